"""The review step: the whole preset as YAML; export it to a file (asking before overwriting one);
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
from tui.screens.steps.step import StepScreen
from tui.steps.review import default_export_path, node_commands


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
            yield from self.compose_fields()
            yield Label("export to")
            yield Input(id="export-path", compact=True, tooltip="A .yaml file: rerun it with qlora-wizard --preset FILE")
        with Grid(id="node-form", classes="form4"):
            yield Label("this machine")
            yield Input(str(self.draft.node_rank), id="node-rank", compact=True,
                        tooltip="This machine's number, 0 to machines - 1 (machine 0 is the one the address names)")
            yield Label("machine 0 at")
            yield Input(self.draft.master or "", id="master", compact=True, placeholder="HOST:PORT",
                        tooltip="Machine 0's address and a free port, e.g. 10.0.0.1:29500")
        yield Static(id="node-commands")
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

    def _refresh_nodes(self) -> None:
        """A run over several machines: this machine's place, and the command each machine runs."""
        nodes = self.draft.preset.distributed.nodes
        several = nodes > 1
        self.query_one("#node-form").display = several
        box = self.query_one("#node-commands", Static)
        box.display = several
        if not several:
            return
        exported = str(self.draft.exported_to or self.query_one("#export-path", Input).value or "PRESET.yaml")
        lines = Text.assemble((f"{nodes} machines", "bold"), ": export the preset, copy it (with the data) to "
                              "each, and run there (or start this one with ctrl+r):")
        for line in node_commands(self.draft.preset, exported, self.draft.master):
            lines.append(f"\n  {line}", "dim")
        box.update(lines)

    @on(Input.Changed, "#node-rank, #master")
    def _node_changed(self) -> None:
        try:
            self.draft.set_node(self.query_one("#node-rank", Input).value, self.query_one("#master", Input).value)
        except UserError as exc:
            self.set_error(exc.one_line())
            return
        self.set_error(None)
        self._refresh_nodes()

    def refresh_step(self) -> None:
        """The YAML as it is now, and whether the run can start."""
        self._refresh_nodes()
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
