"""The model step: a Hub id, a model folder, a .gguf file or the built-in demo; its config is read
and its facts shown (sizes, heads, vocabulary, context, parameters, weight size and the layer names
LoRA can target).

The model source is the step's own field (typed, or from a shipped preset or a recent run), so the
declaration has no form fields; nothing must be done before it.

Once the model is read, the step offers to start from a finished run of the same base model
(``lora.init_from``: its adapter instead of fresh ones, :func:`starting_runs`), such as a dpo run from
an sft one; nothing is offered when the runs folder holds no such run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tui.steps.base import Step


def model_facts(info) -> list[tuple[str, str]]:
    """The facts the model step shows, as (label, value) rows."""
    from tui.format import count, size

    heads = f"{info.num_attention_heads} query / {info.num_key_value_heads} key-value"
    rows = [
        ("architecture", f"{info.architecture} ({info.model_type})"),
        ("parameters", f"{count(info.params_total)} ({info.params_total:,})"),
        ("hidden size", f"{info.hidden_size:,}"),
        ("layers", f"{info.num_hidden_layers}"),
        ("attention heads", heads),
        ("intermediate size", f"{info.intermediate_size:,}"),
        ("vocabulary", f"{info.vocab_size:,}"),
        ("context", f"{info.context_length:,} tokens"),
        ("weights", f"{size(info.weight_bytes)} GGUF file, dequantized to {info.dtype} for training"
                    if info.weight_bytes_source == "gguf" else f"{size(info.weight_bytes)} in {info.dtype}"
                    + ("" if info.weight_bytes_source != "estimate" else " (estimated from the parameters)")),
    ]
    if info.is_moe:
        rows.append(("experts", f"{info.num_experts}"))
    rows.append(("LoRA-targetable", ", ".join(info.lora_target_candidates)))
    return rows


def recent_models(runs_dir: str | os.PathLike = "runs", limit: int = 5) -> list[str]:
    """Models of the newest runs, newest first, each once."""
    from engine.runs import list_runs

    seen: list[str] = []
    for run in sorted(list_runs(runs_dir), key=lambda r: r.name, reverse=True):
        if run.model and run.model not in seen:
            seen.append(run.model)
    return seen[:limit]


INIT_FROM_TITLE = "start from a finished run (lora.init_from)"
"""What the choice of a run to start from is called (the screen's box, the prompts' question)."""

INIT_FROM_HINT = ("its adapter instead of fresh ones (rank, alpha, layers kept): especially useful for dpo or orpo "
                  "after an sft run (dpo's reference: the sft model)")
"""What starting from a run means, shown with the choice."""

FRESH_ADAPTERS = "none: fresh adapters"
"""The choice of no run."""


@dataclass(frozen=True)
class StartingRun:
    """A finished run of the draft's base model that a new run can start from (``lora.init_from``)."""

    name: str
    """The run directory's name."""
    adapter: str
    """Its ``adapter/`` folder, absolute: the value ``lora.init_from`` takes."""
    method: str
    """What it trained: ``sft``, ``dpo`` or ``orpo`` (its start event's)."""
    steps: int
    """Optimizer steps it took."""
    eval_loss: float | None
    """Its final validation loss (None without evaluations)."""
    started: float | None
    """When it started (epoch seconds), for the order."""

    @property
    def label(self) -> str:
        """One line: the run, its method, steps and final validation loss."""
        from engine.events import finite

        loss = finite(self.eval_loss)
        return (f"{self.name}: {self.method}, {self.steps:,} steps"
                + (f", validation loss {loss:.4f}" if loss is not None else ""))


def resolved_source(source: str) -> str:
    """A model source as a run records it (``engine.runs.create_run``): a local path made absolute, a Hub
    id or ``builtin:`` name as it is."""
    if not source or source.startswith("builtin:") or not Path(source).expanduser().exists():
        return source
    return str(Path(source).expanduser().resolve())


def starting_runs(runs_dir: str | os.PathLike, source: str) -> list[StartingRun]:
    """The finished runs under ``runs_dir`` (``engine.runs.list_runs``) whose base model (their preset's
    ``model.source``, resolved alike) is ``source`` and which saved an ``adapter/``, newest first."""
    from engine.runs import ADAPTER_DIR, list_runs

    want = resolved_source(source)
    try:
        runs = list_runs(Path(runs_dir).expanduser())
    except OSError:
        return []
    found = []
    for r in runs:
        adapter = Path(r.path) / ADAPTER_DIR
        if (r.status == "finished" and r.model is not None and resolved_source(r.model) == want
                and (adapter / "adapter_config.json").is_file()):
            found.append(StartingRun(r.name, str(adapter.resolve()), r.method, r.step, r.eval_loss, r.started))
    found.sort(key=lambda r: (r.started or 0.0, r.name), reverse=True)
    return found


def init_from_choices(runs: list[StartingRun], current: str | None = None) -> list[tuple[str, str]]:
    """(label, value) of the choice of a run to start from: none first (value empty), then each run
    (value its adapter folder); a ``current`` ``lora.init_from`` that is none of them (a preset file's)
    is kept as a choice of its own, after none."""
    choices = [(FRESH_ADAPTERS, "")]
    if current and init_from_value(runs, current) == current and current not in (r.adapter for r in runs):
        choices.append((f"keep: {current}", current))
    return choices + [(r.label, r.adapter) for r in runs]


def init_from_value(runs: list[StartingRun], current: str | None) -> str:
    """The choice (:func:`init_from_choices`'s value) that ``lora.init_from`` = ``current`` is: the run
    whose adapter it names (written another way, say relative), else itself; empty for none."""
    if not current:
        return ""
    here = resolved_source(current)
    return next((r.adapter for r in runs if r.adapter in (current, here)), current)


def init_from_values(preset, adapter: str | None) -> dict:
    """What choosing ``adapter`` (None: fresh adapters) sets, for ``Draft.set_many``: ``lora.init_from``,
    and with an adapter its rank, alpha and target layers, which its weights fix (the run takes them
    anyway, ``engine.plan.with_init_adapter``; the memory and targets steps then show them). Raises a
    one-line UserError when the folder is not a LoRA adapter."""
    values: dict = {"lora.init_from": adapter or None}
    if adapter:
        from engine.plan import with_init_adapter

        lora = with_init_adapter(preset.model_copy(update={"lora": preset.lora.model_copy(
            update={"init_from": adapter})})).lora
        values.update({"lora.r": lora.r, "lora.alpha": lora.alpha, "lora.targets": lora.targets})
    return values


def stale_init_from(preset) -> str | None:
    """When ``lora.init_from`` is a run's adapter whose base model is not the preset's (the model was
    changed after a run was picked): the line that says it goes back to fresh adapters; else None."""
    from engine.errors import UserError
    from engine.preset import load_preset
    from engine.runs import PRESET_FILE

    folder = preset.lora.init_from
    if not folder:
        return None
    run_preset = Path(folder).expanduser().parent / PRESET_FILE
    if not run_preset.is_file():
        return None
    try:
        base = load_preset(run_preset).model.source
    except (UserError, OSError):
        return None
    if resolved_source(base) == resolved_source(preset.model.source):
        return None
    return (f"lora.init_from cleared: {Path(folder).parent.name} was trained on {base}, not "
            f"{preset.model.source}; fresh adapters")


STEP = Step("model", "Model")
"""The model step: its one field, the model source, is its own (read, not just set)."""
