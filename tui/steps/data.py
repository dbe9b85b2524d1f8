"""The data step: a file or a Hub dataset, checked and tokenized; the detected format, examples as
the model sees them with the trained part marked, and the statistics.

The data source (``data.train``) is the step's own field, checked when given; the form is the
format, the validation share and whether the prompts are trained on too. It needs the model's
config (its tokenizer counts the tokens).
"""

from __future__ import annotations

from tui.steps.base import FormField, Step

EXAMPLE_LIMIT = 600
"""Characters of an example shown; longer ones are cut in the middle."""


def render_example(pieces: list[tuple[str, bool]], trained_style: str, marks: tuple[str, str] = ("", ""),
                   limit: int = EXAMPLE_LIMIT):
    """One example as the model sees it (a ``rich.text.Text``): the trained part in ``trained_style``
    and between ``marks`` (for a terminal without colour), long ones cut in the middle."""
    from rich.text import Text

    text = Text()
    for piece, trained in pieces:
        text.append(f"{marks[0]}{piece}{marks[1]}" if trained else piece, trained_style if trained else "")
    if len(text) > limit:
        text = Text.assemble(text[: limit // 2], ("\n  ...\n", "dim"), text[-limit // 2:])
    return text


DATA_FORM: tuple[FormField, ...] = (
    FormField("format", "data.format"),
    FormField("validation share", "data.validation_split", "float", "0 for none"),
    FormField("train on prompts", "data.train_on_inputs", "bool",
              ask="train on the prompts too (normally only the answers are trained on)?"),
)
"""How the records are read and split, in order."""

STEP = Step("data", "Data", DATA_FORM, needs="model")
"""The data step: what it shows is the draft's data report (``Draft.data``)."""
