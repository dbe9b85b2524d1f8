"""The training loss, computed where it is needed and a chunk at a time.

transformers' causal-LM forward applies ``lm_head`` to every position and the loss keeps the logits
in fp32 for the backward: 12 bytes per token per vocabulary entry (measured to 0.1 %,
``benchmarks/RESULTS.md``, "Chunked cross-entropy"), 1.5 MiB per token with Llama-3's 128,256
entries: 11.7 GiB for one 8,192-token micro batch, more than a 1B model's whole training otherwise.

Here the decoder runs alone, and the head and the cross-entropy see only the positions whose next
token is trained (a prompt-masked example's prompt needs no logits), ``LOSS_CHUNK_TOKENS`` at a
time. Each chunk runs under activation checkpointing: its logits are freed after its forward and
recomputed in the backward, so the loss's peak is 12 x min(trained positions, chunk) x vocabulary.
The sum is the one transformers computes (cross-entropy of the shifted labels, divided by the
Trainer's count of trained tokens across the accumulated micro batches, or their mean); only the
order of the additions differs.

Used for the architectures whose profile says so (``engine.arch``: ``Profile.own_loss``), whose
causal-LM forward is decoder -> ``lm_head`` -> (a soft-cap or a constant scale of the logits, which
the loss applies to each chunk as the forward does) -> that loss; any other model keeps its own
forward. Importing this module does not import torch.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

LOSS_CHUNK_TOKENS = 1024
"""Positions whose logits exist at once. 1,024 keeps the loss of a 128k-vocabulary model at
1.5 GiB whatever the micro batch; smaller chunks save little more and cost more time (measured:
256 saves another 1.1 GiB at 8,192 tokens for 1.05-1.2x the head's time on the CPU)."""

LOSS_CHUNK_LOGITS = LOSS_CHUNK_TOKENS * 152_064
"""Logits that exist at once: 1,024 positions of Qwen2's 152,064-entry vocabulary (1.74 GiB at 12
bytes each). A larger vocabulary gets fewer positions per chunk (``loss_chunk_tokens``): Gemma 3's
262,144 entries 576 positions, 1.7 GiB, instead of 3.0 GiB for 1,024."""


def loss_chunk_tokens(vocab_size: int | None) -> int:
    """Positions per chunk of the engine's loss for this vocabulary: ``LOSS_CHUNK_TOKENS``, fewer
    (a multiple of 64) where that many positions would hold more than ``LOSS_CHUNK_LOGITS`` logits."""
    if not vocab_size or vocab_size <= 0:
        return LOSS_CHUNK_TOKENS
    return max(64, min(LOSS_CHUNK_TOKENS, LOSS_CHUNK_LOGITS // vocab_size // 64 * 64))

IGNORE_INDEX = -100


def chunked_loss_applies(model_type: str | None) -> bool:
    """Whether the engine computes this architecture's loss itself (and the memory estimate
    counts one chunk's logits instead of the whole micro batch's): its profile says so."""
    from engine.arch import own_loss_applies

    return own_loss_applies(model_type)


@dataclass(frozen=True)
class LogitTransform:
    """What the model's forward does to the head's output before its loss: logits x ``scale``, then
    ``softcap`` x tanh(logits / ``softcap``) where set. The identity where neither is."""

    softcap: float | None = None
    scale: float = 1.0

    def __call__(self, logits):
        import torch

        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def logit_transform(model) -> LogitTransform:
    """The logit transform of a causal LM (through a peft wrapper), from its profile and config."""
    from engine.arch import profile

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    fix = profile(getattr(base.config, "model_type", None)).logits
    return LogitTransform(softcap=fix.softcap(base), scale=fix.scale(base))


def _shifted(labels, shift_labels):
    """The labels of each position's next token, flat (-100 where nothing is trained)."""
    import torch.nn.functional as F

    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    return shift_labels.reshape(-1)


def trained_positions(labels=None, shift_labels=None):
    """Flat indices of the positions whose next token is trained; computed by the engine's collator
    on the host, where finding them costs no read-back from the GPU. None without labels."""
    if labels is None and shift_labels is None:
        return None
    return _shifted(labels, shift_labels).ne(IGNORE_INDEX).nonzero().squeeze(1)


def causal_lm_loss(hidden, head, labels=None, *, shift_labels=None, num_items_in_batch=None,
                   chunk: int = LOSS_CHUNK_TOKENS, positions=None, fused: bool = False,
                   transform: LogitTransform | None = None):
    """The causal-LM loss of ``hidden`` (batch x positions x hidden size) through ``head``.

    ``labels`` are the input ids with ``-100`` where nothing is trained (shifted here, as
    transformers does), or ``shift_labels`` already shifted. ``num_items_in_batch``: the sum is
    divided by it (the Trainer's count over the accumulated micro batches); without it, the mean.
    ``positions``: the trained positions (``trained_positions``), found from the labels when not
    given. ``fused``: Liger's fused linear cross-entropy instead of chunks (CUDA, ``engine.kernels``).
    ``transform``: what the model's forward does to its logits (``logit_transform``); none when not given.
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    targets = _shifted(labels, shift_labels).to(hidden.device)
    if positions is None:
        keep = targets.ne(IGNORE_INDEX).nonzero().squeeze(1)
    else:
        keep = positions.to(hidden.device)
    transform = transform or LogitTransform()
    flat = hidden.reshape(-1, hidden.shape[-1])
    if keep.numel() == 0:
        total = flat.sum() * 0.0  # nothing trained in this micro batch; keeps the graph connected
    elif fused:
        from engine.kernels import fused_linear_loss

        picked = flat.index_select(0, keep)
        if transform.scale != 1.0:  # head(h) x s = head(h x s): the head has no bias where a scale is set
            picked = picked * transform.scale
        total = fused_linear_loss(picked, head, targets.index_select(0, keep), softcap=transform.softcap)
    else:
        picked = flat.index_select(0, keep)
        picked_targets = targets.index_select(0, keep)
        many = picked.shape[0] > chunk and torch.is_grad_enabled()
        total = None
        for start in range(0, picked.shape[0], chunk):
            h, t = picked[start:start + chunk], picked_targets[start:start + chunk]
            part = (checkpoint(_chunk_loss, head, h, t, transform, use_reentrant=False) if many
                    else _chunk_loss(head, h, t, transform))
            total = part if total is None else total + part
    if num_items_in_batch is None:
        return total / max(1, keep.numel())
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _chunk_loss(head, hidden, targets, transform: LogitTransform):
    """Summed cross-entropy of one chunk, its logits transformed as the model's forward does (in the
    compute dtype, as there) and upcast to fp32 as transformers' loss does."""
    import torch.nn.functional as F

    return F.cross_entropy(transform(head(hidden)).float(), targets, reduction="sum")


def decoder_and_head(model):
    """The decoder (its output: the final hidden states) and the output head of a causal LM,
    through a peft wrapper if there is one; (None, None) when the engine does not compute its loss
    (its profile, ``engine.arch``, says so, or a mixture of experts has its router loss on)."""
    from engine.arch import profile

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if not profile(getattr(config, "model_type", None)).uses_own_loss(config):
        return None, None
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    if decoder is None or head is None or decoder is base:
        return None, None
    return decoder, head


@contextmanager
def head_passes_hidden_states(head, model=None):
    """While inside, the output head returns its input: a causal LM's own forward then gives its
    final hidden states as ``logits`` and the loss applies the head itself, a chunk at a time.
    ``model`` (the causal LM, unwrapped): its forward's soft-cap and logit scale are switched off
    too, so the hidden states come through untouched (the loss applies them, ``logit_transform``).

    For a model wrapped by DDP or FSDP, whose forward must run (DDP's prepares the gradients'
    all-reduce; FSDP's gathers the sharded weights; a decoder called around either trains each rank
    on its own share, unsynchronised, or on shards)."""
    had = "forward" in head.__dict__  # a hook (accelerate's) may have replaced it on the instance
    old = head.__dict__.get("forward")
    head.forward = _identity
    restore = _logits_untouched(model) if model is not None else []
    try:
        yield head
    finally:
        for holder, name, value in restore:
            setattr(holder, name, value)
        if had:
            head.forward = old
        else:
            del head.forward


def _logits_untouched(model) -> list:
    """Switch off the forward's soft-cap and logit scale on ``model``; what to set back, as
    (object, attribute, value) triples."""
    from engine.arch import profile

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    fix = profile(getattr(base.config, "model_type", None)).logits
    restore = []
    if fix.softcap_attr and getattr(base.config, fix.softcap_attr, None) is not None:
        restore.append((base.config, fix.softcap_attr, getattr(base.config, fix.softcap_attr)))
        setattr(base.config, fix.softcap_attr, None)
    if fix.scale_attr:
        holder = base if fix.scale_on_model else base.config
        if getattr(holder, fix.scale_attr, None) is not None:
            restore.append((holder, fix.scale_attr, getattr(holder, fix.scale_attr)))
            setattr(holder, fix.scale_attr, 1.0)
    return restore


def _identity(hidden):
    return hidden
