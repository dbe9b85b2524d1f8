"""Runs: a directory plus a detached process.

``runs/<name>/`` holds ``preset.yaml`` (the settings, exactly as run), ``events.jsonl``,
``train.log`` (the process's own output), ``checkpoints/``, ``tensorboard/`` (with ``training.report_to``)
and, at the end, ``adapter/``.
``process.json`` records the training process so a reader can tell running from crashed.

The process is started in its own session (``start_new_session``) with no terminal attached: a
dropped SSH connection, a closed wizard or Ctrl-C in the shell that started it never reaches it.
Stopping is a signal (SIGTERM): it checkpoints and ends with ``end: stopped``.

One run, one process, nothing lost:

- a run directory is claimed atomically (``preset.yaml`` is linked into place, which fails if one
  is there), so of two runs started into one directory at the same moment exactly one starts;
- ``train.lock`` is locked (``flock``) by the launcher and handed to the training process, which
  holds it for its whole life, so a second process (a second ``resume``) is refused at once;
- every ``OSError`` on the way to a run is one line naming the path and the reason, and whatever
  the attempt created is removed again;
- a finished run is not trained again unless the person raises its ``max_steps`` explicitly, and
  its adapter is then kept beside the new one.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from engine.errors import UserError, os_error
from engine.events import EVENTS_FILE, fold_history, json_safe, read_events
from engine.files import file_tail, open_append
from engine.preset import Preset, atomic_write_text, load_preset, preset_from_dict
from engine.proc import DamagedRecord, process_start_time, send_signal, verified, verified_quietly

PRESET_FILE = "preset.yaml"
PROCESS_FILE = "process.json"
LOG_FILE = "train.log"
LOCK_FILE = "train.lock"
CHECKPOINTS_DIR = "checkpoints"
ADAPTER_DIR = "adapter"
TENSORBOARD_DIR = "tensorboard"
"""Where the trainer's TensorBoard event files go (``training.report_to``)."""
RANK_LOGS_DIR = "logs"
"""Each rank's own log in a multi-process run (``engine.distributed.log_path``)."""


def slug(text: str) -> str:
    """A folder-safe short name."""
    keep = "".join(c if c.isalnum() or c in "-_." else "-" for c in text)
    return "-".join(p for p in keep.split("-") if p)[:60] or "run"


def default_run_name(preset: Preset) -> str:
    """The model's short name and the time, e.g. ``Llama-3.1-8B-20261123-101500``."""
    model = preset.model.source.rstrip("/").split("/")[-1].replace("builtin:", "")
    return f"{slug(model)}-{datetime.now():%Y%m%d-%H%M%S}"


def run_dir_for(preset: Preset, run_dir: str | os.PathLike | None = None) -> Path:
    """Where a new run of ``preset`` goes: ``run_dir``, or ``output.runs_dir/<output.name or model-time>``."""
    if run_dir is not None:
        return Path(run_dir)
    return Path(preset.output.runs_dir) / (preset.output.name or default_run_name(preset))


class _Undo:
    """What one attempt to create or start a run made, so a failure can take exactly that back."""

    def __init__(self) -> None:
        self.dirs: list[Path] = []
        self.files: list[Path] = []

    def mkdirs(self, path: Path) -> None:
        """``mkdir -p`` that remembers each folder it made (and only those)."""
        missing = []
        p = path
        while not os.path.lexists(p):
            missing.append(p)
            if p.parent == p:
                break
            p = p.parent
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                if not d.is_dir():
                    raise
                continue  # made a moment ago by someone else (a second start): theirs, not ours to remove
            self.dirs.append(d)

    def undo(self) -> None:
        """Remove the files, then the folders, this attempt created; never anything that was there.

        A folder goes only if it is empty then: one this attempt made may hold what a concurrent
        start (the one that won the run directory) wrote into it a moment later."""
        for f in reversed(self.files):
            try:
                f.unlink()
            except OSError:
                pass
        for d in reversed(self.dirs):
            try:
                d.rmdir()
            except OSError:
                pass


def _already_a_run(run_dir: Path) -> UserError:
    return UserError(f"{run_dir} already holds a run",
                     f"resume it with `qlora-wizard resume {run_dir}`, or pick another --run-dir")


def check_new_run_dir(run_dir: Path) -> None:
    """Refuse (one line) a place a new run cannot go: a link, a file, an existing run, or a folder that
    holds anything at all (someone's files are never mixed with a run's, nor removed by it). Asked
    before anything slow (tokenizing, loading) and again when the directory is claimed."""
    if run_dir.is_symlink():
        raise UserError(f"{run_dir} is a symbolic link; a run directory must be a new or empty folder",
                        "pick another --run-dir (a link above it, such as runs/ on a larger disk, is fine)")
    if os.path.lexists(run_dir) and not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file, not a run directory", "pick another --run-dir")
    if (run_dir / EVENTS_FILE).exists() or (run_dir / PRESET_FILE).exists():
        raise _already_a_run(run_dir)
    if run_dir.is_dir():
        theirs = sorted(p.name for p in run_dir.iterdir())
        if any(name.startswith(f".{PRESET_FILE}.") for name in theirs):
            raise _already_a_run(run_dir)  # another start is claiming it this very moment
        if theirs:
            shown = ", ".join(theirs[:3]) + (f" and {len(theirs) - 3} more" if len(theirs) > 3 else "")
            raise UserError(f"{run_dir} already holds files ({shown}); a run directory must be new or empty, "
                            "so nothing of yours is mixed with the run's or removed by it",
                            "pick a new --run-dir (or output.name)")


def create_run(preset: Preset, run_dir: str | os.PathLike | None = None, undo: _Undo | None = None) -> Path:
    """Make a new run directory holding the preset and an empty events file; returns it.

    Refuses (one line) a directory that already holds a run, a path it cannot write (under a file,
    read-only, full), and leaves nothing behind that was not there before the call.
    """
    run_dir = run_dir_for(preset, run_dir)
    undo = undo if undo is not None else _Undo()
    try:
        check_new_run_dir(run_dir)
        undo.mkdirs(run_dir)
        try:
            # Of two starts claiming this directory at the same moment, exactly one links its preset.
            atomic_write_text(run_dir / PRESET_FILE, _with_absolute_paths(preset).to_yaml(), exclusive=True)
            undo.files.append(run_dir / PRESET_FILE)
            with open(run_dir / EVENTS_FILE, "x", encoding="utf-8"):
                undo.files.append(run_dir / EVENTS_FILE)
        except FileExistsError:
            raise _already_a_run(run_dir) from None  # another start claimed it a moment ago
    except UserError:
        undo.undo()
        raise
    except OSError as exc:
        undo.undo()
        raise os_error(exc, "create the run directory", run_dir) from None
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
        "lora": preset.lora.model_copy(update={"init_from": absolute(preset.lora.init_from)}),
        "data": preset.data.model_copy(update={"train": absolute(preset.data.train),
                                               "validation": absolute(preset.data.validation)}),
    })


def launch_run(preset: Preset, run_dir: str | os.PathLike | None = None, node_rank: int = 0,
               master: str | None = None) -> Path:
    """Create a new run and start its training process: the one way every front end starts a run.

    Several processes (``distributed``): torchrun starts them; ``node_rank`` and ``master`` place
    this machine among several. On any failure (the directory is taken, cannot be written, the
    process cannot start, more GPUs asked for than shown) nothing the attempt created stays
    behind, and the problem is one :class:`UserError`.
    """
    launch = launch_for(preset, node_rank, master)  # refused before anything is created
    undo = _Undo()
    run_dir = create_run(preset, run_dir, undo)
    try:
        start_process(run_dir, undo=undo, launch=launch)
    except BaseException:
        undo.undo()
        raise
    return run_dir


class RunLock:
    """The run's ``train.lock``, locked with ``flock``: whoever holds it is the run's one training process.

    The launcher takes it, hands the open descriptor to the process it starts (which keeps it for
    its whole life; the kernel drops the lock when the process is gone, however it ends) and closes
    its own copy. A second launcher, or a training process started by hand, fails at once.
    """

    def __init__(self, run_dir: str | os.PathLike, fd: int | None = None) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.fd = fd
        """The locked descriptor (inherited when the launcher passed one), or None."""

    def acquire(self) -> RunLock:
        """Lock it, or raise :class:`UserError` saying the run is already training."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666)
        except OSError as exc:
            raise os_error(exc, "write", self.path) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise UserError(f"{self.path.parent} is already training",
                                f"follow it with `qlora-wizard attach {self.path.parent}`") from None
            raise os_error(exc, "lock", self.path) from None
        self.fd = fd
        return self

    def release(self) -> None:
        """Close this process's copy (the lock goes when the last copy does)."""
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None


def launch_for(preset: Preset, node_rank: int = 0, master: str | None = None):
    """How a run of ``preset`` starts on this machine (``engine.distributed.Launch``): the processes
    ``distributed.gpus`` x ``distributed.nodes`` ask for against the GPUs it shows; None for one process."""
    from engine.distributed import Launch, choose_strategy, plan_world

    world = plan_world(preset)
    if not world.distributed:
        return None
    choose_strategy(preset, world)  # a strategy this world cannot run is refused before anything starts
    return Launch(world, node_rank, master)


def start_process(run_dir: str | os.PathLike, resume: bool = False, lock: RunLock | None = None,
                  undo: _Undo | None = None, launch=None) -> int:
    """Start the training process for ``run_dir``, detached in its own session; returns its pid.

    ``launch`` (``engine.distributed.Launch``): several processes, started by torchrun, which is
    then the detached process (it holds the lock for its ranks); None: one process,
    ``python -m engine.train``. Takes the run's lock (unless the caller holds it already) and hands
    it to the process. Refuses a directory that is not a run or that is training, and turns every
    ``OSError`` (the log, the process record) into one line, taking back what it wrote.
    """
    run_dir = Path(run_dir).resolve()
    if not (run_dir / PRESET_FILE).exists():
        raise UserError(f"{run_dir} is not a run directory (no {PRESET_FILE})")
    if is_running(run_dir):
        raise UserError(f"{run_dir} is already training", f"follow it with `qlora-wizard attach {run_dir}`")
    if launch is not None and not launch.world.distributed:
        launch = None
    own_undo = undo is None
    undo = undo if undo is not None else _Undo()
    own_lock = lock is None
    if own_lock:
        if not (run_dir / LOCK_FILE).exists():
            undo.files.append(run_dir / LOCK_FILE)
        try:
            lock = RunLock(run_dir).acquire()
        except BaseException:
            if own_undo:
                undo.undo()
            raise
    log_path = run_dir / LOG_FILE
    log_size = log_path.stat().st_size if log_path.exists() else None
    proc = None
    try:
        try:
            log = os.fdopen(open_append(log_path), "ab")
        except OSError as exc:
            raise os_error(exc, "write", log_path) from None
        if log_size is None:
            undo.files.append(log_path)
        if launch is None:
            cmd = [sys.executable, "-m", "engine.train", str(run_dir), "--lock-fd", str(lock.fd)]
            cmd += ["--resume"] if resume else []
            env = dict(os.environ, PYTHONUNBUFFERED="1")
        else:
            cmd = launch.command(run_dir, resume=resume)
            env = dict(os.environ, PYTHONUNBUFFERED="1", **launch.environment())
            try:
                undo.mkdirs(run_dir / RANK_LOGS_DIR)  # a start that fails takes it back
            except OSError as exc:
                raise os_error(exc, "write", run_dir / RANK_LOGS_DIR) from None
        # The engine package must be importable by the child whatever the current directory is.
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        with log:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=root,
                env=env,
                start_new_session=True,  # its own session: no SIGHUP or terminal Ctrl-C ever reaches it
                close_fds=True,
                pass_fds=(lock.fd,),  # the lock goes with it
            )
        record = run_dir / PROCESS_FILE
        existed = record.exists()
        try:
            atomic_write_text(record, json.dumps({
                "pid": proc.pid, "pgid": proc.pid,  # its own session: its pid is its process group
                "start_time": process_start_time(proc.pid), "started": time.time(),
                "resume": resume, "command": cmd,
                "launch": launch.to_json() if launch is not None else None}))
        except OSError as exc:
            raise os_error(exc, "write", record) from None
        if not existed:
            undo.files.append(record)
    except BaseException:
        if proc is not None:  # a process nobody can see or stop must not go on
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.wait()
        if log_size is not None:
            try:
                os.truncate(log_path, log_size)
            except OSError:
                pass
        if own_lock:
            lock.release()
        if own_undo:
            undo.undo()
        raise
    if own_lock:
        lock.release()
    # Reap the child when it exits if we are still around, so it never lingers as a zombie.
    import threading

    threading.Thread(target=proc.wait, daemon=True).start()
    return proc.pid


def _process_record(run_dir: Path, strict: bool = False) -> dict | None:
    """The recorded training process of a run, or None when there is none (or, unless ``strict``,
    when the record cannot be read; ``strict`` raises :class:`DamagedRecord` then)."""
    path = run_dir / PROCESS_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        if strict:
            raise DamagedRecord(f"{path} cannot be read ({exc.__class__.__name__}); nobody was signalled",
                                "if the run is still training, find it with `ps -ef | grep engine.train`") from None
        return None
    if not isinstance(raw, dict):
        if strict:
            raise DamagedRecord(f"{path} is not a process record; nobody was signalled")
        return None
    return raw


def is_running(run_dir: str | os.PathLike) -> bool:
    """Whether the run's training process is alive and provably the run's own (``engine.proc``: the
    recorded start time, this user's, this run's command line); for a multi-process run, the launcher
    or any of this machine's ranks (they live in sessions of their own and train on if the launcher
    is killed). A damaged record is a run that is not running: nothing can be said for it."""
    rec = _process_record(Path(run_dir))
    if not rec:
        return False
    if verified_quietly(rec.get("pid"), rec.get("start_time"), run_dir):
        return True
    if rec.get("launch"):
        from engine.distributed import rank_alive, read_ranks

        return any(rank_alive(r, run_dir) for r in read_ranks(run_dir))
    return False


def wait_until_exited(run_dir: str | os.PathLike, timeout: float = 30.0) -> bool:
    """Wait for a run's process to exit once it has written its ``end`` event; True when it is gone."""
    deadline = time.time() + timeout
    while is_running(run_dir):
        if time.time() > deadline or fold_history(read_events(run_dir)).end is None:
            return False
        time.sleep(0.1)
    return True


# ------------------------------------------------------------------------------------------
# Checkpoints


@dataclass(frozen=True)
class Checkpoint:
    """One ``checkpoints/checkpoint-N`` folder."""

    step: int
    path: Path
    complete: bool
    """Whether the trainer finished writing it: its ``trainer_state.json`` is whole and names its step.
    The trainer writes that file after the weights, optimizer and random states, so a checkpoint
    cut short (a kill, a full disk, an abandoned stop) never has it."""


def checkpoint_step(path: str | os.PathLike) -> int:
    """The optimizer step a ``checkpoint-N`` folder was saved at; ValueError for another name."""
    return int(Path(path).name.rsplit("-", 1)[-1])


def list_checkpoints(run_dir: str | os.PathLike) -> list[Checkpoint]:
    """The run's checkpoint folders, oldest step first."""
    found = []
    folder = Path(run_dir) / CHECKPOINTS_DIR
    if folder.is_symlink():
        return []  # not the run's own folder: never read as its checkpoints, never cleaned
    for d in folder.glob("checkpoint-*"):
        if d.is_symlink() or not d.is_dir():
            continue
        try:
            step = checkpoint_step(d)
        except ValueError:
            continue
        try:
            state = json.loads((d / "trainer_state.json").read_text(encoding="utf-8"))
            complete = isinstance(state, dict) and state.get("global_step") == step
        except (OSError, ValueError):
            complete = False
        found.append(Checkpoint(step, d, complete))
    return sorted(found, key=lambda c: c.step)


def newest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The resumable checkpoint with the highest step, or None."""
    complete = [c for c in list_checkpoints(run_dir) if c.complete]
    return complete[-1].path if complete else None


def remove_incomplete_checkpoints(run_dir: str | os.PathLike) -> list[str]:
    """Delete checkpoint folders the trainer never finished writing; returns their names.

    Only the run's lock holder may call this (the training process, or a launcher about to start
    one): then no checkpoint is being written. A partial folder can never be resumed, and left in
    place it would count towards ``save_total_limit`` and push out a complete one.
    """
    removed = []
    for c in list_checkpoints(run_dir):
        if not c.complete:
            shutil.rmtree(c.path, ignore_errors=True)
            removed.append(c.path.name)
    return removed


# ------------------------------------------------------------------------------------------
# Checking, resuming and stopping a run


def require_run(run_dir: str | os.PathLike) -> Path:
    """``run_dir`` as a Path if it holds a run of this project (its own ``preset.yaml`` and
    ``events.jsonl``, regular files, not links); else one line saying there is no run there. Every
    command that writes into or removes from an existing run (resume, stop, the after-training
    commands) starts here, so a folder of someone's files is never taken for a run."""
    run_dir = Path(run_dir)
    if not os.path.lexists(run_dir):
        raise UserError(f"there is no run at {run_dir}", "list runs with `qlora-wizard runs`")
    for name in (PRESET_FILE, EVENTS_FILE):
        p = run_dir / name
        if p.is_symlink():
            raise UserError(f"{p} is a symbolic link, not the run's own file; a run never reads or writes through one",
                            "replace it with the run's own file, or pick the run directory it came from")
        if not p.is_file():
            raise UserError(f"{run_dir} is not a run directory of qlora-wizard (no {name})",
                            "list runs with `qlora-wizard runs`")
    return run_dir


@dataclass(frozen=True)
class Resumed:
    """What ``resume_run`` started from, to tell the person."""

    pid: int
    checkpoint: Path | None
    """The checkpoint training continues from; None: from the beginning."""
    removed: tuple[str, ...]
    """Checkpoint folders cut short by the earlier process's end, removed."""
    kept_adapter: Path | None
    """Where a finished run's adapter went when ``max_steps`` was raised."""
    max_steps: int | None
    """The raised step target, when one was given."""


def _same_world(run_dir: Path, preset: Preset, master: str | None = None):
    """The launch a resume uses: the one the run began with (its checkpoints hold that many ranks'
    states), checked against the GPUs this machine shows now. ``master`` replaces machine 0's address."""
    from dataclasses import replace

    from engine.distributed import visible_gpus
    from engine.gpu import probe_gpus

    launch = recorded_launch(run_dir)
    if master is not None:
        if launch is None or launch.world.nodes == 1:
            raise UserError(f"--master is for a run over several machines; {run_dir} trained on one",
                            f"resume it with `qlora-wizard resume {run_dir}`")
        launch = replace(launch, master=master)
    if launch is None:
        return None
    if launch.world.device == "cuda":
        shown = len(visible_gpus(probe_gpus()))
        if shown < launch.world.procs_per_node:
            raise UserError(f"{run_dir} trained on {launch.world.describe()}; this machine shows {shown} GPU(s)",
                            f"resume it where {launch.world.procs_per_node} GPUs are visible (its checkpoints "
                            "hold that many ranks' states)")
    return launch


def resume_run(run_dir: str | os.PathLike, max_steps: int | None = None, master: str | None = None) -> Resumed:
    """Continue a stopped, failed or crashed run from its newest checkpoint in a new training process.

    A finished run is refused unless ``max_steps`` raises its target above the steps done: then the
    preset's ``training.max_steps`` becomes that (the schedule stretches to it) and the finished
    adapter moves to ``adapter-step-N/`` so the new one never overwrites it. Refusals change nothing
    in the run directory; a failure after the first change takes the changes back.
    """
    run_dir = require_run(run_dir)
    history = fold_history(read_events(run_dir))
    if is_running(run_dir) and (history.end is None or not wait_until_exited(run_dir)):
        raise UserError(f"{run_dir} is still training", f"follow it with `qlora-wizard attach {run_dir}`")
    done = history.step
    finished = history.end is not None and history.end.status == "finished"
    if finished and max_steps is None:
        adapter = history.end.adapter or str(run_dir / ADAPTER_DIR)
        raise UserError(
            f"{run_dir} is finished (step {done} of {history.total_steps or done}; its adapter is in {adapter})",
            f"to train it longer, raise its target explicitly: `qlora-wizard resume {run_dir} --max-steps N` "
            f"with N above {done}; or start a new run from its adapter (lora.init_from: {adapter} in a preset)",
        )
    ckpt = newest_checkpoint(run_dir)
    ckpt_step = checkpoint_step(ckpt) if ckpt else 0
    saved = done if finished else ckpt_step
    if max_steps is not None and max_steps <= saved:
        raise UserError(f"--max-steps {max_steps} is not above the {saved} steps this run has saved",
                        f"pick a number above {saved}")
    preset = load_preset(run_dir / PRESET_FILE)
    raised = None
    if max_steps is not None:  # checked against the schema's bounds before anything changes
        data = preset.model_dump(mode="json")
        data["training"]["max_steps"] = max_steps
        raised = preset_from_dict(data, f"--max-steps {max_steps}")
    launch = _same_world(run_dir, preset, master)

    undo = _Undo()
    if not (run_dir / LOCK_FILE).exists():
        undo.files.append(run_dir / LOCK_FILE)
    try:
        lock = RunLock(run_dir).acquire()
    except BaseException:
        undo.undo()
        raise
    preset_text = (run_dir / PRESET_FILE).read_text(encoding="utf-8")
    adapter, kept = run_dir / ADAPTER_DIR, None
    try:
        if max_steps is not None:
            try:
                atomic_write_text(run_dir / PRESET_FILE, raised.to_yaml())
                if finished and adapter.is_dir():
                    kept = run_dir / f"{ADAPTER_DIR}-step-{done}"
                    adapter.rename(kept)
            except OSError as exc:
                raise os_error(exc, "write", exc.filename or run_dir) from None
        removed = remove_incomplete_checkpoints(run_dir)
        pid = start_process(run_dir, resume=True, lock=lock, undo=undo, launch=launch)
    except BaseException:
        undo.undo()
        if kept is not None and not adapter.exists():
            kept.rename(adapter)
        if max_steps is not None:
            try:
                atomic_write_text(run_dir / PRESET_FILE, preset_text)
            except OSError:
                pass
        raise
    finally:
        lock.release()
    return Resumed(pid, ckpt, tuple(removed), kept, max_steps)


def stop_run(run_dir: str | os.PathLike, sig: int = signal.SIGTERM) -> bool:
    """Ask the training process to checkpoint and stop; False if it was not running.

    Only processes proven to be this run's own are signalled (``engine.proc``); a damaged record
    (a pid of -1, 0, 1 or not a number, no start time, a live process that is not this run's
    training, ranks of another machine's record) raises :class:`DamagedRecord` and nobody is signalled.

    A multi-process run: the signal goes to each of this machine's ranks (``ranks.json``), which
    agree on the step to stop at, checkpoint it together and end; not to torchrun, which would
    give them 30 seconds before killing them. Before the ranks have recorded themselves it goes
    to torchrun, which passes it on (nothing is trained yet then)."""
    from engine.distributed import RANKS_FILE, read_ranks

    run_dir = Path(run_dir)
    rec = _process_record(run_dir, strict=True)
    if rec is None:
        return False
    where = str(run_dir / PROCESS_FILE)
    ranks = read_ranks(run_dir, strict=True) if rec.get("launch") else []
    # Every record is checked before anyone is signalled: one damaged entry stops them all.
    launcher_alive = verified(rec.get("pid"), rec.get("start_time"), run_dir, where)
    live = [r for r in ranks if verified(r.pid, r.start_time, run_dir, f"{run_dir / RANKS_FILE} (rank {r.rank})")]
    signalled = False
    for r in live:
        signalled |= send_signal(r.pid, r.start_time, run_dir, f"{run_dir / RANKS_FILE} (rank {r.rank})", sig)
    if not signalled and launcher_alive:
        signalled = send_signal(rec.get("pid"), rec.get("start_time"), run_dir, where, sig)
    return signalled


def launch_command(run_dir: str | os.PathLike) -> str | None:
    """The torchrun command a multi-process run's newest process is, as one line to paste; None for one process."""
    from engine.distributed import shell_command

    rec = _process_record(Path(run_dir)) or {}
    return shell_command(rec["command"]) if rec.get("launch") and rec.get("command") else None


def recorded_launch(run_dir: str | os.PathLike):
    """How the run's newest process was launched (``engine.distributed.Launch``); None for one process."""
    from engine.distributed import Launch

    rec = _process_record(Path(run_dir)) or {}
    return Launch.from_json(rec.get("launch"))


def run_log_path(run_dir: str | os.PathLike) -> Path:
    """The training process's own output: ``train.log``, or for a multi-process run rank 0's
    ``logs/rank-0.log`` (``train.log`` then holds torchrun's own lines)."""
    run_dir = Path(run_dir)
    rank0 = run_dir / RANK_LOGS_DIR / "rank-0.log"
    if rank0.is_file() and (_process_record(run_dir) or {}).get("launch"):
        return rank0
    return run_dir / LOG_FILE


def log_tail(run_dir: str | os.PathLike, lines: int = 20) -> list[str]:
    """The last lines of the run's log (``run_log_path``)."""
    return file_tail(run_log_path(run_dir), lines)


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
    world: str | None = None
    """Several processes: ``2 GPUs, DDP`` (``8 GPUs x 2 machines, FSDP``); None for one."""
    method: str = "sft"
    """What the run trained: ``sft``, ``dpo`` or ``orpo`` (its start event's)."""

    def to_json(self) -> dict:
        """The stable JSON form of ``qlora-wizard runs --json`` (a NaN loss as the string "nan")."""
        return json_safe(asdict(self))


def summarize_run(run_dir: str | os.PathLike) -> RunSummary:
    """The run's status from its events and process: running, finished, stopped, failed or crashed.

    A process that is gone without an ``end`` event crashed (``kill -9``, the machine's OOM killer,
    a power cut); the tail of ``train.log`` says why.
    """
    run_dir = Path(run_dir)
    history = fold_history(read_events(run_dir))
    alive = is_running(run_dir) or (_process_record(run_dir) is None and _lock_held(run_dir))
    status = history.status(alive)
    message = history.end.message if history.end is not None else None
    if status == "crashed":
        message = _crash_message(run_dir)
    model = None
    try:
        model = load_preset(run_dir / PRESET_FILE).model.source
    except UserError:
        pass
    last = history.last_step
    return RunSummary(
        name=run_dir.name,
        path=str(run_dir),
        status=status,
        step=history.step,
        total_steps=history.total_steps,
        loss=last.loss if last else None,
        eval_loss=history.evals[-1].eval_loss if history.evals else None,
        model=model,
        message=message,
        started=history.start.time if history.start else None,
        world=history.start.world_words if history.start else None,
        method=history.start.method if history.start else "sft",
    )


def _lock_held(run_dir: Path) -> bool:
    """Whether a process holds the run's lock: a run whose launcher has not yet written
    ``process.json`` is starting, not crashed. Asked only in that moment's window, since the test
    itself takes the lock for an instant."""
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops the shared lock if it was taken
    return False


def _crash_message(run_dir: Path) -> str:
    """What a crashed run left: the log's last line, a checkpoint cut short, a full disk."""
    tail = file_tail(run_dir / LOG_FILE, 1)
    parts = ["the training process ended without a word" + (f"; train.log ends: {tail[-1]}" if tail else "")]
    rank_logs = sorted((run_dir / RANK_LOGS_DIR).glob("rank-*.log"),
                       key=lambda p: int(p.stem.split("-")[-1]) if p.stem.split("-")[-1].isdigit() else 0)
    if rank_logs:  # several processes: torchrun's summary above names the rank; here is its own last word
        for path in rank_logs:
            last = file_tail(path, 1)
            if last and any(word in last[-1] for word in ("Error", "error", "Killed", "Traceback")):
                parts.append(f"{path.stem.replace('-', ' ')}'s log ends: {last[-1]}")
                break
        else:
            parts.append(f"each rank's log is in {run_dir / RANK_LOGS_DIR}")
    cut = [c.path.name for c in list_checkpoints(run_dir) if not c.complete]
    if cut:
        parts.append(f"{', '.join(cut)} was cut short and cannot be resumed (resume removes it)")
    free = free_bytes(run_dir)
    if free is not None and free < FULL_DISK_BYTES:
        parts.append(f"the disk holding it is full ({free / 2**20:.1f} MiB left)")
    return "; ".join(parts)


FULL_DISK_BYTES = 64 * 2**20
"""Free space under which a failed write is taken for a full disk. torch.save reports ENOSPC as a
RuntimeError about the zip writer's position ("unexpected pos"), not as an OSError, so the free
space of the run's file system decides (read before the part-written files are removed)."""


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes an ordinary user may still write on the file system holding ``path``; None if unknown."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


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
