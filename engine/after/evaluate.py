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
from pathlib import Path

from engine.after.session import Decoding, TrySession, adapter_switch, finished_run
from engine.errors import UserError, os_error
from engine.preset import atomic_write_text

EVAL_FILE = "eval.json"


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


def _scores(loss: float | None) -> dict:
    if loss is None or not math.isfinite(loss):
        return {"loss": None, "perplexity": None}
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}


def evaluate_run(run_dir, *, generations: int = 5, decoding: Decoding = Decoding(temperature=0),
                 progress: Callable[[str], None] | None = None, session: TrySession | None = None) -> dict:
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
        # The tokenizer the run tokenized with, so the run's tokenized-data cache is found again.
        prepared = data_mod.prepare_data(run.preset.data, data_mod.load_tokenizer(run.preset.model), t.seq_len, t.seed)
        result: dict = {
            "run_dir": str(run.run_dir),
            "model": run.preset.model.source,
            "adapter": str(run.adapter),
            "device": session.device,
            "format": run.format,
        }
        base_loss = tuned_loss = None
        tokens = 0
        if prepared.validation is not None:
            batch = max(1, t.micro_batch_size)
            say(f"validation loss of the base model on {len(prepared.validation):,} examples")
            base_loss, tokens = validation_loss(session, prepared.validation, adapter=False, batch_size=batch)
            say("validation loss of the fine-tuned model")
            tuned_loss, _ = validation_loss(session, prepared.validation, adapter=True, batch_size=batch)
        evals = run.history.evals
        result["validation"] = {"examples": len(prepared.validation) if prepared.validation is not None else 0,
                                "scored_tokens": tokens}
        result["base"] = _scores(base_loss)
        result["fine_tuned"] = _scores(tuned_loss)
        result["run_eval_loss"] = evals[-1].eval_loss if evals else None
        examples = session.examples(generations) if generations else []
        held = prepared.validation is not None
        result["generations_from"] = "validation" if held else "training (the run had no validation split)"
        result["decoding"] = {"max_new_tokens": decoding.max_new_tokens, "temperature": decoding.temperature,
                              "top_p": decoding.top_p}
        answers = []
        for i, ex in enumerate(examples, start=1):
            say(f"generating answer {i} of {len(examples)}")
            base = session.answer(ex.prompt, adapter=False, decoding=decoding)
            tuned = session.answer(ex.prompt, adapter=True, decoding=decoding)
            answers.append({"prompt": ex.prompt, "reference": ex.reference, "base": base, "fine_tuned": tuned})
        result["generations"] = answers
        result["exact_matches"] = {
            who: sum(a[who].strip() == a["reference"].strip() for a in answers) for who in ("base", "fine_tuned")}
        result["elapsed_s"] = round(time.time() - started, 2)
    finally:
        if own:
            session.close()
    path = Path(run.run_dir) / EVAL_FILE
    try:
        atomic_write_text(path, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    except OSError as exc:
        raise os_error(exc, "write", path) from None
    return result
