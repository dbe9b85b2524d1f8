"""The wizard: a Textual app that walks the draft preset through six steps to a live run.

The app owns the :class:`~tui.draft.Draft` (the single state) and installs one screen per step of
:data:`tui.steps.STEPS` (its class from :data:`tui.screens.steps.SCREENS`). Slow engine work runs in
thread workers that post :mod:`tui.messages` (a failure as one line, :meth:`WizardApp._attempt`);
the handlers here update the draft and tell the current step to show it. Everything the app asks
of the engine comes through :class:`~tui.draft.Services` (given to the constructor), and the run
screen's readers through ``run_screen``, so tests can give it a fixed GPU or a recorded run while
the rest stays real.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable

from textual import on, work
from textual.app import App, SystemCommand
from textual.message import Message
from textual.screen import Screen

from engine.errors import NeedsRemoteCode, UserError, first_line
from tui import messages as msg
from tui.draft import Draft, Services
from tui.screens.steps import SCREENS, StepScreen
from tui.steps import STEPS, step_ref

_FAILED = object()
"""What :meth:`WizardApp._attempt` returns when the call failed (its message is posted)."""


class WizardApp(App[str]):
    """From a model to a running QLoRA job; its result is the run's status when the person left
    (``detached`` while it trains on), or ``quit`` when no run was started."""

    CSS_PATH = "app.tcss"
    TITLE = "qlora-wizard"

    def __init__(
        self,
        draft: Draft,
        *,
        services: Services | None = None,
        start: str = "model",
        ask_model: bool = False,
        runs_dir: str | os.PathLike = "runs",
        run_screen: dict | None = None,
    ) -> None:
        super().__init__()
        self.draft = draft
        """The preset being built and what is known about it."""
        self.services = services or Services()
        """The engine calls the wizard makes."""
        self.start_step = start
        """The step shown first."""
        self.ask_model = ask_model
        """Start with an empty model field instead of reading the draft's model."""
        self.runs_dir = Path(runs_dir)
        """Where earlier runs are (for recent models and attach)."""
        self.run_screen_args = run_screen or {}
        """Keyword arguments for the run screen (tests feed recorded runs)."""
        self.model_busy = False
        """A model's config is being read."""
        self.model_error: str | None = None
        """Why the last model could not be read."""
        self.data_busy = False
        """The data is being checked."""
        self.data_error: str | None = None
        """Why the data check failed."""
        self.run_dir: Path | None = None
        """The run started from the wizard."""
        self.starting = False
        """A run is being started."""
        self.asking_code = False
        """The question whether to run the model's own code is on screen."""
        self.code_refused: tuple | None = None
        """The model key read right after the person said no to the preset file's trust_remote_code:
        when that read finds the model needs its code, the no stands (it is not asked twice)."""

    # ---- screens -----------------------------------------------------------------------

    def on_mount(self) -> None:
        """Install the steps, open the first, and start the background looks at the GPU and the model."""
        for step in STEPS:
            self.install_screen(SCREENS[step.name](step), step.name)
        self.push_screen(self.start_step)
        self.probe_gpus()
        if not self.ask_model:
            self.read_model()

    def goto(self, step: str) -> None:
        """Show a step (every step can be revisited; the draft keeps everything)."""
        if isinstance(self.screen, StepScreen):
            self.switch_screen(step)
        else:
            self.push_screen(step)

    def refresh_step(self) -> None:
        """Tell the step on screen that the draft (or what is known of it) changed."""
        screen = self.screen
        if isinstance(screen, StepScreen):
            screen.refresh_view()

    # ---- workers and their messages ----------------------------------------------------

    def _attempt(self, call: Callable[[], Any], failed: Callable[[str, Exception], Message], what: str) -> Any:
        """In a worker: ``call()``'s result; when it raises, ``failed(line, exception)`` is posted and
        ``_FAILED`` returned. The line is a UserError's own, or ``what: <first line>`` of any other
        exception: every failure is said on screen, in one line."""
        try:
            return call()
        except UserError as exc:
            line, error = exc.one_line(), exc
        except Exception as exc:  # noqa: BLE001 - any failure is said on screen, in one line
            line, error = f"{what}: {first_line(exc)}", exc
        self.post_message(failed(line, error))
        return _FAILED

    def read_model(self) -> None:
        """Read the draft's model config in the background. When the preset file said to run the
        model's own code (``trust_remote_code: true``), the person is asked first: a file's word is
        not consent, and nothing of the model is read before the answer."""
        if self.draft.code_from_file is not None:
            self._ask_code_from_file()
            return
        self.model_busy, self.model_error = True, None
        self._read_model(self.draft.model_key())
        self.refresh_step()

    def _ask_code_from_file(self) -> None:
        if self.asking_code:
            return
        from tui.dialogs.confirm import Confirm

        source = self.draft.code_from_file

        def answered(allow: bool | None) -> None:
            self.asking_code = False
            if self.draft.code_from_file != source:
                return  # the person has moved on to another model
            if allow:
                self.allow_code(self.draft.model_key())
            else:
                self.draft.refuse_code()
                self.code_refused = self.draft.model_key()
                self.read_model()

        self.asking_code = True
        self.model_busy, self.model_error = False, f"waiting for your answer: run the own code of {source}?"
        self.refresh_step()
        self.push_screen(Confirm(
            f"The preset says to run the own Python code of {source}",
            "It says trust_remote_code: true. That code comes with the model's repository and runs on this "
            "machine with your rights, already when the model is read. Allow it only if you trust the "
            "model's authors; without it the model is read with transformers' own classes, if it can be.",
            yes="Run its code", no="Read it without", danger=True), answered)

    def allow_code(self, key: tuple) -> None:
        """The person agreed to run the model ``key``'s own code: pin a Hub model's revision to the
        commit it points to now (in the background), then read the model with its code."""
        self.model_busy, self.model_error = True, None
        self.refresh_step()
        self._pin_code(key)

    @work(thread=True, exclusive=True, group="model", exit_on_error=False)
    def _pin_code(self, key: tuple) -> None:
        revision = self._attempt(lambda: self.services.pin_revision(key[0], key[1]),
                                 lambda line, _: msg.ModelFailed(key, line, needs_code=False),
                                 f"cannot pin the revision of {key[0]}")
        if revision is not _FAILED:
            self.call_from_thread(self._code_allowed, key, revision)

    def _code_allowed(self, key: tuple, revision: str | None) -> None:
        if key != self.draft.model_key():
            return  # the person has moved on to another model
        self.draft.allow_code(revision)
        self.read_model()

    @work(thread=True, exclusive=True, group="model", exit_on_error=False)
    def _read_model(self, key: tuple) -> None:
        info = self._attempt(lambda: self.services.inspect_model(*key),
                             lambda line, exc: msg.ModelFailed(key, line, needs_code=isinstance(exc, NeedsRemoteCode)),
                             f"cannot read {key[0]}")
        if info is not _FAILED:
            self.post_message(msg.ModelRead(key, info))

    @on(msg.ModelRead)
    def _model_read(self, message: msg.ModelRead) -> None:
        if message.key != self.draft.model_key():
            return  # the person has moved on to another model
        self.model_busy, self.model_error, self.code_refused = False, None, None
        note = self.draft.accept_model(message.key, message.info)
        if note:
            self.notify(note)
        self.refresh_step()
        # The data (perhaps a Hub download) is read when a step that shows it is on screen.
        if getattr(self.screen, "NEEDS_DATA", False):
            self.check_data()

    @on(msg.ModelFailed)
    def _model_failed(self, message: msg.ModelFailed) -> None:
        if message.key != self.draft.model_key():
            return
        self.model_busy, self.model_error = False, message.error
        self.refresh_step()
        refused, self.code_refused = self.code_refused == message.key, None
        if message.needs_code and not refused:
            from tui.dialogs.confirm import Confirm

            def answered(allow: bool | None) -> None:
                if allow and message.key == self.draft.model_key():
                    self.allow_code(message.key)

            self.push_screen(Confirm(
                f"{message.key[0]} needs its own Python code",
                "Its architecture ships as code in the model's repository, which runs on this machine "
                "with your rights. Allow it only if you trust the model's authors.",
                yes="Run its code", no="Cancel", danger=True), answered)

    def check_data(self, force: bool = False) -> None:
        """Check and tokenize the draft's data in the background (needs the model for its tokenizer);
        only when the settings changed since the last check, unless ``force``."""
        if not self.draft.model_ready or (self.draft.data_ready and not force):
            return
        self.data_busy, self.data_error = True, None
        self._check_data(self.draft.data_fingerprint(), self.draft.preset)
        self.refresh_step()

    @work(thread=True, exclusive=True, group="data", exit_on_error=False)
    def _check_data(self, key: str, preset) -> None:
        report = self._attempt(lambda: self.services.check_data(preset), lambda line, _: msg.DataFailed(key, line),
                               f"cannot read {preset.data.train}")
        if report is not _FAILED:
            self.post_message(msg.DataChecked(key, report))

    @on(msg.DataChecked)
    def _data_checked(self, message: msg.DataChecked) -> None:
        if message.key != self.draft.data_fingerprint():
            return
        self.data_busy, self.data_error = False, None
        try:
            note = self.draft.accept_data(message.report)
        except UserError as exc:  # data of the other kind than the method the person chose
            self.data_error, self.draft.data = exc.one_line(), None
            note = None
        if note:
            self.notify(note)
        self.refresh_step()

    @on(msg.DataFailed)
    def _data_failed(self, message: msg.DataFailed) -> None:
        if message.key != self.draft.data_fingerprint():
            return
        self.data_busy, self.data_error = False, message.error
        self.draft.data = None
        self.refresh_step()

    @work(thread=True, exclusive=True, group="gpus", exit_on_error=False)
    def probe_gpus(self) -> None:
        """Look for NVIDIA GPUs and their free memory in the background."""
        try:
            gpus = self.services.probe_gpus()
        except Exception:  # noqa: BLE001 - no usable driver reads as no GPU
            gpus = []
        self.post_message(msg.GpusProbed(gpus))

    @on(msg.GpusProbed)
    def _gpus_probed(self, message: msg.GpusProbed) -> None:
        self.draft.gpus = message.gpus
        self.refresh_step()

    # ---- export and start --------------------------------------------------------------

    def start_run(self) -> None:
        """Start training the draft in the background process; the run screen follows it."""
        missing = self.draft.first_missing()
        if missing is not None:
            self.notify(f"not yet: {missing[1]}", severity="warning")
            self.goto(missing[0])
            return
        if self.starting:
            return
        try:
            place = self.draft.start_kwargs()
        except UserError as exc:
            self.notify(exc.one_line(), severity="warning")
            return
        self.starting = True
        self.refresh_step()
        self._say_if_converting(self.draft.preset.model.source)
        self._start_run(self.draft.preset, place)

    def _say_if_converting(self, source: str) -> None:
        """A .gguf not converted yet is converted before the run starts (a minute or more): say so."""
        from engine.gguf import converted_dir, is_complete, is_gguf

        try:
            if not is_gguf(source) or is_complete(converted_dir(source)):
                return
        except UserError:
            return  # start_run says what is wrong with the file
        self.notify(f"converting {Path(source).name} once to a bf16 model folder before the run starts "
                    "(on the CPU, about a minute per GB)", timeout=60)

    @work(thread=True, exclusive=True, group="start", exit_on_error=False)
    def _start_run(self, preset, place: dict) -> None:
        run_dir = self._attempt(lambda: self.services.start_run(preset, **place),
                                lambda line, _: msg.RunFailed(line), "could not start the run")
        if run_dir is not _FAILED:
            self.post_message(msg.RunStarted(run_dir))

    @on(msg.RunStarted)
    def _run_started(self, message: msg.RunStarted) -> None:
        from engine.runs import launch_command

        self.starting = False
        self.run_dir = message.run_dir
        command = launch_command(message.run_dir)
        if command is not None:  # several processes: say the torchrun command this machine runs
            self.notify(f"started: {command}", timeout=20)
        self.show_run(message.run_dir)

    @on(msg.RunFailed)
    def _run_failed(self, message: msg.RunFailed) -> None:
        self.starting = False
        self.notify(message.error, severity="error", timeout=15)
        self.refresh_step()

    def show_run(self, run_dir: Path) -> None:
        """Open the live run screen on ``run_dir``."""
        from engine.runs import is_running, log_tail, stop_run
        from tui.screens.run import RunScreen

        args = dict(process_alive=is_running, stop=stop_run, read_log=log_tail)
        args.update(self.run_screen_args)
        self.run_dir = Path(run_dir)
        self.sub_title = str(run_dir)
        screen = RunScreen(Path(run_dir), **args)
        if isinstance(self.screen, StepScreen):
            self.switch_screen(screen)
        else:
            self.push_screen(screen)

    # ---- the command palette -----------------------------------------------------------

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """The less common actions: jump to a step, load a shipped preset, export, start, attach."""
        yield from super().get_system_commands(screen)
        if not isinstance(screen, StepScreen):
            return
        for step in STEPS:
            yield SystemCommand(f"Go to {step_ref(step.name)}: {step.title}", f"Show the {step.title.lower()} step",
                                lambda n=step.name: self.goto(n))
        from engine.preset import shipped_presets

        for path in shipped_presets():
            yield SystemCommand(f"Load preset {path.stem}", f"Replace the draft with {path}",
                                lambda p=path: self.load_preset(p))
        yield SystemCommand("Start training", "Start the run now (from any step once model and data are read)",
                            self.start_run)
        yield SystemCommand("Read the model again", "Re-read the model's config (after editing it, say)",
                            self.read_model)
        yield SystemCommand("Check the data again", "Re-read and re-tokenize the data",
                            lambda: self.check_data(force=True))
        from engine.runs import newest_run

        newest = newest_run(self.runs_dir)
        if newest is not None:
            yield SystemCommand(f"Attach to {newest.name}", "Open the newest run's live screen",
                                lambda: self.show_run(newest))

    def load_preset(self, path: str | os.PathLike) -> None:
        """Replace the draft with a preset file and read its model."""
        try:
            self.draft.load_preset(path)
        except UserError as exc:
            self.notify(exc.one_line(), severity="error", timeout=10)
            return
        self.ask_model = False  # the model field shows the preset's model from now on
        self.notify(f"loaded {Path(path).name}")
        self.read_model()
