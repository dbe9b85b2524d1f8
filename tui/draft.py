"""The wizard's single state, the draft preset, and what each step shows of it, as plain functions.

No Textual import: the full-screen wizard (``tui/screens/``) and the plain prompts (``tui/plain.py``)
share every figure and every check from here, so both say the same thing. The slow parts (reading
a model's config, tokenizing the data, probing GPUs) are in :class:`Services`; callers run them off
the UI thread.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError

from engine.errors import UserError
from engine.preset import Preset, describe_validation_error

STEPS: tuple[tuple[str, str], ...] = (
    ("model", "Model"),
    ("memory", "Memory"),
    ("targets", "LoRA targets"),
    ("data", "Data"),
    ("hyper", "Hyperparameters"),
    ("review", "Review"),
)
"""The wizard's steps in order: (screen name, title)."""

SHORTCUTS = (("qv", "q + v"), ("attention", "attention"), ("all", "all linear"))
"""The LoRA target shortcuts both front ends offer: (key in :func:`target_shortcuts`, label)."""

QUANT_CHOICES = (("nf4 (QLoRA)", "nf4"), ("fp4", "fp4"), ("none (16-bit LoRA)", "none"))
"""quantization.method: (label, value)."""
OPTIMIZER_CHOICES = tuple((o, o) for o in ("adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"))
"""training.optimizer: (label, value)."""
SCHEDULER_CHOICES = tuple((s, s) for s in ("cosine", "linear", "constant", "constant_with_warmup"))
"""training.lr_scheduler: (label, value)."""
FORMAT_CHOICES = tuple((f, f) for f in ("auto", "alpaca", "input_output", "prompt_completion", "text", "messages",
                                        "sharegpt"))
"""data.format: (label, value)."""

DEMO_DRAFT = Path(__file__).resolve().parent.parent / "presets" / "tiny-demo.yaml"
"""The offline demo preset, which ``make run`` opens the wizard on."""

ATTENTION_QV = ("q_proj", "v_proj")
"""The original LoRA paper's choice (Hu et al. 2021, section 7.1): query and value projections."""

FUSED_QKV = ("query_key_value", "qkv_proj", "c_attn", "Wqkv", "W_pack")
"""Fused query/key/value projections: the closest a model that has them gets to "q and v"."""


# ---------------------------------------------------------------------------------------------
# The draft


@dataclass
class DataReport:
    """What checking the data found: the statistics, three rendered examples, skipped records."""

    stats: Any
    """``engine.data.DataStats`` of the prepared training and validation sets."""
    examples: list[list[tuple[str, bool]]]
    """Up to three examples as the model sees them: (text, trained?) pieces."""
    bad_records: int = 0
    """Malformed records passed over (only with ``data.skip_bad_records``)."""


@dataclass
class Draft:
    """The preset being built (the one state every step edits) and what was learned about it.

    ``info`` and ``data`` belong to the settings they were computed for; a step that changes the
    model or the data settings makes them stale (``model_ready``/``data_ready`` turn false) and
    the step that computes them runs again.
    """

    preset: Preset
    """The draft preset: always valid; every edit goes through :meth:`set`."""
    info: Any = None
    """``engine.modelinfo.ModelInfo`` of ``info_key``'s model, once read."""
    info_key: tuple | None = None
    """(source, revision, trust_remote_code) that ``info`` was read for."""
    data: DataReport | None = None
    """The data check, once run."""
    data_key: str | None = None
    """The settings ``data`` was computed for (see :meth:`data_fingerprint`)."""
    gpus: list = field(default_factory=list)
    """``engine.gpu.GpuInfo`` of the detected GPUs (empty on a machine without one)."""
    exported_to: Path | None = None
    """Where the preset was last exported."""

    # ---- editing ------------------------------------------------------------------------

    def get(self, path: str) -> Any:
        """The value at a dotted path, e.g. ``training.seq_len``."""
        section, name = path.split(".")
        return getattr(getattr(self.preset, section), name)

    def set(self, path: str, value: Any) -> None:
        """Set one field, validated; a bad value raises a one-line :class:`UserError` and changes nothing."""
        data = self.preset.model_dump(mode="json")
        section, name = path.split(".")
        data[section][name] = value
        try:
            self.preset = Preset.model_validate(data)
        except ValidationError as exc:
            raise UserError(describe_validation_error(exc, "draft").removeprefix("preset draft: ")) from None

    def replace(self, preset: Preset) -> None:
        """Start over from another preset (a shipped one, say); derived facts are kept only where still valid."""
        self.preset = preset

    # ---- readiness ----------------------------------------------------------------------

    def model_key(self) -> tuple:
        """What the model facts depend on."""
        m = self.preset.model
        return (m.source, m.revision, m.trust_remote_code)

    @property
    def model_ready(self) -> bool:
        """Whether ``info`` describes the draft's model."""
        return self.info is not None and self.info_key == self.model_key()

    def data_fingerprint(self) -> str:
        """What the data check depends on: the data settings, seq_len, seed and the model (its tokenizer)."""
        import json

        p = self.preset
        return json.dumps([p.data.model_dump(mode="json"), p.training.seq_len, p.training.seed, self.model_key()],
                          sort_keys=True)

    @property
    def data_ready(self) -> bool:
        """Whether ``data`` describes the draft's data settings."""
        return self.data is not None and self.data_key == self.data_fingerprint()

    def first_missing(self) -> tuple[str, str] | None:
        """The step that must be done before a run can start, with why; None when all are."""
        if not self.model_ready:
            return "model", "read the model's config first (step 1)"
        if not self.data_ready:
            return "data", "check the data first (step 4)"
        return None


# ---------------------------------------------------------------------------------------------
# Form fields: text to value and back, the same in both front ends


def shown(value: Any) -> str:
    """A preset value as a form field or prompt shows it (empty for none)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def parse_field(text: str, kind: str, label: str) -> Any:
    """Typed text as a field's value. ``kind`` is ``int``, ``float`` or ``str``, with a trailing ``?``
    when an empty field means none; a UserError names ``label`` and what is wrong."""
    text = text.strip()
    base = kind.rstrip("?")
    if not text:
        if kind.endswith("?"):
            return None
        raise UserError(f"{label} needs a value")
    if base == "int":
        try:
            return int(text.replace(",", "").replace("_", ""))
        except ValueError:
            raise UserError(f"{label}: {text!r} is not a whole number") from None
    if base == "float":
        try:
            return float(text.replace(",", "").replace("_", ""))
        except ValueError:
            raise UserError(f"{label}: {text!r} is not a number") from None
    return text


# ---------------------------------------------------------------------------------------------
# Step 1: model


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
        ("weights", f"{size(info.weight_bytes)} in {info.dtype}"
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


# ---------------------------------------------------------------------------------------------
# Step 2: memory


@dataclass(frozen=True)
class MemoryView:
    """The memory step's figures for the draft."""

    estimate: Any
    """``engine.memory.MemoryEstimate``."""
    settings: Any
    """``engine.memory.MemorySettings`` it was made for."""
    budget_bytes: int | None
    """The first GPU's free memory; None without a GPU."""
    budget_name: str
    """The budget in words."""
    fit: Any
    """``engine.memory.FitResult`` against the budget; None without one."""

    @property
    def fits(self) -> bool | None:
        """Whether the estimate fits the budget; None without a budget."""
        return self.estimate.fits(self.budget_bytes)


def draft_estimate(draft: Draft) -> tuple[Any, Any]:
    """The memory settings of the draft on the first GPU (or an assumed bf16 one) and their estimate."""
    from engine.memory import estimate_training_memory
    from engine.plan import assumed_gpu, memory_settings, plan_device

    info, gpus = draft.info, draft.gpus
    device = plan_device(draft.preset, gpus, info.model_type) if gpus else assumed_gpu(draft.preset, info.model_type)
    settings = memory_settings(draft.preset, info, device)
    return settings, estimate_training_memory(info, settings)


def memory_view(draft: Draft, budget_bytes: int | None = None) -> MemoryView:
    """Estimate the draft's training memory against ``budget_bytes`` (else the first GPU's free memory)."""
    from engine.memory import fit
    from tui.format import gib

    info, gpus = draft.info, draft.gpus
    settings, est = draft_estimate(draft)
    if budget_bytes is not None:
        name = f"{gib(budget_bytes)} (typed)"
    elif gpus:
        budget_bytes = gpus[0].free_bytes
        name = f"{gpus[0].name}: {gib(gpus[0].free_bytes)} free of {gib(gpus[0].total_bytes)}"
    else:
        name = "no NVIDIA GPU here: type the GPU's memory to check against"
    result = fit(info, settings, budget_bytes) if budget_bytes else None
    return MemoryView(est, settings, budget_bytes, name, result)


# ---------------------------------------------------------------------------------------------
# Step 3: LoRA targets


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


# ---------------------------------------------------------------------------------------------
# Step 5: learning rate


@dataclass(frozen=True)
class LrView:
    """The learning-rate rule with this run's numbers."""

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
    """What has to be typed before the rule can be applied."""


def lr_view(draft: Draft) -> LrView:
    """Apply the guide's rule to the draft's data and batch (needs ``draft.data``)."""
    from engine.lr import family_defaults, suggest_learning_rate
    from engine.plan import steps_per_epoch, total_steps

    p, stats = draft.preset, draft.data.stats
    t = p.training
    spe = steps_per_epoch(stats.examples, t.micro_batch_size, t.gradient_accumulation_steps)
    steps = total_steps(p, stats.examples)
    epochs = steps / spe if t.max_steps else t.epochs
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
    missing = None
    if base_lr is None:
        missing = "the base learning rate"
    elif bsz is None:
        missing = "the pretraining batch in tokens"
    suggestion = None
    if missing is None:
        suggestion = suggest_learning_rate(base_lr, stats.supervised_tokens, steps, epochs, bsz)
    return LrView(base_lr, bsz, source, stats.supervised_tokens, steps, epochs, spe, suggestion, missing)


# ---------------------------------------------------------------------------------------------
# The slow parts, behind one seam


def _inspect(source: str, revision: str | None, trust_remote_code: bool):
    from engine.demo import resolve_model_source
    from engine.modelinfo import inspect_model

    info = inspect_model(resolve_model_source(source), revision=revision, trust_remote_code=trust_remote_code)
    if source.startswith("builtin:"):
        # Show the name the person chose, not the cache folder it resolved to.
        from dataclasses import replace

        info = replace(info, source=source)
    return info


def _probe_gpus() -> list:
    from engine.gpu import probe_gpus

    return probe_gpus()


def check_data(preset: Preset) -> DataReport:
    """Check the records, tokenize (cached) and render three examples: the data step's work."""
    from engine import data as data_mod

    _, _, bad = data_mod.check_records(preset.data)
    tokenizer = data_mod.load_tokenizer(preset.model)
    prepared = data_mod.prepare_data(preset.data, tokenizer, preset.training.seq_len, preset.training.seed)
    examples = data_mod.preview(preset.data, tokenizer, preset.training.seq_len, n=3)
    return DataReport(prepared.stats, examples, len(bad))


def start_run(preset: Preset, run_dir: str | os.PathLike | None = None) -> Path:
    """Check the data and the model's weights, create the run directory and start the detached
    training process; returns the run directory. Every front end starts runs through this."""
    from engine import data as data_mod
    from engine.plan import with_init_adapter
    from engine.runs import launch_run

    # Bad data is found here, before any weights load: one line, exit 2.
    data_mod.check_records(preset.data)
    # A run that starts from a saved adapter has that adapter's rank, alpha and targets, as run.
    preset = with_init_adapter(preset)
    if not preset.model.source.startswith("builtin:"):
        from engine.modelinfo import inspect_model, require_weights

        require_weights(inspect_model(preset.model.source, revision=preset.model.revision,
                                      trust_remote_code=preset.model.trust_remote_code))
    return launch_run(preset, run_dir)


@dataclass(frozen=True)
class Services:
    """Everything the wizard asks of the engine, in one place, so tests can feed it fixed answers
    (a GPU of a given size, say) while the rest stays real."""

    inspect_model: Callable[[str, str | None, bool], Any] = _inspect
    """(source, revision, trust_remote_code) -> ModelInfo; raises UserError or NeedsRemoteCode."""
    probe_gpus: Callable[[], list] = _probe_gpus
    """() -> the detected GPUs."""
    check_data: Callable[[Preset], DataReport] = check_data
    """preset -> DataReport; raises UserError."""
    start_run: Callable[[Preset], Path] = start_run
    """preset -> the started run's directory; raises UserError."""


def default_export_path(draft: Draft) -> str:
    """``<run name or model name>-qlora.yaml`` in the current folder ."""
    from engine.runs import slug

    short = draft.preset.model.source.rstrip("/").split("/")[-1].replace("builtin:", "")
    return f"{draft.preset.output.name or slug(short + '-qlora')}.yaml"


def keep_draft(draft: Draft) -> Path | None:
    """Save the draft to the cache's ``last-draft.yaml`` so no answer is lost; None if it cannot be written."""
    from engine.demo import cache_root
    from engine.preset import save_preset

    path = cache_root() / "last-draft.yaml"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_preset(draft.preset, path)
    except OSError:
        return None
    return path


def load_draft(path: str | os.PathLike | None) -> Draft:
    """A draft from a preset file (the demo when None)."""
    from engine.preset import load_preset

    return Draft(load_preset(path or DEMO_DRAFT))
