"""Form fields bound to a dotted path of the draft preset (``training.seq_len``).

Each field knows its path and how to read its text; the step screen that holds it sets the draft
(validated) on every change and shows the one-line error in place when the value is refused.
The field's tooltip is the schema's own help text, so the form and the YAML say the same.
:func:`form_widget` makes the one a step declares (``tui.steps.FormField``) by its kind.
"""

from __future__ import annotations

from typing import Any

from textual.widgets import Checkbox, Input, Select

from engine.preset import field_help
from tui.draft import choice_options, parse_field, shown
from tui.steps import FormField


class PresetInput(Input):
    """A text field for one preset value."""

    def __init__(self, path: str, kind: str, value: Any, **kwargs) -> None:
        super().__init__(value=shown(value), compact=True, select_on_focus=True, **kwargs)
        self.path = path
        """The dotted preset path this field edits."""
        self.kind = kind
        """``int``, ``float`` or ``str``, with ``?`` when empty means none (see ``tui.draft.parse_field``)."""
        self.tooltip = field_help(path)

    def parse(self, text: str) -> Any:
        """The typed text as the field's value; a UserError says what is wrong."""
        return parse_field(text, self.kind, self.path)

    def show(self, value: Any) -> None:
        """Show ``value`` unless the person is typing here (their text wins)."""
        if not self.has_focus and self.value != shown(value):
            with self.prevent(Input.Changed):
                self.value = shown(value)


class PresetSelect(Select):
    """A choice among the schema's allowed values for one preset field (``tui.draft.choice_options``)."""

    def __init__(self, path: str, value: Any, **kwargs) -> None:
        super().__init__(choice_options(path), value=value, allow_blank=False, compact=True, **kwargs)
        self.path = path
        """The dotted preset path this field edits."""
        self.tooltip = field_help(path)

    def show(self, value: Any) -> None:
        """Show ``value``."""
        if self.value != value:
            with self.prevent(Select.Changed):
                self.value = value


class PresetSwitch(Checkbox):
    """An on/off preset field; says ``on`` or ``off`` in words, not only in colour."""

    def __init__(self, path: str, value: bool, **kwargs) -> None:
        super().__init__("on" if value else "off", value=value, compact=True, **kwargs)
        self.path = path
        """The dotted preset path this field edits."""
        self.tooltip = field_help(path)

    def watch_value(self) -> None:
        """Keep the words in step with the box."""
        self.label = "on" if self.value else "off"

    def show(self, value: bool) -> None:
        """Show ``value``."""
        if self.value != value:
            with self.prevent(Checkbox.Changed):
                self.value = value


def form_widget(f: FormField, value: Any) -> PresetInput | PresetSelect | PresetSwitch:
    """The widget for a declared field, by its kind: a switch for ``bool``, a dropdown of the schema's
    values for a field that has a fixed set, else a text field (saying ``f.empty_text`` while empty)."""
    if f.is_switch:
        return PresetSwitch(f.path, value)
    if f.is_choice:
        return PresetSelect(f.path, value)
    return PresetInput(f.path, f.kind, value, placeholder=f.empty_text)
