"""The run protocol: one JSON object per line in ``events.jsonl``, appended and flushed as things happen.

The training process writes; the TUI run screen, the headless console runner, ``qlora-wizard runs``
and a later reattach all read the same file. A reader tolerates a half-written last line (the
writer may be in the middle of it) and picks it up on the next read.

Event kinds: ``start`` (settings, data statistics, memory estimate, device), ``step`` (step, epoch,
loss, learning rate, grad norm, tokens/s, memory in use), ``eval`` (validation loss),
``checkpoint``, ``end`` (finished / stopped / failed, adapter path, peak memory against the
estimate) and ``error`` (what went wrong, in words, with what to try). Each is a dataclass, and so
are the start event's data statistics, memory estimate and world (:class:`StartData`,
:class:`StartEstimate`, :class:`StartWorld`): typed records that write back the JSON they were given.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

EVENTS_FILE = "events.jsonl"
END_STATUSES = ("finished", "stopped", "failed")
RUN_STATUSES = ("starting", "running", *END_STATUSES, "crashed")
"""What a run can be: before its start event, training, ended three ways, or gone without an end."""


def json_safe(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as strings a reader can still recognise."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def finite(value: Any) -> float | None:
    """A finite number as a float; None for anything else (None, NaN, infinity)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


# ---------------------------------------------------------------------------------------------
# The objects an event holds, one dataclass each


_RECORD_FIELDS = ("extra", "given_keys")
"""The fields every record has that are not keys of its object."""


@dataclass(frozen=True)
class Record:
    """A JSON object inside an event (the start event's ``data``, ``estimate``, ``world``) as typed fields.

    Tolerant as the events are: a key the object lacks (written by an older version) reads as None
    and a key this version does not know is kept in ``extra``. ``to_json`` gives back the object it
    was read from, key for key and in its order, so a line written through a record is the line the
    writer's dict would have made."""

    extra: dict = field(default_factory=dict, compare=False, repr=False)
    """Keys this version does not know."""
    given_keys: tuple[str, ...] | None = field(default=None, compare=False, repr=False)
    """The keys of the object it was read from, in order: those are written back (then any other field
    set since). None for a record made here, which writes its fields that are not None (as an event
    does), then ``extra``."""

    @classmethod
    def known(cls) -> tuple[str, ...]:
        """The keys this version reads into fields."""
        return tuple(f.name for f in fields(cls) if f.name not in _RECORD_FIELDS)

    @classmethod
    def from_json(cls, raw: Any):
        """The record of an object as the events file holds it (a record is returned as it is; anything
        that is not an object reads as the empty object)."""
        if isinstance(raw, cls):
            return raw
        if not isinstance(raw, dict):
            raw = {}
        known = set(cls.known())
        return cls(**{k: v for k, v in raw.items() if k in known},
                   extra={k: v for k, v in raw.items() if k not in known}, given_keys=tuple(raw))

    def to_json(self) -> dict:
        """The object as the events file holds it."""
        known = self.known()
        given = self.given_keys if self.given_keys is not None else ()
        keys = (*given, *(k for k in known if k not in given and getattr(self, k) is not None),
                *(k for k in self.extra if k not in given))
        return {k: getattr(self, k) if k in known else self.extra[k] for k in keys if k in known or k in self.extra}

    @property
    def empty(self) -> bool:
        """Nothing in it: the object had no keys (an event that carried none, or ``{}``), or a record
        made here has no field set."""
        return not self.to_json()


@dataclass(frozen=True)
class StartData(Record):
    """The start event's ``data``: ``engine.data.DataStats.to_json()``, what went into the training data."""

    format: str | None = None
    """The data format trained on (the one detected when the preset says ``auto``)."""
    examples: int | None = None
    """Training examples after cleaning, split, cap and truncation."""
    validation_examples: int | None = None
    """Validation examples."""
    tokens: int | None = None
    """Real tokens in the training examples (no padding)."""
    supervised_tokens: int | None = None
    """Tokens the loss is taken on, in one pass."""
    validation_tokens: int | None = None
    """Real tokens in the validation examples."""
    truncated: int | None = None
    """Examples (training and validation) cut at ``seq_len``."""
    removed_duplicates: int | None = None
    """Examples dropped as duplicates."""
    removed_phrases: int | None = None
    """Examples dropped for a drop phrase."""
    removed_empty: int | None = None
    """Examples dropped because nothing trainable was left after truncation."""
    skipped_bad: int | None = None
    """Bad records skipped (``data.skip_bad_records``)."""
    max_len: int | None = None
    """Longest training example in tokens."""
    mean_len: float | None = None
    """Mean training example length in tokens."""
    seq_len: int | None = None
    """The sequence length the examples were cut at."""
    validation_supervised_tokens: int | None = None
    """Validation tokens the loss is taken on."""
    unstopped: int | None = None
    """Training examples whose trained part does not end with a stop token."""
    unstopped_cut: int | None = None
    """Of those, the ones cut at ``seq_len``."""
    stop_token: str | None = None
    """The stop token the training examples end with (the most common one)."""
    stop_is_eos: bool | None = None
    """Whether that is the tokenizer's end-of-sequence token."""
    pairs: int | None = None
    """Preference pairs (dpo, orpo): the training pairs; 0 for data of single responses."""
    prompt_tokens: int | None = None
    """Prompt tokens of the training pairs, each prompt once."""
    chosen_tokens: int | None = None
    """Chosen answer tokens of the training pairs."""
    rejected_tokens: int | None = None
    """Rejected answer tokens of the training pairs."""
    removed_identical: int | None = None
    """Pairs dropped because their two answers are the same."""
    removed_empty_side: int | None = None
    """Pairs dropped because an answer is empty."""
    removed_prompt_too_long: int | None = None
    """Pairs dropped because their prompt leaves no answer token within ``seq_len``."""


@dataclass(frozen=True)
class StartEstimate(Record):
    """The start event's ``estimate``: ``engine.memory.MemoryEstimate.to_json()``, in bytes."""

    total_bytes: int | None = None
    """The estimated device footprint of a training step."""
    reserved_bytes: int | None = None
    """The estimate of torch's reserved peak."""
    allocated_bytes: int | None = None
    """The estimate of torch's allocated peak."""
    components: dict | None = None
    """Ordered name -> bytes; they add up to ``total_bytes``."""
    inference_rule_bytes: int | None = None
    """The rule of thumb for inference, for comparison."""
    budget_bytes: int | None = None
    """The budget it was checked against (none at the start of a run)."""
    fits: bool | None = None
    """Whether it fits that budget."""
    lora_params: int | None = None
    """Trainable LoRA parameters."""
    paged: bool | None = None
    """The optimizer state is paged."""
    paged_bytes: int | None = None
    """Bytes of paged optimizer state."""
    loss_peak_bytes: int | None = None
    """The loss computation's own peak."""
    layer_backward_bytes: int | None = None
    """One layer's backward pass."""
    phases_share_memory: bool | None = None
    """Whether the forward and backward peaks share memory."""
    notes: list | None = None
    """What the estimate assumed, in words."""
    strategy: str | None = None
    """``single``, ``ddp`` or ``fsdp``: the strategy it estimated for."""
    world_size: int | None = None
    """Processes it estimated for (the estimate is per process)."""
    sharded: list | None = None
    """Components sharded across the processes (FSDP)."""
    replicated: list | None = None
    """Components every process holds whole."""


@dataclass(frozen=True)
class StartWorld(Record):
    """The start event's ``world`` of a multi-process run (``engine.distributed.World.to_json()`` and more)."""

    procs_per_node: int | None = None
    """Processes (GPUs, or CPU processes) per machine."""
    nodes: int | None = None
    """Machines."""
    device: str | None = None
    """``cuda`` or ``cpu``."""
    world_size: int | None = None
    """Processes in all."""
    describe: str | None = None
    """The world in words: ``2 GPUs``, ``8 GPUs x 2 machines``."""
    strategy: str | None = None
    """``ddp`` or ``fsdp``."""
    reason: str | None = None
    """Why that strategy, in words."""
    backend: str | None = None
    """The collective backend: ``nccl`` or ``gloo``."""
    ranks_file: str | None = None
    """The run's record of its ranks (``ranks.json``)."""


# ---------------------------------------------------------------------------------------------
# The events, one dataclass per kind


@dataclass(frozen=True)
class Event:
    """What every event has. A field the file lacks (written by an older version) is None; a key
    this version does not know (written by a newer one) is kept in ``extra``."""

    kind: ClassVar[str] = ""
    FLOATS: ClassVar[tuple[str, ...]] = ()
    """Fields that are numbers the writer may have stored as "nan" / "inf" strings."""

    time: float | None = None
    """When it was written (seconds since the epoch)."""
    extra: dict = field(default_factory=dict, compare=False, repr=False)
    """Keys this version does not know."""

    def to_json(self) -> dict:
        """The event as one line of ``events.jsonl`` holds it (fields that are None are left out)."""
        out: dict = {"kind": self.kind}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "extra" and value is not None:
                out[f.name] = json_safe(value.to_json() if isinstance(value, Record) else value)
        return out


@dataclass(frozen=True)
class StartEvent(Event):
    """The training process has read the data and the model's config and is about to load it."""

    kind: ClassVar[str] = "start"
    preset: dict = field(default_factory=dict)
    """The preset as run (``Preset.model_dump``)."""
    model: dict = field(default_factory=dict)
    """``ModelInfo.to_json()`` plus ``source`` and ``resolved_source``."""
    targets: list = field(default_factory=list)
    """The layer names LoRA adapts."""
    data: StartData = field(default_factory=StartData)
    """``DataStats.to_json()`` (given as that dict, kept as its record)."""
    estimate: StartEstimate = field(default_factory=StartEstimate)
    """``MemoryEstimate.to_json()`` (given as that dict, kept as its record)."""
    device: str | None = None
    """``cuda`` or ``cpu``."""
    device_name: str | None = None
    compute_dtype: str | None = None
    attn_implementation: str | None = None
    kernels: str | None = None
    """Which attention and loss kernels run and why, in words (``DevicePlan.kernels_note``)."""
    fused_kernels: bool | None = None
    """Liger Kernel's fused blocks and loss run."""
    total_steps: int | None = None
    steps_per_epoch: int | None = None
    method: str = "sft"
    """What the run teaches: ``sft``, ``dpo`` or ``orpo`` (``training.method``)."""
    reference: str | None = None
    """dpo: ``precomputed`` or ``each_step`` (``engine.preference.reference_mode``); None otherwise."""
    resumed_from_step: int | None = None
    """The checkpoint's step a resume continues from; None for a fresh start (or a resume without one)."""
    resume_requested: bool = False
    pid: int | None = None
    versions: dict = field(default_factory=dict)
    world: StartWorld | None = None
    """Several processes (``engine.distributed``; given as a dict, kept as its record); None for one process."""

    def __post_init__(self) -> None:
        """The objects the writer hands over (and a file holds) as dicts, as their records."""
        object.__setattr__(self, "data", StartData.from_json(self.data))
        object.__setattr__(self, "estimate", StartEstimate.from_json(self.estimate))
        world = self.world
        object.__setattr__(self, "world",
                           StartWorld.from_json(world) if isinstance(world, (dict, StartWorld)) else None)

    @property
    def world_words(self) -> str | None:
        """``2 GPUs, DDP`` for a multi-process run; None for one process."""
        world = self.world
        if world is None or world.empty:
            return None
        strategy = str(world.strategy or "").upper()
        return f"{world.describe or world.world_size}, {strategy}".rstrip(", ")

    @property
    def remote_code(self) -> str | None:
        """The model's own code runs (``trust_remote_code``): from where and at which revision, in words."""
        words = self.model.get("remote_code")
        return words if isinstance(words, str) else None

    @property
    def model_source(self) -> str:
        """The model as the person named it (the preset's source), else as the process resolved it."""
        return (self.preset.get("model") or {}).get("source") or self.model.get("source") or "?"


@dataclass(frozen=True)
class StepEvent(Event):
    """An optimizer step (every ``logging_steps``)."""

    kind: ClassVar[str] = "step"
    FLOATS: ClassVar[tuple[str, ...]] = ("loss", "learning_rate", "grad_norm", "tokens_per_s", "epoch",
                                         "rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy",
                                         "nll_loss")
    step: int = 0
    total_steps: int | None = None
    epoch: float = 0.0
    loss: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens: int | None = None
    """Real tokens (no padding) since the last step event."""
    tokens_per_s: float | None = None
    tokens_seen: int | None = None
    mem_allocated: int | None = None
    """CUDA: torch's allocated bytes now."""
    mem_reserved: int | None = None
    """CUDA: torch's reserved bytes now."""
    mem_device_used: int | None = None
    """CUDA: the device's used bytes as nvidia-smi counts them."""
    mem_rss: int | None = None
    """CPU: the process's resident bytes."""
    ranks: list | None = None
    """Several processes: each rank's ``{"rank", "tokens", "mem_*"}`` now; the ``mem_*`` fields above
    are then the highest of any rank and ``tokens`` the sum."""
    rewards_chosen: float | None = None
    """dpo, orpo: the implicit reward of the chosen answers (dpo: beta x the log-probability ratio to the
    reference; orpo: beta x the log-probability), the mean over the logged steps' pairs."""
    rewards_rejected: float | None = None
    """dpo, orpo: the same for the rejected answers."""
    reward_margin: float | None = None
    """dpo, orpo: chosen minus rejected reward, the mean over pairs."""
    reward_accuracy: float | None = None
    """dpo, orpo: the share of pairs whose chosen answer has the higher reward."""
    nll_loss: float | None = None
    """orpo: the supervised part of its loss (the chosen answers' negative log-likelihood)."""


@dataclass(frozen=True)
class EvalEvent(Event):
    """A validation pass."""

    kind: ClassVar[str] = "eval"
    FLOATS: ClassVar[tuple[str, ...]] = ("eval_loss", "epoch", "eval_reward_margin", "eval_reward_accuracy")
    step: int = 0
    epoch: float = 0.0
    eval_loss: float | None = None
    eval_reward_margin: float | None = None
    """dpo, orpo: chosen minus rejected reward on the validation pairs."""
    eval_reward_accuracy: float | None = None
    """dpo, orpo: the share of validation pairs whose chosen answer has the higher reward."""


@dataclass(frozen=True)
class CheckpointEvent(Event):
    """A resumable checkpoint was written."""

    kind: ClassVar[str] = "checkpoint"
    step: int = 0
    path: str | None = None


@dataclass(frozen=True)
class ErrorEvent(Event):
    """What went wrong, in words, with what to try."""

    kind: ClassVar[str] = "error"
    message: str = ""
    bad_input: bool = False
    """The problem is the input (exit status 2), not the run."""
    exception: str | None = None
    """The Python exception's type name, for the log reader."""
    step: int | None = None


@dataclass(frozen=True)
class EndEvent(Event):
    """The run (or the latest resume of it) ended: ``finished``, ``stopped`` or ``failed``."""

    kind: ClassVar[str] = "end"
    FLOATS: ClassVar[tuple[str, ...]] = ("elapsed_s",)
    status: str = "failed"
    message: str | None = None
    step: int | None = None
    """The last optimizer step done."""
    adapter: str | None = None
    """Where the finished adapter is."""
    checkpoint: str | None = None
    """The newest complete checkpoint, when stopped or failed."""
    signal: str | None = None
    """The signal that stopped it."""
    abandoned: bool = False
    """A third signal abandoned the checkpoint of a stop; ``message`` says what is saved."""
    elapsed_s: float | None = None
    peak_reserved: int | None = None
    peak_allocated: int | None = None
    peak_device_used: int | None = None
    device_used_before: int | None = None
    peak_rss: int | None = None
    estimate_total: int | None = None
    estimate_reserved: int | None = None
    ranks: list | None = None
    """Several processes: each rank's peak memory (``{"rank", "peak_*"}``); the ``peak_*`` fields above
    are then the highest of any rank."""
    failed_rank: int | None = None
    """The rank whose death or failure ended a multi-process run."""


EVENT_TYPES: dict[str, type[Event]] = {cls.kind: cls for cls in
                                       (StartEvent, StepEvent, EvalEvent, CheckpointEvent, ErrorEvent, EndEvent)}
"""Every kind of event, by the ``kind`` its lines carry."""
KINDS = tuple(EVENT_TYPES)


def parse_event(raw: Any) -> Event | None:
    """One line's object as its typed event; None for something that is not an event of a known kind.

    Tolerant by design: files written by older versions lack fields (they read as None) and files
    written by newer ones carry more (kept in ``extra``)."""
    if isinstance(raw, Event):
        return raw
    if not isinstance(raw, dict):
        return None
    cls = EVENT_TYPES.get(raw.get("kind"))
    if cls is None:
        return None
    known = {f.name for f in fields(cls)} - {"extra"}
    values = {k: v for k, v in raw.items() if k in known}
    for name in cls.FLOATS:
        if isinstance(values.get(name), str):
            try:
                values[name] = float(values[name])
            except ValueError:
                values[name] = None
    extra = {k: v for k, v in raw.items() if k not in known and k != "kind"}
    try:
        return cls(**values, extra=extra)
    except TypeError:
        return None


class EventWriter:
    """Appends events to a run's ``events.jsonl``; each line goes out in one ``write`` and is synced.

    A write the disk cut short (full) leaves a torn line; the next event starts on a new line, so
    readers skip the torn one and lose nothing after it.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        import threading

        self.path = Path(run_dir) / EVENTS_FILE
        from engine.files import open_append

        self._fd = open_append(self.path)  # never through a link planted at the name
        self._torn = False
        self._lock = threading.Lock()
        self.ended = False
        """An ``end`` event was written: the process's last word; later ones are dropped (a watchdog
        thread and the training thread may both try to end a multi-process run)."""

    def emit(self, kind: str, **payload: Any) -> Event | None:
        """Write one event of ``kind`` with these fields and return it; ``OSError`` when the file cannot
        take it. A field the kind does not have is a ``TypeError``: a misspelt key never reaches readers.
        Nothing is written after the ``end`` event (None is returned)."""
        with self._lock:
            if self.ended:
                return None
            event = self._write(kind, payload)
            self.ended = kind == "end"
            return event

    def _write(self, kind: str, payload: dict) -> Event:
        event = EVENT_TYPES[kind](time=time.time(), **payload)
        line = (json.dumps(event.to_json(), separators=(",", ":")) + "\n").encode("utf-8")
        if self._torn:
            line = b"\n" + line
        written = 0
        try:
            while written < len(line):
                written += os.write(self._fd, line[written:])
        except OSError:
            self._torn = self._torn or written > 0
            raise
        self._torn = False
        try:
            os.fsync(self._fd)
        except OSError:
            pass
        return event

    def close(self) -> None:
        """Close the file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class NoEvents:
    """The writer of a rank that writes no events (every rank of a multi-process run but local rank 0):
    the same calls, checked the same way, nothing written."""

    path = None
    ended = False

    def emit(self, kind: str, **payload: Any) -> None:
        """Check the event as ``EventWriter.emit`` would, and drop it."""
        EVENT_TYPES[kind](time=None, **payload)

    def close(self) -> None:
        """Nothing to close."""


POLL_S = 0.2
"""Seconds between a follower's looks at ``events.jsonl`` (and the process and the log): the headless
console runner and the run screen read what is written within a poll (the screen draws it then, or
at its next redraw when news comes faster than ``tui.screens.run.SHOW_EVERY_S``)."""


class EventTail:
    """Reads new complete events from a growing ``events.jsonl``, remembering where it stopped."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / EVENTS_FILE
        self._offset = 0

    def read_new(self) -> list[Event]:
        """Events written since the last call; a half-written last line waits for the next call."""
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n")
        if end < 0:
            return []
        self._offset += end + 1
        events = []
        for raw in data[: end + 1].splitlines():
            if not raw.strip():
                continue
            try:
                event = parse_event(json.loads(raw))
            except ValueError:
                continue  # a line torn by a crash mid-write: skip it, the rest of the history stands
            if event is not None:
                events.append(event)
        return events


def read_events(run_dir: str | os.PathLike) -> list[Event]:
    """All complete events of a run, in order."""
    return EventTail(run_dir).read_new()


@dataclass
class RunHistory:
    """A run's events folded into one history, across resumes."""

    start: StartEvent | None = None
    """The first ``start`` event (settings, data, estimate, device)."""
    resumes: list[StartEvent] = field(default_factory=list)
    """Later ``start`` events, one per resume."""
    steps: list[StepEvent] = field(default_factory=list)
    """``step`` events in step order; steps redone after a resume replace the lost ones."""
    evals: list[EvalEvent] = field(default_factory=list)
    checkpoints: list[CheckpointEvent] = field(default_factory=list)
    errors: list[ErrorEvent] = field(default_factory=list)
    end: EndEvent | None = None
    """The last ``end`` event, if the run (or its latest resume) ended."""

    @property
    def last_step(self) -> StepEvent | None:
        """The newest step event."""
        return self.steps[-1] if self.steps else None

    @property
    def latest_start(self) -> StartEvent | None:
        """The start event of the latest process (the last resume, else the first start)."""
        return self.resumes[-1] if self.resumes else self.start

    @property
    def total_steps(self) -> int | None:
        """Optimizer steps the run will take."""
        latest = self.latest_start
        return latest.total_steps if latest else None

    @property
    def step(self) -> int:
        """The last optimizer step done (that the history shows)."""
        if self.steps:
            return self.steps[-1].step
        return (self.end.step if self.end and self.end.step is not None else 0)

    @property
    def bad_input(self) -> bool:
        """Whether the run failed on its input (exit status 2)."""
        return any(e.bad_input for e in self.errors)

    def status(self, alive: bool) -> str:
        """``starting``, ``running``, ``finished``, ``stopped``, ``failed`` or ``crashed``, given whether
        its training process is alive. Crashed is a process gone without an ``end`` event; a reader
        that looks at the process before it reads the file always sees an end written just before
        the process exited."""
        if self.end is not None:
            return self.end.status
        if alive:
            return "running" if self.start else "starting"
        return "crashed"


def fold_history(events: list[Event | dict]) -> RunHistory:
    """Fold raw events into one history.

    A resume restarts from a checkpoint at step k: any step, eval or checkpoint event after k
    that the earlier process wrote is dropped, since that work was lost and is done again.
    An ``end`` event before a resume no longer describes the run.
    """
    return extend_history(RunHistory(), events)


def extend_history(h: RunHistory, events: list[Event | dict]) -> RunHistory:
    """Fold more events into ``h`` (in place, and returned): a follower folds each poll's news
    instead of the whole file again. ``fold_history(a + b)`` equals ``extend_history(fold_history(a), b)``."""
    for ev in map(parse_event, events):
        if isinstance(ev, StartEvent):
            if h.start is None:
                h.start = ev
                continue
            h.resumes.append(ev)
            k = ev.resumed_from_step or 0
            h.steps = [s for s in h.steps if s.step <= k]
            h.evals = [s for s in h.evals if s.step <= k]
            h.checkpoints = [s for s in h.checkpoints if s.step <= k]
            h.end = None
        elif isinstance(ev, StepEvent):
            h.steps.append(ev)
        elif isinstance(ev, EvalEvent):
            h.evals.append(ev)
        elif isinstance(ev, CheckpointEvent):
            h.checkpoints.append(ev)
        elif isinstance(ev, ErrorEvent):
            h.errors.append(ev)
        elif isinstance(ev, EndEvent):
            h.end = ev
    return h
