"""The data step: a file or a Hub dataset, checked and tokenized; the detected format, examples as
the model sees them with the trained part marked (preference pairs: the prompt, the chosen and the
rejected answer, labelled), and the statistics (for pairs: their counts, tokens and removals).

The data source (``data.train``) is the step's own field, checked when given; the form is the
format, the validation share and whether the prompts are trained on too. It needs the model's
config (its tokenizer counts the tokens).
"""

from __future__ import annotations

from tui.steps.base import FormField, Step

EXAMPLE_LIMIT = 600
"""Characters of an example shown; longer ones are cut in the middle."""


LABEL_STYLE = "bold"
"""How the labels of a preference pair's parts (prompt, chosen answer, rejected answer) are shown."""


def render_example(pieces: list[tuple[str, bool | None]], trained_style: str, marks: tuple[str, str] = ("", ""),
                   limit: int = EXAMPLE_LIMIT):
    """One example as the model sees it (a ``rich.text.Text``): the trained part in ``trained_style``
    and between ``marks`` (for a terminal without colour), long ones cut in the middle. A preference
    pair's pieces carry labels (trained? None, ``engine.data.preview``): each labelled part is cut on
    its own, so the three labels always show."""
    from rich.text import Text

    parts: list[tuple[str | None, list]] = [(None, [])]
    for piece, trained in pieces:
        if trained is None:
            parts.append((piece, []))
        else:
            parts[-1][1].append((piece, trained))
    parts = [p for p in parts if p[0] is not None or p[1]]
    share = max(limit // max(len(parts), 1), 120)
    out = Text()
    for label, body in parts:
        if label is not None:
            out.append(label, LABEL_STYLE)
        text = Text()
        for piece, trained in body:
            text.append(f"{marks[0]}{piece}{marks[1]}" if trained else piece, trained_style if trained else "")
        if len(text) > share:
            text = Text.assemble(text[: share // 2], ("\n  ...\n", "dim"), text[-share // 2:])
        out.append_text(text)
    return out


DATA_FORM: tuple[FormField, ...] = (
    FormField("format", "data.format"),
    FormField("validation share", "data.validation_split", "float", "0 for none"),
    FormField("train on prompts", "data.train_on_inputs", "bool",
              ask="train on the prompts too (normally only the answers are trained on)?"),
)
"""How the records are read and split, in order."""

STEP = Step("data", "Data", DATA_FORM, needs="model")
"""The data step: what it shows is the draft's data report (``Draft.data``)."""
