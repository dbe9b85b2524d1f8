"""The wizard's single state, the draft preset: editing it, whether it is ready to run, and the
engine calls behind it.

No Textual import: the full-screen wizard (``tui/screens/steps/``) and the plain prompts
(``tui/plain.py``) edit the same :class:`Draft` and read fields the same way (:func:`parse_field`,
:func:`shown`, :func:`choice_options`); what each step asks and shows is declared in
:mod:`tui.steps`. The slow parts (reading a model's config, tokenizing the data, probing GPUs) are
in :class:`Services`; callers run them off the UI thread.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError

from engine.demo import DEMO_PRESET
from engine.errors import UserError
from engine.preset import Preset, describe_validation_error

CHOICE_LABELS = {("quantization.method", "nf4"): "nf4 (QLoRA)", ("quantization.method", "none"): "none (16-bit LoRA)"}
"""How a few allowed values read in the forms and the prompts; every other value reads as itself."""


def choice_options(path: str) -> list[tuple[str, str]]:
    """(label, value) for each value the schema allows at ``path`` (its ``Literal``): the dropdowns of
    the forms and the menus of the prompts both come from here, so a new choice appears in both."""
    from engine.preset import choices

    return [(CHOICE_LABELS.get((path, value), value), value) for value in choices(path)]


# ---------------------------------------------------------------------------------------------
# The draft


@dataclass
class DataReport:
    """What checking the data found: the statistics, three rendered examples, skipped records."""

    stats: Any
    """``engine.data.DataStats`` of the prepared training and validation sets."""
    examples: list[list[tuple[str, bool | None]]]
    """Up to three examples as the model sees them: (text, trained?) pieces; for preference pairs the
    prompt, the chosen and the rejected answer, each after a label piece (trained? None)."""
    bad_records: int = 0
    """Malformed records passed over (only with ``data.skip_bad_records``)."""
    method: str = "sft"
    """The training method the data was checked for: the draft's, or the one its data calls for
    (``checked_for_suited_method``), which the draft takes on (``Draft.accept_data``)."""


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
    method_chosen: bool = False
    """The person set ``training.method`` (a form): a data check then refuses data of the other kind
    instead of switching the method to suit it (``accept_data``)."""

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
        chosen = "training.method" in values
        data = self.preset.model_dump(mode="json")
        for path, value in values.items():
            section, name = path.split(".")
            data[section][name] = value
        try:
            self.preset = Preset.model_validate(data)
        except ValidationError as exc:
            raise UserError(describe_validation_error(exc, "draft").removeprefix("preset draft: ")) from None
        self.method_chosen = self.method_chosen or chosen

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
        from tui.steps.memory import fastest_fit_for

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
        """What the data check depends on: the data settings, seq_len, seed, the model (its tokenizer)
        and the training method (which kind of data it takes)."""
        import json

        p = self.preset
        return json.dumps([p.data.model_dump(mode="json"), p.training.seq_len, p.training.seed, self.model_key(),
                           p.training.method], sort_keys=True)

    def accept_data(self, report: DataReport) -> str | None:
        """Take a data check's report: its method too, when the data called for another one (the
        settings that method does not use go back to their defaults), with the words that say so;
        unless the person chose the method (``method_chosen``): then the data is refused, a one-line
        :class:`UserError` (and the draft keeps no report)."""
        note = None
        if report.method != self.preset.training.method:
            from tui.steps import get_step

            before = self.preset.training.method
            if self.method_chosen:  # the person's choice stands: the data is refused, in its own words
                from engine import data as data_mod

                data_mod.check_records(self.preset.data, method=before)
                raise UserError(f"training.method {before} does not train on {self.preset.data.train}")
            self.set_many(get_step("hyper").changes("training.method", report.method, self.preset))
            self.method_chosen = False
            note = (f"the data holds preference pairs: training.method is now dpo, not {before} (orpo is the "
                    "other choice, in Hyperparameters)" if report.method == "dpo" else
                    f"the data holds single responses: training.method is now sft, not {before} (dpo and orpo "
                    "train on pairs)")
        self.data, self.data_key = report, self.data_fingerprint()
        return note

    @property
    def data_ready(self) -> bool:
        """Whether ``data`` describes the draft's data settings."""
        return self.data is not None and self.data_key == self.data_fingerprint()

    def first_missing(self, needs: str | None = "data") -> tuple[str, str] | None:
        """The step that must be done first, with why, for something that needs ``needs``: None,
        ``model`` or ``data`` (a step's ``Step.needs``; by default a run, which needs both); None
        when nothing is missing."""
        from tui.steps import step_ref

        if needs is None:
            return None
        if not self.model_ready:
            return "model", f"read the model's config first ({step_ref('model')})"
        if needs == "data" and not self.data_ready:
            return "data", f"check the data first ({step_ref('data')})"
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


def checked_for_suited_method(preset: Preset) -> tuple[str, int]:
    """The training method for the preset's data, and its bad records (passed over with
    ``data.skip_bad_records``): the preset's own method when the data is of its kind; dpo for pairs
    under sft, sft for single responses under dpo or orpo (the wizard switches and says so; a preset
    run headless is refused instead). Data that fits neither is refused as it is for the preset's
    method (``engine.data.check_records``'s one line)."""
    from engine import data as data_mod
    from engine.preset import PREFERENCE_METHODS

    method = preset.training.method
    try:
        return method, len(data_mod.check_records(preset.data, method=method)[2])
    except UserError as refused:
        other = "sft" if method in PREFERENCE_METHODS else "dpo"
        try:
            return other, len(data_mod.check_records(preset.data, method=other)[2])
        except UserError:
            raise refused from None


def check_data(preset: Preset) -> DataReport:
    """Check the records, tokenize (cached) and render three examples: the data step's work. Data of
    the other kind than the method takes (pairs under sft) is checked for the method it suits
    (``DataReport.method``)."""
    from engine import data as data_mod

    method, bad = checked_for_suited_method(preset)
    tokenizer = data_mod.load_tokenizer(preset.model)
    prepared = data_mod.prepare_data(preset.data, tokenizer, preset.training.seq_len, preset.training.seed,
                                     method=method)
    examples = data_mod.preview(preset.data, tokenizer, preset.training.seq_len, n=3)
    return DataReport(prepared.stats, examples, bad, method)


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
    data_mod.check_records(preset.data, method=preset.training.method)
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
    # Data prepared before for this tokenizer is found without loading it (or torch): a rerun starts at once.
    t = preset.training
    stats = data_mod.cached_stats(preset.data, preset.model, t.seq_len, t.seed, method=t.method)
    if stats is None:
        stats = data_mod.prepare_data(preset.data, data_mod.load_tokenizer(preset.model), t.seq_len, t.seed,
                                      method=t.method).stats
    if note is not None and stats.stop_line():
        note(stats.stop_line())
    return launch_run(preset, run_dir, node_rank, master)


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
    """A draft from a preset file (the demo, ``engine.demo.DEMO_PRESET``, when None). A file's ``model.trust_remote_code: true`` is
    not consent: the draft holds it false and remembers the question (``Draft.code_from_file``)."""
    from engine.preset import load_preset

    preset, asked = untrusted(load_preset(path or DEMO_PRESET))
    return Draft(preset, code_from_file=asked)
