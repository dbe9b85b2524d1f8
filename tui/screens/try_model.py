"""The try screen: a finished run's model answering a prompt, next to the base model's answer.

A prompt field and the decoding settings on top; below, two panes side by side, the fine-tuned
model's answer and the base model's (the same model with the adapter switched off), each streamed
as it is generated, with a dim line under it once done: whether the model ended it by itself (the
stop token) or ran into the length limit. The prompt as the model sees it (the run's own template) is
in one dim line above them (``ctrl+t`` shows it whole). ``ctrl+e`` fills the prompt with a validation
example and shows its reference answer; ``ctrl+v`` evaluates base against fine-tuned on the
validation split.

Everything slow runs in thread workers that post messages (loading the model, generating,
evaluating); the handlers own every widget. The model is loaded once, when the screen opens, and
one thing uses it at a time (a lock): a new prompt stops the answer being generated (its ``stop``
event) and starts once that has let go of the model; the evaluation runs on the same loaded model
(no second copy) and answers wait for it. Leaving the screen stops generating and closes the
session, freeing the model's memory.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from rich.text import Text
from textual import events, on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Input, Label, Static, TextArea

from engine.after import Decoding, TrySession
from engine.after.evaluate import EvalResult
from engine.errors import UserError, first_line
from tui.try_command import (
    DECODING_FIELDS,
    EVAL_GENERATIONS,
    EXAMPLES,
    ExampleCycle,
    eval_lines,
    eval_rows,
    set_decoding,
)

PANES = (("tuned", "fine-tuned", True), ("base", "base (adapter off)", False))
"""The two answers: pane id, title, whether the adapter is on. The fine-tuned one is generated first."""


CLOSE_WAIT_S = 2.0
"""How long leaving waits for a generation to stop before closing the session in the background."""


class PromptArea(TextArea):
    """The prompt: Enter asks for both answers; ctrl+j (or shift+enter, where the terminal tells it
    apart) starts a new line, as the blank line between an alpaca instruction and its input needs."""

    BINDINGS = [Binding("ctrl+j,shift+enter", "newline", "New line", show=False)]

    class Submitted(Message):
        """Enter was pressed in the prompt."""

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted())
            return
        await super()._on_key(event)

    def action_newline(self) -> None:
        """Start a new line in the prompt."""
        self.insert("\n")


class AnswerPane(VerticalScroll):
    """One model's answer, growing as it is generated; its subtitle says where generation is."""

    def __init__(self, title: str, *, id: str) -> None:
        super().__init__(id=id, classes="answer")
        self.border_title = title
        self.text = ""
        """The answer shown."""
        self.note = ""
        """How the answer shown ended, in words (empty while it is generated)."""

    def compose(self) -> ComposeResult:
        yield Static(Text("(the answer shows here)", "dim"), classes="answer-text")

    def show(self, text: str, note: str = "") -> None:
        """Show ``text`` (the answer so far) and keep its end in view; ``note``, a dim line under it,
        says how a finished answer ended (the stop token or the length limit)."""
        self.text = text
        self.note = note
        shown = Text(text)
        if note:
            shown.append(f"\n({note})", "dim")
        self.query_one(".answer-text", Static).update(shown)
        self.scroll_end(animate=False, immediate=False)

    def state(self, subtitle: str) -> None:
        """Say where this answer's generation is (``generating...``, ``done in 1.2 s``)."""
        self.border_subtitle = subtitle


class TryScreen(Screen[None]):
    """A finished run's model, fine-tuned against base, on prompts typed or taken from its validation data."""

    BINDINGS = [
        Binding("ctrl+g", "generate", "Generate", tooltip="Both answers to the prompt (Enter does the same)"),
        Binding("ctrl+s", "stop", "Stop", tooltip="Stop generating"),
        Binding("ctrl+e", "example", "Example", priority=True,
                tooltip="Fill the prompt with the next validation example and show its reference answer"),
        Binding("ctrl+v", "evaluate", "Evaluate", priority=True,
                tooltip="Validation loss and perplexity of the base model and the fine-tuned one"),
        Binding("ctrl+t", "template", "Template", tooltip="The prompt as the model sees it: whole, or one line"),
        Binding("escape", "leave", "Back", tooltip="Leave (stops generating and frees the model)"),
    ]

    # ---- messages from the workers ---------------------------------------------------------

    class Loaded(Message, bubble=False):
        """The model and the adapter are loaded."""

        def __init__(self, session: TrySession, examples: list) -> None:
            super().__init__()
            self.session = session
            """The open session."""
            self.examples = examples
            """The run's validation examples (``engine.after.Example``)."""

    class LoadFailed(Message, bubble=False):
        """The run cannot be tried."""

        def __init__(self, error: str) -> None:
            super().__init__()
            self.error = error
            """One line: why, and what to do."""

    class Streamed(Message, bubble=False):
        """An answer grew. A newer one of the same answer replaces it while both wait in the queue, so a
        fast generation cannot flood the screen."""

        def __init__(self, request: int, pane: str, text: str) -> None:
            super().__init__()
            self.request = request
            """Which prompt (a newer one makes this stale)."""
            self.pane = pane
            """``tuned`` or ``base``."""
            self.text = text
            """The answer so far."""

        def can_replace(self, message: Message) -> bool:
            return (isinstance(message, TryScreen.Streamed) and message.request == self.request
                    and message.pane == self.pane)

    class Answered(Message, bubble=False):
        """An answer is complete, stopped or failed."""

        def __init__(self, request: int, pane: str, text: str, outcome: str, seconds: float,
                     error: str | None = None, ending: str = "") -> None:
            super().__init__()
            self.request = request
            """Which prompt."""
            self.pane = pane
            """``tuned`` or ``base``."""
            self.text = text
            """The whole answer (what was generated before a stop or a failure)."""
            self.outcome = outcome
            """``done``, ``stopped`` or ``failed``."""
            self.seconds = seconds
            """How long it took."""
            self.error = error
            """Why it failed, in one line."""
            self.ending = ending
            """How a finished answer ended, in words (``ended by the stop token </s>``, or cut at the length
            limit); empty for one stopped or failed."""

    class EvalProgress(Message, bubble=False):
        """The evaluation reached a stage (a newer one replaces it in the queue)."""

        def __init__(self, line: str) -> None:
            super().__init__()
            self.line = line
            """What it is doing, in a few words."""

        def can_replace(self, message: Message) -> bool:
            return isinstance(message, TryScreen.EvalProgress)

    class Evaluated(Message, bubble=False):
        """The evaluation finished (``result``) or failed (``error``)."""

        def __init__(self, result: EvalResult | None, error: str | None = None) -> None:
            super().__init__()
            self.result = result
            """``evaluate_run``'s result."""
            self.error = error
            """Why it failed, in one line."""

    # ---- state -----------------------------------------------------------------------------

    ready: reactive[bool] = reactive(False, bindings=True)
    """The model is loaded."""
    generating: reactive[bool] = reactive(False, bindings=True)
    """Answers are being generated."""
    evaluating: reactive[bool] = reactive(False, bindings=True)
    """The evaluation runs."""

    def __init__(self, run_dir: str | Path) -> None:
        super().__init__()
        self.run_dir = Path(run_dir)
        """The run tried."""
        self.session: TrySession | None = None
        """The loaded model (None while loading, after a failure and once left)."""
        self.decoding = Decoding()
        """The decoding settings of the next answers (the last good values typed)."""
        self.examples = ExampleCycle([])
        """The run's validation examples."""
        self.load_error: str | None = None
        """Why the run cannot be tried."""
        self.problem: str | None = None
        """A refused decoding value or a failed generation, in one line."""
        self.eval_result: EvalResult | None = None
        """The last evaluation's result."""
        self.eval_tried = False
        """An evaluation was asked for (its box stays on screen)."""
        self.request = 0
        """The newest prompt's number: answers still arriving for an older one are not shown."""
        self._loading = True
        self._stop = threading.Event()
        self._pending: set[str] = set()
        self._model_lock = threading.Lock()  # one generation uses the model at a time; close waits for it
        self._state_lock = threading.Lock()  # between the loading worker and leaving
        self._closing = False
        self.closed = threading.Event()
        """Set once the screen is left and the session closed (or there was none to close)."""

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="try-status")
        with Horizontal(id="prompt-row"):
            yield Label("prompt", classes="field-label")
            yield PromptArea(id="prompt", compact=True, soft_wrap=True, show_line_numbers=False,
                             highlight_cursor_line=False,
                             placeholder="type a prompt: Enter answers it, ctrl+j starts a new line")
        with Horizontal(id="decoding-row"):
            for f in DECODING_FIELDS:
                yield Label(f.label, classes="field-label")
                field = Input(f"{getattr(self.decoding, f.name):g}", id=f.name, compact=True, select_on_focus=True,
                              classes="decoding")
                field.tooltip = f"{f.label}: {f.help}"
                yield field
        yield Static(id="rendered")
        with Horizontal(id="answers"):
            for pane, title, _ in PANES:
                yield AnswerPane(title, id=f"{pane}-pane")
        with Horizontal(id="try-extras"):
            reference = Static(id="reference")
            reference.border_title = "reference answer"
            yield reference
            with Vertical(id="eval-box") as box:
                box.border_title = "validation: base vs fine-tuned"
                yield DataTable(id="eval-table", show_cursor=False, zebra_stripes=False)
                yield Static(id="eval-note")
        yield Footer()

    def on_mount(self) -> None:
        """Start loading the model; the prompt takes the keys."""
        self.query_one("#eval-table", DataTable).add_columns("model", "val loss", "perplexity")
        self._show_status()
        self._show_rendered()
        self.query_one("#prompt", PromptArea).focus()
        self._load()

    def on_unmount(self) -> None:
        """Leaving: stop generating, then close the session (freeing the model's memory) as soon as the
        generation has let go of the model, which it does at its next token."""
        with self._state_lock:
            self._closing = True
            session, self.session = self.session, None
            loading = self._loading
        self._stop.set()
        if session is None:
            if not loading:  # else the loading worker closes what it loads
                self.closed.set()
            return
        if self._model_lock.acquire(timeout=CLOSE_WAIT_S):
            try:
                session.close()
            finally:
                self._model_lock.release()
                self.closed.set()
        else:  # a token that takes longer than that: close once it is done, off the UI thread
            threading.Thread(target=self._close_later, args=(session,), name="try-close", daemon=True).start()

    def _close_later(self, session: TrySession) -> None:
        with self._model_lock:
            session.close()
        self.closed.set()

    # ---- workers: engine calls, never widgets ----------------------------------------------

    @work(thread=True, exclusive=True, exit_on_error=False, group="load")
    def _load(self) -> None:
        """Open the session (the model, 4-bit on a GPU, and the adapter) and read the validation examples."""
        try:
            session = TrySession.open(self.run_dir)
        except Exception as exc:  # noqa: BLE001 - any failure is said on screen, in one line
            error = exc.one_line() if isinstance(exc, UserError) else \
                f"cannot load the model of {self.run_dir}: {first_line(exc)}"
            with self._state_lock:
                self._loading = False
                if self._closing:
                    self.closed.set()
                    return
            self.post_message(self.LoadFailed(error))
            return
        try:
            examples = session.examples(EXAMPLES)
        except Exception:  # noqa: BLE001 - prompts can still be typed; ctrl+e says there are none
            examples = []
        with self._state_lock:
            self._loading = False
            if self._closing:  # left while it loaded
                session.close()
                self.closed.set()
                return
            self.session = session
        self.post_message(self.Loaded(session, examples))

    @work(thread=True, exclusive=True, exit_on_error=False, group="generate")
    def _generate(self, request: int, session: TrySession, prompt: str, decoding: Decoding,
                  stop: threading.Event) -> None:
        """Both answers, fine-tuned then base, each posted as it grows."""
        with self._model_lock:
            for pane, _, adapter in PANES:
                t0 = time.monotonic()
                if stop.is_set():
                    self.post_message(self.Answered(request, pane, "", "stopped", 0.0))
                    continue
                text = ""
                try:
                    for piece in session.stream(prompt, adapter=adapter, decoding=decoding, stop=stop):
                        text += piece
                        self.post_message(self.Streamed(request, pane, text))
                except Exception as exc:  # noqa: BLE001 - said in the pane and the status line
                    self.post_message(self.Answered(request, pane, text, "failed", time.monotonic() - t0,
                                                    first_line(exc)))
                    continue
                outcome = "stopped" if stop.is_set() else "done"
                ending = getattr(session, "last_stop", {}).get(adapter)
                words = ending.words() if ending is not None and ending.reason != "stopped" else ""
                self.post_message(self.Answered(request, pane, text, outcome, time.monotonic() - t0,
                                                ending=words))

    @work(thread=True, exclusive=True, exit_on_error=False, group="evaluate")
    def _evaluate(self, session: TrySession) -> None:
        """Validation loss and perplexity, base and fine-tuned, on the loaded model (no second copy): it
        holds the model meanwhile, so answers wait for it."""
        from engine.after import evaluate_run

        def progress(line: str) -> None:
            self.post_message(self.EvalProgress(line))

        try:
            with self._model_lock:
                if self._closing:
                    return
                result = evaluate_run(self.run_dir, generations=EVAL_GENERATIONS, session=session, progress=progress)
        except UserError as exc:
            self.post_message(self.Evaluated(None, exc.one_line()))
        except Exception as exc:  # noqa: BLE001
            self.post_message(self.Evaluated(None, f"the evaluation failed: {first_line(exc)}"))
        else:
            self.post_message(self.Evaluated(result))

    # ---- handlers: own every widget --------------------------------------------------------

    @on(Loaded)
    def _loaded(self, message: Loaded) -> None:
        self.examples = ExampleCycle(message.examples)
        self.ready = True
        self._show_status()
        self._show_rendered()

    @on(LoadFailed)
    def _load_failed(self, message: LoadFailed) -> None:
        self.load_error = message.error
        self._show_status()

    @on(Streamed)
    def _streamed(self, message: Streamed) -> None:
        if message.request != self.request:
            return
        pane = self._pane(message.pane)
        pane.show(message.text)
        if pane.border_subtitle != "generating...":  # the base answer, once the fine-tuned one is done
            pane.state("generating...")

    @on(Answered)
    def _answered(self, message: Answered) -> None:
        if message.request != self.request:
            return
        pane = self._pane(message.pane)
        pane.show(message.text, message.ending)
        if message.outcome == "failed":
            pane.state("failed")
            self.problem = f"generating the {pane.border_title} answer failed: {message.error}"
        else:
            pane.state(f"done in {message.seconds:.1f} s" if message.outcome == "done" else "stopped")
        self._pending.discard(message.pane)
        if not self._pending:
            self.generating = False
        self._show_status()

    @on(EvalProgress)
    def _eval_progress(self, message: EvalProgress) -> None:
        if self.evaluating:
            self.query_one("#eval-note", Static).update(Text(f"{message.line} ...", "yellow"))

    @on(Evaluated)
    def _evaluated(self, message: Evaluated) -> None:
        self.evaluating = False
        note = self.query_one("#eval-note", Static)
        if message.result is None:
            note.update(Text(f"error: {message.error}", "bold red"))
        else:
            self.eval_result = message.result
            table = self.query_one("#eval-table", DataTable)
            table.clear()
            for row in eval_rows(message.result):
                table.add_row(*row)
            note.update("\n".join(eval_lines(message.result)))
        self._show_extras()

    @on(Input.Submitted)
    @on(PromptArea.Submitted)
    def _submitted(self) -> None:
        self.action_generate()

    @on(TextArea.Changed, "#prompt")
    def _prompt_changed(self) -> None:
        self._show_rendered()

    @on(Input.Changed, ".decoding")
    def _decoding_changed(self, event: Input.Changed) -> None:
        try:
            self.decoding = set_decoding(self.decoding, event.input.id, event.value)
        except UserError as exc:
            event.input.add_class("-invalid")
            self.problem = exc.one_line()
        else:
            event.input.remove_class("-invalid")
            self.problem = None
        self._show_status()

    # ---- what the screen says ----------------------------------------------------------------

    def _pane(self, pane: str) -> AnswerPane:
        return self.query_one(f"#{pane}-pane", AnswerPane)

    def _show_status(self) -> None:
        """One line: why nothing can be tried, a refused value, loading, or what is loaded."""
        status = self.query_one("#try-status", Static)
        error = self.load_error or self.problem
        status.set_class(bool(error), "-error")
        if error:
            status.update(Text(f"error: {error}"))
        elif self.session is None:
            status.update(Text(f"loading the model and the adapter of {self.run_dir} ...", "yellow"))
        else:
            s = self.session
            status.update(Text.assemble(
                (self.run_dir.name, "bold"), f": {s.preset.model.source} with the run's adapter, on {s.device}",
                (f"  {len(self.examples.examples)} validation examples" if self.examples.examples else "", "dim")))

    def _show_rendered(self) -> None:
        """The prompt as the model sees it (the run's template): dim, in one line unless shown whole."""
        rendered = self.query_one("#rendered", Static)
        prompt = self.query_one("#prompt", PromptArea).text
        if self.session is None or not prompt:
            rendered.update(Text("the prompt as the model sees it, in the run's template, shows here", "dim"))
            return
        try:
            text = self.session.render(prompt)
        except Exception as exc:  # noqa: BLE001 - the answers will say the same; one dim line here
            rendered.update(Text(f"cannot render the prompt: {first_line(exc)}", "dim red"))
            return
        if not rendered.has_class("-full"):
            text = text.replace("\n", "⏎")
        rendered.update(Text.assemble(("as the model sees it: ", "dim italic"), (text, "dim")))

    def _show_extras(self) -> None:
        """The row under the answers: the reference answer and the evaluation, once either has something."""
        reference = self.query_one("#reference", Static)
        box = self.query_one("#eval-box")
        reference.display = bool(self.examples.index >= 0)
        box.display = self.evaluating or self.eval_tried
        self.query_one("#eval-table", DataTable).display = self.eval_result is not None
        self.query_one("#try-extras").set_class(reference.display or box.display, "-shown")

    # ---- actions -----------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Generate, example, evaluate and template need the model (dimmed until it is loaded; Generate and
        Evaluate also while the evaluation uses it); Stop shows only while generating."""
        if action == "stop":
            return self.generating
        if action in ("generate", "evaluate"):
            return True if self.ready and not self.evaluating else None
        if action in ("example", "template"):
            return True if self.ready else None
        return True

    def action_generate(self) -> None:
        """Both answers to the prompt; a generation still going is stopped first."""
        if self.session is None:
            self.notify(self.load_error or "the model is still loading", severity="warning")
            return
        if self.evaluating:
            self.notify("the evaluation is using the model; answers once it is done", severity="warning")
            return
        prompt = self.query_one("#prompt", PromptArea).text
        if not prompt.strip():
            self.notify("type a prompt first (or ctrl+e for a validation example)", severity="warning")
            return
        bad = next((i for i in self.query(".decoding").results(Input) if i.has_class("-invalid")), None)
        if bad is not None:
            self.notify(f"{self.problem}", severity="warning")
            return
        self._stop.set()
        self._stop = threading.Event()
        self.request += 1
        self._pending = {pane for pane, _, _ in PANES}
        self.problem = None
        for i, (pane, _, _) in enumerate(PANES):
            p = self._pane(pane)
            p.show("")
            p.state("generating..." if i == 0 else "waiting for the fine-tuned answer...")
        self.generating = True
        self._show_status()
        self._generate(self.request, self.session, prompt, self.decoding, self._stop)

    def action_stop(self) -> None:
        """Stop the answers being generated (what came so far stays)."""
        self._stop.set()

    def action_example(self) -> None:
        """Fill the prompt with the next validation example and show its reference answer."""
        example = self.examples.next()
        if example is None:
            self.notify("this run has no validation examples to offer", severity="warning")
            return
        prompt = self.query_one("#prompt", PromptArea)
        prompt.load_text(example.prompt)
        prompt.move_cursor(prompt.document.end)
        self._show_rendered()
        reference = self.query_one("#reference", Static)
        reference.border_title = f"reference answer: example {self.examples.where()}"
        reference.update(Text(example.reference))
        self._show_extras()

    def action_evaluate(self) -> None:
        """Evaluate base against fine-tuned on the validation split, in the background."""
        if self.evaluating:
            return
        if self.session is None:
            return
        self.evaluating = self.eval_tried = True
        self.query_one("#eval-note", Static).update(Text(
            "evaluating on the validation split" + (" once the answers are done" if self.generating else "")
            + " ...", "yellow"))
        self._show_extras()
        self._evaluate(self.session)

    def action_template(self) -> None:
        """Show the rendered prompt whole (wrapped) or in one line."""
        self.query_one("#rendered", Static).toggle_class("-full")
        self._show_rendered()

    def action_leave(self) -> None:
        """Back to the run screen, or out of ``qlora-wizard try`` (``on_unmount`` frees the model)."""
        if len(self.app.screen_stack) > 2:
            self.app.pop_screen()
        else:
            self.app.exit()
