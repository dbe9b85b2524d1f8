"""Step 6, Review: the whole preset as YAML; export it to a file (asking before overwriting one);
start the run, which opens the live run screen."""

from __future__ import annotations

from rich.syntax import Syntax
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, VerticalScroll
from textual.widgets import Button, Input, Label, Static

from engine.errors import UserError
from tui.dialogs.confirm import Confirm
from tui.draft import default_export_path
from tui.screens.step import StepScreen
from tui.widgets.fields import PresetInput


class ReviewScreen(StepScreen):
    """The preset as it will run; export and start."""

    STEP = "review"
    NEEDS_DATA = True

    BINDINGS = [
        Binding("ctrl+s", "export", "Export", tooltip="Write the preset to the file named below"),
        Binding("ctrl+r", "start", "Start", tooltip="Start training (in the background; it survives a lost SSH)"),
    ]

    def compose_step(self) -> ComposeResult:
        with Grid(id="review-form", classes="form4"):
            yield Label("run name")
            yield PresetInput("output.name", "str?", self.draft.get("output.name"), placeholder="model and time")
            yield Label("export to")
            yield Input(id="export-path", compact=True, tooltip="A .yaml file: rerun it with qlora-wizard --preset FILE")
        with Horizontal(id="review-actions"):
            yield Button("Export (ctrl+s)", id="export", compact=True)
            yield Button("Start training (ctrl+r)", id="start", variant="success", compact=True)
        yield Static(id="review-status")
        with VerticalScroll(id="yaml-box", classes="step-body") as box:
            box.border_title = "the preset"
            yield Static(id="yaml")

    def on_mount(self) -> None:
        """Show the YAML."""
        super().on_mount()
        self.query_one("#export-path", Input).value = default_export_path(self.draft)
        self.refresh_view()

    def refresh_step(self) -> None:
        """The YAML as it is now, and whether the run can start."""
        self.query_one("#yaml", Static).update(Syntax(self.draft.preset.to_yaml(), "yaml", theme="ansi_dark",
                                                      background_color="default", word_wrap=True))
        status = self.query_one("#review-status", Static)
        missing = self.draft.first_missing()
        start = self.query_one("#start", Button)
        start.disabled = missing is not None or self.app.starting
        if self.app.starting:
            status.update(Text("starting the training process ...", "yellow"))
        elif missing is not None:
            status.update(Text(f"before starting: {missing[1]}", "yellow"))
        else:
            exported = self.draft.exported_to
            status.update(Text.assemble(
                ("ready: ", "bold green"), "ctrl+r starts training in the background (it survives a lost SSH); ",
                (f"exported to {exported}" if exported else "ctrl+s exports the preset", "dim")))

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Start applies once model and data are read."""
        if action == "start":
            return True if self.draft.first_missing() is None and not self.app.starting else None
        return super().check_action(action, parameters)

    @on(Button.Pressed, "#export")
    def _export_pressed(self) -> None:
        self.action_export()

    @on(Input.Submitted, "#export-path")
    def _export_submitted(self) -> None:
        self.action_export()

    @on(Button.Pressed, "#start")
    def _start_pressed(self) -> None:
        self.action_start()

    def action_export(self) -> None:
        """Write the preset, asking first when that would replace a file."""
        try:
            path = self.draft.export_path(self.query_one("#export-path", Input).value)
        except UserError as exc:
            self.set_error(exc.one_line())
            return

        def write(ok: bool | None = True) -> None:
            if not ok:
                return
            try:
                written = self.draft.export(path)
            except UserError as exc:
                self.set_error(exc.one_line())
                return
            self.set_error(None)
            self.notify(f"exported {written}; rerun it with: qlora-wizard --preset {written}")
            self.refresh_view()

        if self.draft.export_overwrites(path):
            self.app.push_screen(Confirm(f"Overwrite {path}?", "The file exists; exporting replaces it.",
                                         yes="Overwrite", no="Keep it", danger=True), write)
        else:
            write()

    def action_start(self) -> None:
        """Start the run."""
        self.app.start_run()
