"""The data step: a file or a Hub dataset, checked and tokenized in a worker; the detected format,
three examples as the model sees them with the trained part highlighted (preference pairs: the prompt,
the chosen and the rejected answer, labelled), the statistics (examples, tokens, supervised tokens,
truncated, removed by cleaning, whether every example ends with the stop token: a yellow warning when
some do not; for pairs their counts, tokens by part and removals) and the validation split."""

from __future__ import annotations

from rich.console import Group
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Grid, Horizontal, VerticalScroll
from textual.timer import Timer
from textual.widgets import Button, Input, Label, Static

from tui.screens.steps.step import StepScreen
from tui.steps import step_ref
from tui.steps.data import render_example

PLACEHOLDER = "a .jsonl/.json/.csv/.parquet file, a Hub dataset id, or builtin:demo"
TRAINED_STYLE = "bold black on green"
"""How the tokens the model is trained on are shown."""
RECHECK_AFTER_S = 0.6
"""Pause after the last edit of a data setting before checking again."""


class DataScreen(StepScreen):
    """Load and check the training data."""

    STEP = "data"
    NEEDS_DATA = True
    _timer: Timer | None = None

    def compose_step(self) -> ComposeResult:
        d = self.draft
        with Horizontal(id="train-row"):
            yield Label("Data ", classes="field-label")
            yield Input(placeholder=PLACEHOLDER, id="train", compact=True, value=d.get("data.train"))
            yield Button("Check", id="check", compact=True)
        with Grid(id="data-form", classes="form-row"):
            yield from self.compose_fields()
        with Horizontal(classes="step-body"):
            with VerticalScroll(id="stats-box") as box:
                box.border_title = "statistics"
                yield Static(id="data-status")
                yield Static(id="stats")
            with VerticalScroll(id="examples-box") as box:
                box.border_title = "as the model sees it (trained part highlighted)"
                yield Static(id="examples")

    def on_mount(self) -> None:
        """Show what is known."""
        super().on_mount()
        self.refresh_view()

    def ready(self) -> bool:
        """Done when the data in the field has been checked."""
        typed = self.query_one("#train", Input).value.strip()
        return super().ready() and self.draft.data_ready and typed == self.draft.get("data.train")

    def _check(self) -> None:
        source = self.query_one("#train", Input).value.strip()
        if not source:
            self.set_error("type a data file, a Hub dataset id, or builtin:demo")
            return
        if source != self.draft.get("data.train"):
            self.draft.set("data.train", source)
        self.set_error(None)
        if not self.draft.model_ready:
            self.set_error(f"read a model first ({step_ref('model')}): its tokenizer counts the tokens")
            return
        self.app.check_data(force=True)

    @on(Input.Submitted, "#train")
    def _submitted(self) -> None:
        self._check()

    @on(Button.Pressed, "#check")
    def _check_pressed(self) -> None:
        self._check()

    @on(Input.Changed, "#train")
    def _typing(self) -> None:
        self.refresh_bindings()
        self.query_one("#next", Button).disabled = not self.ready()

    def field_changed(self, path: str) -> None:
        """A data setting changed: check again once the typing pauses."""
        if self._timer is not None:
            self._timer.stop()
        self._timer = self.set_timer(RECHECK_AFTER_S, self.app.check_data)

    def refresh_step(self) -> None:
        """Show the statistics and examples, or what is happening, or what went wrong."""
        app, draft = self.app, self.draft
        status, stats, examples = (self.query_one(f"#{n}", Static) for n in ("data-status", "stats", "examples"))
        if app.data_busy:
            status.update(Text(f"checking and tokenizing {draft.get('data.train')} ...", "yellow"))
        elif app.data_error:
            status.update(Text(app.data_error, "bold red"))
        elif not draft.model_ready:
            status.update(Text(f"read a model first ({step_ref('model')}): its tokenizer counts the tokens",
                               "yellow"))
        elif not draft.data_ready:
            status.update(Text("press Enter to check the data", "dim"))
        else:
            status.update("")
        status.set_class(not (app.data_busy or app.data_error or not draft.data_ready), "-empty")
        if draft.data is None or not draft.data_ready:
            stats.update("")
            examples.update("")
            return
        report = draft.data
        # A warning (examples that do not end with the stop token, say) stands out in yellow.
        lines = [Text(line, "yellow" if line.startswith("warning:") else "") for line in report.stats.summary_lines()]
        lines[0] = Text.assemble("format: ", (report.stats.format, "bold"))
        if report.bad_records:
            lines.append(Text(f"{report.bad_records:,} malformed records skipped (data.skip_bad_records)", "yellow"))
        stats.update(Group(*lines))
        parts = []
        noun = "pair" if report.stats.paired else "example"
        for i, pieces in enumerate(report.examples, 1):
            parts.append(Text(f"{noun} {i}", "bold underline"))
            parts.append(render_example(pieces, TRAINED_STYLE))
        examples.update(Group(*parts) if parts else Text("no example to show", "dim"))
