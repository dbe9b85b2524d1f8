"""What every wizard step shares: the steps bar, Back and Next, and the form fields bound to the draft.

Each screen renders its step's declaration (:class:`tui.steps.Step`): the title, what it needs
done first (Next stays dimmed until it is), and its form fields, made by kind from ``step.fields``
(:meth:`StepScreen.compose_fields`). A step edits the app's draft through those
:class:`~tui.widgets.fields.PresetInput` (and Select, Switch) fields: every change is validated at
once and a refused value is named in place, in the step's error line, without changing the draft.
``ctrl+n``/``ctrl+b`` move on and back (the Footer dims Next while the step is not done), and the
command palette (``ctrl+p``) jumps to any step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import Button, Checkbox, Footer, Header, Input, Label, Select, Static

from engine.errors import UserError
from tui.draft import Draft
from tui.steps import STEP_NAMES, STEPS, FormField, Step, get_step
from tui.widgets.fields import PresetInput, PresetSelect, PresetSwitch, form_widget

if TYPE_CHECKING:
    from tui.wizard import WizardApp


class StepsBar(Static):
    """One line naming every step, the current one highlighted."""

    def show(self, current: str) -> None:
        """Highlight ``current``."""
        text = Text(no_wrap=True, overflow="ellipsis")
        for i, step in enumerate(STEPS, 1):
            if i > 1:
                text.append(" > ", "dim")
            text.append(f"{i} {step.title}", "bold reverse" if step.name == current else "")
        self.update(text)


class StepScreen(Screen[None]):
    """A wizard step: subclasses give ``STEP``, ``compose_step`` and ``refresh_step``."""

    STEP = ""
    """The name of the step this screen shows (``tui.steps.STEPS``): its key in the screen registry
    (``tui.screens.steps.SCREENS``)."""
    NEEDS_DATA = False
    """Whether the step shows figures of the checked data (it is checked when the step opens)."""

    BINDINGS = [
        Binding("ctrl+b", "back", "Back", tooltip="The previous step (the draft keeps everything)"),
        Binding("ctrl+n", "next", "Next", tooltip="The next step"),
    ]

    app: "WizardApp"

    def __init__(self, step: Step | None = None) -> None:
        super().__init__()
        self.step = step or get_step(self.STEP)
        """The step's declaration: title, what it needs first, its form fields."""

    @property
    def draft(self) -> Draft:
        """The app's draft preset and what is known about it."""
        return self.app.draft

    @property
    def index(self) -> int:
        """This step's position, from 0."""
        return STEP_NAMES.index(self.step.name)

    def compose(self) -> ComposeResult:
        yield Header()
        yield StepsBar(id="steps")
        yield from self.compose_step()
        yield Static(id="form-error")
        with Horizontal(id="nav"):
            yield Static(id="nav-space")
            if self.index > 0:
                yield Button("< Back", id="back", compact=True)
            if self.index < len(STEPS) - 1:
                yield Button("Next >", id="next", variant="primary", compact=True)
        yield Footer()

    def compose_step(self) -> ComposeResult:
        """The step's own widgets."""
        yield from ()

    def compose_fields(self, fields: Iterable[FormField] | None = None) -> ComposeResult:
        """A label and a bound widget (``tui.widgets.fields.form_widget``) for each of ``fields``
        (by default all of the step's), for a form grid to hold."""
        for f in self.step.fields if fields is None else fields:
            yield Label(f.label)
            yield form_widget(f, self.draft.get(f.path))

    _shown = False

    def on_mount(self) -> None:
        """Show the draft."""
        self._shown = True
        self.query_one(StepsBar).show(self.step.name)
        self.sub_title = self.step.title

    def on_screen_resume(self) -> None:
        """Another step may have changed the draft: show it as it is now (and count the data again
        if this step shows it and a setting it depends on changed)."""
        self.refresh_view()
        app = self.app
        if self.NEEDS_DATA and self.draft.model_ready and not self.draft.data_ready and not app.data_busy:
            app.check_data()

    def refresh_view(self) -> None:
        """Bring every field and figure up to date with the draft."""
        if not self._shown:
            return  # not composed yet: on_mount shows it
        for f in self.query("PresetInput, PresetSelect, PresetSwitch"):
            f.show(self.draft.get(f.path))
        self.refresh_step()
        self.refresh_bindings()
        nxt = self.query("#next")
        if nxt:
            nxt.first(Button).disabled = not self.ready()

    def refresh_step(self) -> None:
        """Bring the step's own figures up to date (subclasses)."""

    def ready(self) -> bool:
        """Whether the step is done well enough to go on: by default, once what it needs is done
        (``Step.needs``: the model read, the data checked)."""
        return self.draft.first_missing(self.step.needs) is None

    def set_error(self, message: str | None) -> None:
        """Show (or clear) the step's one-line error."""
        error = self.query_one("#form-error", Static)
        error.update(Text(message or "", "bold red"))
        error.set_class(bool(message), "-shown")

    # ---- form fields -------------------------------------------------------------------

    def _apply(self, field, value) -> None:
        if value == self.draft.get(field.path):
            field.remove_class("-invalid")
            self.set_error(None)
            return  # nothing changed (a widget announcing its first value, say)
        try:
            self.draft.set(field.path, value)
        except UserError as exc:
            field.add_class("-invalid")
            self.set_error(exc.one_line())
            return
        field.remove_class("-invalid")
        self.set_error(None)
        self.field_changed(field.path)
        self.refresh_view()

    @on(Input.Changed)
    def _input_changed(self, event: Input.Changed) -> None:
        field = event.input
        if not isinstance(field, PresetInput):
            return
        event.stop()
        try:
            value = field.parse(event.value)
        except UserError as exc:
            field.add_class("-invalid")
            self.set_error(exc.one_line())
            return
        self._apply(field, value)

    @on(Select.Changed)
    def _select_changed(self, event: Select.Changed) -> None:
        if isinstance(event.select, PresetSelect) and event.value is not Select.NULL:
            event.stop()
            self._apply(event.select, event.value)

    @on(Checkbox.Changed)
    def _switch_changed(self, event: Checkbox.Changed) -> None:
        if isinstance(event.checkbox, PresetSwitch):
            event.stop()
            self._apply(event.checkbox, event.value)

    def field_changed(self, path: str) -> None:
        """React to an accepted change of ``path`` (subclasses)."""

    # ---- moving ------------------------------------------------------------------------

    @on(Button.Pressed, "#back")
    def _back_pressed(self) -> None:
        self.action_back()

    @on(Button.Pressed, "#next")
    def _next_pressed(self) -> None:
        self.action_next()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Back is hidden on the first step, Next on the last; Next is dimmed until the step is done."""
        if action == "back":
            return self.index > 0
        if action == "next":
            if self.index >= len(STEPS) - 1:
                return False
            return True if self.ready() else None
        return True

    def action_back(self) -> None:
        """Go to the previous step."""
        if self.index > 0:
            self.app.goto(STEPS[self.index - 1].name)

    def action_next(self) -> None:
        """Go to the next step, if this one is done."""
        if self.index < len(STEPS) - 1 and self.ready():
            self.app.goto(STEPS[self.index + 1].name)
