"""The hyperparameters step: a validated form for the schedule, batch, optimizer and intervals, and
the learning rate from the guide's rule with this run's numbers filled in (supervised tokens from
the data, steps per epoch from data and batch, base rate and pretraining batch from the model
family, all editable); the person takes the suggestion or types another rate, and sees a note when
the rate is far from what LoRA runs usually use."""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, VerticalScroll
from textual.timer import Timer
from textual.widgets import Button, Static

from engine.errors import UserError
from engine.lr import note_on_lora_range
from engine.lr import RULE_FORMULA
from tui.screens.steps.step import StepScreen
from tui.steps import step_ref
from tui.steps.hyper import LR_FORM, batch_words, lr_view
from tui.widgets.fields import PresetInput

RECOUNT = frozenset({"training.seq_len", "training.seed"})
"""Fields that change the tokenized data (truncation, split): the supervised tokens are counted again."""


class HyperScreen(StepScreen):
    """The training schedule and the learning rate."""

    STEP = "hyper"
    NEEDS_DATA = True
    _timer: Timer | None = None

    BINDINGS = [
        Binding("ctrl+l", "use_suggestion", "Use suggested lr", tooltip="Set the learning rate to the rule's value"),
    ]

    def compose_step(self) -> ComposeResult:
        with VerticalScroll(classes="step-body"):
            with Grid(id="hyper-form", classes="form4") as form:
                form.border_title = "schedule and batch"
                yield from self.compose_fields(f for f in self.step.fields if f not in LR_FORM)
            yield Static(id="batch-line")
            with Grid(id="lr-form", classes="form4") as form:
                form.border_title = "learning rate"
                yield from self.compose_fields(f for f in self.step.fields if f in LR_FORM)
                yield Button("Use suggestion", id="use", compact=True)
                yield Static()
            yield Static(id="lr-rule")

    def on_mount(self) -> None:
        """Show the rule."""
        super().on_mount()
        self.refresh_view()

    def field_changed(self, path: str) -> None:
        """A change to sequence length or seed recounts the tokens, once typing pauses."""
        if path in RECOUNT:
            if self._timer is not None:
                self._timer.stop()
            self._timer = self.set_timer(0.6, self.app.check_data)

    def _suggestion(self):
        if not self.draft.data_ready:
            return None
        try:
            return lr_view(self.draft)
        except UserError:
            return None

    def refresh_step(self) -> None:
        """The effective batch, the rule with its numbers, and the note on the chosen rate."""
        draft = self.draft
        t = draft.preset.training
        batch = self.query_one("#batch-line", Static)
        rule = self.query_one("#lr-rule", Static)
        effective, made = batch_words(draft)
        line = Text.assemble("effective batch ", (f"{effective}", "bold"), f" examples ({made})")
        view = self._suggestion()
        if view is not None:
            line.append(f"; {view.steps_per_epoch:,} steps per epoch, ")
            line.append(f"{view.steps:,} steps", "bold")
            line.append(" in all")
        batch.update(line)
        use = self.query_one("#use", Button)
        if self.app.data_busy:
            rule.update(Text("counting the supervised tokens ...", "yellow"))
            use.disabled = True
            return
        if view is None:
            why = (self.app.data_error
                   or f"check the data first ({step_ref('data')}): the rule needs its supervised tokens")
            rule.update(Text(why, "yellow"))
            use.disabled = True
            return
        text = Text.assemble(
            (RULE_FORMULA + "\n", "bold"),
        )
        if view.suggestion is None:
            text.append(f"type {view.missing}: {view.source}", "yellow")
            use.disabled = True
        else:
            s = view.suggestion
            text.append(f"   = {s.arithmetic}\n")
            text.append(f"   {view.supervised_tokens:,} supervised tokens per epoch, {view.steps:,} steps over "
                        f"{view.epochs:.3g} epochs: {s.tokens_per_step:,.0f} tokens per step\n", "dim")
            text.append(f"   base rate and batch: {view.source}\n", "dim")
            text.append("suggested ")
            text.append(f"{s.learning_rate:.3g}", "bold cyan")
            use.label = f"Use {s.learning_rate:.3g}"
            use.disabled = False
        chosen = t.learning_rate
        text.append("   chosen ")
        text.append(f"{chosen:.3g}", "bold")
        note = note_on_lora_range(chosen)
        if note:
            text.append(f"\nnote: {note}", "yellow")
        rule.update(text)

    @on(Button.Pressed, "#use")
    def _use(self) -> None:
        self.action_use_suggestion()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """``ctrl+u`` applies when the rule has a value."""
        if action == "use_suggestion":
            view = self._suggestion()
            return True if view is not None and view.suggestion is not None else None
        return super().check_action(action, parameters)

    def action_use_suggestion(self) -> None:
        """Take the rule's learning rate (rounded to three significant digits)."""
        view = self._suggestion()
        if view is None or view.suggestion is None:
            return
        value = float(f"{view.suggestion.learning_rate:.3g}")
        self.draft.set("training.learning_rate", value)
        for field in self.query(PresetInput):
            if field.path == "training.learning_rate":
                field.value = f"{value:g}"
        self.notify(f"learning rate {value:g}")
        self.refresh_view()
