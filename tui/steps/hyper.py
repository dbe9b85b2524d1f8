"""The hyperparameters step: what the run teaches (the method, and the settings of dpo and orpo), the
schedule, batch, optimizer and intervals, and the learning rate: for sft from the guide's rule with
this run's numbers (supervised tokens from the data, steps per epoch from data and batch, base rate
and pretraining batch from the model family unless typed); for dpo and orpo, whose loss is not a
cross-entropy over supervised tokens alone, the rates published runs of the method used, with their
sources (``engine.lr.preference_advice``).

It needs the checked data: the rule and the step count are figures of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tui.draft import Draft
from tui.steps.base import FormField, Step


def uses_beta(preset: Any) -> bool:
    """Whether the preset's method has a beta (dpo and orpo)."""
    from engine.preset import PREFERENCE_METHODS

    return preset.training.method in PREFERENCE_METHODS


def is_dpo(preset: Any) -> bool:
    """Whether the preset's method is dpo (its loss and its reference are dpo's own settings)."""
    return preset.training.method == "dpo"


METHOD_FORM: tuple[FormField, ...] = (
    FormField("method", "training.method", hint="sft: supervised; dpo, orpo: on preference pairs"),
    FormField("beta", "training.beta", "float", "dpo: closeness to the reference; orpo: preference weight",
              applies=uses_beta),
    FormField("dpo loss", "training.dpo_loss", applies=is_dpo),
    FormField("reference", "training.reference", applies=is_dpo),
)
"""What the run teaches and the settings of that method: the screen's method box, the prompts' first
questions. A setting that the method does not use is not offered, and goes back to its default when the
method changes (``FormField.applies``, ``Step.changes``): the preset refuses it otherwise."""

HYPER_FORM: tuple[FormField, ...] = (
    FormField("epochs", "training.epochs", "float"),
    FormField("max steps", "training.max_steps", "int?", "empty: train by epochs"),
    FormField("micro batch", "training.micro_batch_size", "int"),
    FormField("grad accumulation", "training.gradient_accumulation_steps", "int", "micro batches per step"),
    FormField("sequence length", "training.seq_len", "int", "tokens"),
    FormField("scheduler", "training.lr_scheduler"),
    FormField("warmup ratio", "training.warmup_ratio", "float"),
    FormField("weight decay", "training.weight_decay", "float"),
    FormField("max grad norm", "training.max_grad_norm", "float", "0: no clipping"),
    FormField("optimizer", "training.optimizer"),
    FormField("seed", "training.seed", "int"),
    FormField("eval every", "training.eval_steps", "int?", "steps; empty: once per epoch and at the end"),
    FormField("save every", "training.save_steps", "int", "steps, a resumable checkpoint"),
)
"""The schedule and batch, in order: the screen shows it whole; the prompts ask steps, epochs and
accumulation first and the rest on request."""

LR_FORM: tuple[FormField, ...] = (
    FormField("base rate", "model.base_lr", "float?", placeholder="family table",
              ask="base learning rate of the pretrained model (empty: the model family's)"),
    FormField("pretrain batch (tokens)", "model.pretrained_batch_tokens", "int?", placeholder="family table",
              ask="pretraining batch in tokens (empty: the model family's)"),
    FormField("learning rate", "training.learning_rate", "float"),
)
"""The learning rule's inputs and the rate itself: the screen's learning-rate box; the prompts ask the
base rate and the pretraining batch with the rest on request, and the rate last, the rule's value
shown."""


@dataclass(frozen=True)
class LrView:
    """The learning-rate rule with this run's numbers, or for dpo and orpo the method's published rates."""

    base_lr: float | None
    """The pretrained model's peak learning rate (draft, else the family table)."""
    pretrained_batch_tokens: int | None
    """The pretraining batch in tokens (draft, else the family table)."""
    source: str
    """Where the base rate and batch come from."""
    supervised_tokens: int
    """Tokens trained on in one pass over the data."""
    steps: int
    """Optimizer steps of the run."""
    epochs: float
    """Passes over the data."""
    steps_per_epoch: int
    """Optimizer steps per pass."""
    suggestion: Any
    """``engine.lr.LrSuggestion``; None while a number is missing."""
    missing: str | None
    """What has to be typed before the rule can be applied (None for dpo and orpo: the rule is not used)."""
    method: str = "sft"
    """What the run teaches (``training.method``)."""
    advice: Any = None
    """``engine.lr.PreferenceAdvice`` for dpo and orpo, shown instead of the rule; None for sft."""

    @property
    def suggested_rate(self) -> float | None:
        """The rate offered to take: the method's suggestion for LoRA (dpo, orpo), else the rule's value;
        None while the rule lacks a number."""
        if self.advice is not None:
            return self.advice.learning_rate
        return self.suggestion.learning_rate if self.suggestion is not None else None


def draft_world_size(draft: Draft) -> int:
    """The processes a run of the draft would train on here (GPUs x machines; ``distributed``)."""
    from engine.plan import planned_world_size

    return planned_world_size(draft.preset, draft.gpus)


def batch_words(draft: Draft) -> tuple[int, str]:
    """The effective batch and how it is made, e.g. (64, "micro batch 8 x accumulation 4 x 2 GPUs")."""
    from engine.plan import effective_batch

    t = draft.preset.training
    world = draft_world_size(draft)
    made = f"micro batch {t.micro_batch_size} x {t.gradient_accumulation_steps}"
    if world > 1:
        unit = "GPUs" if draft.gpus else "processes"
        made = f"micro batch {t.micro_batch_size} x accumulation {t.gradient_accumulation_steps} x {world} {unit}"
    return effective_batch(draft.preset, world), made


def lr_view(draft: Draft, steps: int | None = None, epochs: float | None = None,
            supervised_tokens: int | None = None) -> LrView:
    """Apply the guide's rule to the draft's data and batch (needs ``draft.data``). ``steps``, ``epochs``
    and ``supervised_tokens`` put other numbers in place of the run's (``qlora-wizard lr`` flags). For a
    dpo or orpo draft the rule is not applied: ``advice`` holds the method's published rates instead."""
    from engine.lr import family_defaults, preference_advice, suggest_learning_rate
    from engine.plan import steps_per_epoch, total_steps

    p, stats = draft.preset, draft.data.stats
    t = p.training
    world = draft_world_size(draft)  # data parallel: each step takes a micro batch from every process
    spe = steps_per_epoch(stats.examples, t.micro_batch_size, t.gradient_accumulation_steps, world)
    if epochs is None:
        epochs = (steps or total_steps(p, stats.examples, world)) / spe if (steps or t.max_steps) else t.epochs
    steps = steps or total_steps(p, stats.examples, world)
    supervised = supervised_tokens or stats.supervised_tokens
    family = family_defaults(draft.info.family, draft.info.params_total) if draft.info else None
    base_lr = p.model.base_lr or (family.base_lr if family else None)
    bsz = p.model.pretrained_batch_tokens or (family.pretrained_batch_tokens if family else None)
    if p.model.base_lr or p.model.pretrained_batch_tokens:
        source = "typed in this preset"
        if family:
            batch = f"{family.pretrained_batch_tokens:,}" if family.pretrained_batch_tokens else "?"
            source += f" (the {draft.info.family} family table: {family.base_lr:g}, {batch} tokens)"
    elif family:
        source = family.source
    else:
        fam = draft.info.family if draft.info else "?"
        source = f"no published values for the {fam} family: type the model's pretraining rate and batch"
    advice = preference_advice(t.method)
    missing = None
    if advice is None:  # dpo and orpo: the rule is for supervised tokens, nothing to type for it
        if base_lr is None:
            missing = "the base learning rate"
        elif bsz is None:
            missing = "the pretraining batch in tokens"
    suggestion = None
    if missing is None and advice is None:
        suggestion = suggest_learning_rate(base_lr, supervised, steps, epochs, bsz)
    return LrView(base_lr, bsz, source, supervised, steps, epochs, spe, suggestion, missing, t.method, advice)


def advice_lines(advice: Any) -> list[tuple[str, str]]:
    """What every front end says of a preference method's learning rate above its suggestion, line by
    line with a rich style: that the guide's rule is for supervised tokens and why it does not apply, the
    published range with its sources, and what beta means (``advice``: ``engine.lr.PreferenceAdvice``)."""
    low, high = advice.band
    return [
        (f"learning rate for {advice.method}: the guide's rule is not used", "bold"),
        (f"   {advice.rule}", "dim"),
        (f"   published {advice.method} rates run from {low:.0e} to {high:.0e} ({advice.band_source})", "dim"),
        (f"   beta: {advice.beta}", "dim"),
    ]


STEP = Step("hyper", "Hyperparameters", METHOD_FORM + HYPER_FORM + LR_FORM, needs="data")
"""The hyperparameters step."""
