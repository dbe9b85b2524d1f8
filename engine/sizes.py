"""The largest model that fits: reference architectures of known sizes, estimated at the same settings.

"Would a 70B fit on my two cards?" is answered here without reading any model: the Llama-3
family's published shapes (Meta's ``config.json`` of each) are turned into the same
:class:`~engine.modelinfo.ModelInfo` that ``inspect_model`` reads from a config, by arithmetic
alone, and each is estimated per GPU (``engine.memory``) with the person's LoRA, batch and
sequence settings, for each strategy. Llama-3 shapes stand for their size class: other families of
the same parameter count differ mostly in vocabulary (the embeddings, head and loss) and the MLP's
width, so "Llama-3.1-70B-class" is a size, not a promise about another 70B.

No torch, no network: pure functions, fast enough to run on every keystroke of the memory step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from engine.memory import STRATEGIES, MemorySettings, estimate_training_memory
from engine.modelinfo import ModelInfo, TargetLayer

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The Linear layers of a Llama decoder block, in model order (all of them are LoRA targets)."""


@dataclass(frozen=True)
class ReferenceModel:
    """One published architecture, as its ``config.json`` gives it."""

    name: str
    """The model's name, e.g. ``Llama-3.1-8B``."""
    hub_id: str
    """Its Hugging Face id."""
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    context_length: int = 131072
    """``max_position_embeddings`` (128k for every Llama-3.1 and 3.2 model)."""

    @property
    def size_class(self) -> str:
        """How the model is named as a size: ``Llama-3.1-8B-class``."""
        return f"{self.name}-class"

    @property
    def info(self) -> ModelInfo:
        """The model's facts, as ``engine.modelinfo.inspect_model`` reads them from its config."""
        return reference_info(self)


# Each row is the model's config.json on the Hugging Face Hub (meta-llama/<name>); the parameter
# counts the test checks are the Hub's safetensors totals (Llama-3.1-8B and 3.2-1B are also in
# tests/fixtures/hf-configs and checked against inspect_model).
REFERENCE_MODELS: tuple[ReferenceModel, ...] = (
    # 1,235,814,400 parameters
    ReferenceModel("Llama-3.2-1B", "meta-llama/Llama-3.2-1B", 2048, 16, 32, 8, 8192, 128256, True),
    # 3,212,749,824 parameters
    ReferenceModel("Llama-3.2-3B", "meta-llama/Llama-3.2-3B", 3072, 28, 24, 8, 8192, 128256, True),
    # 8,030,261,248 parameters
    ReferenceModel("Llama-3.1-8B", "meta-llama/Llama-3.1-8B", 4096, 32, 32, 8, 14336, 128256, False),
    # 70,553,706,496 parameters
    ReferenceModel("Llama-3.1-70B", "meta-llama/Llama-3.1-70B", 8192, 80, 64, 8, 28672, 128256, False),
    # 405,853,388,800 parameters
    ReferenceModel("Llama-3.1-405B", "meta-llama/Llama-3.1-405B", 16384, 126, 128, 8, 53248, 128256, False),
)
"""Reference architectures, smallest first."""


def reference_info(ref: ReferenceModel) -> ModelInfo:
    """A Llama decoder's facts from its shape: per block q/k/v/o and the gated MLP (no biases) and
    two RMSNorms; token embeddings, a final norm and an untied head unless tied. Counted as
    ``inspect_model`` counts (tied embeddings once, buffers not at all)."""
    h, L = ref.hidden_size, ref.num_hidden_layers
    head_dim = h // ref.num_attention_heads
    q, kv, inter = ref.num_attention_heads * head_dim, ref.num_key_value_heads * head_dim, ref.intermediate_size
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    targets = tuple(TargetLayer(name, i, o, L, False) for name, (i, o) in shapes.items())
    quantizable = sum(t.weight_params for t in targets)
    embedding = ref.vocab_size * h
    head = 0 if ref.tie_word_embeddings else ref.vocab_size * h
    blocks = quantizable + 2 * h * L  # + input_layernorm and post_attention_layernorm
    total = embedding + head + blocks + h  # + the final norm
    return ModelInfo(
        source=ref.hub_id, model_type="llama", architecture="LlamaForCausalLM", hidden_size=h,
        num_hidden_layers=L, num_attention_heads=ref.num_attention_heads,
        num_key_value_heads=ref.num_key_value_heads, intermediate_size=inter, vocab_size=ref.vocab_size,
        context_length=ref.context_length, tie_word_embeddings=ref.tie_word_embeddings, dtype="bfloat16",
        params_total=total, params_embedding=embedding, params_head=head, params_blocks=blocks,
        params_quantizable=quantizable, params_other=total - embedding - head - quantizable,
        targets=targets, default_targets=LLAMA_TARGETS, weight_bytes=2 * total, weight_bytes_source="estimate",
        is_moe=False, family="llama",
    )


@dataclass(frozen=True)
class LargestFit:
    """The largest reference model one strategy fits per GPU."""

    strategy: str
    """``single``, ``ddp`` or ``fsdp``."""
    world_size: int
    """GPUs it was estimated on (1 for ``single``)."""
    model: ReferenceModel | None
    """The largest that fits; None when even the smallest does not."""
    total_bytes: int | None
    """Its per-GPU estimate; None with no model."""

    def to_json(self) -> dict:
        """A JSON-ready dict (``estimate --json``'s ``largest_reference``)."""
        return {"strategy": self.strategy, "world_size": self.world_size,
                "model": self.model.name if self.model else None, "total_bytes": self.total_bytes}


def reference_settings(settings: MemorySettings, info: ModelInfo, strategy: str, world_size: int) -> MemorySettings:
    """``settings`` for a reference model: the same LoRA, batch, sequence and kernel choices, its
    targets when the reference has them all (else all its linear layers), and the strategy."""
    names = {t.name for t in info.targets}
    targets = settings.lora_targets if settings.lora_targets and set(settings.lora_targets) <= names else ()
    if strategy == "fsdp":  # as engine.plan runs it: transformers' loss, no Liger, under FSDP
        settings = replace(settings, loss_chunk=None, liger=False)
    return replace(settings, lora_targets=targets, strategy=strategy,
                   world_size=1 if strategy == "single" else world_size)


def largest_fitting(settings: MemorySettings, budget_bytes: int, world_size: int,
                    strategies: tuple[str, ...] = STRATEGIES,
                    references: tuple[ReferenceModel, ...] = REFERENCE_MODELS) -> dict[str, LargestFit]:
    """Per strategy, the largest reference model whose per-GPU estimate fits ``budget_bytes`` on
    ``world_size`` GPUs. ``single`` is always on one GPU; ``ddp`` and ``fsdp`` are left out when
    ``world_size`` is 1 (they would be ``single``)."""
    out: dict[str, LargestFit] = {}
    for strategy in strategies:
        if strategy != "single" and world_size < 2:
            continue
        best = LargestFit(strategy, 1 if strategy == "single" else world_size, None, None)
        for ref in references:
            info = ref.info
            total = estimate_training_memory(info, reference_settings(settings, info, strategy, world_size)).total_bytes
            if total <= budget_bytes and (best.model is None or info.params_total > best.model.info.params_total):
                best = replace(best, model=ref, total_bytes=total)
        out[strategy] = best
    return out


def largest_words(fits: dict[str, LargestFit], world_size: int, budget_words: str) -> str:
    """``the largest reference model that fits on 2 x 80 GiB: single: Llama-3.1-8B-class, ddp: ...``."""
    gpus = budget_words if world_size == 1 else f"{world_size} x {budget_words}"
    said = ", ".join(f"{s}: {f.model.size_class if f.model else 'none of them'}" for s, f in fits.items())
    return (f"the largest reference model that fits on {gpus}: {said} "
            "(Llama-3 shapes at these LoRA, batch and sequence settings)")
