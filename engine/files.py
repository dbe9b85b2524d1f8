"""Writing files the way a run directory needs: whole or not at all, never through a planted link,
with the modes the person's umask asks for.

- :func:`atomic_write_bytes` / :func:`atomic_write_text`: a temporary file beside the target,
  fsynced, renamed (or, ``exclusive``, linked) into place. A rename replaces a symbolic link that
  stands at the name instead of writing through it.
- :func:`open_append`: the append-only files (``events.jsonl``, ``train.log``, each rank's log,
  ``train.lock``) are opened with ``O_NOFOLLOW``: a link planted at the name is refused (ELOOP),
  never followed into someone else's file.
- :func:`file_tail`: the last lines of a log (a run's ``train.log``, a rank's log), for the
  engine's messages about a run.
- Modes: every file the engine creates gets ``0o666 & ~umask`` and every folder ``0o777 & ~umask``,
  the same as the libraries' own files (checkpoints, adapters): with the usual umask 022 a run is
  readable by its owner's group and others and writable by the owner; with umask 077 it is private
  throughout. Temporary files and folders (``mkstemp``/``mkdtemp`` make them 0600/0700) are given
  that mode before they are renamed into place, so no file of a run is more or less private than
  its neighbours.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

_UMASK: int | None = None


def umask() -> int:
    """The process's umask (read from ``/proc/self/status``; elsewhere set and restored once)."""
    global _UMASK
    if _UMASK is None:
        try:
            with open("/proc/self/status", encoding="ascii") as fh:
                for line in fh:
                    if line.startswith("Umask:"):
                        _UMASK = int(line.split()[1], 8)
                        break
        except (OSError, ValueError, IndexError):
            pass
        if _UMASK is None:
            _UMASK = os.umask(0o022)
            os.umask(_UMASK)
    return _UMASK


def file_mode() -> int:
    """The mode a new file gets: ``0o666`` less the umask."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    """The mode a new folder gets: ``0o777`` less the umask."""
    return 0o777 & ~umask()


def settle_tree(path: str | os.PathLike) -> None:
    """Give a folder made by ``mkdtemp`` (0700), and what is in it, the modes the umask asks for,
    before it is renamed into place. Links are left alone."""
    root = Path(path)
    os.chmod(root, dir_mode())
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, dir_mode())
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, os.stat(p).st_mode & 0o111 | file_mode())


def atomic_write_bytes(path: str | os.PathLike, data: bytes, exclusive: bool = False) -> None:
    """Write a file so that a crash mid-write never leaves a broken one: temp file, fsync, rename.

    ``exclusive``: only if no file of that name exists (``FileExistsError`` otherwise). The temp
    file is then linked into place, which is atomic, so of two writers racing for one name exactly
    one wins, and a reader never sees half of it. A symbolic link at ``path`` is replaced, never
    written through.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), file_mode())
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if exclusive:
            os.link(tmp, p)
            os.unlink(tmp)
        else:
            os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike, text: str, exclusive: bool = False) -> None:
    """:func:`atomic_write_bytes` for text (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"), exclusive=exclusive)


def open_append(path: str | os.PathLike, read: bool = False) -> int:
    """A descriptor appending to ``path`` (created with the umask's mode), never through a symbolic
    link: a link at the name raises ``OSError`` (ELOOP) instead of being followed."""
    flags = (os.O_RDWR if read else os.O_WRONLY) | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    return os.open(path, flags, 0o666)


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes, read 4 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_tail(path: str | os.PathLike, lines: int = 20) -> list[str]:
    """The last non-empty lines of a log file (read from its last 64 KiB); empty when it cannot be read."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return []
    return [ln for ln in text.splitlines() if ln.strip()][-lines:]
