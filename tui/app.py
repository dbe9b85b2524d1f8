"""The Textual apps of ``qlora-wizard attach`` (the run screen) and ``qlora-wizard try`` (the try screen).

The app takes what it reads and does to a run in its constructor (where the events come from, how
often to look, how to tell the process is alive, how to stop it), so tests feed it a recorded run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from textual.app import App

from engine.events import POLL_S, EventTail
from engine.runs import is_running, log_tail, stop_run
from tui.screens.run import RunScreen


class RunApp(App[str]):
    """Shows one run live; its result is the run's status when the person left (``detached``
    while it still runs)."""

    CSS_PATH = "app.tcss"
    TITLE = "qlora-wizard"

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        events_source: Callable[[Path], EventTail] = EventTail,
        poll_interval: float = POLL_S,
        process_alive: Callable[[Path], bool] = is_running,
        stop: Callable[[Path], bool] = stop_run,
        read_log: Callable[[Path, int], list[str]] = log_tail,
    ) -> None:
        super().__init__()
        self.run_dir = Path(run_dir)
        """The run directory shown."""
        self.sub_title = str(self.run_dir)
        self._screen_args = dict(events_source=events_source, poll_interval=poll_interval,
                                 process_alive=process_alive, stop=stop, read_log=read_log)

    def on_mount(self) -> None:
        """Open the run screen."""
        self.push_screen(RunScreen(self.run_dir, **self._screen_args))


class TryApp(App[None]):
    """Tries one finished run: its fine-tuned model against the base model (``qlora-wizard try RUN_DIR``)."""

    CSS_PATH = "app.tcss"
    TITLE = "qlora-wizard"

    def __init__(self, run_dir: str | os.PathLike) -> None:
        super().__init__()
        self.run_dir = Path(run_dir)
        """The run tried."""
        self.sub_title = f"try {self.run_dir}"

    def on_mount(self) -> None:
        """Open the try screen (it loads the model in the background)."""
        from tui.screens.try_model import TryScreen

        self.push_screen(TryScreen(self.run_dir))
