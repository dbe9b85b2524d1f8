"""Comparing a finished run with its base model on held-out data: ``qlora-wizard eval RUN_DIR``.

Validation loss and perplexity of the base (adapter off) and the fine-tuned model (adapter on), the
same loaded model both times, on the run's own validation split, tokenized and masked as training
did; then a few held-out prompts answered by both next to their references. Everything goes to
``RUN_DIR/eval.json``.

The loss here is the mean over every scored token of the validation set (so the perplexity is
``exp`` of it). The run's own ``eval`` events average per batch instead (transformers' Trainer), so
the fine-tuned number can differ a little from the last validation loss the run reported, which is
kept beside it (``run_eval_loss``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.after.session import Decoding, TrySession, adapter_switch, finished_run
from engine.errors import UserError, os_error
from engine.preset import atomic_write_text

EVAL_FILE = "eval.json"


# ---------------------------------------------------------------------------------------------
# The result, as ``eval.json`` holds it


@dataclass(frozen=True)
class EvalScores:
    """Validation loss and perplexity of one model (the base, or the fine-tuned)."""

    loss: float | None = None
    """Mean cross-entropy per scored token; None without a validation split (or for a loss that is not
    finite)."""
    perplexity: float | None = None
    """``exp(loss)``; None where the loss is."""

    @classmethod
    def of(cls, loss: float | None) -> EvalScores:
        """The scores of a mean loss (None, NaN and infinity give none)."""
        if loss is None or not math.isfinite(loss):
            return cls()
        return cls(loss, math.exp(min(loss, 700.0)))


@dataclass(frozen=True)
class EvalValidation:
    """What the losses were taken on: the run's validation split."""

    examples: int = 0
    """Validation examples (0: the run had no validation split)."""
    scored_tokens: int = 0
    """Tokens the loss was taken on."""


@dataclass(frozen=True)
class EvalGeneration:
    """One held-out prompt answered by both models, next to its reference."""

    prompt: str
    """The prompt as a person would type it."""
    reference: str
    """The answer the run trained towards."""
    base: str
    """The base model's answer (adapter off)."""
    fine_tuned: str
    """The fine-tuned model's answer (adapter on)."""


@dataclass(frozen=True)
class EvalExactMatches:
    """How many generated answers equal their reference (whitespace at the ends aside), per model."""

    base: int = 0
    """The base model's."""
    fine_tuned: int = 0
    """The fine-tuned model's."""

    @classmethod
    def of(cls, generations: tuple[EvalGeneration, ...]) -> EvalExactMatches:
        """Counted over the generated answers."""
        return cls(sum(g.base.strip() == g.reference.strip() for g in generations),
                   sum(g.fine_tuned.strip() == g.reference.strip() for g in generations))


@dataclass(frozen=True)
class EvalPreferences:
    """A preference run's held-out pairs scored by both models: how often each makes the chosen answer
    the likelier one, and the fine-tuned model's implicit reward as its method defines it (dpo's against
    the base; orpo's, which has no reference, the fine-tuned model's own), as the run's events report it."""

    pairs: int = 0
    """Held-out pairs scored."""
    base_accuracy: float | None = None
    """The share of pairs whose chosen answer the base model finds likelier (summed log-probability of
    the answer's tokens) than the rejected one."""
    fine_tuned_accuracy: float | None = None
    """The same share for the fine-tuned model."""
    reward_accuracy: float | None = None
    """The share of pairs whose implicit reward is higher for the chosen answer: the run's preference
    accuracy, on the held-out pairs. dpo: beta x how much likelier (summed log-probability) the
    fine-tuned model makes an answer than the base does (against the base: a run started from another
    adapter was trained against that one). orpo (no reference): beta x the fine-tuned model's mean
    log-probability per token of the answer, TRL's ORPO reward."""
    reward_margin: float | None = None
    """The implicit reward of the chosen answers minus the rejected ones', the mean over pairs."""
    beta: float | None = None
    """The run's ``training.beta``, the scale of the rewards (orpo: its lambda)."""
    method: str = "dpo"
    """The run's ``training.method`` (dpo or orpo): which implicit reward ``reward_accuracy`` and
    ``reward_margin`` are of."""


@dataclass(frozen=True)
class EvalResult:
    """What ``evaluate_run`` found: the base against the fine-tuned model on the run's held-out data.

    ``as_dict`` is ``RUN_DIR/eval.json``'s content, a stable interface: its keys and values do not
    change."""

    run_dir: str
    """The run evaluated."""
    model: str
    """The base model as the preset names it."""
    adapter: str
    """The adapter evaluated (``RUN_DIR/adapter``)."""
    device: str
    """Where the model ran (``cuda`` or ``cpu``)."""
    format: str
    """The data format the run trained with."""
    validation: EvalValidation
    """The split the losses were taken on."""
    base: EvalScores
    """The base model's scores (adapter off)."""
    fine_tuned: EvalScores
    """The fine-tuned model's scores (adapter on)."""
    run_eval_loss: float | None
    """The run's own last validation loss (its ``eval`` events average per batch); None without one."""
    generations_from: str
    """Where the prompts came from: ``validation``, or the training data when the run had no
    validation split (said in words)."""
    decoding: Decoding
    """How the answers were generated."""
    generations: tuple[EvalGeneration, ...]
    """The prompts answered by both models."""
    exact_matches: EvalExactMatches
    """How many of those answers equal their reference."""
    elapsed_s: float
    """How long the evaluation took, in seconds."""
    preferences: EvalPreferences | None = None
    """dpo and orpo runs: the held-out pairs scored by both models (the losses above are then the
    chosen answers'); None for sft."""

    def as_dict(self) -> dict:
        """The result as ``eval.json`` holds it (and ``qlora-wizard eval --json`` prints it): the fields
        in their order, the parts as nested objects."""
        return asdict(self)

    def to_json(self) -> str:
        """The text of ``eval.json``."""
        return json.dumps(self.as_dict(), indent=2, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------------------------------------
# The evaluation


def _batches(dataset, size: int):
    """The dataset's (input_ids, labels) rows in micro batches, in order."""
    rows = []
    for row in dataset:
        rows.append((list(row["input_ids"]), list(row["labels"])))
        if len(rows) == size:
            yield rows
            rows = []
    if rows:
        yield rows


def _padded(rows, pad_id: int, device):
    """Right-padded ids, attention mask and labels (-100 on the padding) of a micro batch."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
        mask[i, : len(row_ids)] = 1
    return ids.to(device), mask.to(device), labels.to(device)


def summed_loss(model, ids, mask, labels) -> tuple[float, int]:
    """(summed cross-entropy, scored tokens) of a padded micro batch: the engine's chunked loss where
    the architecture allows it (no full logits held), else the model's logits."""
    import torch
    import torch.nn.functional as F

    from engine.loss import IGNORE_INDEX, causal_lm_loss, decoder_and_head

    count = int((labels[:, 1:] != IGNORE_INDEX).sum())
    if count == 0:
        return 0.0, 0
    decoder, head = decoder_and_head(model)
    if decoder is not None:
        hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
        total = causal_lm_loss(hidden, head, labels, num_items_in_batch=1)
    else:
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        total = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="sum")
    return float(total.to(torch.float64)), count


def validation_loss(session: TrySession, dataset, *, adapter: bool, batch_size: int) -> tuple[float, int]:
    """Mean loss per scored token of ``dataset`` (tokenized as training did) and the tokens scored."""
    import torch

    total, count = 0.0, 0
    pad = session.tokenizer.pad_token_id if session.tokenizer.pad_token_id is not None else 0
    with torch.inference_mode(), adapter_switch(session.model, adapter):
        for rows in _batches(dataset, batch_size):
            part, n = summed_loss(session.model, *_padded(rows, pad, session.model.device))
            total, count = total + part, count + n
    return (total / count if count else float("nan")), count


def _answer_logps(session: TrySession, pairs, *, adapter: bool) -> list[tuple[float, float, int, int]]:
    """(log-probability of the chosen answer, of the rejected one, the chosen answer's tokens, the
    rejected one's) of each pair given its prompt, one sequence at a time (no full batch of logits held)."""
    import torch

    out = []
    device = session.model.device
    with torch.inference_mode(), adapter_switch(session.model, adapter):
        for row in pairs:
            prompt = list(row["prompt_ids"])
            sides = []
            for side in ("chosen_ids", "rejected_ids"):
                answer = list(row[side])
                ids = torch.tensor([prompt + answer], device=device)
                labels = torch.tensor([[-100] * len(prompt) + answer], device=device)
                total, count = summed_loss(session.model, ids, torch.ones_like(ids), labels)
                sides.append((-total, count))
            out.append((sides[0][0], sides[1][0], sides[0][1], sides[1][1]))
    return out


def preference_scores(session: TrySession, pairs, beta: float, say, method: str = "dpo",
                      ) -> tuple[EvalPreferences, float, float, int]:
    """The held-out pairs scored by the base and the fine-tuned model: (their preferences, the base's
    and the fine-tuned model's loss per token of the chosen answers, the chosen answers' tokens).

    The implicit reward is the method's, as its trainer logs it: dpo's is beta x the log-probability
    ratio of the fine-tuned model to the base (summed over the answer); orpo's, which has no reference,
    beta x the fine-tuned model's mean log-probability per answer token."""
    say(f"scoring {len(pairs):,} held-out pairs with the base model")
    base = _answer_logps(session, pairs, adapter=False)
    say("scoring them with the fine-tuned model")
    tuned = _answer_logps(session, pairs, adapter=True)
    n = len(pairs)
    tokens = sum(b[2] for b in base)
    if method == "orpo":
        margins = [beta * (tc / max(nc, 1) - tr / max(nr, 1)) for tc, tr, nc, nr in tuned]
    else:
        margins = [beta * ((t[0] - b[0]) - (t[1] - b[1])) for b, t in zip(base, tuned)]
    prefs = EvalPreferences(
        pairs=n,
        base_accuracy=sum(b[0] > b[1] for b in base) / n,
        fine_tuned_accuracy=sum(t[0] > t[1] for t in tuned) / n,
        reward_accuracy=sum(m > 0 for m in margins) / n,
        reward_margin=sum(margins) / n,
        beta=beta,
        method=method,
    )
    return prefs, -sum(b[0] for b in base) / max(tokens, 1), -sum(t[0] for t in tuned) / max(tokens, 1), tokens


def evaluate_run(run_dir, *, generations: int = 5, decoding: Decoding = Decoding(temperature=0),
                 progress: Callable[[str], None] | None = None, session: TrySession | None = None) -> EvalResult:
    """Validation loss and perplexity of base (adapter off) and fine-tuned on the run's validation split,
    plus ``generations`` generated answers of each against their references; written to
    ``RUN_DIR/eval.json`` and returned.

    ``progress`` hears a line at each stage; ``session`` reuses a model already loaded for the run."""
    say = progress or (lambda line: None)
    if generations < 0:
        raise UserError(f"--generations {generations} must be 0 or more")
    run = finished_run(run_dir)
    started = time.time()
    own = session is None
    if own:
        say(f"loading {run.preset.model.source} with the adapter of {run.run_dir}")
        session = TrySession.open(run.run_dir)
    try:
        from engine import data as data_mod

        t = run.preset.training
        say("preparing the validation data as the run did")
        # As the run tokenized it: its tokenized-data cache entry, found without loading the tokenizer
        # again (a large vocabulary takes seconds), else tokenized again with the model's tokenizer.
        prepared = data_mod.cached_prepared_data(run.preset.data, run.preset.model, t.seq_len, t.seed,
                                                 method=t.method) \
            or data_mod.prepare_data(run.preset.data, data_mod.load_tokenizer(run.preset.model), t.seq_len, t.seed,
                                     method=t.method)
        base_loss = tuned_loss = None
        tokens = 0
        preferences = None
        if prepared.validation is not None and prepared.stats.paired:
            preferences, base_loss, tuned_loss, tokens = preference_scores(session, prepared.validation, t.beta,
                                                                           say, method=t.method)
        elif prepared.validation is not None:
            batch = max(1, t.micro_batch_size)
            say(f"validation loss of the base model on {len(prepared.validation):,} examples")
            base_loss, tokens = validation_loss(session, prepared.validation, adapter=False, batch_size=batch)
            say("validation loss of the fine-tuned model")
            tuned_loss, _ = validation_loss(session, prepared.validation, adapter=True, batch_size=batch)
        evals = run.history.evals
        examples = session.examples(generations) if generations else []
        held = prepared.validation is not None
        answers = []
        if examples:
            prompts = [ex.prompt for ex in examples]
            say(f"generating {len(prompts)} answers with the base model")
            base = session.answers(prompts, adapter=False, decoding=decoding)
            say(f"generating {len(prompts)} answers with the fine-tuned model")
            tuned = session.answers(prompts, adapter=True, decoding=decoding)
            answers = [EvalGeneration(ex.prompt, ex.reference, base_text, tuned_text)
                       for ex, (base_text, _), (tuned_text, _) in zip(examples, base, tuned)]
        result = EvalResult(
            run_dir=str(run.run_dir),
            model=run.preset.model.source,
            adapter=str(run.adapter),
            device=session.device,
            format=run.format,
            validation=EvalValidation(len(prepared.validation) if held else 0, tokens),
            base=EvalScores.of(base_loss),
            fine_tuned=EvalScores.of(tuned_loss),
            run_eval_loss=evals[-1].eval_loss if evals else None,
            generations_from="validation" if held else "training (the run had no validation split)",
            decoding=decoding,
            generations=tuple(answers),
            exact_matches=EvalExactMatches.of(tuple(answers)),
            elapsed_s=round(time.time() - started, 2),
            preferences=preferences,
        )
    finally:
        if own:
            session.close()
    path = Path(run.run_dir) / EVAL_FILE
    try:
        atomic_write_text(path, result.to_json())
    except OSError as exc:
        raise os_error(exc, "write", path) from None
    return result
