"""Cheap widgets for a screen that changes several times a second: a curve, a progress line and
the newest lines of a list.

Each draws itself from its own size in ``render``, so a resize needs nothing from the screen, and
asks for a redraw only when a character it shows changes. Textual's own Sparkline colours every
cell by its value (one styled segment per cell) and its ProgressBar is four widgets that animate
while the total is unknown; on the run screen those were most of the CPU of a redraw
(``benchmarks/RESULTS.md``, "Overhead").
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

from rich.text import Text
from textual.widget import Widget

BARS = " ▁▂▃▄▅▆▇█"
"""Eighths of a cell, from empty to full."""


def curve_rows(values: Sequence[float], width: int, height: int) -> list[str]:
    """The curve as ``height`` strings of ``width`` characters, top row first.

    The values are spread over the columns: each column shows the mean of its share of them (more
    values than columns) or repeats a value (fewer). The lowest mean sits on the bottom row, the
    highest fills the top; a flat curve is drawn at half height. No values: an empty baseline.
    """
    if width <= 0 or height <= 0:
        return []
    n = len(values)
    if n == 0:
        return [" " * width] * (height - 1) + ["▁" * width]
    columns = []
    for c in range(width):
        lo = c * n // width
        hi = max(lo + 1, (c + 1) * n // width)
        part = values[lo:hi]
        columns.append(sum(part) / len(part))
    low, high = min(columns), max(columns)
    span = high - low
    levels = height * 8
    # Eighths filled per column: at least one, so the lowest point still shows.
    filled = [levels // 2 if span == 0 else 1 + round((v - low) / span * (levels - 1)) for v in columns]
    rows = []
    for r in range(height - 1, -1, -1):
        base = r * 8
        rows.append("".join(BARS[min(8, max(0, f - base))] for f in filled))
    return rows


def progress_line(step: int, total: int | None, note: str, width: int) -> Text:
    """``━━━━━━━━━━━━━━━━  45%  ETA 1m 20s`` in ``width`` columns: the bar takes what the
    percentage and the note leave. An unknown total shows an empty bar."""
    done = min(1.0, step / total) if total else 0.0
    tail = f" {done:4.0%}  {note}"
    bar = max(0, width - len(tail))
    full = int(done * bar)
    text = Text("━" * full, "bold green" if done >= 1 else "bold blue")
    text.append("━" * (bar - full), "grey30")
    text.append(tail)
    return text


class ProgressLine(Widget):
    """A one-line progress bar with a percentage and a note (the ETA)."""

    DEFAULT_CSS = """
    ProgressLine {
        height: 1;
    }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self._state: tuple[int, int | None, str] = (0, None, "")

    def show(self, step: int, total: int | None, note: str) -> None:
        """Show ``step`` of ``total``; redraws only if that or the note changed."""
        if (step, total, note) != self._state:
            self._state = (step, total, note)
            self.refresh()

    def render(self) -> Text:
        return progress_line(*self._state, self.content_size.width)


class TailLines(Widget):
    """The newest lines that fit, one row each, cut with an ellipsis; the older ones scroll away.

    A fixed-size view rather than a growing log: a log's every new line costs a layout of the
    whole screen."""

    def __init__(self, keep: int, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.lines: deque[str] = deque(maxlen=keep)
        """The newest ``keep`` lines."""

    def add(self, lines: Iterable[str]) -> None:
        """Append lines; redraws if there were any."""
        new = list(lines)
        if new:
            self.lines.extend(new)
            self.refresh()

    def render(self) -> Text:
        rows = max(1, self.content_size.height)
        return Text("\n".join(list(self.lines)[-rows:]), no_wrap=True, overflow="ellipsis")


class Curve(Widget):
    """Values as a block-character curve filling the widget; its CSS ``color`` colours it."""

    DEFAULT_CSS = """
    Curve {
        height: 1fr;
    }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self._values: list[float] = []
        self._drawn: list[str] | None = None

    @property
    def values(self) -> list[float]:
        """The values shown."""
        return self._values

    def show(self, values: Sequence[float]) -> None:
        """Show these values; redraws only if a character of the curve changes."""
        self._values = list(values)
        size = self.content_size
        if self._drawn is None or curve_rows(self._values, size.width, size.height) != self._drawn:
            self.refresh()

    def render(self) -> Text:
        size = self.content_size
        self._drawn = curve_rows(self._values, size.width, size.height)
        return Text("\n".join(self._drawn), no_wrap=True, overflow="crop")
