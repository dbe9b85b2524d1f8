"""Helpers for driving the Textual app in tests: the screen as text, waiting for phrases, snapshots."""

from __future__ import annotations

import difflib
import io
import os
import time
from pathlib import Path

from rich.console import Console

SNAPSHOTS = Path(__file__).resolve().parent / "snapshots"
"""Text snapshots of screens; ``UPDATE_SNAPSHOTS=1 make test`` rewrites them after a wanted change."""


def screen_text(app) -> str:
    """The screen as plain text: what a person sees."""
    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), record=True, force_terminal=True,
                      legacy_windows=False, safe_box=False)
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return console.export_text()


def flat(text: str) -> str:
    """Screen text with its line breaks and frame characters gone, for phrases that may wrap."""
    for ch in "│╭╮╰╯─▏█▀▄▔▁":
        text = text.replace(ch, " ")
    return " ".join(text.split())


async def wait_for(pilot, *phrases: str, timeout: float = 3.0, absent: tuple[str, ...] = (),
                   region: str | None = None) -> str:
    """Pause until every phrase is on screen (in the widget ``region`` selects, if given) and none of
    ``absent`` is, or the timeout; returns the flattened text."""
    deadline = time.monotonic() + timeout
    while True:
        await pilot.pause(0.05)
        text = region_text(pilot.app, region) if region else flat(screen_text(pilot.app))
        done = all(p in text for p in phrases) and not any(a in text for a in absent)
        if done or time.monotonic() > deadline:
            return text


async def wait_until(pilot, condition, timeout: float = 60.0, what: str = "the condition") -> None:
    """Pause until ``condition()`` is true; fails the test with ``what`` after the timeout."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}:\n{screen_text(pilot.app)}")
        await pilot.pause(0.05)


def assert_snapshot(name: str, text: str) -> None:
    """Compare a screen with ``tests/snapshots/NAME.txt`` (written when UPDATE_SNAPSHOTS=1)."""
    path = SNAPSHOTS / f"{name}.txt"
    text = "\n".join(line.rstrip() for line in text.splitlines()) + "\n"
    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        SNAPSHOTS.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return
    assert path.is_file(), f"no snapshot {path}: run the tests once with UPDATE_SNAPSHOTS=1 and review it"
    want = path.read_text(encoding="utf-8")
    if text != want:
        diff = "\n".join(difflib.unified_diff(want.splitlines(), text.splitlines(), "snapshot", "screen",
                                              lineterm=""))
        raise AssertionError(f"{name} differs from {path} (UPDATE_SNAPSHOTS=1 to accept):\n{diff}")


def region_text(app, selector: str) -> str:
    """The flattened text inside one widget's region on screen (what a person reads there)."""
    widget = app.screen.query_one(selector)
    r = widget.region
    lines = screen_text(app).splitlines()[r.y:r.y + r.height]
    return flat("\n".join(line[r.x:r.x + r.width] for line in lines))
