"""Runs: a directory plus a detached process.

``runs/<name>/`` holds ``preset.yaml`` (the settings, exactly as run), ``events.jsonl``,
``train.log`` (the process's own output), ``checkpoints/`` and, at the end, ``adapter/``.
``process.json`` records the training process so a reader can tell running from crashed.

The process is started in its own session (``start_new_session``) with no terminal attached: a
dropped SSH connection, a closed wizard or Ctrl-C in the shell that started it never reaches it.
Stopping is a signal (SIGTERM): it checkpoints and ends with ``end: stopped``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from engine.errors import UserError
from engine.events import fold_history, read_events
from engine.preset import Preset, atomic_write_text, load_preset

PROCESS_FILE = "process.json"
LOG_FILE = "train.log"
STATUSES = ("starting", "running", "finished", "stopped", "failed", "crashed")


def slug(text: str) -> str:
    """A folder-safe short name."""
    keep = "".join(c if c.isalnum() or c in "-_." else "-" for c in text)
    return "-".join(p for p in keep.split("-") if p)[:60] or "run"


def default_run_name(preset: Preset) -> str:
    """The model's short name and the time, e.g. ``Llama-3.1-8B-20261123-101500``."""
    model = preset.model.source.rstrip("/").split("/")[-1].replace("builtin:", "")
    return f"{slug(model)}-{datetime.now():%Y%m%d-%H%M%S}"


def create_run(preset: Preset, run_dir: str | os.PathLike | None = None) -> Path:
    """Make a new run directory holding the preset; refuses to reuse a directory that has a run."""
    if run_dir is None:
        name = preset.output.name or default_run_name(preset)
        run_dir = Path(preset.output.runs_dir) / name
    run_dir = Path(run_dir)
    if (run_dir / "events.jsonl").exists() or (run_dir / "preset.yaml").exists():
        raise UserError(
            f"{run_dir} already holds a run",
            f"resume it with `qlora-wizard resume {run_dir}`, or pick another --run-dir",
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "preset.yaml", _with_absolute_paths(preset).to_yaml())
    return run_dir


def _with_absolute_paths(preset: Preset) -> Preset:
    """The preset with local model and data paths made absolute, so the run means the same files
    whatever directory it is resumed or inspected from."""

    def absolute(value: str | None) -> str | None:
        if not value or value.startswith("builtin:") or not Path(value).exists():
            return value
        return str(Path(value).resolve())

    return preset.model_copy(update={
        "model": preset.model.model_copy(update={"source": absolute(preset.model.source)}),
        "data": preset.data.model_copy(update={"train": absolute(preset.data.train),
                                               "validation": absolute(preset.data.validation)}),
    })


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _process_start_time(pid: int) -> str | None:
    """The kernel's start time of a process, to tell it from a later process that reused its pid."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def start_process(run_dir: str | os.PathLike, resume: bool = False) -> int:
    """Start the training process for ``run_dir``, detached in its own session; returns its pid."""
    run_dir = Path(run_dir).resolve()
    if not (run_dir / "preset.yaml").exists():
        raise UserError(f"{run_dir} is not a run directory (no preset.yaml)")
    if is_running(run_dir):
        raise UserError(f"{run_dir} is already training", f"follow it with `qlora-wizard attach {run_dir}`")
    cmd = [sys.executable, "-m", "engine.train", str(run_dir)] + (["--resume"] if resume else [])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # The engine package must be importable by the child whatever the current directory is.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(run_dir / LOG_FILE, "ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=root,
            env=env,
            start_new_session=True,  # its own session: no SIGHUP or terminal Ctrl-C ever reaches it
            close_fds=True,
        )
    atomic_write_text(
        run_dir / PROCESS_FILE,
        json.dumps({"pid": proc.pid, "start_time": _process_start_time(proc.pid), "started": time.time(),
                    "resume": resume, "command": cmd}),
    )
    # Reap the child when it exits if we are still around, so it never lingers as a zombie.
    import threading

    threading.Thread(target=proc.wait, daemon=True).start()
    return proc.pid


def _process_record(run_dir: Path) -> dict | None:
    """The recorded training process of a run, or None."""
    try:
        return json.loads((run_dir / PROCESS_FILE).read_text())
    except (OSError, ValueError):
        return None


def is_running(run_dir: str | os.PathLike) -> bool:
    """Whether the run's training process is alive (the same process, not a reused pid)."""
    rec = _process_record(Path(run_dir))
    if not rec:
        return False
    pid = rec.get("pid")
    if not pid or not pid_alive(pid):
        return False
    recorded = rec.get("start_time")
    return recorded is None or _process_start_time(pid) in (None, recorded)


def wait_until_exited(run_dir: str | os.PathLike, timeout: float = 30.0) -> bool:
    """Wait for a run's process to exit once it has written its ``end`` event; True when it is gone."""
    deadline = time.time() + timeout
    while is_running(run_dir):
        if time.time() > deadline or fold_history(read_events(run_dir)).end is None:
            return False
        time.sleep(0.1)
    return True


def stop_run(run_dir: str | os.PathLike, sig: int = signal.SIGTERM) -> bool:
    """Ask the training process to checkpoint and stop; False if it was not running."""
    rec = _process_record(Path(run_dir))
    if not rec or not is_running(run_dir):
        return False
    os.kill(rec["pid"], sig)
    return True


def log_tail(run_dir: str | os.PathLike, lines: int = 20) -> list[str]:
    """The last lines of the run's ``train.log``."""
    try:
        with open(Path(run_dir) / LOG_FILE, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return []
    return [ln for ln in text.splitlines() if ln.strip()][-lines:]


@dataclass
class RunSummary:
    """One line's worth of a run, as ``qlora-wizard runs`` shows it."""

    name: str
    path: str
    status: str
    step: int
    total_steps: int | None
    loss: float | None
    eval_loss: float | None
    model: str | None
    message: str | None
    started: float | None

    def to_json(self) -> dict:
        """The stable JSON form of ``qlora-wizard runs --json``."""
        return asdict(self)


def summarize_run(run_dir: str | os.PathLike) -> RunSummary:
    """The run's status from its events and process: running, finished, stopped, failed or crashed.

    A process that is gone without an ``end`` event crashed (``kill -9``, the machine's OOM killer,
    a power cut); the tail of ``train.log`` says why.
    """
    run_dir = Path(run_dir)
    history = fold_history(read_events(run_dir))
    last = history.last_step or {}
    message = None
    if history.end is not None:
        status = history.end.get("status", "failed")
        message = history.end.get("message")
    elif is_running(run_dir):
        status = "running" if history.start else "starting"
    else:
        status = "crashed"
        tail = log_tail(run_dir, 1)
        message = "the training process ended without a word" + (f"; train.log ends: {tail[-1]}" if tail else "")
    model = None
    try:
        model = load_preset(run_dir / "preset.yaml").model.source
    except UserError:
        pass
    return RunSummary(
        name=run_dir.name,
        path=str(run_dir),
        status=status,
        step=int(last.get("step", 0)),
        total_steps=history.total_steps,
        loss=last.get("loss"),
        eval_loss=history.evals[-1]["eval_loss"] if history.evals else None,
        model=model,
        message=message,
        started=(history.start or {}).get("time"),
    )


def list_runs(runs_dir: str | os.PathLike = "runs") -> list[RunSummary]:
    """Every run under ``runs_dir``, newest first."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if (d / "preset.yaml").exists()]
    dirs.sort(key=lambda d: d.stat().st_mtime, reverse=True)
    return [summarize_run(d) for d in dirs]


def newest_run(runs_dir: str | os.PathLike = "runs") -> Path | None:
    """The most recently started run directory."""
    runs = list_runs(runs_dir)
    return Path(runs[0].path) if runs else None
