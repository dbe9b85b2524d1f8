"""The model step: a Hub id or a local folder (or a shipped preset, or a recent model); the config is
read in a worker and its facts shown: sizes, heads, vocabulary, context, parameters, weight size
and the layer names LoRA can target. A model that needs its own code asks for consent first. Once it
is read, the finished runs of the same model are offered to start from (``lora.init_from``), in a box
below that shows only when there are any."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Button, Input, Label, OptionList, Static
from textual.widgets.option_list import Option

from engine.errors import UserError
from engine.preset import shipped_presets
from tui.screens.steps.step import StepScreen
from tui.steps.model import (
    INIT_FROM_HINT,
    INIT_FROM_TITLE,
    StartingRun,
    init_from_choices,
    init_from_value,
    init_from_values,
    model_facts,
    recent_models,
    stale_init_from,
    starting_runs,
)

PLACEHOLDER = "org/name on the Hub, a model folder, a .gguf file, or builtin:tiny-llama"


class ModelScreen(StepScreen):
    """Choose the base model and see what it is."""

    STEP = "model"

    DEFAULT_CSS = """
    ModelScreen #init-box {
        height: auto;
        border: round $primary-darken-1;
        padding: 0 1;
    }
    ModelScreen #init-from {
        height: auto;
        max-height: 6;
        border: none;
        padding: 0;
    }
    """
    """The box of runs to start from (its own here: only this step has it)."""

    _runs_key: tuple | None = None
    """(runs folder, model) that ``_runs`` were found for."""
    _runs: list[StartingRun] = []
    """The finished runs of the model to start from (``lora.init_from``)."""
    _listed: tuple | None = None
    """(choices, the chosen value) the list shows, so a refresh that changes neither leaves it be."""

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
        with Vertical(id="init-box") as init_box:
            init_box.border_title = INIT_FROM_TITLE
            init_box.display = False
            yield Static(Text(INIT_FROM_HINT, "dim"), id="init-hint")
            yield OptionList(id="init-from")

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

    @on(OptionList.OptionSelected, "#init-from")
    def _init_chosen(self, event: OptionList.OptionSelected) -> None:
        value = (event.option.id or "").removeprefix("init:") or None
        if value != self.draft.preset.lora.init_from:
            try:
                self.draft.set_many(init_from_values(self.draft.preset, value))
            except UserError as exc:
                self.set_error(exc.one_line())
                return
        self.set_error(None)
        self._show_init_from()

    def _find_runs(self) -> None:
        """Look for the finished runs of the draft's model once it is read (again when the model or the
        runs folder changes); a run picked before for another model goes back to fresh adapters, said."""
        preset = self.draft.preset
        key = (preset.output.runs_dir, preset.model.source)
        if key == self._runs_key:
            return
        self._runs_key = key
        note = stale_init_from(preset)
        if note:
            self.draft.set("lora.init_from", None)
            self.app.notify(note)
        try:
            self._runs = starting_runs(*key)
        except Exception:  # noqa: BLE001 - unreadable runs just mean none to start from
            self._runs = []

    def _show_init_from(self) -> None:
        """The runs to start from, the chosen one marked; the box hidden when there are none."""
        box = self.query_one("#init-box", Vertical)
        runs = self._runs if self.draft.model_ready else []
        box.display = bool(runs)
        if not runs:
            return
        current = self.draft.preset.lora.init_from
        chosen = init_from_value(runs, current)
        choices = init_from_choices(runs, current)
        if (choices, chosen) == self._listed:
            return  # as shown already
        self._listed = (choices, chosen)
        options = self.query_one("#init-from", OptionList)
        highlighted = options.highlighted
        options.clear_options()
        for label, value in choices:
            mark = "(•) " if value == chosen else "( ) "
            options.add_option(Option(Text.assemble((mark, "bold" if value == chosen else "dim"), label),
                                      id=f"init:{value}"))
        if highlighted is not None:
            options.highlighted = min(highlighted, options.option_count - 1)

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
            self._find_runs()
        else:
            facts.update("")
        self._show_init_from()
