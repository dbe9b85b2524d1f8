"""What the engine knows about each architecture, in one place: one profile per ``config.model_type``.

Every module that treats families differently asks the profile: the memory model (how a block
stores activations), the loss (whether the engine computes it, chunked, and what the model does to
its logits first), Liger (which patch exists), the device plan (attention that SDPA cannot do), the
learning-rate rule (the family's published pretraining values), modelinfo (the family's name) and
the LoRA-target step (fused projections). A new family is added here and nowhere else;
``tests/test_arch.py`` fails when another module names a family that has no profile.

A model type without a profile gets ``UNKNOWN``: transformers' own loss and forward, no Liger, the
RMSNorm block of the memory model, and a note in the estimate saying so.

Every value below was read from transformers 5's modeling file of the family (``XForCausalLM.forward``
and ``XDecoderLayer``); the per-family tests (``tests/test_families.py``) check the loss and packing
against transformers on a tiny random model of each. Importing this module imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Block:
    """How one decoder block stores activations for the backward, beyond its widths (``engine.memory``)."""

    layernorm: bool = False
    """LayerNorm, which autocast runs in fp32 and which returns fp32; bitsandbytes' 4-bit layers then
    return fp32 too (``Linear4bit`` casts its output back to the input's dtype), so the block's
    projections and MLP activations are fp32. RMSNorm returns the input's dtype."""
    norms: int = 2
    """Norms over the hidden width per layer (1 where attention and MLP run in parallel off one norm;
    4 in Gemma 2 and 3: before and after both attention and MLP)."""
    qk_norms: bool = False
    """RMSNorm over the queries and keys (Qwen3, Gemma 3, OLMo 2): an fp32 copy of q and k per layer."""
    act_saves: int = 1
    """Tensors of width I a non-gated MLP's activation saves: 4 for transformers' python
    ``NewGELUActivation`` (``gelu_new``: its input, tanh, 1 + tanh, 0.5 x input), 1 for a fused GELU."""
    dropout_masks: int = 0
    """Residual dropouts of width h active in training (each keeps a 1-byte mask)."""


RMSNORM_BLOCK = Block()
"""Llama, Mistral, Qwen2, Gemma and the like: two RMSNorms, a gated MLP, no dropout."""


@dataclass(frozen=True)
class LogitFix:
    """What a causal-LM forward does to ``lm_head``'s output before the loss, and how the engine's
    loss does the same (``engine.loss``)."""

    softcap_attr: str | None = None
    """Config attribute of a final soft-cap: logits = cap x tanh(logits / cap) (Gemma 2, Gemma 3 text)."""
    scale_attr: str | None = None
    """Config attribute of a constant the logits are multiplied or divided by (Granite, Cohere)."""
    scale_divides: bool = False
    """The logits are divided by the scale (Granite's ``logits_scaling``), not multiplied (Cohere's ``logit_scale``)."""
    scale_on_model: bool = False
    """The forward reads the scale from the model (Cohere copies it there at init), not from its config."""

    def softcap(self, model: Any) -> float | None:
        """The soft-cap this causal-LM ``model``'s config sets (None: none)."""
        value = getattr(model.config, self.softcap_attr, None) if self.softcap_attr else None
        return float(value) if value else None

    def scale(self, model: Any) -> float:
        """The factor the logits of this causal-LM ``model`` (not a peft wrapper) are multiplied by (1.0: none)."""
        holder = model if self.scale_on_model else getattr(model, "config", None)
        value = getattr(holder, self.scale_attr, None) if self.scale_attr else None
        if not value:
            return 1.0
        return 1.0 / float(value) if self.scale_divides else float(value)


@dataclass(frozen=True)
class Profile:
    """One architecture, by ``config.model_type``."""

    model_type: str
    family: str
    """The family's name (the learning-rate table's key; several model types share one)."""
    examples: str
    """Published models of this type, in words."""
    block: Block = RMSNORM_BLOCK
    own_loss: bool = True
    """The engine computes the loss itself (decoder -> the trained positions' hidden states -> head ->
    the fix below -> cross-entropy, a chunk at a time); False keeps transformers' forward."""
    logits: LogitFix = field(default_factory=LogitFix)
    router_aux_loss: bool = False
    """A mixture of experts whose forward adds the router's load-balancing loss when
    ``config.output_router_logits`` is true; the engine's loss is used only when it is false (the
    published configs' default)."""
    liger: bool = False
    """Liger Kernel has a patch for it (``MODEL_TYPE_TO_APPLY_LIGER_FN``) that the engine applies:
    fused norms, rotary embeddings and MLP, and its fused linear cross-entropy at the loss."""
    attention_softcap: bool = False
    """Soft-capped attention scores, which SDPA cannot do: eager attention unless flash-attn is installed."""
    attention: str = "full"
    """``full``; ``sliding``: a sliding window where the config sets ``sliding_window``; ``alternating``:
    local (sliding) and global layers by ``config.layer_types``. The engine's packed kernels honour the
    window each layer passes them (``engine.attention``)."""
    moe: bool = False
    known: bool = True
    """False only for ``UNKNOWN``."""

    def describe(self) -> str:
        """What the engine does with this family, in words (``qlora-wizard inspect``)."""
        if not self.known:
            return "no profile: transformers' own loss, blocks estimated as Llama's"
        parts = [self.family + (f" ({self.examples})" if self.examples else "")]
        if self.own_loss:
            fix = self.logits
            how = (" with the final soft-cap" if fix.softcap_attr else "") + (" with the logit scale" if fix.scale_attr else "")
            parts.append("the engine's chunked loss" + how + (" (transformers' while the router loss is on)"
                                                            if self.router_aux_loss else ""))
        else:
            parts.append("transformers' own loss")
        if self.liger:
            parts.append("Liger patch on CUDA")
        parts.append({"full": "full attention", "sliding": "sliding-window attention where the config sets one",
                      "alternating": "alternating local (sliding-window) and global layers"}[self.attention]
                     + ("; soft-capped scores: eager attention without flash-attn" if self.attention_softcap else ""))
        return "; ".join(parts)

    def uses_own_loss(self, config: Any = None) -> bool:
        """Whether the engine computes this model's loss (for ``config``, where a MoE's router loss is on)."""
        if not self.own_loss:
            return False
        return not (self.router_aux_loss and config is not None and getattr(config, "output_router_logits", False))


UNKNOWN = Profile(model_type="", family="", examples="", own_loss=False, known=False)
"""The conservative profile of a model type this table does not name."""

_GEMMA_SOFTCAP = LogitFix(softcap_attr="final_logit_softcapping")
_GEMMA2_BLOCK = Block(norms=4)
_GEMMA3_BLOCK = Block(norms=4, qk_norms=True)


def _profiles(*items: Profile) -> dict[str, Profile]:
    return {p.model_type: p for p in items}


PROFILES: dict[str, Profile] = _profiles(
    Profile("llama", "llama", "Llama 2, Llama 3.x, SmolLM, TinyLlama", liger=True),
    Profile("mistral", "mistral", "Mistral 7B, Mistral NeMo", attention="sliding", liger=True),
    Profile("ministral", "mistral", "Ministral 8B", attention="alternating"),
    Profile("mixtral", "mixtral", "Mixtral 8x7B, 8x22B", moe=True, router_aux_loss=True, attention="sliding",
            liger=True),
    Profile("qwen2", "qwen2", "Qwen2, Qwen2.5", attention="sliding", liger=True),
    Profile("qwen2_moe", "qwen2", "Qwen1.5-MoE, Qwen2-57B-A14B", moe=True, router_aux_loss=True,
            attention="sliding"),
    Profile("qwen3", "qwen3", "Qwen3 0.6B-32B", block=Block(qk_norms=True), attention="sliding", liger=True),
    Profile("qwen3_moe", "qwen3", "Qwen3-30B-A3B, Qwen3-235B-A22B", block=Block(qk_norms=True), moe=True,
            router_aux_loss=True, attention="sliding", liger=True),
    Profile("gemma", "gemma", "Gemma 2B, 7B", liger=True),
    Profile("gemma2", "gemma2", "Gemma 2 2B-27B", block=_GEMMA2_BLOCK, logits=_GEMMA_SOFTCAP, liger=True,
            attention_softcap=True, attention="alternating"),
    Profile("gemma3_text", "gemma3", "Gemma 3 270M, 1B (text only)", block=_GEMMA3_BLOCK, logits=_GEMMA_SOFTCAP,
            liger=True, attention="alternating"),
    # Gemma3ForConditionalGeneration's forward: no soft-cap (its text config keeps one, unused).
    Profile("gemma3", "gemma3", "Gemma 3 4B-27B (vision and text; trained on text)", block=_GEMMA3_BLOCK,
            liger=True, attention="alternating"),
    Profile("phi3", "phi3", "Phi-3, Phi-3.5, Phi-4 (fused qkv_proj and gate_up_proj)", attention="sliding",
            liger=True),
    Profile("phi", "phi", "phi-2", block=Block(layernorm=True, norms=1, act_saves=4, dropout_masks=2)),
    # OlmoLayerNorm (no weights) and CohereLayerNorm compute in fp32 and return the input's dtype.
    Profile("olmo", "olmo", "OLMo 1B, 7B"),
    Profile("olmo2", "olmo2", "OLMo 2 1B-32B", block=Block(qk_norms=True), liger=True),
    Profile("granite", "granite", "Granite 3.x dense", logits=LogitFix(scale_attr="logits_scaling", scale_divides=True),
            liger=True),
    Profile("granitemoe", "granite", "Granite 3.x MoE", logits=LogitFix(scale_attr="logits_scaling", scale_divides=True),
            moe=True, router_aux_loss=True),
    Profile("cohere", "cohere", "Command R", block=Block(norms=1),
            logits=LogitFix(scale_attr="logit_scale", scale_on_model=True)),
    Profile("stablelm", "stablelm", "StableLM 2", block=Block(layernorm=True)),
    Profile("starcoder2", "starcoder2", "StarCoder2", block=Block(layernorm=True), attention="sliding"),
    # The LayerNorm families below keep transformers' forward (their heads and tied Conv1D layers are
    # not the plain Linear the engine's loss calls); their blocks were read from source, phi-2's
    # measured on an H100 (allocated peak within 2 %).
    # GPT2Block: ln_1 and ln_2, gelu_new, resid_pdrop 0.1 on the attention and the MLP output.
    Profile("gpt2", "gpt2", "GPT-2", block=Block(layernorm=True, norms=2, act_saves=4, dropout_masks=2),
            own_loss=False),
    # GPTJBlock: one ln_1, parallel attention and MLP, gelu_new, pdrops 0.0 in GPT-J-6B.
    Profile("gptj", "gptj", "GPT-J 6B", block=Block(layernorm=True, norms=1, act_saves=4), own_loss=False),
    # FalconDecoderLayer (falcon-7b: parallel_attn, one input_layernorm), nn.GELU, dropouts 0.0.
    Profile("falcon", "falcon", "Falcon 7B, 40B", block=Block(layernorm=True, norms=1), own_loss=False),
)
"""Every architecture the engine treats as its own, by ``config.model_type``."""

LEGACY_MODEL_TYPES = {"refinedwebmodel": "falcon", "refinedweb": "falcon", "gpt-j": "gptj", "gpt_j": "gptj"}
"""``model_type`` strings of old configs that transformers maps onto a profile's type."""

# Layer names by role inside a decoder block, across families: which saved tensors LoRA adds
# (``engine.memory``) and which layers the LoRA-target step offers as "attention" (``tui.steps.targets``).
ATTENTION_QV = ("q_proj", "v_proj")
"""The original LoRA paper's choice (Hu et al. 2021, section 7.1): query and value projections."""
FUSED_QKV = ("query_key_value", "qkv_proj", "c_attn", "Wqkv", "W_pack")
"""Fused query/key/value projections (Falcon/GPT-NeoX, Phi-3, GPT-2, MPT, Baichuan): the closest a
model that has them gets to "q and v"."""
LAYER_ROLES: dict[str, frozenset[str]] = {
    "attn_in": frozenset({"q_proj", "k_proj", "v_proj", "query", "key", "value", "q", "k", "v", *FUSED_QKV}),
    "attn_out": frozenset({"o_proj", "out_proj", "dense", "wo"}),
    "mlp_in": frozenset({"gate_proj", "up_proj", "gate_up_proj", "fc1", "fc_in", "c_fc", "w1", "w3",
                         "dense_h_to_4h"}),
    "mlp_out": frozenset({"down_proj", "fc2", "fc_out", "w2", "dense_4h_to_h"}),
}
"""Which input a layer reads inside a block. Names that are not here are counted conservatively."""


def profile(model_type: str | None) -> Profile:
    """The profile of ``model_type`` (``UNKNOWN`` for one without)."""
    key = (model_type or "").strip().lower()
    key = LEGACY_MODEL_TYPES.get(key, key)
    return PROFILES.get(key, UNKNOWN)


def family(model_type: str | None) -> str:
    """The family's name for this model type (the type itself where there is no profile)."""
    p = profile(model_type)
    return p.family if p.known else (model_type or "").strip().lower()


def own_loss_applies(model_type: str | None) -> bool:
    """Whether the engine computes this architecture's loss itself (the memory estimate then counts
    one chunk's logits instead of the whole micro batch's)."""
    return profile(model_type).uses_own_loss()


def unknown_note(model_type: str | None) -> str | None:
    """What the estimate says of a model type without a profile (None where there is one)."""
    if profile(model_type).known:
        return None
    return (f"{model_type or 'this model'}: an architecture the engine has no profile for (engine/arch.py), so it "
            "keeps transformers' own loss (every position's logits) and its blocks are estimated as "
            "Llama's; treat the total as approximate")
