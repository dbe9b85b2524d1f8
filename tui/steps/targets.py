"""The LoRA targets step: which of the model's layers get adapters (the shortcuts query and value,
all attention, all linear; or picked by name), their rank, alpha and dropout, and what they cost:
the trainable parameters, their share of the model and the memory they add.

The layer list (``lora.targets``) is the step's own widget; the form is rank, alpha and dropout. It
needs the model's config.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.arch import ATTENTION_QV, FUSED_QKV
from tui.draft import Draft
from tui.steps.base import FormField, Step
from tui.steps.memory import draft_estimate

SHORTCUTS = (("qv", "q + v"), ("attention", "attention"), ("all", "all linear"))
"""The LoRA target shortcuts both front ends offer: (key in :func:`target_shortcuts`, label)."""


def target_shortcuts(info) -> dict[str, list[str]]:
    """The layer sets the targets step offers: ``qv`` (query and value), ``attention``, ``all``."""
    from engine.memory import layer_role

    names = info.lora_target_candidates
    qv = [n for n in names if n in ATTENTION_QV] or [n for n in names if n in FUSED_QKV]
    attention = [n for n in names if (layer_role(n) or "").startswith("attn")]
    return {"qv": qv or list(names[:1]), "attention": attention or qv or list(names[:1]),
            "all": list(info.default_targets)}


def targets_value(info, selected: list[str]) -> str | list[str]:
    """The preset's ``lora.targets`` for a selection: ``all-linear`` when it is exactly the default set."""
    ordered = [n for n in info.lora_target_candidates if n in selected]
    return "all-linear" if set(ordered) == set(info.default_targets) else ordered


def selected_targets(draft: Draft) -> list[str]:
    """The layer names the draft adapts, in model order."""
    from engine.plan import resolve_targets

    return list(resolve_targets(draft.preset, draft.info))


@dataclass(frozen=True)
class LoraView:
    """The trainable parameters of a LoRA setup and the memory they add."""

    trainable: int
    """LoRA parameters over every adapted module."""
    share: float
    """``trainable`` as a share of the model's parameters."""
    memory_bytes: int
    """Adapter weights, their gradients and the optimizer states."""


def lora_view(draft: Draft) -> LoraView:
    """The draft's adapters: how many parameters they train and what they hold in memory."""
    _, est = draft_estimate(draft)
    c = est.components
    added = c["lora_weights"] + c["lora_gradients"] + c["optimizer_states"]
    return LoraView(est.lora_params, est.lora_params / max(1, draft.info.params_total), added)


LORA_FORM: tuple[FormField, ...] = (
    FormField("rank r", "lora.r", "int"),
    FormField("alpha", "lora.alpha", "float"),
    FormField("dropout", "lora.dropout", "float"),
)
"""The adapters' size, in order."""

STEP = Step("targets", "LoRA targets", LORA_FORM, needs="model")
"""The LoRA targets step."""
