"""How numbers read on screen, the same in the command line, the console runner and the TUI."""

from __future__ import annotations


def gib(n: float | None) -> str:
    """Bytes as GiB with two decimals; ``-`` when unknown."""
    return "-" if n is None else f"{n / 2**30:,.2f} GiB"


def duration(seconds: float | None) -> str:
    """Seconds as ``45s``, ``3m07s`` or ``2h05m``; ``-`` when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "-"
    s = int(seconds)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")
