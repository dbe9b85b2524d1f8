"""The wizard's steps, each declared once as data (:class:`Step`), in order.

Each step's module holds its declaration (``STEP``: title, fields, what it needs) and the plain
functions that compute what it shows of the draft. No Textual import: the full-screen wizard
(``tui/screens/steps/``) and the plain prompts (``tui/plain.py``) both render these, so they ask the
same fields with the same choices and number the steps the same (:func:`step_ref`).
"""

from __future__ import annotations

from tui.steps import data, hyper, memory, model, review, targets
from tui.steps.base import FormField, Step

__all__ = ["STEPS", "STEP_NAMES", "FormField", "Step", "get_step", "step_number", "step_ref"]

STEPS: tuple[Step, ...] = (model.STEP, memory.STEP, targets.STEP, data.STEP, hyper.STEP, review.STEP)
"""The wizard's steps in order."""

STEP_NAMES: tuple[str, ...] = tuple(s.name for s in STEPS)
"""The steps' names in order."""



def get_step(name: str) -> Step:
    """The step called ``name``; a KeyError names the steps there are."""
    for step in STEPS:
        if step.name == name:
            return step
    raise KeyError(f"no step {name!r}: the steps are {', '.join(STEP_NAMES)}")


def step_number(name: str) -> int:
    """The step's place in the walk, from 1."""
    return STEP_NAMES.index(get_step(name).name) + 1


def step_ref(name: str) -> str:
    """How a line refers to a step: the word and its number by its place in :data:`STEPS`, so every
    "(step N)" a front end says follows the order."""
    return f"step {step_number(name)}"
