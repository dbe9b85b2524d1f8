"""Preference tuning (``training.method: dpo | orpo``) on TRL's trainers.

The engine tokenizes the pairs itself (``engine.data``: columns ``prompt_ids``, ``chosen_ids``,
``rejected_ids``, cached like every data set), so what the data step showed and counted is what
trains; TRL's ``DPOTrainer`` and ``ORPOTrainer`` compute the loss, the reference pass and the reward
figures. Everything around them is the engine's, as for sft: the detached process, the events (the
step event carries the rewards of the chosen and rejected answers, their margin and the preference
accuracy), checkpoints, stop and resume, the adapter written whole or not at all.

What the engine changes in TRL's behaviour, and why:

- The reference of dpo is the model as the run began: the base with the adapter switched off for a
  fresh adapter (whose update is zero; TRL's frozen copy of it is dropped), or TRL's frozen copy of
  the adapter a run starts from with ``lora.init_from`` (as SFT-then-DPO needs); or its
  log-probabilities precomputed once before the first step (``training.reference``).
- TRL casts the trainable adapter weights of a 4-bit model to bfloat16. At a preference rate (about
  5e-6) most Adam updates of a weight near 0.1 are below bfloat16's spacing there (about 5e-4) and
  are lost; the engine keeps them in float32, as its sft runs do, and restores the values the run
  starts from (a run from ``lora.init_from`` then starts exactly at its reference, TRL's frozen copy
  of the same adapter, not at a bfloat16 rounding of it).
- TRL writes a model card into the checkpoints folder at every checkpoint; the engine's ``card``
  command writes the run's card, so that one is skipped.
"""

from __future__ import annotations

from engine.preset import Preset
from engine.train import REAL_TOKENS_KEY, _on_base

PAIR_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
"""The engine's tokenized pair columns (TRL DPOTrainer's tokenized layout)."""


def reference_mode(preset: Preset, pairs: int, steps: int, world_size: int = 1) -> str | None:
    """How dpo gets its reference log-probabilities: ``precomputed`` (once, before the first step) or
    ``each_step`` (a no-gradient pass of the model as it began, beside every step); None for the
    other methods. ``auto`` precomputes when the run covers every pair at least once (precomputing
    costs one pass over all pairs), else runs it beside the steps."""
    t = preset.training
    if t.method != "dpo":
        return None
    if t.reference != "auto":
        return t.reference
    covered = steps * t.micro_batch_size * t.gradient_accumulation_steps * max(1, world_size)
    return "precomputed" if covered >= pairs else "each_step"


def preference_args(preset: Preset, kwargs: dict, reference: str | None):
    """TRL's config for the method: the run's TrainingArguments keywords and the method's own."""
    t = preset.training
    common = dict(kwargs, beta=t.beta, max_length=t.seq_len, disable_dropout=True, dataset_num_proc=None)
    if t.method == "dpo":
        from trl import DPOConfig

        return DPOConfig(**common, loss_type=[t.dpo_loss], precompute_ref_log_probs=reference == "precomputed",
                         padding_free=False)
    from trl.experimental.orpo import ORPOConfig

    return ORPOConfig(**common)


def _without_count(inputs):
    """A batch without the engine's token count (a model's forward takes no such argument)."""
    if isinstance(inputs, dict) and REAL_TOKENS_KEY in inputs:
        inputs = {k: v for k, v in inputs.items() if k != REAL_TOKENS_KEY}
    return inputs


class PairCounting:
    """What both preference trainers add to TRL's (``_on_base`` puts the TRL trainer beneath): the
    real tokens of each training micro batch counted (``RunState.tokens``), the count kept away from
    the model's forward, and no model card written into the checkpoints."""

    def __init__(self, *, run, **kwargs) -> None:
        self.run = run
        """Where the real tokens are counted."""
        super().__init__(**kwargs)

    def training_step(self, model, inputs, *args, **kwargs):
        """One training micro batch, its real tokens counted (the collator's count)."""
        tokens = inputs.get(REAL_TOKENS_KEY) if isinstance(inputs, dict) else None
        self.run.tokens += int(tokens or 0)
        return super().training_step(model, _without_count(inputs), *args, **kwargs)

    def compute_loss(self, model, inputs, *args, **kwargs):
        """TRL's loss, on the batch without the count."""
        return super().compute_loss(model, _without_count(inputs), *args, **kwargs)

    def prediction_step(self, model, inputs, *args, **kwargs):
        """TRL's validation step, on the batch without the count."""
        return super().prediction_step(model, _without_count(inputs), *args, **kwargs)

    def create_model_card(self, *args, **kwargs) -> None:
        """Nothing: ``qlora-wizard card`` writes the run's card."""


class EngineDPO(PairCounting):
    """TRL's DPOTrainer on the engine's tokenized pairs."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """The engine's pairs are tokenized already (``PAIR_COLUMNS``): used as they are."""
        if set(PAIR_COLUMNS) <= set(dataset.column_names):
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def compute_ref_log_probs(self, model, inputs):
        """TRL's reference pass, on the batch without the count."""
        return super().compute_ref_log_probs(model, _without_count(inputs))


class EngineORPO(PairCounting):
    """TRL's ORPOTrainer on the engine's tokenized pairs."""

    def tokenize_row(self, feature, model=None) -> dict:
        """ORPO's row layout built from the engine's tokens (not from text again): the prompt, and each
        side as prompt + answer with the prompt's labels masked."""
        prompt = list(feature["prompt_ids"])
        row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
        for side in ("chosen", "rejected"):
            answer = list(feature[f"{side}_ids"])
            row[f"{side}_input_ids"] = prompt + answer
            row[f"{side}_attention_mask"] = [1] * (len(prompt) + len(answer))
            row[f"{side}_labels"] = [-100] * len(prompt) + answer
        return row


class CountingCollator:
    """TRL's pair collator, plus the micro batch's real tokens (both sides, the prompt in each) counted
    on the host, so nothing is read back from the GPU per micro batch."""

    def __init__(self, inner) -> None:
        self.inner = inner
        """TRL's collator."""

    def __call__(self, features):
        batch = self.inner(features)
        masks = [v for k, v in batch.items() if k.endswith("attention_mask") and k != "prompt_attention_mask"]
        batch[REAL_TOKENS_KEY] = int(sum(int(m.sum()) for m in masks))
        return batch


def _trainer_class(method: str) -> type:
    """The engine's trainer for a method, on TRL's (made when a run first builds one)."""
    if method == "dpo":
        from trl import DPOTrainer

        return _on_base(EngineDPO, DPOTrainer)
    from trl.experimental.orpo import ORPOTrainer

    return _on_base(EngineORPO, ORPOTrainer)


def build_preference_trainer(*, run, preset: Preset, model, args, train_dataset, eval_dataset, tokenizer,
                             callbacks: list):
    """The dpo or orpo trainer for this run, its adapters kept in float32 and its batches counted."""
    import torch

    # The adapter as the run starts it (fresh, ``init_from``'s or a checkpoint's to come), in float32.
    start = {name: p.detach().to(torch.float32, copy=True) for name, p in model.named_parameters() if p.requires_grad}
    trainer = _trainer_class(preset.training.method)(
        run=run, model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        processing_class=tokenizer, callbacks=callbacks,
    )
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    if not preset.lora.init_from and "ref" in getattr(unwrapped, "peft_config", {}):
        # A fresh adapter's frozen copy is the base itself (its update is zero): the reference pass
        # runs with the adapter switched off instead of through LoRA layers that add zeros.
        unwrapped.delete_adapter("ref")
        unwrapped.set_adapter("default")
    for name, param in unwrapped.named_parameters():
        if param.requires_grad and (name in start or param.dtype != torch.float32):
            # TRL rounded the trainable weights to bfloat16 (see the module's notes): back to the values the
            # run starts from, so that an init_from run starts exactly at its reference (TRL's frozen copy).
            param.data = start[name] if name in start else param.data.float()
    trainer.data_collator = CountingCollator(trainer.data_collator)
    return trainer
