"""What a wizard step is, as data: its name and title, the preset fields it edits, what must be done
before it. The functions that compute what a step shows of the draft live beside its declaration, in
the step's module (``tui/steps/memory.py``: ``memory_view``).

No Textual import: the full-screen wizard (``tui/screens/steps/``) and the plain prompts
(``tui/plain.py``) both render these declarations, so they ask the same fields with the same choices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

NEEDS = (None, "model", "data")
"""What a step can need done first: nothing, the model's config read, or the data checked (which
needs the model too)."""


@dataclass(frozen=True)
class FormField:
    """One field of a form both front ends show: the screen as a labelled input, dropdown or switch,
    the prompts as a question."""

    label: str
    """What the field is called (the screen's label)."""
    path: str
    """The dotted preset path it edits."""
    kind: str = "str"
    """``int``, ``float``, ``str`` (``?`` when empty means none; see ``tui.draft.parse_field``) or
    ``bool`` (a switch on screen, a yes/no question in the prompts)."""
    hint: str = ""
    """What an answer means, where the label alone does not say (the prompts add it in brackets)."""
    ask: str = ""
    """The prompts' question, where it is not the label and the hint (a yes/no question, say)."""
    placeholder: str = ""
    """What the screen's empty field says (``(none)`` for a field whose empty value means none)."""
    applies: Callable[[Any], bool] | None = None
    """Whether the field means anything for a preset (it gets the ``Preset``); None: always. A field that
    does not apply is not offered (the screen hides it, the prompts do not ask it) and keeps its default:
    a change that makes it stop applying puts it back (:meth:`Step.changes`), as the preset would refuse
    a setting of another method (``beta`` under ``method: sft``)."""

    def offered(self, preset: Any) -> bool:
        """Whether the front ends offer the field for ``preset`` (see ``applies``)."""
        return self.applies is None or bool(self.applies(preset))

    @property
    def is_choice(self) -> bool:
        """Whether the schema fixes the field's values (a dropdown, a menu: ``tui.draft.choice_options``)."""
        from engine.preset import choices

        return bool(choices(self.path))

    @property
    def is_switch(self) -> bool:
        """Whether the field is on or off (a switch, a yes/no question)."""
        return self.kind == "bool"

    @property
    def optional(self) -> bool:
        """Whether an empty answer means none."""
        return self.kind.endswith("?")

    @property
    def prompt(self) -> str:
        """The question the plain prompts ask."""
        if self.ask:
            return self.ask
        return f"{self.label} ({self.hint})" if self.hint else self.label

    @property
    def empty_text(self) -> str:
        """What the screen's field says while empty."""
        return self.placeholder or ("(none)" if self.optional else "")


@dataclass(frozen=True)
class Step:
    """One step of the wizard, declared once; both front ends render it."""

    name: str
    """The step's name: the key of its screen and of its prompts (``memory``)."""
    title: str
    """What the step is called (``LoRA targets``)."""
    fields: tuple[FormField, ...] = ()
    """The preset fields the step edits with plain form fields, in the screen's order. A step's special
    widgets (the model and data sources, the GPU budget, the layer list, the export path) are not here."""
    needs: str | None = None
    """What must be done before the step means anything: None, ``model`` (its config read) or ``data``
    (the data checked, which needs the model too); the step is done once it is (``Draft.first_missing``)."""

    def __post_init__(self) -> None:
        if self.needs not in NEEDS:
            raise ValueError(f"step {self.name!r}: needs must be one of {NEEDS}, not {self.needs!r}")

    def changes(self, path: str, value: Any, preset: Any) -> dict[str, Any]:
        """What setting ``path`` to ``value`` in ``preset`` sets, for ``Draft.set_many`` (validated together):
        the field itself, and each of the step's fields that the new value makes stop applying
        (``FormField.applies``) back to the schema's default where it is not there already."""
        section, name = path.split(".")
        after = preset.model_copy(update={section: getattr(preset, section).model_copy(update={name: value})})
        values: dict[str, Any] = {}
        for f in self.fields:
            if f.path == path or f.offered(after):
                continue
            default = schema_default(f.path)
            part, key = f.path.split(".")
            if getattr(getattr(preset, part), key) != default:
                values[f.path] = default
        values[path] = value
        return values

    def field(self, path: str) -> FormField:
        """The field that edits ``path``."""
        return next(f for f in self.fields if f.path == path)

    @property
    def paths(self) -> tuple[str, ...]:
        """The preset paths of the step's fields, in order."""
        return tuple(f.path for f in self.fields)


def schema_default(path: str) -> Any:
    """The value the preset schema gives a dotted path (``training.beta``) when a preset leaves it out."""
    from engine.preset import Preset

    model: Any = Preset
    *sections, name = path.split(".")
    for section in sections:
        model = model.model_fields[section].annotation
    return model.model_fields[name].get_default(call_default_factory=True)
