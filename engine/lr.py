"""A learning rate worked out from the data: the guide's square-root rule, with its arithmetic shown.

    lr = base_lr x sqrt(supervised_tokens_in_batch / pretrained_batch_tokens)
    supervised_tokens_in_batch = supervised_tokens / (num_steps / num_epochs)

``base_lr`` is the pretrained model's peak learning rate and ``pretrained_batch_tokens`` its
pretraining batch in tokens: a fine-tuning batch with fewer tokens than the pretraining batch gets
a proportionally noisier gradient, so the rate shrinks with the square root of the ratio. The rule
comes from full fine-tuning; LoRA adapters usually train at higher rates, so the result is shown
with its arithmetic and a note, and the person decides. LLaMA-Factory ships the same rule as a
script (base 3e-4, reference batch 4M tokens).

The rule is for supervised fine-tuning: a preference method (dpo, orpo) does not train a token-level
cross-entropy alone, so for those :func:`preference_advice` gives the rates published runs used
(TRL's scripts, the alignment-handbook, the DPO and ORPO authors), with their sources, instead.
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


# ---------------------------------------------------------------------------------------------
# Preference tuning (dpo, orpo): the rule above does not apply; the published rates do.


@dataclass(frozen=True)
class PreferenceAdvice:
    """The learning rate a preference method's LoRA run starts from, with its sources, given in place of
    the guide's rule (which is for supervised tokens)."""

    method: str
    """``dpo`` or ``orpo`` (``training.method``)."""
    learning_rate: float
    """The suggested peak learning rate for LoRA adapters."""
    source: str
    """Where the suggested rate comes from, in words a person can check."""
    band: tuple[float, float]
    """The rates published runs of the method used: full fine-tuning at the low end, LoRA at the high end."""
    band_source: str
    """Where the ends of ``band`` come from."""
    rule: str
    """Why the guide's rule is not used for this method."""
    beta: str
    """What ``training.beta`` means for this method, and its usual value."""

    def to_json(self) -> dict:
        """A JSON-ready dict (``qlora-wizard lr --json``)."""
        return {"method": self.method, "learning_rate": self.learning_rate, "source": self.source,
                "range": list(self.band), "range_source": self.band_source, "rule": self.rule,
                "beta_meaning": self.beta}


RULE_IS_FOR_SUPERVISED_TOKENS = (
    "the guide's rule is for supervised tokens: it scales the rate with the supervised tokens of each step, "
    "the batch of a token-level cross-entropy"
)
"""The first half of every preference method's ``rule``."""

_PREFERENCE: dict[str, PreferenceAdvice] = {
    # TRL's own DPO script (trl/scripts/dpo.py, TRL 1.16) shows two runs of the same model and data:
    # --learning_rate 5.0e-7 for full training and 5.0e-6 with --use_peft (LoRA r 32, alpha 16). The
    # alignment-handbook's recipes/zephyr-7b-beta/dpo/config_qlora.yaml (4-bit, LoRA r 16) uses
    # learning_rate 5.0e-6 with beta 0.01. The DPO paper (Rafailov et al. 2023, appendix B) trained the
    # full model at 1e-6 (RMSprop, batch 64, beta 0.1), and TRL's DPOConfig defaults to learning_rate
    # 1e-6 and beta 0.1.
    "dpo": PreferenceAdvice(
        method="dpo",
        learning_rate=5e-6,
        source="TRL's DPO script (trl/scripts/dpo.py) trains LoRA at 5e-6 and the full model at 5e-7; the "
               "Hugging Face alignment-handbook's Zephyr-7B DPO QLoRA recipe uses 5e-6 too",
        band=(5e-7, 5e-6),
        band_source="5e-7: TRL's DPO script, full training; 1e-6: the DPO paper (Rafailov et al. 2023, "
                    "appendix B, full fine-tuning) and TRL's DPOConfig default; 5e-6: LoRA, as suggested",
        rule=RULE_IS_FOR_SUPERVISED_TOKENS + "; DPO's loss is one term per pair (how much more than the "
             "reference the model prefers the chosen answer to the rejected one), not a cross-entropy over "
             "tokens, so the rule does not apply",
        beta="how far the tuned model may move from the reference, higher keeps it closer; 0.1 is the DPO "
             "paper's and TRL's default (the alignment-handbook's QLoRA recipe used 0.01)",
    ),
    # TRL's ORPO example (examples/scripts/orpo.py, 2024) gives --learning_rate 8e-6 for full training
    # and 8e-5 with --use_peft (LoRA r 16, alpha 16, RMSprop), saying ORPO's best configuration is close
    # to DPO's. The ORPO authors' script for Mistral-ORPO-beta (xfactlab/orpo,
    # scripts/run_mistral_orpo_beta.sh) trains the full Mistral-7B at --lr 5e-6 with --alpha (lambda)
    # 0.1. TRL 1.16's ORPOConfig (trl.experimental.orpo) defaults to learning_rate 1e-6 and beta 0.1,
    # "denoted by lambda" in the paper.
    "orpo": PreferenceAdvice(
        method="orpo",
        learning_rate=8e-5,
        source="TRL's ORPO example (examples/scripts/orpo.py) trains LoRA at 8e-5 and the full model at 8e-6",
        band=(5e-6, 8e-5),
        band_source="5e-6: the ORPO authors' Mistral-ORPO-beta script (xfactlab/orpo), full fine-tuning; "
                    "8e-6: TRL's ORPO example, full training; 8e-5: the same example with LoRA",
        rule=RULE_IS_FOR_SUPERVISED_TOKENS + "; ORPO adds a term per pair (the odds of the chosen answer "
             "against the rejected one) to the supervised loss on the chosen answer, and the published rates "
             "are for that sum, so the rule is not used",
        beta="ORPO's lambda, the weight of the preference term beside the supervised loss; 0.1 is TRL's "
             "default and the ORPO authors' value",
    ),
}


def preference_advice(method: str) -> PreferenceAdvice | None:
    """The published learning rates of a preference method (``dpo``, ``orpo``), for LoRA; None for
    ``sft``, whose rate the guide's rule gives (:func:`suggest_learning_rate`).

    dpo: 5e-6, from TRL's DPO script (trl/scripts/dpo.py: 5e-6 with LoRA, 5e-7 full) and the
    alignment-handbook's Zephyr-7B DPO QLoRA recipe (5e-6); the DPO paper (Rafailov et al. 2023,
    appendix B) used 1e-6 with beta 0.1 on the full model, TRL's DPOConfig default.
    orpo: 8e-5, from TRL's ORPO example (examples/scripts/orpo.py: 8e-5 with LoRA, 8e-6 full); the ORPO
    authors trained Mistral-ORPO-beta fully at 5e-6 with lambda 0.1 (xfactlab/orpo).
    """
    return _PREFERENCE.get(method)


def note_on_preference_range(method: str, lr: float) -> str | None:
    """A short note when ``lr`` is outside the rates published runs of ``method`` (dpo, orpo) used; None
    inside them."""
    advice = _PREFERENCE[method]
    low, high = advice.band
    value = _positive("learning rate", lr)
    if value < low:
        return (f"{value:.3g} is below the {low:.0e} to {high:.0e} that published {method} runs used (full "
                f"fine-tuning at the low end, LoRA at the high end); LoRA adapters usually need the high end: "
                f"consider {advice.learning_rate:.0e}")
    if value > high:
        return (f"{value:.3g} is above the {low:.0e} to {high:.0e} that published {method} runs used; a rate "
                f"this high can make the loss diverge: consider {advice.learning_rate:.0e}")
    return None


def note_on_rate(method: str, lr: float) -> str | None:
    """The note on a chosen rate for a run of ``method``: against LoRA's usual band for sft
    (:func:`note_on_lora_range`), against the method's published rates for dpo and orpo."""
    if method in _PREFERENCE:
        return note_on_preference_range(method, lr)
    return note_on_lora_range(lr)
