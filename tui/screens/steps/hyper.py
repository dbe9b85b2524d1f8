"""The hyperparameters step: a validated form for what the run teaches (the method, and beta and the
dpo settings where the method uses them: the others are hidden), the schedule, batch, optimizer and
intervals, and the learning rate. For sft the guide's rule with this run's numbers filled in
(supervised tokens from the data, steps per epoch from data and batch, base rate and pretraining
batch from the model family, all editable); for dpo and orpo, whose loss is not a cross-entropy over
supervised tokens, the rates published runs of the method used, with their sources. The person takes
the suggestion or types another rate, and sees a note when the rate is far from the usual ones."""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, VerticalScroll
from textual.timer import Timer
from textual.widgets import Button, Label, Static

from engine.errors import UserError
from engine.lr import RULE_FORMULA, note_on_rate, preference_advice
from tui.screens.steps.step import StepScreen
from tui.steps import step_ref
from tui.steps.hyper import LR_FORM, METHOD_FORM, advice_lines, batch_words, lr_view
from tui.widgets.fields import PresetInput, form_widget

RECOUNT = frozenset({"training.seq_len", "training.seed", "training.method"})
"""Fields that can change the tokenized data (truncation, split, pairs or not): the data is checked
again when the check depends on them (``WizardApp.check_data`` does nothing otherwise)."""


class HyperScreen(StepScreen):
    """What the run teaches, the training schedule and the learning rate."""

    STEP = "hyper"
    NEEDS_DATA = True
    _timer: Timer | None = None

    BINDINGS = [
        Binding("ctrl+l", "use_suggestion", "Use suggested lr",
                tooltip="Set the learning rate to the suggested value (the rule's; for dpo and orpo the method's)"),
    ]

    def compose_step(self) -> ComposeResult:
        self._labels: dict[str, Label] = {}
        with VerticalScroll(classes="step-body"):
            with Grid(id="method-form", classes="form4") as form:
                form.border_title = "method"
                yield from self._compose_hideable(f for f in self.step.fields if f in METHOD_FORM)
            with Grid(id="hyper-form", classes="form4") as form:
                form.border_title = "schedule and batch"
                yield from self.compose_fields(f for f in self.step.fields
                                               if f not in LR_FORM and f not in METHOD_FORM)
            yield Static(id="batch-line")
            with Grid(id="lr-form", classes="form4") as form:
                form.border_title = "learning rate"
                yield from self.compose_fields(f for f in self.step.fields if f in LR_FORM)
                yield Button("Use suggestion", id="use", compact=True)
                yield Static()
            yield Static(id="lr-rule")

    def _compose_hideable(self, fields) -> ComposeResult:
        """Like ``compose_fields``, remembering each label so that a field the draft's method does not
        use (``FormField.applies``) can be hidden with it."""
        for f in fields:
            label = Label(f.label)
            self._labels[f.path] = label
            yield label
            yield form_widget(f, self.draft.get(f.path))

    def on_mount(self) -> None:
        """Show the rule."""
        super().on_mount()
        self.refresh_view()

    def _show_offered(self) -> None:
        """Show the fields that apply to the draft's method, hide the others (label and widget)."""
        preset = self.draft.preset
        widgets = {w.path: w for w in self.query("PresetInput, PresetSelect, PresetSwitch")}
        for path, label in self._labels.items():
            shown = self.step.field(path).offered(preset)
            label.display = shown
            widgets[path].display = shown

    def _apply(self, field, value) -> None:
        """Set a field as every step does, with the settings its new value makes stop applying put back
        to their defaults in the same change (``Step.changes``: the method switched to sft puts beta and
        the dpo settings back), which the preset would refuse otherwise."""
        values = (self.step.changes(field.path, value, self.draft.preset) if field.path in self.step.paths
                  else {field.path: value})
        if len(values) > 1 and value != self.draft.get(field.path):
            try:
                self.draft.set_many(values)
            except UserError:
                pass  # refused as a whole: the single change below says why
            else:
                super()._apply(field, value)  # nothing left to change: clears the error line
                self.field_changed(field.path)
                self.refresh_view()
                return
        super()._apply(field, value)

    def field_changed(self, path: str) -> None:
        """A change to what the data check depends on checks the data again, once typing pauses."""
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

    def _suggested_rate(self) -> float | None:
        """The rate ``Use`` takes: the method's for dpo and orpo, the rule's for sft (once it has its numbers)."""
        advice = preference_advice(self.draft.preset.training.method)
        if advice is not None:
            return advice.learning_rate
        view = self._suggestion()
        return view.suggested_rate if view is not None else None

    def _waiting_for_data(self) -> str | None:
        """Why the data's figures (its steps) are not shown yet under a preference method's advice, or None."""
        if self.app.data_busy:
            return "checking the data ..."
        if not self.draft.data_ready:
            return self.app.data_error or f"check the data first ({step_ref('data')}): the steps are its figures"
        return None

    def refresh_step(self) -> None:
        """The method's fields, the effective batch, the rule with its numbers (or the method's published
        rates), and the note on the chosen rate."""
        draft = self.draft
        t = draft.preset.training
        self._show_offered()
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
        advice = preference_advice(t.method)
        if advice is not None:
            text = Text()
            for words, style in advice_lines(advice):
                text.append(words + "\n", style)
            text.append(f"   source: {advice.source}\n", "dim")
            wait = self._waiting_for_data()
            if wait:
                text.append(f"   {wait}\n", "yellow")
            text.append("suggested ")
            text.append(f"{advice.learning_rate:.3g}", "bold cyan")
            text.append(" for LoRA")
            use.label = f"Use {advice.learning_rate:.3g}"
            use.disabled = False
            self._chosen(text)
            rule.update(text)
            return
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
        self._chosen(text)
        rule.update(text)

    def _chosen(self, text: Text) -> None:
        """Append the chosen rate, and the note when it is far from the method's usual rates."""
        t = self.draft.preset.training
        text.append("   chosen ")
        text.append(f"{t.learning_rate:.3g}", "bold")
        note = note_on_rate(t.method, t.learning_rate)
        if note:
            text.append(f"\nnote: {note}", "yellow")

    @on(Button.Pressed, "#use")
    def _use(self) -> None:
        self.action_use_suggestion()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """``ctrl+l`` applies when there is a suggested rate."""
        if action == "use_suggestion":
            return True if self._suggested_rate() is not None else None
        return super().check_action(action, parameters)

    def action_use_suggestion(self) -> None:
        """Take the suggested learning rate (rounded to three significant digits)."""
        rate = self._suggested_rate()
        if rate is None:
            return
        value = float(f"{rate:.3g}")
        self.draft.set("training.learning_rate", value)
        for field in self.query(PresetInput):
            if field.path == "training.learning_rate":
                field.value = f"{value:g}"
        self.notify(f"learning rate {value:g}")
        self.refresh_view()
