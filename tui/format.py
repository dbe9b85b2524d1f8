"""How numbers read on screen, the same in the command line, the console runner and the TUI."""

from __future__ import annotations

STATUS_STYLES = {"starting": "bold yellow", "running": "bold green", "finished": "bold green",
                 "stopped": "bold yellow", "failed": "bold red", "crashed": "bold red"}
"""How each run status is coloured, wherever it is shown (the run screen, ``qlora-wizard runs``)."""


def gib(n: float | None) -> str:
    """Bytes as GiB with two decimals; ``-`` when unknown."""
    return "-" if n is None else f"{n / 2**30:,.2f} GiB"


def size(n: float | None) -> str:
    """Bytes in the unit that reads best: MiB below 1 GiB, else GiB; ``-`` when unknown."""
    if n is None:
        return "-"
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else gib(n)


def count(n: int) -> str:
    """A parameter count: ``1.24 B``, ``131.1 M``, ``6.2 K`` or the plain number."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:,.{2 if unit == 'B' else 1}f} {unit}"
    return f"{n:,}"


def duration(seconds: float | None) -> str:
    """Seconds as ``45s``, ``3m07s`` or ``2h05m``; ``-`` when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "-"
    s = int(seconds)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")
