"""The loss curves as pictures: ``qlora-wizard plot RUN_DIR`` writes ``curves.svg`` and ``curves.png``.

Training loss per logged step and validation loss per evaluation, from the run's events, on one
pair of axes. A dpo or orpo run gets two more panels below it, on the same steps: the reward margin
(chosen minus rejected reward) and the preference accuracy (the share of pairs whose chosen answer has
the higher reward), each for the training steps and the evaluations. The SVG is written here as text
(no dependency); the model card shows it. The PNG is drawn by matplotlib when it is installed, and
otherwise here with the standard library only (``zlib`` and ``struct``): lines, markers, grid, ticks
and labels in a small built-in bitmap font. Pure functions over (step, value) points
(:class:`Panel`, :class:`Series`), plus the file writing; no torch.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

from engine.errors import UserError, os_error

Points = Sequence[tuple[float, float]]

WIDTH, HEIGHT = 720, 360
"""A picture of one panel (the loss); each panel of several is :data:`PANEL_HEIGHT` high."""
PANEL_HEIGHT = 300
"""The height of each panel where there are several (a dpo or orpo run's three)."""
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 64, 20, 36, 44
TRAIN_COLOR = (31, 119, 180)
"""Training figures: matplotlib's first colour, so both renderers look alike."""
VALIDATION_COLOR = (255, 127, 14)
GRID_COLOR = (225, 225, 225)
AXIS_COLOR = (60, 60, 60)


@dataclass(frozen=True)
class Series:
    """One curve of a panel."""

    name: str
    """What the legend calls it (``training loss``)."""
    css: str
    """The SVG polyline's class (``train``, ``validation``, ``train_margin``): what readers and tests find it by."""
    color: tuple[int, int, int]
    points: Points
    """(step, value) in step order."""
    markers: bool = False
    """A marker at each point (evaluations, which are few)."""


@dataclass(frozen=True)
class Panel:
    """One pair of axes: its curves over the steps."""

    title: str
    """Written above the panel."""
    axis: str
    """The y axis's label (``loss``, ``margin``, ``accuracy``)."""
    series: tuple[Series, ...]
    include: tuple[float, ...] = ()
    """Values the y axis always covers (0 for a margin; 0 and 1 for an accuracy)."""

    @property
    def empty(self) -> bool:
        """Whether no curve has a point."""
        return not any(s.points for s in self.series)


def curve_points(history) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """Training (step, loss) and validation (step, loss) of a run's history; NaN losses left out."""
    from engine.events import finite

    train = [(s.step, v) for s in history.steps if (v := finite(s.loss)) is not None]
    validation = [(e.step, v) for e in history.evals if (v := finite(e.eval_loss)) is not None]
    return train, validation


def loss_panel(train: Points, validation: Points, title: str = "loss") -> Panel:
    """The training and validation loss on one pair of axes."""
    return Panel(title, "loss", (Series("training loss", "train", TRAIN_COLOR, train),
                                 Series("validation loss", "validation", VALIDATION_COLOR, validation, True)))


def is_preference(history) -> bool:
    """Whether the run is a dpo or orpo run (its start event's method, else its steps' reward figures)."""
    start = history.start
    if start is not None and start.method != "sft":
        return True
    return any(s.reward_margin is not None for s in history.steps)


def preference_panels(history) -> list[Panel]:
    """A dpo or orpo run's reward margin and preference accuracy, training steps and evaluations; a
    panel with no figures at all is left out."""
    from engine.events import finite

    def points(events, name: str) -> list[tuple[int, float]]:
        return [(e.step, v) for e in events if (v := finite(getattr(e, name))) is not None]

    panels = [
        Panel("reward margin (chosen minus rejected)", "margin",
              (Series("training margin", "train_margin", TRAIN_COLOR, points(history.steps, "reward_margin")),
               Series("validation margin", "validation_margin", VALIDATION_COLOR,
                      points(history.evals, "eval_reward_margin"), True)), (0.0,)),
        Panel("preference accuracy (chosen answer's reward higher)", "accuracy",
              (Series("training accuracy", "train_accuracy", TRAIN_COLOR, points(history.steps, "reward_accuracy")),
               Series("validation accuracy", "validation_accuracy", VALIDATION_COLOR,
                      points(history.evals, "eval_reward_accuracy"), True)), (0.0, 1.0)),
    ]
    return [p for p in panels if not p.empty]


def curve_panels(history, title: str = "loss") -> list[Panel]:
    """What ``plot`` draws of a run's history: the loss (``title`` above it), and for a dpo or orpo run
    the reward margin and the preference accuracy below it."""
    panels = [loss_panel(*curve_points(history), title)]
    if is_preference(history):
        panels += preference_panels(history)
    return panels


def figure_height(panels: int) -> int:
    """The picture's height for that many panels: :data:`HEIGHT` for one."""
    return HEIGHT if panels <= 1 else PANEL_HEIGHT * panels


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return [0.0]
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(1, count)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    ticks, value = [], first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 12))
    return ticks


def tick_label(value: float) -> str:
    """A tick value in few characters (``2.5``, ``40``, ``1e-05``)."""
    return f"{value:.4g}"


class _Frame:
    """Data coordinates to picture coordinates of one panel, shared by the SVG and the PNG."""

    def __init__(self, panel: Panel, width: int, height: int, top: int = 0) -> None:
        points = [p for s in panel.series for p in s.points]
        if not points:
            raise UserError("the run has no losses to plot yet")
        steps = [p[0] for p in points]
        values = [p[1] for p in points] + list(panel.include)
        self.x_ticks = nice_ticks(min(0, min(steps)), max(steps) or 1, 6)
        self.y_ticks = nice_ticks(min(values), max(values), 5)
        self.width, self.height, self.offset = width, height, top
        self.left, self.right = MARGIN_LEFT, width - MARGIN_RIGHT
        self.top, self.bottom = top + MARGIN_TOP, top + height - MARGIN_BOTTOM

    def x(self, step: float) -> float:
        lo, hi = self.x_ticks[0], self.x_ticks[-1]
        return self.left + (step - lo) / ((hi - lo) or 1) * (self.right - self.left)

    def y(self, loss: float) -> float:
        lo, hi = self.y_ticks[0], self.y_ticks[-1]
        return self.bottom - (loss - lo) / ((hi - lo) or 1) * (self.bottom - self.top)


def _frames(panels: Sequence[Panel]) -> list[tuple[Panel, _Frame]]:
    """Each panel with its frame, stacked top to bottom (an empty panel after the first is left out)."""
    panels = [p for i, p in enumerate(panels) if i == 0 or not p.empty]
    h = HEIGHT if len(panels) <= 1 else PANEL_HEIGHT
    return [(p, _Frame(p, WIDTH, h, i * h)) for i, p in enumerate(panels)]


def _hex(color: tuple[int, int, int]) -> str:
    return "#%02x%02x%02x" % color


def curves_svg(train: Points, validation: Points, title: str = "loss") -> str:
    """The loss curves as an SVG document (text)."""
    return panels_svg([loss_panel(train, validation, title)])


def panels_svg(panels: Sequence[Panel]) -> str:
    """The panels, stacked, as an SVG document (text)."""
    framed = _frames(panels)
    height = figure_height(len(framed))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
           f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{WIDTH}" height="{height}" fill="white"/>']
    for panel, f in framed:
        out += _panel_svg(panel, f)
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _panel_svg(panel: Panel, f: _Frame) -> list[str]:
    """One panel's SVG elements: title, grid, ticks, axes, curves, legend."""
    out = [f'<text x="{f.left}" y="{f.offset + 22}" font-size="14" font-weight="bold">{escape(panel.title)}</text>']
    for t in f.y_ticks:
        y = f.y(t)
        out.append(f'<line x1="{f.left}" y1="{y:.1f}" x2="{f.right}" y2="{y:.1f}" stroke="{_hex(GRID_COLOR)}"/>')
        out.append(f'<text x="{f.left - 6}" y="{y + 4:.1f}" text-anchor="end">{tick_label(t)}</text>')
    for t in f.x_ticks:
        x = f.x(t)
        out.append(f'<line x1="{x:.1f}" y1="{f.top}" x2="{x:.1f}" y2="{f.bottom}" stroke="{_hex(GRID_COLOR)}"/>')
        out.append(f'<text x="{x:.1f}" y="{f.bottom + 16}" text-anchor="middle">{tick_label(t)}</text>')
    out.append(f'<polyline points="{f.left},{f.top} {f.left},{f.bottom} {f.right},{f.bottom}" fill="none" '
               f'stroke="{_hex(AXIS_COLOR)}"/>')
    out.append(f'<text x="{(f.left + f.right) / 2:.1f}" y="{f.offset + f.height - 8}" text-anchor="middle">step</text>')
    out.append(f'<text x="14" y="{(f.top + f.bottom) / 2:.1f}" text-anchor="middle" '
               f'transform="rotate(-90 14 {(f.top + f.bottom) / 2:.1f})">{escape(panel.axis)}</text>')
    for s in panel.series:
        if not s.points:
            continue
        pts = " ".join(f"{f.x(x):.1f},{f.y(v):.1f}" for x, v in s.points)
        out.append(f'<polyline class="{s.css}" points="{pts}" fill="none" stroke="{_hex(s.color)}" '
                   f'stroke-width="{2 if s.markers else 1.5}"/>')
        if s.markers:
            out += [f'<circle cx="{f.x(x):.1f}" cy="{f.y(v):.1f}" r="3.5" fill="{_hex(s.color)}"/>'
                    for x, v in s.points]
    legend_x = f.right - 150
    for i, s in enumerate(s for s in panel.series if s.points):
        y = f.top + 12 + 18 * i
        out.append(f'<line x1="{legend_x}" y1="{y - 4}" x2="{legend_x + 20}" y2="{y - 4}" stroke="{_hex(s.color)}" '
                   f'stroke-width="2"/>')
        out.append(f'<text x="{legend_x + 26}" y="{y}">{escape(s.name)}</text>')
    return out


# ---------------------------------------------------------------------------------------------
# PNG


def curves_png(train: Points, validation: Points, title: str = "loss") -> bytes:
    """The loss curves as PNG bytes (see :func:`panels_png`)."""
    return panels_png([loss_panel(train, validation, title)])


def panels_png(panels: Sequence[Panel]) -> bytes:
    """The panels, stacked, as PNG bytes: matplotlib's rendering when it is installed, else
    :func:`raster_panels`."""
    try:
        import matplotlib
    except ImportError:
        return raster_panels(panels)
    matplotlib.use("Agg", force=False)
    import io

    import matplotlib.pyplot as plt

    framed = _frames(panels)
    fig, axes = plt.subplots(len(framed), 1, figsize=(WIDTH / 100, figure_height(len(framed)) / 100), dpi=100,
                             squeeze=False)
    for (panel, _), ax in zip(framed, axes[:, 0]):
        for s in panel.series:
            if s.points:
                ax.plot(*zip(*s.points), color=_hex(s.color), linewidth=2 if s.markers else 1.5,
                        marker="o" if s.markers else None, label=s.name)
        if len(panel.include) > 1:
            low, high = min(panel.include), max(panel.include)
            data = [v for s in panel.series for _, v in s.points]
            pad = (max(data + [high]) - min(data + [low])) * 0.05
            ax.set_ylim(min(data + [low]) - pad, max(data + [high]) + pad)
        elif panel.include:
            ax.axhline(panel.include[0], color=_hex(AXIS_COLOR), linewidth=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel(panel.axis)
        ax.set_title(panel.title, loc="left")
        ax.grid(color=_hex(GRID_COLOR))
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


_FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001010010010",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    "+": "000010111010000", "e": "000111111100111", "a": "000011101101011", "d": "001011101101011",
    "g": "011101011001110", "i": "010000010010010", "l": "110010010010111", "n": "000110101101101",
    "o": "000010101101010", "p": "000110101110100", "r": "000101110100100", "s": "000011110011110",
    "t": "010111010010001", "v": "000101101101010", " ": "000000000000000",
    "b": "100100110101110", "c": "000011100100011", "f": "011100110100100", "h": "100100110101101",
    "k": "100101110110101", "m": "000111111101101", "u": "000101101101011", "w": "000101101111111",
    "x": "000101010010101", "y": "101101011001110",
}
"""A 3x5 bitmap per character the PNG's labels use (rows top to bottom, 1 = ink)."""


class _Canvas:
    """An RGB raster with the few drawing operations a line plot needs."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(b"\xff" * (width * height * 3))

    def dot(self, x: int, y: int, color, size: int = 1) -> None:
        for yy in range(y - size // 2, y - size // 2 + size):
            for xx in range(x - size // 2, x - size // 2 + size):
                if 0 <= xx < self.width and 0 <= yy < self.height:
                    i = (yy * self.width + xx) * 3
                    self.pixels[i:i + 3] = bytes(color)

    def line(self, x0: float, y0: float, x1: float, y1: float, color, size: int = 1) -> None:
        """Bresenham's line, ``size`` pixels thick."""
        x0, y0, x1, y1 = round(x0), round(y0), round(x1), round(y1)
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            self.dot(x0, y0, color, size)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def text(self, x: float, y: float, text: str, color=AXIS_COLOR, scale: int = 2, anchor: str = "start") -> None:
        """Text in the 3x5 font; ``y`` is the top; ``anchor``: start, middle or end."""
        advance = 4 * scale
        width = advance * len(text) - scale
        x = round(x - (width if anchor == "end" else width / 2 if anchor == "middle" else 0))
        for i, ch in enumerate(text):
            glyph = _FONT.get(ch.lower(), _FONT[" "])
            for row in range(5):
                for col in range(3):
                    if glyph[row * 3 + col] == "1":
                        for yy in range(scale):
                            for xx in range(scale):
                                self.dot(x + i * advance + col * scale + xx, round(y) + row * scale + yy, color)

    def png(self) -> bytes:
        """The raster as PNG bytes (8-bit RGB, no filtering, zlib)."""
        row = self.width * 3
        raw = b"".join(b"\x00" + bytes(self.pixels[y * row:(y + 1) * row]) for y in range(self.height))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
                + chunk(b"IEND", b""))


def raster_png(train: Points, validation: Points) -> bytes:
    """The loss curves drawn with the standard library only (see :func:`raster_panels`)."""
    return raster_panels([loss_panel(train, validation)])


def raster_panels(panels: Sequence[Panel]) -> bytes:
    """The panels, stacked, drawn with the standard library only: grid, axes, ticks and labels, the curves."""
    framed = _frames(panels)
    c = _Canvas(WIDTH, figure_height(len(framed)))
    for panel, f in framed:
        _raster_panel(c, panel, f)
    return c.png()


def _raster_panel(c: _Canvas, panel: Panel, f: _Frame) -> None:
    """Draw one panel onto the canvas."""
    for t in f.y_ticks:
        c.line(f.left, f.y(t), f.right, f.y(t), GRID_COLOR)
        c.text(f.left - 8, f.y(t) - 5, tick_label(t), anchor="end")
    for t in f.x_ticks:
        c.line(f.x(t), f.top, f.x(t), f.bottom, GRID_COLOR)
        c.text(f.x(t), f.bottom + 8, tick_label(t), anchor="middle")
    c.line(f.left, f.top, f.left, f.bottom, AXIS_COLOR)
    c.line(f.left, f.bottom, f.right, f.bottom, AXIS_COLOR)
    c.text((f.left + f.right) / 2, f.offset + f.height - 16, "step", anchor="middle")
    c.text(8, f.offset + 10, panel.axis)
    for s in panel.series:
        for a, b in zip(s.points, s.points[1:]):
            c.line(f.x(a[0]), f.y(a[1]), f.x(b[0]), f.y(b[1]), s.color, 2)
    for s in panel.series:
        if s.markers:
            for x, v in s.points:
                c.dot(round(f.x(x)), round(f.y(v)), s.color, 7)
    legend_x = f.right - 190
    for i, s in enumerate(s for s in panel.series if s.points):
        y = f.top + 8 + 18 * i
        c.line(legend_x, y + 5, legend_x + 20, y + 5, s.color, 2)
        c.text(legend_x + 28, y, s.name, s.color)


def write_curves(run_dir, out: str | Path | None = None) -> tuple[Path, Path]:
    """Write the run's curves (:func:`curve_panels`: the loss, and for a dpo or orpo run the reward margin
    and the preference accuracy) as ``curves.svg`` and ``curves.png`` in the run directory, or at ``out``
    (its suffix is replaced by .svg and .png); returns both paths."""
    from engine.events import fold_history, read_events
    from engine.runs import require_run

    run_dir = require_run(run_dir)
    history = fold_history(read_events(run_dir))
    base = Path(out) if out is not None else run_dir / "curves.svg"
    if base.is_dir():
        base = base / "curves.svg"
    svg_path, png_path = base.with_suffix(".svg"), base.with_suffix(".png")
    method = history.start.method if history.start is not None and history.start.method != "sft" else None
    panels = curve_panels(history, f"{run_dir.name}: {method} loss" if method else f"{run_dir.name}: loss")
    svg, png = panels_svg(panels), panels_png(panels)
    from engine.files import atomic_write_bytes, atomic_write_text

    try:
        atomic_write_text(svg_path, svg)
        atomic_write_bytes(png_path, png)
    except OSError as exc:
        raise os_error(exc, "write", exc.filename or svg_path) from None
    return svg_path, png_path
