"""Errors a person can act on.

Every problem caused by the input (a wrong path, a broken config, a malformed dataset line, a
preset with a typo, a model that needs its own code) is raised as a :class:`UserError`. Front
ends print its message as one line starting with ``error:`` and exit with status 2; they never
show a traceback for it.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: one line that names the problem and says what to do about it."""

    exit_code = 2

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
