"""The model step: a Hub id or a local folder (or a shipped preset, or a recent model); the config is
read in a worker and its facts shown: sizes, heads, vocabulary, context, parameters, weight size
and the layer names LoRA can target. A model that needs its own code asks for consent first."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Button, Input, Label, OptionList, Static
from textual.widgets.option_list import Option

from engine.errors import UserError
from engine.preset import shipped_presets
from tui.screens.steps.step import StepScreen
from tui.steps.model import model_facts, recent_models

PLACEHOLDER = "org/name on the Hub, a model folder, a .gguf file, or builtin:tiny-llama"


class ModelScreen(StepScreen):
    """Choose the base model and see what it is."""

    STEP = "model"

    def compose_step(self) -> ComposeResult:
        with Horizontal(id="source-row"):
            yield Label("Model ", classes="field-label")
            yield Input(placeholder=PLACEHOLDER, id="source", compact=True)
            yield Button("Read", id="read", compact=True)
        with Horizontal(classes="step-body"):
            choices = OptionList(id="choices")
            choices.border_title = "presets and recent models"
            yield choices
            with VerticalScroll(id="facts-box") as box:
                box.border_title = "the model"
                yield Static(id="model-status")
                yield Static(id="facts")

    def on_mount(self) -> None:
        """Fill the choices and the field."""
        super().on_mount()
        choices = self.query_one("#choices", OptionList)
        for path in shipped_presets():
            choices.add_option(Option(Text.assemble(("preset ", "dim"), path.stem), id=f"preset:{path}"))
        try:
            recent = recent_models(self.app.runs_dir)
        except Exception:  # noqa: BLE001 - unreadable runs just mean no recent models
            recent = []
        for source in recent:
            choices.add_option(Option(Text.assemble(("recent ", "dim"), source), id=f"model:{source}"))
        field = self.query_one("#source", Input)
        if not self.app.ask_model:
            field.value = self.draft.preset.model.source
        field.focus()
        self.refresh_view()

    def _typed(self) -> str:
        return self.query_one("#source", Input).value.strip()

    def ready(self) -> bool:
        """Done once the model in the field has been read."""
        return self.draft.model_ready and self._typed() == self.draft.preset.model.source

    def _read(self, source: str) -> None:
        try:
            self.draft.change_model(source)
        except UserError as exc:
            self.set_error(exc.one_line())
            return
        self.set_error(None)
        if self.draft.model_ready:
            self.refresh_view()
            return
        self.app.read_model()

    @on(Input.Submitted, "#source")
    def _submitted(self, event: Input.Submitted) -> None:
        self._read(event.value.strip())

    @on(Input.Changed, "#source")
    def _changed(self) -> None:
        self.refresh_bindings()
        self.query_one("#next", Button).disabled = not self.ready()

    @on(Button.Pressed, "#read")
    def _read_pressed(self) -> None:
        self._read(self._typed())

    @on(OptionList.OptionSelected, "#choices")
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        kind, _, value = (event.option.id or "").partition(":")
        if kind == "preset":
            self.app.load_preset(value)
            self.query_one("#source", Input).value = self.draft.preset.model.source
        elif kind == "model":
            self.query_one("#source", Input).value = value
            self._read(value)

    def refresh_step(self) -> None:
        """Show the model's facts, or what is happening, or what went wrong."""
        app, draft = self.app, self.draft
        status = self.query_one("#model-status", Static)
        facts = self.query_one("#facts", Static)
        field = self.query_one("#source", Input)
        if not field.has_focus and not app.ask_model and field.value != draft.preset.model.source:
            field.value = draft.preset.model.source
        if app.model_busy:
            what = draft.preset.model.source
            slow = " (creating the demo model once, about 15 s)" if what.startswith("builtin:") else ""
            status.update(Text(f"reading {what}{slow} ...", "yellow"))
        elif app.model_error:
            status.update(Text(app.model_error, "bold red"))
        elif not draft.model_ready:
            status.update(Text("type a model and press Enter, or pick a preset on the left", "dim"))
        else:
            status.update(Text(draft.info.source, "bold"))
        if draft.model_ready:
            t = Table.grid(padding=(0, 1))
            t.add_column(style="dim", no_wrap=True)
            t.add_column()
            for label, value in model_facts(draft.info):
                t.add_row(label, value)
            for note in draft.info.notes:
                t.add_row("note", Text(note, "italic"))
            facts.update(t)
        else:
            facts.update("")
