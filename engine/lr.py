"""A learning rate worked out from the data: the guide's square-root rule, with its arithmetic shown.

    lr = base_lr x sqrt(supervised_tokens_in_batch / pretrained_batch_tokens)
    supervised_tokens_in_batch = supervised_tokens / (num_steps / num_epochs)

``base_lr`` is the pretrained model's peak learning rate and ``pretrained_batch_tokens`` its
pretraining batch in tokens: a fine-tuning batch with fewer tokens than the pretraining batch gets
a proportionally noisier gradient, so the rate shrinks with the square root of the ratio. The rule
comes from full fine-tuning; LoRA adapters usually train at higher rates, so the result is shown
with its arithmetic and a note, and the person decides. LLaMA-Factory ships the same rule as a
script (base 3e-4, reference batch 4M tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from engine.errors import UserError

RULE_FORMULA = "lr = base_lr x sqrt(supervised_tokens / (steps / epochs) / pretrain_batch)"
"""The rule as every front end shows it above its arithmetic (80 columns wide with the screen's margin;
``pretrain_batch`` is the pretraining batch in tokens)."""

LORA_LR_BAND = (1e-5, 5e-4)
"""Learning rates LoRA runs usually use. QLoRA (Dettmers et al. 2023, Guanaco hyperparameters)
trained at 2e-4 for 7B/13B and 1e-4 for 33B/65B; peft and trl examples sit between 1e-5 and 5e-4."""


@dataclass(frozen=True)
class LrSuggestion:
    """The rule's learning rate and how it was computed."""

    learning_rate: float
    """The suggested peak learning rate."""
    arithmetic: str
    """The formula with the numbers filled in, e.g. ``5e-05 x sqrt(2,000,000 / (350 / 1) / 4,000,000) = 1.89e-06``."""
    tokens_per_step: float
    """Supervised tokens per optimizer step: supervised_tokens / (num_steps / num_epochs)."""

    def to_json(self) -> dict:
        """A JSON-ready dict."""
        return {"learning_rate": self.learning_rate, "arithmetic": self.arithmetic,
                "tokens_per_step": self.tokens_per_step}


@dataclass(frozen=True)
class FamilyDefaults:
    """A model family's published pretraining learning rate and batch, with where they come from."""

    base_lr: float
    """Peak learning rate of pretraining."""
    pretrained_batch_tokens: int | None
    """Pretraining batch in tokens; None where no single value is published (the caller asks)."""
    source: str
    """The citation, in words a person can check."""


# Only values a public paper (or the guide itself) states. Qwen2.5, Gemma and Mixtral publish no
# per-model peak learning rate and batch, so they are left out: the caller asks the person.
_LLAMA_ROWS: tuple[tuple[float, FamilyDefaults], ...] = (
    (20e9, FamilyDefaults(
        3e-4, 4_000_000,
        "Llama 2 paper (Touvron et al. 2023), Table 1: peak lr 3.0e-4 for 7B and 13B, global batch 4M tokens "
        "(also the guide's Llama values); the Llama 3 paper (Dubey et al. 2024), Table 3, gives 3e-4 for 8B too "
        "but no batch size for it",
    )),
    (100e9, FamilyDefaults(
        1.5e-4, 4_000_000,
        "Llama 2 paper (Touvron et al. 2023), Table 1: peak lr 1.5e-4 for 34B and 70B, global batch 4M tokens; "
        "the Llama 3 paper (Dubey et al. 2024), Table 3, gives 1.5e-4 for 70B too",
    )),
    (math.inf, FamilyDefaults(
        8e-5, None,
        "Llama 3 paper (Dubey et al. 2024), Table 3: peak lr 8e-5 for 405B; its batch grew from 4M to 8M to "
        "16M tokens during pretraining (section 3.4.1), so there is no single pretraining batch to use",
    )),
)

_FAMILIES: dict[str, FamilyDefaults] = {
    "mistral": FamilyDefaults(
        5e-5, 4_000_000,
        "the guide's worked example for Mistral 7B (base lr 5e-5, pretraining batch 4M tokens); the Mistral 7B "
        "paper (Jiang et al. 2023) publishes neither",
    ),
}


def family_defaults(family: str | None, params_total: int | None = None) -> FamilyDefaults | None:
    """Published base lr and pretraining batch for a model family (``ModelInfo.family``); None when unknown.

    For Llama the published rate depends on size; without ``params_total`` the 7B-13B row is used.
    """
    if not family:
        return None
    key = family.strip().lower()
    if key == "llama":
        size = params_total if params_total is not None else 0
        return next(d for limit, d in _LLAMA_ROWS if size <= limit)
    return _FAMILIES.get(key)


def _positive(name: str, value) -> float:
    """``value`` as a float, or a UserError unless it is a finite number above 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UserError(f"learning-rate rule: {name} must be a positive number, not {value!r}")
    return float(value)


def _fmt(x: float) -> str:
    """A number as a person writes it: thousands separators, one decimal for large fractions, else 4 digits."""
    if float(x).is_integer():
        return f"{int(x):,}"
    if abs(x) >= 100:
        return f"{x:,.1f}"
    return f"{x:.4g}"


def suggest_learning_rate(
    base_lr: float,
    supervised_tokens: float,
    num_steps: float,
    num_epochs: float,
    pretrained_batch_tokens: float,
) -> LrSuggestion:
    """The guide's rule: base_lr x sqrt(supervised_tokens / (num_steps / num_epochs) / pretrained_batch_tokens).

    ``supervised_tokens`` are the tokens trained on in one pass over the data (labels that are not
    -100), ``num_steps`` the optimizer steps of the whole run and ``num_epochs`` the passes it makes,
    so ``num_steps / num_epochs`` is the number of steps per pass.
    """
    lr0 = _positive("base_lr", base_lr)
    tokens = _positive("supervised_tokens", supervised_tokens)
    steps = _positive("num_steps", num_steps)
    epochs = _positive("num_epochs", num_epochs)
    bsz = _positive("pretrained_batch_tokens", pretrained_batch_tokens)
    tokens_per_step = tokens / (steps / epochs)
    lr = lr0 * math.sqrt(tokens_per_step / bsz)
    arithmetic = (
        f"{lr0:g} x sqrt({_fmt(tokens)} / ({_fmt(steps)} / {_fmt(epochs)}) / {_fmt(bsz)}) = {lr:.3g}"
    )
    return LrSuggestion(learning_rate=lr, arithmetic=arithmetic, tokens_per_step=tokens_per_step)


def note_on_lora_range(lr: float) -> str | None:
    """A short note when ``lr`` is outside what LoRA runs usually use; None inside that band."""
    low, high = LORA_LR_BAND
    value = _positive("learning rate", lr)
    if value < low:
        return (f"{value:.3g} is below the {low:.0e} to {high:.0e} that LoRA runs usually use: the square-root rule "
                "comes from full fine-tuning, and LoRA adapters usually train at higher rates (QLoRA used 2e-4 "
                "for 7B-13B models); consider a higher rate and watch the validation loss")
    if value > high:
        return (f"{value:.3g} is above the {low:.0e} to {high:.0e} that LoRA runs usually use; a rate this high "
                "can make the loss diverge")
    return None
