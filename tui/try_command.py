"""Trying a finished run: ``qlora-wizard try RUN_DIR``, the try screen's entry point and its plain loop.

:func:`run_try_app` opens the full-screen try screen (:class:`tui.screens.try_model.TryScreen`, in
:class:`tui.app.TryApp`), or with ``plain=True`` (or without a terminal) a line-by-line loop in the
style of ``qlora-wizard plain``: ``prompt>`` asks, the fine-tuned and the base model's answers are
printed as they are generated, each followed by how it ended (the stop token or the length limit),
and ``:example``, ``:set NAME VALUE``, ``:eval``, ``:template``, ``:help`` and ``:quit`` do the rest.
A prompt is one line; ``\\n`` in it stands for a line break (an alpaca instruction and its input are
separated by a blank line: ``Reverse the word.\\n\\nfree``).

What both front ends do is here, once, with no Textual import: reading a decoding setting from typed
text (:func:`set_decoding`), cycling through the validation examples (:class:`ExampleCycle`), and
turning ``evaluate_run``'s ``EvalResult`` into rows and lines (:func:`eval_rows`, :func:`eval_lines`).
The model work itself is ``engine.after``'s.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from engine.errors import EXIT_OK, EXIT_STOPPED, UserError, first_line

if TYPE_CHECKING:
    from engine.after.evaluate import EvalResult

EXAMPLES = 20
"""Validation examples offered (``ctrl+e`` / ``:example`` cycle through them)."""

EVAL_GENERATIONS = 5
"""Validation examples ``evaluate_run`` answers next to their references (each costs a generation)."""


# ---------------------------------------------------------------------------------------------
# Decoding settings from typed text


@dataclass(frozen=True)
class DecodingField:
    """One setting of ``engine.after.Decoding`` as a person types it (the engine's Decoding checks its range)."""

    name: str
    """The Decoding attribute (``max_new_tokens``, ``temperature``, ``top_p``)."""
    label: str
    """How the screen and the loop name it."""
    kind: type
    """``int`` or ``float``."""
    help: str
    """What it does, in words (the field's tooltip)."""


DECODING_FIELDS: tuple[DecodingField, ...] = (
    DecodingField("max_new_tokens", "max new tokens", int, "the longest answer, in tokens (at least 1)"),
    DecodingField("temperature", "temperature", float,
                  "how freely tokens are drawn: 0 is greedy (the likeliest token every time, the same answer "
                  "each time), higher is more varied"),
    DecodingField("top_p", "top-p", float,
                  "draw only from the likeliest tokens that together hold this share of the probability "
                  "(above 0, at most 1; 1 keeps every token)"),
)
"""The decoding settings a person can change, in the order they are shown."""

_ALIASES = {"max": "max_new_tokens", "tokens": "max_new_tokens", "temp": "temperature", "p": "top_p"}


def decoding_field(name: str) -> DecodingField:
    """The field ``name`` stands for (``top-p``, ``top_p``, ``temp``, ``max-new-tokens``, ...)."""
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    key = _ALIASES.get(key, key)
    for f in DECODING_FIELDS:
        if f.name == key:
            return f
    raise UserError(f"there is no decoding setting {name!r}",
                    "set one of " + ", ".join(f.name for f in DECODING_FIELDS))


def set_decoding(decoding, name: str, text: str):
    """``decoding`` with one setting read from typed text; a UserError names the setting and what it takes
    (the range is ``engine.after.Decoding``'s own check)."""
    f = decoding_field(name)
    typed = text.strip()
    try:
        value = f.kind(typed)
    except ValueError:
        what = "a whole number" if f.kind is int else "a number"
        raise UserError(f"{f.label} {typed!r} is not {what}") from None
    if not math.isfinite(value):
        raise UserError(f"{f.label} {typed!r} is not a number")
    return replace(decoding, **{f.name: value})


def decoding_line(decoding) -> str:
    """The decoding settings in one line: ``max new tokens 128, temperature 0.7, top-p 0.9``."""
    return ", ".join(f"{f.label} {getattr(decoding, f.name):g}" for f in DECODING_FIELDS)


# ---------------------------------------------------------------------------------------------
# Validation examples


class ExampleCycle:
    """The run's validation examples, handed out one after another and round again."""

    def __init__(self, examples: list) -> None:
        self.examples = list(examples)
        """``engine.after.Example`` (prompt and reference) of the run."""
        self.index = -1
        """Which was handed out last (-1: none yet)."""

    def next(self):
        """The next example (the first after the last); None when there are none."""
        if not self.examples:
            return None
        self.index = (self.index + 1) % len(self.examples)
        return self.examples[self.index]

    def where(self) -> str:
        """``3 of 20``: which example was handed out last."""
        return f"{self.index + 1} of {len(self.examples)}"


# ---------------------------------------------------------------------------------------------
# The evaluation's result, as a table and lines


def _number(value, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def eval_rows(result: EvalResult) -> list[tuple[str, str, str]]:
    """``(model, validation loss, perplexity)`` for the base model and the fine-tuned one."""
    return [(label, _number(scores.loss, ".4f"), _number(scores.perplexity, ",.2f"))
            for label, scores in (("base", result.base), ("fine-tuned", result.fine_tuned))]


def eval_lines(result: EvalResult) -> list[str]:
    """What the evaluation found, in two short lines: how the validation loss moved, and how many
    generated answers equal their reference."""
    lines = []
    b, t = result.base.loss, result.fine_tuned.loss
    n = result.validation.examples
    if isinstance(b, (int, float)) and isinstance(t, (int, float)) and b > 0:
        lines.append(f"loss {(t - b) / b:+.1%} vs base, {n or '?'} examples")
    elif n == 0:
        lines.append("no validation split: no losses to compare")
    answers, exact = result.generations, result.exact_matches
    if answers:
        lines.append(f"exact: base {exact.base}/{len(answers)}, fine-tuned {exact.fine_tuned}/{len(answers)}")
    return lines


# ---------------------------------------------------------------------------------------------
# The plain loop


HELP = ("a prompt is one line; \\n in it starts a new line (alpaca: instruction\\n\\ninput)\n"
        ":example  the next validation example: its prompt, reference and both answers\n"
        ":set NAME VALUE  a decoding setting: max_new_tokens, temperature (0 greedy), top_p\n"
        ":eval     validation loss and perplexity, base against fine-tuned\n"
        ":template the last prompt as the model sees it\n"
        ":quit     leave (so does Ctrl-D)")
"""The loop's commands, one per line."""


class PlainTry:
    """The plain loop on one open ``TrySession``: reads lines, prints answers as they come."""

    def __init__(self, session, *, read: Callable[[str], str] = input, out: TextIO | None = None,
                 evaluate: Callable | None = None) -> None:
        from engine.after import Decoding

        self.session = session
        """The loaded model with the run's adapter."""
        self.read = read
        """Reads one line after printing a prompt (``input``); EOFError at the end."""
        self.out = out or sys.stdout
        """Where the lines and answers go."""
        self.decoding = Decoding()
        """The decoding settings of the next answers."""
        self.examples: ExampleCycle | None = None
        """The validation examples, read on the first ``:example``."""
        self.last_prompt: str | None = None
        """The last prompt answered."""
        self._evaluate = evaluate

    def say(self, text: str = "", end: str = "\n") -> None:
        """Print and flush (the answers come a piece at a time)."""
        self.out.write(text + end)
        self.out.flush()

    def loop(self) -> int:
        """Ask and answer until ``:quit`` or the end of the input; the exit status."""
        s = self.session
        self.say(f"{s.run_dir}: {s.preset.model.source} with the run's adapter, on {s.device}; "
                 f"{decoding_line(self.decoding)}")
        self.say("type a prompt; :example for a validation example, :help for the commands, :quit to leave")
        while True:
            try:
                line = self.read("prompt> ")
            except EOFError:
                self.say()
                return EXIT_OK
            except KeyboardInterrupt:
                self.say()
                return EXIT_STOPPED
            text = line.strip()
            if not text:
                continue
            if text.startswith(":"):
                if self.command(text) is False:
                    return EXIT_OK
                continue
            self.answer(line.rstrip("\n").replace("\\n", "\n"))

    def command(self, text: str) -> bool:
        """Do one ``:command``; False to leave."""
        name, _, rest = text[1:].partition(" ")
        name = name.lower()
        if name in ("q", "quit", "exit"):
            return False
        if name in ("h", "help", "?"):
            self.say(HELP)
        elif name in ("e", "ex", "example"):
            self.example()
        elif name == "set":
            parts = rest.split()
            if len(parts) != 2:
                self.say(f"{decoding_line(self.decoding)}  (change one with :set NAME VALUE)")
            else:
                try:
                    self.decoding = set_decoding(self.decoding, *parts)
                except UserError as exc:
                    self.say(f"error: {exc.one_line()}")
                else:
                    self.say(decoding_line(self.decoding))
        elif name == "eval":
            self.evaluate()
        elif name in ("template", "t"):
            if self.last_prompt is None:
                self.say("no prompt yet")
            else:
                self.say(self.session.render(self.last_prompt))
        else:
            self.say(f"error: no command :{name}; :help lists them")
        return True

    def example(self) -> None:
        """The next validation example: its prompt, its reference, then both answers."""
        if self.examples is None:
            self.examples = ExampleCycle(self.session.examples(EXAMPLES))
        ex = self.examples.next()
        if ex is None:
            self.say("error: this run has no validation examples to offer")
            return
        self.say(f"example {self.examples.where()}: {ex.prompt}")
        self.say(f"reference: {ex.reference}")
        self.answer(ex.prompt)

    def answer(self, prompt: str) -> None:
        """Both answers to ``prompt``, fine-tuned first, each printed as it is generated.
        Ctrl-C stops the answer being generated (and skips the other)."""
        self.last_prompt = prompt
        stop = threading.Event()
        for label, adapter in (("fine-tuned", True), ("base", False)):
            self.say(f"{label}: ", end="")
            pieces = self.session.stream(prompt, adapter=adapter, decoding=self.decoding, stop=stop)
            try:
                for piece in pieces:
                    self.say(piece, end="")
            except KeyboardInterrupt:
                stop.set()
                for _ in pieces:  # the generation ends at its next token
                    pass
                self.say(" (stopped)")
                return
            self.say()
            ending = getattr(self.session, "last_stop", {}).get(adapter)
            if ending is not None:  # whether the model stopped by itself or ran into the length limit
                self.say(f"  ({ending.words()})")

    def evaluate(self) -> None:
        """Validation loss and perplexity of base and fine-tuned, and how the generated answers did."""
        evaluate = self._evaluate
        if evaluate is None:
            from engine.after import evaluate_run as evaluate
        self.say("evaluating base against fine-tuned on the validation split")
        try:
            result = evaluate(self.session.run_dir, generations=EVAL_GENERATIONS, session=self.session,
                              progress=lambda line: self.say(f"  {line} ..."))
        except UserError as exc:
            self.say(f"error: {exc.one_line()}")
            return
        except Exception as exc:  # noqa: BLE001 - said in one line, the loop goes on
            self.say(f"error: the evaluation failed: {first_line(exc)}")
            return
        self.say(f"{'model':<12}{'val loss':>10}{'perplexity':>12}")
        for label, loss, ppl in eval_rows(result):
            self.say(f"{label:<12}{loss:>10}{ppl:>12}")
        for line in eval_lines(result):
            self.say(line)
        self.say(f"written to {Path(result.run_dir) / 'eval.json'}")


def run_try_plain(run_dir: str | os.PathLike, *, read: Callable[[str], str] = input,
                  out: TextIO | None = None) -> int:
    """Load the run's model and adapter, then the plain loop; the exit status. A run that cannot be
    tried (none there, no adapter yet, still training) raises the engine's one-line UserError."""
    from engine.after import TrySession

    out = out or sys.stdout
    out.write(f"loading the model and the adapter of {run_dir} ...\n")
    out.flush()
    session = TrySession.open(run_dir)
    try:
        return PlainTry(session, read=read, out=out).loop()
    finally:
        session.close()


def run_try_app(run_dir: str | os.PathLike, plain: bool = False) -> int:
    """``qlora-wizard try RUN_DIR``: the try screen in a terminal, else (or with ``plain``) the plain loop;
    the exit status."""
    if plain or not (sys.stdin.isatty() and sys.stdout.isatty()):
        return run_try_plain(run_dir)
    # Textual loads only here, so the plain loop stays light.
    from tui.app import TryApp

    TryApp(Path(run_dir)).run()
    return EXIT_OK
