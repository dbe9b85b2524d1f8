"""The run protocol: one JSON object per line in ``events.jsonl``, appended and flushed as things happen.

The training process writes; the TUI run screen, the headless console runner, ``qlora-wizard runs``
and a later reattach all read the same file. A reader tolerates a half-written last line (the
writer may be in the middle of it) and picks it up on the next read.

Event kinds: ``start`` (settings, data statistics, memory estimate, device), ``step`` (step, epoch,
loss, learning rate, grad norm, tokens/s, memory in use), ``eval`` (validation loss),
``checkpoint``, ``end`` (finished / stopped / failed, adapter path, peak memory against the
estimate) and ``error`` (what went wrong, in words, with what to try).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EVENTS_FILE = "events.jsonl"
KINDS = ("start", "step", "eval", "checkpoint", "end", "error")
END_STATUSES = ("finished", "stopped", "failed")


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as strings a reader can still recognise."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class EventWriter:
    """Appends events to a run's ``events.jsonl``; each line goes out in one ``write`` and is synced.

    A write the disk cut short (full) leaves a torn line; the next event starts on a new line, so
    readers skip the torn one and lose nothing after it.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / EVENTS_FILE
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._torn = False

    def emit(self, kind: str, **payload: Any) -> dict:
        """Write one event and return it; ``OSError`` when the file cannot take it."""
        if kind not in KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        event = {"kind": kind, "time": time.time(), **_clean(payload)}
        line = (json.dumps(event, separators=(",", ":")) + "\n").encode("utf-8")
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


class EventTail:
    """Reads new complete events from a growing ``events.jsonl``, remembering where it stopped."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / EVENTS_FILE
        self._offset = 0

    def read_new(self) -> list[dict]:
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
                event = json.loads(raw)
            except ValueError:
                continue  # a line torn by a crash mid-write: skip it, the rest of the history stands
            if isinstance(event, dict) and "kind" in event:
                events.append(event)
        return events


def read_events(run_dir: str | os.PathLike) -> list[dict]:
    """All complete events of a run, in order."""
    return EventTail(run_dir).read_new()


@dataclass
class RunHistory:
    """A run's events folded into one history, across resumes."""

    start: dict | None = None
    """The first ``start`` event (settings, data, estimate, device)."""
    resumes: list[dict] = field(default_factory=list)
    """Later ``start`` events, one per resume."""
    steps: list[dict] = field(default_factory=list)
    """``step`` events in step order; steps redone after a resume replace the lost ones."""
    evals: list[dict] = field(default_factory=list)
    checkpoints: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    end: dict | None = None
    """The last ``end`` event, if the run (or its latest resume) ended."""

    @property
    def last_step(self) -> dict | None:
        """The newest step event."""
        return self.steps[-1] if self.steps else None

    @property
    def total_steps(self) -> int | None:
        """Optimizer steps the run will take."""
        latest = self.resumes[-1] if self.resumes else self.start
        return (latest or {}).get("total_steps")


def fold_history(events: list[dict]) -> RunHistory:
    """Fold raw events into one history.

    A resume restarts from a checkpoint at step k: any step, eval or checkpoint event after k
    that the earlier process wrote is dropped, since that work was lost and is done again.
    An ``end`` event before a resume no longer describes the run.
    """
    return extend_history(RunHistory(), events)


def extend_history(h: RunHistory, events: list[dict]) -> RunHistory:
    """Fold more events into ``h`` (in place, and returned): a follower folds each poll's news
    instead of the whole file again. ``fold_history(a + b)`` equals ``extend_history(fold_history(a), b)``."""
    for ev in events:
        kind = ev.get("kind")
        if kind == "start":
            if h.start is None:
                h.start = ev
                continue
            h.resumes.append(ev)
            k = ev.get("resumed_from_step") or 0
            h.steps = [s for s in h.steps if s.get("step", 0) <= k]
            h.evals = [s for s in h.evals if s.get("step", 0) <= k]
            h.checkpoints = [s for s in h.checkpoints if s.get("step", 0) <= k]
            h.end = None
        elif kind == "step":
            h.steps.append(ev)
        elif kind == "eval":
            h.evals.append(ev)
        elif kind == "checkpoint":
            h.checkpoints.append(ev)
        elif kind == "error":
            h.errors.append(ev)
        elif kind == "end":
            h.end = ev
    return h
