"""The export dialog of a finished run (``x`` on the run screen): its model as a GGUF for llama.cpp,
Ollama and LM Studio.

The person picks the quantization (each with the size its GGUF would have) and names the output
folder (``<runs dir>/<run name>-gguf`` until they change it); the dialog says whether llama.cpp's
check will run. Export runs ``qlora-wizard export RUN --out DIR --quant Q --json`` in a process of
its own, from a thread worker: its progress lines (stderr) stream into the dialog, and when it ends
the dialog shows the GGUF, the check's verdict and the commands that run it in Ollama, or the
``error:`` line. A refusal (:func:`engine.after.export.plan_export`: the converter not installed, an
output folder that is not empty, too little memory or disk) shows in one line before anything runs.

Escape closes the dialog; while an export runs it interrupts it first (the export writes into a
scratch folder and renames it to the output folder only at the end, so nothing half-written is left).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, RadioButton, RadioSet, RichLog, Static

from engine.after.export import (
    CHECK_PROMPTS,
    DEFAULT_QUANT,
    INSTALL_LLAMA_CPP,
    K_QUANTS,
    QUANT_WORDS,
    QUANTS,
    llama_cpp_installed,
    plan_export,
)
from engine.errors import UserError, first_line
from tui.format import size

KILL_AFTER_S = 10.0
"""How long an interrupted export has to clean up (remove its scratch folder) before it is killed."""

LOG_LINES = 200
"""Progress lines kept in the dialog's log."""


def default_out(run_dir: Path) -> Path:
    """Where the export goes unless the person names another folder: ``<runs dir>/<run name>-gguf``."""
    return run_dir.parent / f"{run_dir.name}-gguf"


def quant_label(quant: str, sizes: dict[str, int] | None) -> str:
    """One choice: the quant, what it means and the size its GGUF would have."""
    about = f"about {size(sizes[quant])}" if sizes else "..."
    needs = " (needs llama-cpp-python)" if quant in K_QUANTS and not llama_cpp_installed() else ""
    return f"{quant:<7} {about:<17} {QUANT_WORDS[quant]}{needs}"


def ollama_commands(result: dict) -> str:
    """The commands that run the export in Ollama, in one line to copy."""
    name = Path(result["run_dir"]).name.lower() if result.get("run_dir") else Path(result["gguf"]).stem.lower()
    return f"cd {shlex.quote(str(result['out']))} && ollama create {name} -f Modelfile && ollama run {name}"


def result_lines(result: dict) -> list[str]:
    """What the dialog says when the export has ended: the GGUF, the check's verdict, how to run it."""
    gguf = Path(result["gguf"])
    lines = [f"written: {gguf} ({size(result['gguf_bytes'])}, {result['quant']}), "
             f"with {Path(result['modelfile']).name} and {Path(result['readme']).name}"]
    check = result.get("check")
    if check:
        lines.append(f"check: {check['verdict']}")
        diff = check.get("first_difference")
        if diff:
            lines.append(f"first difference: prompt {diff['prompt']!r}: llama.cpp {diff['llama_cpp']!r}, "
                         f"transformers {diff['transformers']!r}")
    else:
        lines.append("check: not run (llama-cpp-python is not installed)")
    lines += ["run it in Ollama:", f"  {ollama_commands(result)}",
              f"or in llama.cpp: llama-cli -m {shlex.quote(str(gguf))} -cnv --jinja"]
    return lines


def export_argv(run_dir: Path, out: str, quant: str) -> list[str]:
    """The export command this dialog runs: this interpreter, ``-m tui.cli export ... --json``."""
    return [sys.executable, "-m", "tui.cli", "export", str(run_dir), "--out", out, "--quant", quant, "--json"]


class ExportDialog(ModalScreen[dict | None]):
    """Exports one finished run; dismissed with ``export.json``'s content once an export succeeded,
    else None."""

    BINDINGS = [Binding("escape", "leave", "Cancel", tooltip="Close; an export under way is interrupted first")]

    class Planned(Message):
        """Each quant's GGUF size (None where the model could not be read) and the plan of the choice
        (its summary) or its refusal."""

        def __init__(self, sizes: dict[str, int] | None, summary: str | None, refusal: str | None) -> None:
            super().__init__()
            self.sizes = sizes
            self.summary = summary
            self.refusal = refusal

    class Progress(Message):
        """A progress line of the export process."""

        def __init__(self, line: str) -> None:
            super().__init__()
            self.line = line

    class Ended(Message):
        """The export process ended (or was refused before it started)."""

        def __init__(self, result: dict | None, error: str | None, cancelled: bool = False) -> None:
            super().__init__()
            self.result = result
            self.error = error
            self.cancelled = cancelled

    def __init__(self, run_dir: Path) -> None:
        super().__init__()
        self.run_dir = Path(run_dir)
        """The finished run exported."""
        self.sizes: dict[str, int] | None = None
        """Each quant's GGUF size, once the model is read."""
        self.running = False
        """Whether an export is being planned or runs."""
        self.result: dict | None = None
        """``export.json``'s content, once an export succeeded."""
        self.error: str | None = None
        """The last refusal or error line shown."""
        self.progress: list[str] = []
        """The export process's progress lines, as shown."""
        self._proc: subprocess.Popen | None = None
        self._cancelled = threading.Event()
        self._interrupted = False

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="export-dialog"):
            yield Label(f"Export {self.run_dir.name} as a GGUF (llama.cpp, Ollama, LM Studio)", id="export-title")
            with Vertical(id="export-form"):
                yield Label("quantization (and the size of its GGUF):", classes="export-label")
                with RadioSet(id="export-quant"):
                    for q in QUANTS:
                        yield RadioButton(quant_label(q, None), value=q == DEFAULT_QUANT, id=f"quant-{q}")
                with Horizontal(id="export-out-row"):
                    yield Label("output folder:", classes="export-label")
                    yield Input(str(default_out(self.run_dir)), id="export-out")
                yield Static(self._check_line(), id="export-check")
            yield Static(Text("reading the model...", "dim"), id="export-status")
            log = RichLog(max_lines=LOG_LINES, wrap=True, markup=False, min_width=20, id="export-log")
            log.border_title = "qlora-wizard export"
            yield log
            yield Static(id="export-result")
            with Horizontal(id="export-buttons"):
                yield Button("Export", variant="success", id="export-go")
                yield Button("Cancel (esc)", variant="primary", id="export-cancel")

    @staticmethod
    def _check_line() -> Text:
        if llama_cpp_installed():
            return Text(f"llama.cpp's check: on. After the conversion llama.cpp and transformers answer "
                        f"{CHECK_PROMPTS} held-out prompts; the verdict shows here when it ends.")
        return Text(f"llama.cpp's check: off, llama-cpp-python is not installed ({INSTALL_LLAMA_CPP}).", "dim")

    def on_mount(self) -> None:
        """Read the model's size (and whether an export would be refused) in the background."""
        self.query_one("#export-quant", RadioSet).focus()
        self._plan(self.quant, self.out)

    @property
    def quant(self) -> str:
        """The quant chosen."""
        pressed = self.query_one("#export-quant", RadioSet).pressed_button
        return str(pressed.id).removeprefix("quant-") if pressed is not None else DEFAULT_QUANT

    @property
    def out(self) -> str:
        """The output folder named (as typed)."""
        return self.query_one("#export-out", Input).value.strip()

    # ---- workers: read files and run the export, never touch widgets ---------------------------

    @work(thread=True, exclusive=True, exit_on_error=False, group="export-plan")
    def _plan(self, quant: str, out: str) -> None:
        """The parameter count (for the sizes), and the plan of the choice or its refusal in one line."""
        try:
            plan = plan_export(self.run_dir, out, quant)
        except UserError as exc:
            refusal = exc.one_line()
        except Exception as exc:  # noqa: BLE001 - one line, the sizes may still be read below
            refusal = f"cannot plan the export: {first_line(exc)}"
        else:
            self.post_message(self.Planned(plan.sizes, plan.summary(), None))
            return
        try:
            from engine.after.export import model_sizes
            from engine.after.session import finished_run, model_source
            from engine.modelinfo import inspect_model

            run = finished_run(self.run_dir)
            sizes = model_sizes(inspect_model(model_source(run), revision=run.preset.model.revision,
                                              trust_remote_code=run.preset.model.trust_remote_code))
        except Exception:  # noqa: BLE001 - the refusal above says what is wrong; sizes stay unknown
            sizes = None
        self.post_message(self.Planned(sizes, None, refusal))

    @work(thread=True, exclusive=True, exit_on_error=False, group="export-run")
    def _export(self, quant: str, out: str) -> None:
        """Plan (a refusal ends here), then run the export process and stream its progress lines."""
        try:
            result, error = self._run_export(quant, out)
        except UserError as exc:
            result, error = None, exc.one_line()
        except Exception as exc:  # noqa: BLE001 - one line, never a worker left hanging
            result, error = None, f"the export failed: {first_line(exc)}"
        self.post_message(self.Ended(result, error, cancelled=self._cancelled.is_set()))

    def _run_export(self, quant: str, out: str) -> tuple[dict | None, str | None]:
        """The export's result, or the line that says why there is none."""
        plan_export(self.run_dir, out, quant)  # a refusal, in one line, before anything runs
        if self._cancelled.is_set():
            return None, None
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent.parent)  # where `tui` is, for `-m tui.cli`
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONUNBUFFERED"] = "1"
        said: list[str] = []
        # stdout (the result's JSON) goes to a file: a pipe read only at the end could fill and stall it.
        with tempfile.TemporaryFile(mode="w+", encoding="utf-8") as stdout:
            try:
                proc = subprocess.Popen(export_argv(self.run_dir, out, quant), stdin=subprocess.DEVNULL,
                                        stdout=stdout, stderr=subprocess.PIPE, text=True, env=env,
                                        start_new_session=True, bufsize=1)
            except OSError as exc:
                return None, f"cannot start the export: {first_line(exc)}"
            self._proc = proc
            if self._cancelled.is_set():
                self._interrupt()
            assert proc.stderr is not None
            for raw in proc.stderr:
                line = raw.rstrip()
                if line:
                    said = [*said[-19:], line]
                    self.post_message(self.Progress(line))
            code = proc.wait()
            stdout.seek(0)
            printed = stdout.read()
        if self._cancelled.is_set():
            return None, None
        if code == 0:
            try:
                return json.loads(printed), None
            except ValueError:
                return None, "the export printed no result" + (f": {said[-1]}" if said else "")
        errors = [ln for ln in said if ln.startswith("error: ")]
        line = errors[-1] if errors else (said[-1] if said else f"the export ended with status {code}")
        return None, line

    def _interrupt(self) -> None:
        """Interrupt the export process (it removes its scratch folder and exits); kill it if it has not
        after ``KILL_AFTER_S``."""
        proc = self._proc
        if proc is None or proc.poll() is not None or self._interrupted:
            return
        self._interrupted = True  # once: a second SIGINT could cut its clean-up short
        try:
            os.killpg(proc.pid, signal.SIGINT)
        except OSError:
            return

        def kill() -> None:
            deadline = time.monotonic() + KILL_AFTER_S
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    return
                time.sleep(0.1)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass

        threading.Thread(target=kill, name="export-kill", daemon=True).start()

    # ---- handlers: own every widget ---------------------------------------------------------

    @on(Planned)
    def _planned(self, message: Planned) -> None:
        if message.sizes:
            self.sizes = message.sizes
            for q in QUANTS:
                self.query_one(f"#quant-{q}", RadioButton).label = quant_label(q, self.sizes)
        if self.running:
            return
        if message.refusal:
            self._say_error(message.refusal)
        else:
            self.error = None
            self._status(Text(message.summary or ""))

    @on(Progress)
    def _progress(self, message: Progress) -> None:
        self.progress.append(message.line)
        log = self.query_one("#export-log", RichLog)
        log.add_class("-shown")
        log.write(Text(message.line))

    @on(Ended)
    def _ended(self, message: Ended) -> None:
        self.running = False
        self._proc = None
        if message.cancelled:
            return
        if message.error:
            self._set_form(enabled=True)  # the log stays: what led to the error
            self._say_error(message.error)
            return
        self.result = message.result
        self.error = None
        self._status(Text("exported", "bold green"))
        self.query_one("#export-log", RichLog).remove_class("-shown")
        box = self.query_one("#export-result", Static)
        box.add_class("-shown")
        box.update(Text("\n".join(result_lines(message.result or {}))))
        go = self.query_one("#export-go", Button)
        go.display = False
        close = self.query_one("#export-cancel", Button)
        close.label = "Close (esc)"
        close.focus()

    def _status(self, text: Text) -> None:
        status = self.query_one("#export-status", Static)
        status.remove_class("-error")
        status.update(text)

    def _say_error(self, line: str) -> None:
        self.error = line
        status = self.query_one("#export-status", Static)
        status.add_class("-error")
        status.update(Text(line if line.startswith("error: ") else f"error: {line}"))

    def _set_form(self, enabled: bool) -> None:
        """The choices are shown (and Export works) until an export starts, and again after a refusal."""
        self.query_one("#export-form").display = enabled
        self.query_one("#export-go").disabled = not enabled

    @on(RadioSet.Changed, "#export-quant")
    def _quant_changed(self) -> None:
        """Another quant: plan it again (a k-quant needs llama.cpp's quantizer, and its size differs)."""
        if not self.running and self.result is None:
            self._plan(self.quant, self.out)

    @on(Input.Changed, "#export-out")
    def _out_changed(self) -> None:
        """Another folder: the old refusal may no longer hold; Export plans it again."""
        if not self.running and self.error:
            self.error = None
            self._status(Text("press Export to check this folder and start", "dim"))

    @on(Input.Submitted, "#export-out")
    @on(Button.Pressed, "#export-go")
    def action_export(self) -> None:
        """Plan the chosen export and run it."""
        if self.running or self.result is not None:
            return
        if not self.out:
            self._say_error("name an output folder (a new or empty one)")
            return
        self.running = True
        self._cancelled.clear()
        self._interrupted = False
        self._set_form(enabled=False)
        self.progress = []
        self.query_one("#export-log", RichLog).clear()
        self._status(Text(f"exporting {self.run_dir.name} as {self.quant} into {self.out} (Escape interrupts it)",
                          "bold"))
        self._export(self.quant, self.out)

    @on(Button.Pressed, "#export-cancel")
    def action_leave(self) -> None:
        """Close the dialog; an export under way is interrupted first (nothing half-written is left)."""
        if self.running:
            self._cancelled.set()
            self._interrupt()
            self.notify(f"export interrupted: nothing was written to {self.out}", severity="warning")
        self.dismiss(self.result)

    def on_unmount(self) -> None:
        """Leaving the app while an export runs interrupts it too."""
        if self._proc is not None:
            self._cancelled.set()
            self._interrupt()
