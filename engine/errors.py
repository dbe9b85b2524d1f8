"""Errors a person can act on, and the exit statuses of every command.

Every problem caused by the input (a wrong path, a broken config, a malformed dataset line, a
preset with a typo, a model that needs its own code) is raised as a :class:`UserError`. Front
ends print its message as one line starting with ``error:`` and exit with its ``exit_code`` (2);
they never show a traceback for it.
"""

from __future__ import annotations

import errno
import os


EXIT_OK = 0
"""Success; a run that finished."""
EXIT_FAILED = 1
"""An unexpected failure; a run that failed or crashed."""
EXIT_BAD_INPUT = 2
"""Bad input: one ``error:`` line on stderr."""
EXIT_STOPPED = 130
"""Interrupted by Ctrl-C (the shell's 128 + SIGINT); a run stopped after saving a checkpoint."""


def run_exit_status(status: str, bad_input: bool = False) -> int:
    """The exit status a run's status stands for: finished 0, stopped 130, failed on bad input 2,
    anything else (failed, crashed, still running when left) 1."""
    if status == "finished":
        return EXIT_OK
    if status == "stopped":
        return EXIT_STOPPED
    return EXIT_BAD_INPUT if status == "failed" and bad_input else EXIT_FAILED


class UserError(Exception):
    """Bad input: one line that names the problem and says what to do about it."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.message = " ".join(message.split())
        self.hint = " ".join(hint.split()) if hint else None
        super().__init__(self.one_line())

    def one_line(self) -> str:
        """The message and the hint as a single line (no trailing period doubling)."""
        if not self.hint:
            return self.message
        sep = " " if self.message.endswith((".", ":", "?", "!")) else "; "
        return f"{self.message}{sep}{self.hint}"


class NeedsRemoteCode(UserError):
    """The model's config needs Python code shipped with the model (``trust_remote_code``)."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message cut to its first line (library errors often run to many), or its type."""
    lines = str(exc).strip().splitlines()
    return lines[0].strip()[:limit] if lines else type(exc).__name__


_OS_ERROR_HINTS = {
    errno.ENOSPC: "the disk is full: free space on it or pick a folder on another disk",
    errno.EDQUOT: "your disk quota is used up: free space or pick a folder on another disk",
    errno.EROFS: "that file system is read-only: pick a folder on a writable one",
    errno.EACCES: "you may not write there: pick a folder you own",
    errno.EPERM: "you may not write there: pick a folder you own",
    errno.ENOTDIR: "a part of that path is a file, not a folder: pick another path",
    errno.EEXIST: "a file of that name is in the way: pick another path",
    errno.ENAMETOOLONG: "the path is too long: pick a shorter one",
    errno.ELOOP: "a symbolic link stands at that name, and qlora-wizard never writes through one: remove the link",
}
"""What to do about the operating-system errors a person can meet when writing files."""


def os_error(exc: OSError, doing: str, path: str | os.PathLike | None = None, hint: str | None = None) -> UserError:
    """An ``OSError`` as one line: what was being done, to which path, the system's reason and what to try.

    ``doing`` reads as "cannot <doing> <path>", e.g. ``os_error(exc, "create the run folder", path)``.
    """
    where = path if path is not None else exc.filename
    reason = exc.strerror or first_line(exc)
    return UserError(f"cannot {doing}{f' {where}' if where is not None else ''}: {reason}",
                     hint or _OS_ERROR_HINTS.get(exc.errno))
