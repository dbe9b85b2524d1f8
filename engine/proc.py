"""Processes a run records, and proving that one is the run's own before anything signals it.

A run directory names its training process (``process.json``) and, for several processes, its
ranks (``ranks.json``). Those files are data on disk: damaged, edited, copied from another machine
or left by a process whose pid the kernel has since given to someone else. A pid read from them
is trusted only when all of this holds:

- it is an integer above 1 (not a bool, not 0, not -1: ``kill(0)`` and ``kill(-1)`` signal whole
  process groups or every process the user owns, and pid 1 is init);
- the record carries the kernel's start time of the process (``/proc/PID/stat`` field 22), and
  the live process has exactly that start time (a reused pid has another);
- the process belongs to this user;
- its command line is this project's training process for this very run directory
  (``... -m engine.train RUN_DIR ...``: the single process, torchrun's launcher and each rank).

Anything else in a record is *damaged*: :class:`DamagedRecord`, one line, and nobody is signalled.
Verification needs ``/proc`` (Linux); where it is missing nothing can be verified, so nothing is signalled.

Nothing here imports torch; this module sits below ``engine.runs`` and ``engine.distributed``.
"""

from __future__ import annotations

import os
from pathlib import Path

from engine.errors import UserError

TRAIN_MODULE = "engine.train"
"""The module every training process (single, torchrun's launcher, each rank) runs with ``-m``."""


class DamagedRecord(UserError):
    """A process record that cannot be trusted: nobody is signalled on its word."""


def checked_pid(value, where: str) -> int:
    """``value`` as a pid that may be signalled, or :class:`DamagedRecord` naming ``where`` it came from."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 1:
        raise DamagedRecord(f"{where} names pid {value!r}, which is not a process id this run can have; "
                            "nobody was signalled",
                            "if the run is still training, find it with `ps -ef | grep engine.train` "
                            "and stop that process yourself")
    return value


def checked_start_time(value, where: str) -> str:
    """The recorded kernel start time (a string of digits), or :class:`DamagedRecord`."""
    if not isinstance(value, str) or not value.isdigit():
        raise DamagedRecord(f"{where} has no valid start time for its process ({value!r}), so a reused pid "
                            "cannot be told from the run's own; nobody was signalled",
                            "if the run is still training, find it with `ps -ef | grep engine.train` "
                            "and stop that process yourself")
    return value


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists and is not a zombie."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of a process (clock ticks after boot), to tell it from a later process
    that reused its pid; None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_command(pid: int) -> list[str] | None:
    """The process's command line as its arguments; None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a] or None


def _owner(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def trains(command: list[str] | None, run_dir: str | os.PathLike) -> bool:
    """Whether ``command`` is this project's training process for ``run_dir``: ``-m engine.train RUN_DIR``
    in its arguments, with RUN_DIR the run directory's absolute path."""
    if not command:
        return False
    want = str(Path(run_dir).resolve())
    for i in range(len(command) - 2):
        if command[i] == "-m" and command[i + 1] == TRAIN_MODULE and command[i + 2] == want:
            return True
    return False


def verified(pid, start_time, run_dir: str | os.PathLike, where: str) -> bool:
    """Whether the recorded process is alive and is the run's own (see the module's rules).

    False when it is gone or its pid now belongs to a later process (another start time); raises
    :class:`DamagedRecord` when the record is damaged or names a live process of the same start
    time that is not this run's training process (someone else's, or another program)."""
    pid = checked_pid(pid, where)
    start_time = checked_start_time(start_time, where)
    if not pid_alive(pid):
        return False
    now = process_start_time(pid)
    if now is None:
        raise DamagedRecord(f"cannot read /proc/{pid} to check that pid {pid} ({where}) is this run's process; "
                            "nobody was signalled", "stop the process yourself if it is the run's")
    if now != start_time:
        return False  # the recorded process is gone; the pid is someone else's now
    if _owner(pid) != os.getuid():
        raise DamagedRecord(f"{where} names pid {pid}, a process of another user; nobody was signalled")
    if not trains(process_command(pid), run_dir):
        shown = " ".join(process_command(pid) or ["?"])[:80]
        raise DamagedRecord(f"{where} names pid {pid}, which is not this run's training process "
                            f"(it runs `{shown}`); nobody was signalled",
                            "if the run is still training, find it with `ps -ef | grep engine.train`")
    return True


def send_signal(pid, start_time, run_dir: str | os.PathLike, where: str, sig: int) -> bool:
    """Signal the recorded process if, and only if, it is verified as the run's own; False when it is gone.

    The process is pinned first (``pidfd_open``), then verified, then signalled through that
    descriptor, so a pid that the kernel hands to another process in between is never signalled."""
    import signal as signals

    pid = checked_pid(pid, where)
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except (AttributeError, OSError):
        fd = None  # an old kernel: verify, then kill by pid
    try:
        if not verified(pid, start_time, run_dir, where):
            return False
        try:
            if fd is not None:
                signals.pidfd_send_signal(fd, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            return False
        return True
    finally:
        if fd is not None:
            os.close(fd)


def verified_quietly(pid, start_time, run_dir: str | os.PathLike) -> bool:
    """:func:`verified` for readers that only ask "is it running?": a damaged record is a run that
    is not (provably) running."""
    try:
        return verified(pid, start_time, run_dir, "the record")
    except DamagedRecord:
        return False
