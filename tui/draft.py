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

from engine.arch import ATTENTION_QV, FUSED_QKV
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

CHOICE_LABELS = {("quantization.method", "nf4"): "nf4 (QLoRA)", ("quantization.method", "none"): "none (16-bit LoRA)"}
"""How a few allowed values read in the forms and the prompts; every other value reads as itself."""


def choice_options(path: str) -> list[tuple[str, str]]:
    """(label, value) for each value the schema allows at ``path`` (its ``Literal``): the dropdowns of
    the forms and the menus of the prompts both come from here, so a new choice appears in both."""
    from engine.preset import choices

    return [(CHOICE_LABELS.get((path, value), value), value) for value in choices(path)]


@dataclass(frozen=True)
class FormField:
    """One field of a form both front ends show: the screen as a labelled input, the prompts as a question."""

    label: str
    """What the field is called."""
    path: str
    """The dotted preset path it edits."""
    kind: str = "str"
    """``int``, ``float`` or ``str`` (``?`` when empty means none; see :func:`parse_field`)."""
    hint: str = ""
    """What an answer means, where the label alone does not say (the prompts add it in brackets)."""

    @property
    def is_choice(self) -> bool:
        """Whether the schema fixes the field's values (a dropdown, a menu: :func:`choice_options`)."""
        from engine.preset import choices

        return bool(choices(self.path))

    @property
    def prompt(self) -> str:
        """The question the plain prompts ask."""
        return f"{self.label} ({self.hint})" if self.hint else self.label


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
"""The hyperparameter form, in order: the screen shows it whole; the prompts ask steps, epochs and
accumulation first and the rest on request."""

DEMO_DRAFT = Path(__file__).resolve().parent.parent / "presets" / "tiny-demo.yaml"
"""The offline demo preset, which ``make run`` opens the wizard on."""



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
    node_rank: int = 0
    """This machine's number in a run over several machines (``distributed.nodes``); not in the preset,
    since each machine runs the same one."""
    master: str | None = None
    """Machine 0's HOST:PORT in a run over several machines."""
    code_from_file: str | None = None
    """The model whose own code the preset file said to run (``model.trust_remote_code: true``), while
    the person here has not answered yet. A file's word is not consent to run a model's code just to
    look at it: a draft loaded from a file holds ``trust_remote_code`` false until the person agrees
    (:meth:`allow_code`), and both front ends ask before the model is read."""

    def set_node(self, node_rank: Any, master: str | None) -> None:
        """Place this machine in a run over several: its number and machine 0's address; a bad value
        raises a one-line :class:`UserError` and changes nothing."""
        from engine.distributed import parse_master

        nodes = self.preset.distributed.nodes
        try:
            rank = int(str(node_rank).strip())
        except ValueError:
            raise UserError(f"this machine's number must be 0 to {nodes - 1}, not {node_rank!r}") from None
        if not 0 <= rank < nodes:
            raise UserError(f"this machine's number must be 0 to {nodes - 1}, not {rank}")
        master = (master or "").strip() or None
        if master is not None:
            parse_master(master)
        self.node_rank, self.master = rank, master

    def start_kwargs(self) -> dict:
        """What ``start_run`` needs beyond the preset: this machine's place when there are several."""
        nodes = self.preset.distributed.nodes
        if nodes <= 1:
            return {}
        if self.master is None:
            raise UserError(f"a run on {nodes} machines needs machine 0's address (HOST:PORT)",
                            "type it in the review step, or run each machine with --nodes/--node-rank/--master")
        return {"node_rank": self.node_rank, "master": self.master}

    # ---- editing ------------------------------------------------------------------------

    def get(self, path: str) -> Any:
        """The value at a dotted path, e.g. ``training.seq_len``."""
        section, name = path.split(".")
        return getattr(getattr(self.preset, section), name)

    def set(self, path: str, value: Any) -> None:
        """Set one field, validated; a bad value raises a one-line :class:`UserError` and changes nothing."""
        self.set_many({path: value})

    def set_many(self, values: dict[str, Any]) -> None:
        """Set several fields at once, validated together; on a bad value nothing changes."""
        data = self.preset.model_dump(mode="json")
        for path, value in values.items():
            section, name = path.split(".")
            data[section][name] = value
        try:
            self.preset = Preset.model_validate(data)
        except ValidationError as exc:
            raise UserError(describe_validation_error(exc, "draft").removeprefix("preset draft: ")) from None

    def replace(self, preset: Preset) -> None:
        """Start over from another preset (a shipped one, say); derived facts are kept only where still valid."""
        self.preset = preset

    # ---- actions: what both front ends do, done once here -------------------------------

    def load_preset(self, path: str | os.PathLike) -> None:
        """Start over from a preset file; a one-line UserError when it cannot be read. Its
        ``model.trust_remote_code: true`` waits for the person's answer (see ``code_from_file``)."""
        from engine.preset import load_preset

        preset, asked = untrusted(load_preset(path))
        self.replace(preset)
        self.code_from_file = asked

    def allow_code(self, revision: str | None) -> None:
        """The person agreed now to run the model's own code: trust it, pinned to ``revision`` (the
        commit resolved at this moment for a Hub model, see :func:`pin_revision`; None keeps the
        revision, as for a local folder)."""
        values: dict[str, Any] = {"model.trust_remote_code": True}
        if revision:
            values["model.revision"] = revision
        self.set_many(values)
        self.code_from_file = None

    def refuse_code(self) -> None:
        """The person said no to the preset file's ``trust_remote_code: true``: the model is read
        without its own code (trust_remote_code stays false)."""
        self.code_from_file = None

    def change_model(self, source: str) -> None:
        """Point the draft at another model. Consent to run one model's code is not consent for
        another's, and a revision belongs to its repository: both are reset with the model."""
        source = source.strip()
        if not source:
            raise UserError("type a Hub id (org/name), a model folder, a .gguf file, or builtin:tiny-llama")
        if source != self.preset.model.source:
            self.set("model.source", source)
            self.set("model.trust_remote_code", False)
            self.set("model.revision", None)
            self.code_from_file = None

    def accept_model(self, key: tuple, info: Any) -> str | None:
        """Take the facts read for the model ``key``. Returns the line to show when the LoRA targets had
        to go back to all linear layers (the draft named layers this model does not have)."""
        self.info, self.info_key = info, key
        targets = self.preset.lora.targets
        if isinstance(targets, list) and not set(targets) <= set(info.lora_target_candidates):
            self.set("lora.targets", "all-linear")
            return "LoRA targets reset to all linear layers: this model names its layers differently"
        return None

    def apply_fastest_fit(self, budget_bytes: int | None = None):
        """Set checkpointing, micro batch and accumulation to the fastest that fit (``fastest_fit_for``),
        keeping the effective batch; returns the ``engine.speed.FastestFit`` with what was chosen and
        why. When nothing fits, the draft stays as it was. A UserError when there is no budget."""
        result = fastest_fit_for(self, budget_bytes)
        c = result.choice
        if c is not None:
            self.set_many({"training.gradient_checkpointing": c.gradient_checkpointing,
                           "training.micro_batch_size": c.micro_batch_size,
                           "training.gradient_accumulation_steps": c.gradient_accumulation_steps})
        return result

    def export_path(self, text: str) -> Path:
        """Where an export typed as ``text`` goes: ``~`` expanded, ``.yaml`` added to a bare name."""
        text = text.strip()
        if not text:
            raise UserError("name a file to export to, e.g. my-run.yaml")
        path = Path(text).expanduser()
        if not path.suffix:
            path = path.with_suffix(".yaml")
        if path.is_dir():
            raise UserError(f"{path} is a folder", "name a .yaml file")
        return path

    def export_overwrites(self, path: Path) -> bool:
        """Whether exporting to ``path`` would replace a file this draft did not write (ask first)."""
        return path.exists() and path != self.exported_to

    def export(self, path: str | os.PathLike) -> Path:
        """Write the draft preset to ``path`` (atomically; see :meth:`export_path`); returns the path written."""
        from engine.errors import os_error
        from engine.preset import save_preset

        target = self.export_path(str(path))
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            save_preset(self.preset, target)
        except OSError as exc:
            raise os_error(exc, "write", target) from None
        self.exported_to = target
        return target

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


# ---------------------------------------------------------------------------------------------
# Step 2: memory


NO_GPU_LINE = "no NVIDIA GPU found here: the estimate is for a bf16 GPU"
"""What the memory step says on a machine without a GPU (the estimate assumes one that does bf16)."""


def gpu_line(gpu) -> str:
    """One detected GPU and its memory, as the memory step lists it."""
    from tui.format import gib

    return f"GPU {gpu.index}: {gpu.name}, {gib(gpu.free_bytes)} free of {gib(gpu.total_bytes)}"


def parse_gib(text: str) -> int | None:
    """GPU memory typed in GiB, as bytes; None when nothing is typed."""
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise UserError(f"GPU memory {text!r} is not a number of GiB above 0")
    return int(value * 2**30)


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
    kernels: str = ""
    """Which attention and loss kernels the run gets and why (``DevicePlan.kernels_note``)."""
    world_line: str = ""
    """With several GPUs (or DDP/FSDP asked for): how many, which strategy and why, e.g.
    ``2 x NVIDIA H100: DDP, per GPU (...)``; empty for one GPU, where nothing changes."""
    sharing: str = ""
    """With several GPUs: which components are sharded and which every GPU holds whole."""
    largest: str = ""
    """With several GPUs and a budget: the largest reference model each strategy fits on them."""

    @property
    def fits(self) -> bool | None:
        """Whether the estimate fits the budget; None without a budget."""
        return self.estimate.fits(self.budget_bytes)

    @property
    def verdict(self) -> tuple[str | None, str]:
        """``FITS`` / ``DOES NOT FIT`` (None without a budget) and the figures behind it, in words."""
        from tui.format import gib

        total = gib(self.estimate.total_bytes)
        if self.fits is None:
            return None, f"needs {total} at the peak"
        room = self.budget_bytes - self.estimate.total_bytes
        if self.fits:
            share = 100 * self.estimate.total_bytes / self.budget_bytes
            return "FITS", f"{total} of {gib(self.budget_bytes)} ({share:.0f} %), {gib(room)} left"
        return "DOES NOT FIT", f"needs {total}, {gib(self.budget_bytes)} available ({gib(-room)} short)"

    context_line = property(lambda self: cuda_context_line())
    """What the CUDA context costs (``cuda_context_line``)."""


def cuda_context_line() -> str:
    """What the CUDA context costs, which the total includes and torch's counters never show: the
    same on a 16 GB, a 24 GB or an 80 GB card, only the room left differs."""
    from engine.memory import CUDA_CONTEXT_BYTES
    from tui.format import gib

    return (f"the total counts {gib(CUDA_CONTEXT_BYTES)} of CUDA context (measured on an H100 and an H200, "
            "CUDA 13); other cards and drivers take a few hundred MiB more or less")


STRATEGY_SHORT = {"single": "one GPU", "ddp": "DDP", "fsdp": "FSDP"}
"""Each strategy in a word, for the memory step's GPU line (``engine.distributed.STRATEGY_WORDS`` says more)."""


def draft_world(draft: Draft):
    """The GPUs a run of the draft would train on (``engine.distributed.World``, as CUDA GPUs: the
    estimate is for a GPU even on a machine without one), when there are several or the preset asks
    for DDP or FSDP; None otherwise (one GPU: the memory step shows what it always did)."""
    from engine.distributed import World
    from engine.plan import planned_world_size

    d = draft.preset.distributed
    size = planned_world_size(draft.preset, draft.gpus)
    if size < 2 and d.strategy not in ("ddp", "fsdp"):
        return None
    return World(max(1, size // d.nodes), d.nodes, "cuda")


def _first_gpu(draft: Draft):
    """The first GPU CUDA will use (``CUDA_VISIBLE_DEVICES`` applied); None without one."""
    from engine.distributed import visible_gpus

    gpus = visible_gpus(draft.gpus) if draft.gpus else []
    return gpus[0] if gpus else None


def draft_device(draft: Draft, budget_bytes: int | None = None):
    """The device plan of the draft: the first GPU, or an assumed bf16 one (``engine.plan.DevicePlan``);
    with several GPUs (``draft_world``) also the strategy, chosen against ``budget_bytes`` per GPU
    (else the first visible GPU's free memory)."""
    from engine.plan import assumed_gpu, plan_device, with_world

    info, gpus = draft.info, draft.gpus
    plan = plan_device(draft.preset, gpus, info.model_type) if gpus else assumed_gpu(draft.preset, info.model_type)
    world = draft_world(draft)
    if world is None:
        return plan
    if budget_bytes is None and _first_gpu(draft) is not None:
        budget_bytes = _first_gpu(draft).free_bytes
    return with_world(plan, draft.preset, info, world, budget_bytes=budget_bytes)


def draft_estimate(draft: Draft, device=None) -> tuple[Any, Any]:
    """The memory settings of the draft on the first GPU (or an assumed bf16 one) and their estimate."""
    from engine.memory import estimate_training_memory
    from engine.plan import memory_settings

    settings = memory_settings(draft.preset, draft.info, device or draft_device(draft))
    return settings, estimate_training_memory(draft.info, settings)


def fit_line(fit, seq_len: int) -> str:
    """What fits a budget (``engine.memory.FitResult``), in one line: the largest micro batch at this
    sequence length and the longest sequence at micro batch 1."""
    mb, sl = fit.max_micro_batch, fit.max_seq_len
    return (f"largest micro batch at {seq_len:,} tokens: {mb if mb else 'none fits'}; "
            f"longest sequence at micro batch 1: {f'{sl:,}' if sl else 'none fits'}")


def _budget(draft: Draft, budget_bytes: int | None) -> tuple[int | None, str]:
    """The memory to check against (typed, else the first GPU's free memory) and it in words."""
    from tui.format import gib

    gpus = draft.gpus
    if budget_bytes is not None:
        return budget_bytes, f"{gib(budget_bytes)} (typed)"
    if gpus:
        return gpus[0].free_bytes, f"{gpus[0].name}: {gib(gpus[0].free_bytes)} free of {gib(gpus[0].total_bytes)}"
    return None, "no NVIDIA GPU here: type the GPU's memory to check against"


def memory_view(draft: Draft, budget_bytes: int | None = None) -> MemoryView:
    """Estimate the draft's training memory against ``budget_bytes`` (else the first GPU's free memory);
    with several GPUs per GPU, for the strategy the run would take, and the largest reference model
    each strategy fits on them (``engine.sizes``)."""
    from engine.memory import fit

    typed = budget_bytes
    budget_bytes, name = _budget(draft, budget_bytes)
    device = draft_device(draft, budget_bytes)
    settings, est = draft_estimate(draft, device)
    result = fit(draft.info, settings, budget_bytes) if budget_bytes else None
    view = MemoryView(est, settings, budget_bytes, name, result, f"kernels: {device.kernels_note}")
    world = draft_world(draft)
    if world is None:
        return view
    from dataclasses import replace

    from engine.sizes import largest_fitting, largest_words
    from tui.format import gib

    gpu = _first_gpu(draft)
    card = gpu.name if gpu is not None else "a bf16-capable GPU"
    machines = f" x {world.nodes} machines" if world.nodes > 1 else ""
    per_gpu = ", per GPU" if world.distributed else ""
    line = (f"{world.procs_per_node} x {card}{machines}: {STRATEGY_SHORT[device.strategy]}{per_gpu} "
            f"({device.strategy_reason})")
    largest = ""
    if budget_bytes and world.distributed:
        words = f"{gib(budget_bytes)}" if typed is not None or gpu is None else f"{card} ({gib(budget_bytes)} free)"
        largest = largest_words(largest_fitting(settings, budget_bytes, world.size, ("ddp", "fsdp")), world.size, words)
    return replace(view, world_line=line, sharing=est.sharing_words(), largest=largest)


FASTEST_FIT_NO_DATA = "check the data (step 4) for its real lengths"
"""What the memory step adds when the fastest fit had to assume every example is seq_len long."""


def fastest_fit_for(draft: Draft, budget_bytes: int | None = None):
    """The fastest checkpointing, micro batch and accumulation that fit (``engine.speed.fastest_fit``)
    for the draft on the first GPU (or an assumed one) against ``budget_bytes`` (else the GPU's free
    memory), keeping the draft's effective batch and using the checked data's lengths when the data
    check is current. A UserError when there is no budget to fit."""
    from engine.speed import fastest_fit

    budget, _ = _budget(draft, budget_bytes)
    if not budget:
        raise UserError("no GPU memory to fit against", "type the GPU's memory in GiB")
    settings, _ = draft_estimate(draft)
    stats = draft.data.stats if draft.data_ready else None
    return fastest_fit(
        draft.info, settings, budget,
        gradient_accumulation_steps=draft.preset.training.gradient_accumulation_steps,
        mean_len=(stats.mean_len or None) if stats else None,
        max_len=(stats.max_len or None) if stats else None,
        gpu=draft.gpus[0].name if draft.gpus else None,
    )


def fastest_fit_lines(result, lengths_hint: str = FASTEST_FIT_NO_DATA) -> list[str]:
    """What both front ends show of a ``FastestFit``: the choice in one line, then each reason, and
    ``lengths_hint`` when the data's lengths were not known."""
    head = f"fastest that fits: {result.summary}" if result.found else result.reasons[0]
    reasons = list(result.reasons if result.found else result.reasons[1:])
    if result.found and not result.lengths_known:
        reasons.append(lengths_hint)
    return [head, *(f"  - {r}" for r in reasons)]


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
# Step 4: data

EXAMPLE_LIMIT = 600
"""Characters of an example shown; longer ones are cut in the middle."""


def render_example(pieces: list[tuple[str, bool]], trained_style: str, marks: tuple[str, str] = ("", ""),
                   limit: int = EXAMPLE_LIMIT):
    """One example as the model sees it (a ``rich.text.Text``): the trained part in ``trained_style``
    and between ``marks`` (for a terminal without colour), long ones cut in the middle."""
    from rich.text import Text

    text = Text()
    for piece, trained in pieces:
        text.append(f"{marks[0]}{piece}{marks[1]}" if trained else piece, trained_style if trained else "")
    if len(text) > limit:
        text = Text.assemble(text[: limit // 2], ("\n  ...\n", "dim"), text[-limit // 2:])
    return text


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
    and ``supervised_tokens`` put other numbers in place of the run's (``qlora-wizard lr`` flags)."""
    from engine.lr import family_defaults, suggest_learning_rate
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
    missing = None
    if base_lr is None:
        missing = "the base learning rate"
    elif bsz is None:
        missing = "the pretraining batch in tokens"
    suggestion = None
    if missing is None:
        suggestion = suggest_learning_rate(base_lr, supervised, steps, epochs, bsz)
    return LrView(base_lr, bsz, source, supervised, steps, epochs, spe, suggestion, missing)


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


def pin_revision(source: str, revision: str | None) -> str | None:
    """The commit a consent to run ``source``'s own code covers (``engine.modelinfo.code_revision``):
    a Hub model's revision resolved now (the cached snapshot's when offline); None for a local folder
    or a built-in model, whose code is the files there. Raises a one-line UserError."""
    if source.startswith("builtin:"):
        return None
    from engine.modelinfo import code_revision

    return code_revision(source, revision)


def untrusted(preset: Preset) -> tuple[Preset, str | None]:
    """A preset as read from a file, with ``model.trust_remote_code`` false until the person here
    agrees, and the model the file asked to trust (None when it did not)."""
    if not preset.model.trust_remote_code:
        return preset, None
    data = preset.model_dump(mode="json")
    data["model"]["trust_remote_code"] = False
    return Preset.model_validate(data), preset.model.source


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


def start_run(preset: Preset, run_dir: str | os.PathLike | None = None, node_rank: int = 0,
              master: str | None = None, note=None) -> Path:
    """Check the data and the model's weights, create the run directory and start the detached
    training process (torchrun for several); returns the run directory. Every front end starts runs
    through this. ``node_rank`` and ``master`` place this machine in a run over several; ``note``, if
    given, hears whether every example teaches the model to stop (the data statistics' stop line)."""
    from engine import data as data_mod
    from engine.plan import with_init_adapter
    from engine.runs import check_new_run_dir, launch_run, run_dir_for

    # Where the run goes is settled (and refused: a folder of someone's files) before anything slow.
    run_dir = run_dir_for(preset, run_dir)
    check_new_run_dir(run_dir)
    # Bad data is found here, before any weights load: one line, exit 2.
    data_mod.check_records(preset.data)
    # A run that starts from a saved adapter has that adapter's rank, alpha and targets, as run.
    preset = with_init_adapter(preset)
    if not preset.model.source.startswith("builtin:"):
        from engine.modelinfo import inspect_model, require_weights

        if preset.model.trust_remote_code:
            # The code that trains is the code agreed to: a Hub model's revision is pinned to a commit
            # (a no-op when the front end pinned it at the moment of consent).
            revision = pin_revision(preset.model.source, preset.model.revision)
            if revision and revision != preset.model.revision:
                preset = preset.model_copy(update={"model": preset.model.model_copy(update={"revision": revision})})
        require_weights(inspect_model(preset.model.source, revision=preset.model.revision,
                                      trust_remote_code=preset.model.trust_remote_code))
    # Data that leaves nothing to train at this seq_len is refused here, with the numbers, not in the
    # detached run. Tokenized under the key the training process uses (same data, seq_len, seed and
    # tokenizer), so the run loads this cache entry instead of tokenizing again.
    prepared = data_mod.prepare_data(preset.data, data_mod.load_tokenizer(preset.model), preset.training.seq_len,
                                     preset.training.seed)
    if note is not None and prepared.stats.stop_line():
        note(prepared.stats.stop_line())
    return launch_run(preset, run_dir, node_rank, master)


def node_commands(preset: Preset, preset_path: str, master: str | None) -> list[str]:
    """What each machine of a multi-machine run types (``qlora-wizard --preset ... --node-rank R``);
    empty for one machine. ``master``: machine 0's HOST:PORT (a placeholder when not known yet)."""
    nodes = preset.distributed.nodes
    if nodes <= 1:
        return []
    import shlex

    where = master or "HOST:29500"
    return [f"qlora-wizard --preset {shlex.quote(preset_path)} --nodes {nodes} --node-rank {r} --master {where}"
            for r in range(nodes)]


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
    pin_revision: Callable[[str, str | None], str | None] = pin_revision
    """(source, revision) -> the commit a consent to run the model's code covers (None for a local
    model); asked at the moment the person agrees. Raises UserError."""


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
    """A draft from a preset file (the demo when None). A file's ``model.trust_remote_code: true`` is
    not consent: the draft holds it false and remembers the question (``Draft.code_from_file``)."""
    from engine.preset import load_preset

    preset, asked = untrusted(load_preset(path or DEMO_DRAFT))
    return Draft(preset, code_from_file=asked)
