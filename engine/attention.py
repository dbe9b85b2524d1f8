"""Attention for packed rows: each example attends only to itself, and no dense mask is ever built.

A packed micro batch is one row holding several examples, positions restarting at each. With
``attn_implementation="sdpa"`` transformers turns that into a dense (tokens x tokens) block-causal
mask: attention then costs (sum of lengths)^2 instead of the sum of squares, SDPA's flash kernel
refuses the mask (the slower masked kernels run instead), and every layer saves the mask. The
engine never lets that happen; it picks, per machine, the fastest exact kernel it has:

* ``flash_attention_2``: flash-attn's varlen kernel (the ``flash`` extra), fed the example
  boundaries by ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``;
* ``VARLEN_TORCH``: PyTorch's own varlen flash kernel (``torch.nn.attention.varlen``, CUDA, compute
  capability 8.0+, in the torch versions whose ``varlen_attn`` takes grouped k/v heads), checked
  against per-example SDPA on the device when a run starts (``probe_varlen``);
* ``PACKED_SDPA``: SDPA run once per example with ``is_causal`` and no mask (its flash kernel on a
  GPU, grouped k/v heads as they are), everywhere else, the CPU included.

Both engine kernels are registered with transformers' ``AttentionInterface`` under their names, so
a model loads with them like with any built-in kernel. The example boundaries travel as Python ints
(``PACKED_BOUNDS_KEY``, added by the engine's collator) so no kernel reads them back from the GPU.
"""

from __future__ import annotations

import functools

PACKED_SDPA = "sdpa_packed"
"""SDPA once per example of a packed row (registered with transformers under this name)."""

VARLEN_TORCH = "varlen_torch"
"""PyTorch's varlen flash-attention kernel over a packed row (registered under this name)."""

PACKED_KERNELS = (PACKED_SDPA, VARLEN_TORCH)
"""The engine's own kernels for packed rows."""

PACKED_BOUNDS_KEY = "packed_bounds"
"""The batch key (a tuple of ints: 0, end of example 1, ..., total) the engine's collator adds for
``PACKED_SDPA``; it reaches the attention function as a keyword through the model's forward."""

KERNEL_WORDS = {
    "flash_attention_2": "flash-attn 2 varlen (packed rows, no mask)",
    VARLEN_TORCH: "PyTorch varlen flash attention (packed rows, no mask)",
    PACKED_SDPA: "SDPA per example (packed rows, no mask)",
    "sdpa": "SDPA",
    "eager": "eager attention (materializes seq x seq scores)",
}
"""What each kernel is, in words, for the memory step and the run screen."""


def describe_kernel(name: str | None) -> str:
    """A kernel's name in words (the name itself for one this table does not know)."""
    return KERNEL_WORDS.get(name or "", name or "unknown")


def _bounds(kwargs: dict, query) -> list[int] | None:
    """The example boundaries of a packed row as ints: from the collator's ints, else from
    ``cu_seq_lens_q``, else from where the position ids restart (read-backs from the device, which
    the engine's collator avoids; the last is for families whose decoder layers pass the attention
    only its position ids, StableLM's)."""
    bounds = kwargs.get(PACKED_BOUNDS_KEY)
    if bounds is not None:
        return list(bounds)
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        return cu.tolist()
    pos = kwargs.get("position_ids")
    if pos is None or pos.dim() != 2 or pos.shape[0] != 1 or pos.shape[1] != query.shape[2]:
        return None
    starts = (pos[0] == 0).nonzero().squeeze(1).tolist()
    if not starts or starts[0] != 0 or len(starts) == 1:
        return None  # one example (or positions that do not start at 0): plain causal attention
    return starts + [pos.shape[1]]


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                          **kwargs):
    """SDPA over a packed row one example at a time, causal within each (what flash-attn's varlen
    kernel computes). Anything else (a padding mask, no boundaries, several rows) is plain SDPA."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = _bounds(kwargs, query)
    if bounds is None or attention_mask is not None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal)
    window = kwargs.get("sliding_window")
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b <= a:
            continue
        mask = None
        if window and b - a > window:  # Mistral-style sliding window: each token sees the last `window`
            pos = torch.arange(b - a, device=query.device)
            distance = pos[:, None] - pos[None, :]
            mask = (distance >= 0) & (distance < window)
        outs.append(sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], mask,
                                           dropout=dropout, scaling=scaling, is_causal=mask is None)[0])
    return torch.cat(outs, dim=1), None


@functools.lru_cache(maxsize=1)
def _varlen_function():
    """PyTorch's ``varlen_attn`` and how to ask it for causal attention, or None where this torch
    has no varlen kernel that takes grouped k/v heads."""
    try:
        import inspect

        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "enable_gqa" not in params:
        return None
    if "window_size" in params:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        return None
    return varlen_attn, causal


def varlen_torch_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                           **kwargs):
    """PyTorch's varlen flash attention over a packed row (query/key/value: 1 x heads x tokens x dim)."""
    fn = _varlen_function()
    cu = kwargs.get("cu_seq_lens_q")
    if fn is None or cu is None or attention_mask is not None or query.shape[0] != 1 or dropout:
        return packed_sdpa_attention(module, query, key, value, attention_mask, dropout=dropout,
                                     scaling=scaling, is_causal=is_causal, **kwargs)
    varlen_attn, causal = fn
    window = kwargs.get("sliding_window")
    if window:
        if "window_size" not in causal:  # this torch's kernel takes no window: per example instead
            return packed_sdpa_attention(module, query, key, value, attention_mask, dropout=dropout,
                                         scaling=scaling, is_causal=is_causal, **kwargs)
        causal = {"window_size": (window - 1, 0)}
    max_len = kwargs.get("max_length_q")
    if max_len is None:
        max_len = int((cu[1:] - cu[:-1]).max())
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # tokens x heads x dim
    out = varlen_attn(q, k, v, cu.int(), cu.int(), int(max_len), int(max_len), scale=scaling,
                      enable_gqa=k.shape[1] != q.shape[1], **causal)
    return out.unsqueeze(0), None  # 1 x tokens x heads x dim, as transformers' kernels return


def register_kernels() -> None:
    """Make the engine's kernels loadable by name (``attn_implementation=PACKED_SDPA``)."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    AttentionInterface.register(VARLEN_TORCH, varlen_torch_attention)


def torch_varlen_supported(compute_capability: tuple[int, int] | None) -> bool:
    """Whether this torch has a varlen kernel the engine can use on a GPU of this capability
    (flash kernels need Ampere, 8.0, or newer). Where torch is not imported yet (the wizard's
    planning, on the UI thread) its source is read instead of importing it; a run checks the
    kernel itself on the GPU (``probe_varlen``)."""
    if compute_capability is None or tuple(compute_capability) < (8, 0):
        return False
    import sys

    if "torch" in sys.modules:
        return _varlen_function() is not None
    return _varlen_source_takes_gqa()


@functools.lru_cache(maxsize=1)
def _varlen_source_takes_gqa() -> bool:
    """Whether the installed torch's ``varlen_attn`` takes ``enable_gqa``, read from its source file."""
    import importlib.util
    from pathlib import Path

    try:
        spec = importlib.util.find_spec("torch")
        text = (Path(spec.origin).parent / "nn" / "attention" / "varlen.py").read_text(encoding="utf-8")
    except (AttributeError, ImportError, OSError, TypeError, ValueError):
        return False
    start = text.find("def varlen_attn(")
    return start >= 0 and "enable_gqa" in text[start:text.find("->", start)]


def probe_varlen(dtype_name: str = "bfloat16") -> str | None:
    """Run PyTorch's varlen kernel on the GPU once, forward and backward, against per-example SDPA
    on a small packed row with grouped heads; None when they agree, else why it cannot be used."""
    try:
        import torch

        torch.manual_seed(0)
        dtype = getattr(torch, dtype_name)
        heads, kv_heads, dim, lengths = 4, 2, 64, (5, 17, 42)
        total = sum(lengths)
        q = torch.randn(1, heads, total, dim, device="cuda", dtype=dtype, requires_grad=True)
        k = torch.randn(1, kv_heads, total, dim, device="cuda", dtype=dtype, requires_grad=True)
        v = torch.randn(1, kv_heads, total, dim, device="cuda", dtype=dtype, requires_grad=True)
        cu = torch.tensor([0, 5, 22, total], device="cuda", dtype=torch.int32)

        class _Module:
            num_key_value_groups = heads // kv_heads
            is_causal = True

        a, _ = varlen_torch_attention(_Module, q, k, v, None, cu_seq_lens_q=cu, max_length_q=max(lengths))
        grads_a = torch.autograd.grad(a.float().square().sum(), (q, k, v))
        b, _ = packed_sdpa_attention(_Module, q, k, v, None, **{PACKED_BOUNDS_KEY: (0, 5, 22, total)})
        grads_b = torch.autograd.grad(b.float().square().sum(), (q, k, v))
        tol = 3e-2 if dtype != torch.float32 else 1e-4
        for x, y in zip((a, *grads_a), (b, *grads_b)):
            if not torch.allclose(x.float(), y.float(), atol=tol, rtol=tol):
                return f"its result differs from per-example SDPA by {float((x.float() - y.float()).abs().max()):.3g}"
        return None
    except Exception as exc:  # an older driver, a kernel not built for this GPU: fall back, say why
        from engine.errors import first_line

        return f"{type(exc).__name__}: {first_line(exc, 160)}"


def add_packed_bounds(batch: dict) -> dict:
    """Add the example boundaries of a packed batch as ints, from the collator's ``cu_seq_lens_q``
    while it is still on the host."""
    cu = batch.get("cu_seq_lens_q")
    if cu is not None:
        batch[PACKED_BOUNDS_KEY] = tuple(int(x) for x in cu.tolist())
    return batch
