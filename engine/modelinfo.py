"""What is this model: facts read from its config, without downloading any weights.

The data classes here are the contract that the memory model, the wizard and the command line
read. ``inspect_model`` fills them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class TargetLayer:
    """One LoRA-targetable layer name inside the transformer blocks (e.g. ``q_proj``)."""

    name: str
    """The module's own name, the last part of its dotted path (what peft's ``target_modules`` takes)."""
    in_features: int
    """Input width of one such module."""
    out_features: int
    """Output width of one such module."""
    count: int
    """How many modules of this name the model has (usually one per layer)."""
    bias: bool
    """Whether the module has a bias (kept unquantized)."""
    kind: str = "linear"
    """``linear`` for ``torch.nn.Linear``, ``conv1d`` for transformers' ``Conv1D`` (GPT-2)."""

    @property
    def weight_params(self) -> int:
        """Weight parameters over all modules of this name (without biases)."""
        return self.in_features * self.out_features * self.count

    def lora_params(self, rank: int) -> int:
        """LoRA parameters over all modules of this name: r x (in + out) per module."""
        return rank * (self.in_features + self.out_features) * self.count


@dataclass(frozen=True)
class ModelInfo:
    """Everything the planner needs to know about a model, read from its config alone."""

    source: str
    """What the person typed: a local directory, a config.json path or a Hub id."""
    model_type: str
    """``config.model_type``, e.g. ``llama``."""
    architecture: str
    """The class that would be built, e.g. ``LlamaForCausalLM``."""
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    context_length: int
    """``max_position_embeddings`` (or the model's equivalent)."""
    tie_word_embeddings: bool
    dtype: str
    """The checkpoint's dtype as written in the config (``bfloat16``, ``float16``, ``float32``)."""
    params_total: int
    """All parameters, tied embeddings counted once (what the Hub lists)."""
    params_embedding: int
    """Input embedding parameters (token embeddings, plus learned position embeddings if any)."""
    params_head: int
    """Output head parameters not shared with the embeddings (0 when tied)."""
    params_blocks: int
    """Parameters inside the transformer blocks."""
    params_quantizable: int
    """Weights that bitsandbytes quantizes to 4 bit: the Linear/Conv1D weights inside the blocks
    (biases, norms, embeddings and the head stay in the load dtype)."""
    params_other: int
    """Everything else: final norm, biases, norms inside blocks, fused expert tensors that are not
    Linear modules; kept in the load dtype."""
    targets: tuple[TargetLayer, ...]
    """Every LoRA-targetable layer name inside the blocks, in model order."""
    default_targets: tuple[str, ...]
    """A sensible default: all block linears, never ``lm_head``."""
    weight_bytes: int | None
    """Bytes of the weights on disk (safetensors/bin index or files); None when unknown."""
    weight_bytes_source: str
    """Where ``weight_bytes`` came from: ``index``, ``files`` or ``estimate`` (params x dtype size)."""
    is_moe: bool
    """Mixture of experts."""
    num_experts: int = 0
    notes: tuple[str, ...] = field(default_factory=tuple)
    """Things a person should know (e.g. expert weights are fused parameters, not LoRA targets)."""
    family: str | None = None
    """Model family for the learning-rate table (``llama``, ``mistral``, ``qwen2`` ...)."""

    @property
    def lora_target_candidates(self) -> list[str]:
        """The targetable layer names, in model order."""
        return [t.name for t in self.targets]

    def target(self, name: str) -> TargetLayer:
        """The layer called ``name``; KeyError if the model has none."""
        for t in self.targets:
            if t.name == name:
                return t
        raise KeyError(name)

    def to_json(self) -> dict:
        """The stable JSON form printed by ``qlora-wizard inspect --json``."""
        d = asdict(self)
        d["targets"] = [asdict(t) for t in self.targets]
        d["lora_target_candidates"] = self.lora_target_candidates
        d["default_targets"] = list(self.default_targets)
        d["notes"] = list(self.notes)
        return d
