"""The run screen: one training run, live, from its ``events.jsonl`` alone.

A thread worker polls the events file (``engine.events.EventTail``), whether the process is alive
and the tail of ``train.log``, and posts one message per poll that found something new; the
handlers own every widget. Keys: ``s`` stop (after a confirmation), ``d``/``q`` detach (the run
goes on), ``l`` the whole log, and once the run has finished ``t`` tries its model (the try screen)
and ``x`` exports it as a GGUF (the export dialog); both are in the command palette too.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import (
    Footer,
    Header,
    RichLog,
    Static,
)
from textual.timer import Timer
from textual.worker import Worker, WorkerState, get_current_worker

from engine.curves import diagnose_history
from engine.errors import UserError
from engine.events import POLL_S, EventTail, RunHistory, extend_history, finite, fold_history
from engine.runs import run_log_path
from tui.console import describe
from tui.dialogs.confirm import Confirm
from tui.format import STATUS_STYLES, duration, gib
from tui.widgets.live import Curve, ProgressLine, TailLines

LOG_LINES = 200
"""Lines of ``train.log`` kept for the log screen; the crash panel shows the last few."""

ETA_WINDOW = 20
"""Recent steps the ETA's speed is measured over: recent enough to follow a change of pace, enough
to smooth out evaluation and checkpoint pauses."""

EVENT_LINES = 200
"""Event lines kept for the events panel (it shows the newest that fit)."""



SHOW_EVERY_S = 1.0
"""Least time between two redraws. News that comes after a quiet second (a real model's steps take
seconds) is drawn at once, within a poll of being written; news that comes faster is batched into
one redraw a second. The demo writes ten steps a second, and drawing each cost about 12 ms of CPU on
a 2-core machine, stretching its training by 11-15 %; with batching and the cheap widgets of
``tui.widgets.live`` the screen costs it under 2 % (benchmarks/RESULTS.md, "Overhead")."""


# ---------------------------------------------------------------------------------------------
# What the screen says, as pure functions of the history (no widgets).


def eta_seconds(history: RunHistory) -> float | None:
    """Seconds left, from the pace of the last ``ETA_WINDOW`` steps; None without two timed steps."""
    total = history.total_steps
    steps = [s for s in history.steps[-ETA_WINDOW:] if isinstance(s.time, (int, float))]
    if not total or len(steps) < 2:
        return None
    done = steps[-1].step - steps[0].step
    took = steps[-1].time - steps[0].time
    if done <= 0 or took <= 0:
        return None
    return max(0, total - steps[-1].step) * took / done


def memory_line(history: RunHistory) -> str:
    """Memory in use against the estimate: reserved on CUDA, the process's RSS on the CPU."""
    start, step = history.start, history.last_step
    estimate = start.estimate.reserved_bytes if start else None
    ranks = step.ranks if step and step.ranks else None
    if (step and step.mem_reserved is not None) or (start and start.device == "cuda"):
        line = f"memory {gib(step.mem_reserved if step else None)} reserved of {gib(estimate)} estimated"
        key = "mem_reserved"
    elif step and step.mem_rss is not None:
        line = f"memory {gib(step.mem_rss)} in use (CPU, the process's RSS; the estimate is for a GPU)"
        key = "mem_rss"
    else:
        return "memory -"
    if ranks:  # several processes: the line above is the highest; each rank's own
        line += " (highest rank; " + ", ".join(f"rank {r.get('rank')} {gib(r.get(key))}" for r in ranks[:8])
        line += (f", +{len(ranks) - 8} more" if len(ranks) > 8 else "") + ")"
    return line


def diagnosis_line(history: RunHistory) -> str | None:
    """The guide's reading of the learning curves, once there are validation losses (for dpo and orpo:
    the preference figures' reading, once there are eight steps)."""
    d = diagnose_history(history)
    return f"learning curves: {d.verdict}: {d.message}" if d else None


CURVES = (("loss", "training loss"), ("val", "validation loss"), ("lr", "learning rate"),
          ("margin", "reward margin"), ("acc", "preference accuracy"))
"""The curve boxes, left to right: (key, title)."""
PREFERENCE_CURVES = ("margin", "acc")
"""The boxes a dpo or orpo run shows in place of the learning rate's (its rate stays on the metrics line)."""


# ---------------------------------------------------------------------------------------------


class LogScreen(Screen[None]):
    """The tail of ``train.log``, the training process's own output; follows it while open."""

    BINDINGS = [Binding("escape,l,q", "app.pop_screen", "Back")]

    def __init__(self, run_dir: Path, lines: list[str]) -> None:
        super().__init__()
        self.run_dir = run_dir
        """The run whose log is shown."""
        self._lines = lines

    def compose(self) -> ComposeResult:
        yield Header()
        log = RichLog(id="train-log", max_lines=LOG_LINES, wrap=True, min_width=20)
        log.border_title = f"{run_log_path(self.run_dir)} (last {LOG_LINES} lines)"
        yield log
        yield Footer()

    def on_mount(self) -> None:
        """Show the lines known so far."""
        self.show_lines(self._lines)

    def show_lines(self, lines: list[str]) -> None:
        """Replace the shown lines (the log's tail moved on)."""
        self._lines = lines
        log = self.query_one("#train-log", RichLog)
        log.clear()
        for line in lines or ["(train.log is empty or not there yet)"]:
            log.write(line, expand=True, shrink=True)


class FinishedRunCommands(Provider):
    """The command palette's entries for a finished run on the run screen: try its model, export it."""

    def _commands(self) -> list[tuple[str, str, Callable[[], None]]]:
        screen = self.screen
        if not isinstance(screen, RunScreen) or not screen.finished:
            return []
        return [("Export to GGUF", "A GGUF of this run's model for llama.cpp, Ollama and LM Studio (x)",
                 screen.action_export),
                ("Try it", "Prompt the fine-tuned model next to the base model (t)", screen.action_try_model)]

    async def discover(self) -> Hits:
        """The entries, before anything is typed."""
        for name, help_text, callback in self._commands():
            yield DiscoveryHit(name, callback, help=help_text)

    async def search(self, query: str) -> Hits:
        """The entries that match what is typed."""
        matcher = self.matcher(query)
        for name, help_text, callback in self._commands():
            if (score := matcher.match(name)) > 0:
                yield Hit(score, matcher.highlight(name), callback, help=help_text)


class RunScreen(Screen[None]):
    """One run: status, progress, curves, memory, the diagnosis and the latest events."""

    COMMANDS = {FinishedRunCommands}

    BINDINGS = [
        Binding("s", "stop", "Stop", tooltip="Save a checkpoint and end the run (asks first)"),
        Binding("d", "detach", "Detach", tooltip="Leave; the run goes on in the background"),
        Binding("l", "show_log", "Log", tooltip="The tail of train.log"),
        Binding("t", "try_model", "Try it", tooltip="Prompt the fine-tuned model next to the base model"),
        Binding("x", "export", "Export", tooltip="A GGUF for llama.cpp, Ollama and LM Studio"),
        Binding("q", "detach", "Quit", tooltip="Same as detach: the run goes on"),
    ]

    class Polled(Message):
        """What one poll found: new events, whether the process is alive, the log's last lines."""

        def __init__(self, events: list[dict], alive: bool, log: list[str] | None) -> None:
            super().__init__()
            self.events = events
            """Events written since the previous poll, in order."""
            self.alive = alive
            """Whether the training process is alive."""
            self.log = log
            """The last lines of ``train.log`` when they changed, else None."""

    running: reactive[bool] = reactive(False, bindings=True)
    """Whether the training process is alive (``s`` is enabled only then)."""
    stopping: reactive[bool] = reactive(False, bindings=True)
    """Whether a stop was asked for and the run has not ended yet."""
    finished: reactive[bool] = reactive(False, bindings=True)
    """Whether the run's end event says ``finished`` (``t`` and ``x`` show only then)."""

    def __init__(
        self,
        run_dir: Path,
        *,
        events_source: Callable[[Path], EventTail] = EventTail,
        poll_interval: float = POLL_S,
        process_alive: Callable[[Path], bool],
        stop: Callable[[Path], bool],
        read_log: Callable[[Path, int], list[str]],
    ) -> None:
        super().__init__()
        self.run_dir = Path(run_dir)
        """The run directory shown."""
        self.events: list[dict] = []
        """Every event read so far."""
        self.history = fold_history([])
        """The events folded into one history."""
        self.status = "starting"
        """The run's status as last shown."""
        self.log_lines: list[str] = []
        """The last lines of ``train.log``."""
        self._events_source = events_source
        self._poll_interval = poll_interval
        self._process_alive = process_alive
        self._stop = stop
        self._read_log = read_log
        self._log_screen: LogScreen | None = None
        self._unshown: list[dict] = []
        self._last_show = 0.0
        self._show_timer: Timer | None = None
        self._shown_content: dict[str, Text | str] = {}

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="status")
        # One line of text, not Textual's ProgressBar: that is four widgets to redraw for every
        # step, and while its total is unknown (the run loading its model) it animates, redrawing
        # the whole screen 15 times a second (measured).
        yield ProgressLine(id="progress")
        yield Static(id="metrics")
        with Horizontal(id="curves"):
            for key, title in CURVES:
                with Vertical(id=f"{key}-box", classes="curve") as box:
                    box.border_title = title
                    box.display = key not in PREFERENCE_CURVES  # shown once the run says it is dpo or orpo
                    yield Curve(id=f"{key}-curve")
        yield Static(id="diagnosis")
        yield Static(id="alert")
        events = TailLines(EVENT_LINES, id="events")
        events.border_title = "latest events"
        yield events
        yield Footer()

    def on_mount(self) -> None:
        """Start reading the run."""
        self.query_one("#status", Static).update(Text(f"reading {self.run_dir} ..."))
        self._poll()

    # ---- the worker: reads files, never touches widgets -------------------------------------

    @work(thread=True, exclusive=True, exit_on_error=False, group="poll")
    def _poll(self) -> None:
        """Poll the events file, the process and the log; post one message per poll with news."""
        worker = get_current_worker()
        tail = self._events_source(self.run_dir)
        alive: bool | None = None
        log: list[str] | None = None
        while not worker.is_cancelled:
            # The process first, then the file: an end event written just before exiting is read
            # in the same poll that sees the process gone, so a clean end never flickers "crashed".
            now_alive = self._process_alive(self.run_dir)
            new = tail.read_new()
            now_log = self._read_log(self.run_dir, LOG_LINES)
            log_changed = now_log != log
            if new or now_alive != alive or log_changed:
                self.post_message(self.Polled(new, now_alive, now_log if log_changed else None))
                alive, log = now_alive, now_log
            time.sleep(self._poll_interval)

    @on(Worker.StateChanged)
    def _worker_failed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR:
            self.notify(f"reading the run failed: {event.worker.error}", severity="error", timeout=10)

    # ---- handlers: own every widget ---------------------------------------------------------

    @on(Polled)
    def _polled(self, message: Polled) -> None:
        if message.log is not None:
            self.log_lines = message.log
            if self._log_screen is not None and self._log_screen.is_attached:
                self._log_screen.show_lines(message.log)
        if message.events:
            self.events.extend(message.events)
            self.history = extend_history(self.history, message.events)
            self._unshown.extend(message.events)
        self.running = message.alive
        self.status = self.history.status(message.alive)
        if self.history.end is not None:
            self.stopping = False
        self.finished = self.history.end is not None and self.history.end.status == "finished"
        self._schedule_show()

    def _schedule_show(self) -> None:
        """Redraw now, or once ``SHOW_EVERY_S`` has passed since the last redraw (news is batched)."""
        wait = self._last_show + SHOW_EVERY_S - time.monotonic()
        if wait <= 0:
            self._show()
        elif self._show_timer is None:
            self._show_timer = self.set_timer(wait, self._show)

    def _show(self) -> None:
        """Bring every widget up to date with the history."""
        if self._show_timer is not None:
            self._show_timer.stop()
            self._show_timer = None
        self._last_show = time.monotonic()
        if self._unshown:
            self.query_one("#events", TailLines).add(describe(event) for event in self._unshown)
            self._unshown = []
        h, status = self.history, self.status
        last = h.last_step
        total = h.total_steps
        step = h.step

        head = Text.assemble((status.upper(), STATUS_STYLES.get(status, "bold")), "  ")
        if self.stopping and status == "running":
            head.append("stopping: saving a checkpoint...  ", "yellow")
        head.append(f"step {step}/{total or '?'}  ")
        start = h.start
        on = (start.device_name if start else None) or "?"
        if start is not None and start.world_words:
            on = f"{start.world_words}, {on}"
        head.append(f"{start.model_source if start else '?'} on {on}", "dim")
        self._update("#status", head, layout=False)  # one line, always

        eta = eta_seconds(h)
        if h.end is not None and h.end.elapsed_s is not None:
            eta_text = f"took {duration(h.end.elapsed_s)}"
        elif status == "running" and eta is not None:
            eta_text = f"ETA {duration(eta)}"
        else:
            eta_text = "ETA -"
        self.query_one("#progress", ProgressLine).show(step, total, eta_text)

        loss = finite(last.loss) if last else None
        val = finite(h.evals[-1].eval_loss) if h.evals else None
        lr = finite(last.learning_rate) if last else None
        speed = finite(last.tokens_per_s) if last else None
        pairs = start is not None and start.method != "sft"
        margin = finite(last.reward_margin) if last else None
        acc = finite(last.reward_accuracy) if last else None
        metrics = Text.assemble(
            "loss ", (f"{loss:.4f}" if loss is not None else str(last.loss if last else "-"), "bold cyan"),
            "  val ", (f"{val:.4f}" if val is not None else "-", "bold magenta"),
            *(("  margin ", (f"{margin:+.3f}" if margin is not None else "-", "bold green"),
               "  pref acc ", (f"{acc:.0%}" if acc is not None else "-", "bold yellow")) if pairs else ()),
            "  lr ", (f"{lr:.2e}" if lr is not None else "-", "bold"),
            "  ", (f"{speed:,.0f}" if speed is not None else "-", "bold"), " tok/s",
            "\n", memory_line(h),
        )
        self._update("#metrics", metrics, layout=False)  # two lines, always

        curves = {
            "loss": [v for s in h.steps if (v := finite(s.loss)) is not None],
            "val": [v for e in h.evals if (v := finite(e.eval_loss)) is not None],
            "lr": [v for s in h.steps if (v := finite(s.learning_rate)) is not None],
            "margin": [v for s in h.steps if (v := finite(s.reward_margin)) is not None],
            "acc": [v for s in h.steps if (v := finite(s.reward_accuracy)) is not None],
        }
        for key, _ in CURVES:  # a preference run: its margin and accuracy where the learning rate was
            box = self.query_one(f"#{key}-box")
            shown = (key in PREFERENCE_CURVES) == pairs or key in ("loss", "val")
            if box.display != shown:
                box.display = shown
        # The latest values are on the metrics line, in the curves' colours; the boxes' titles stay
        # fixed, so a new step redraws the curves' insides only.
        for key, data in curves.items():
            self.query_one(f"#{key}-curve", Curve).show(data)

        waiting = "waiting for eight steps" if pairs else "waiting for validation losses"
        self._update("#diagnosis", Text(diagnosis_line(h) or f"learning curves: {waiting}", "italic"))

        subtitle = (f"d leaves it training; come back with: qlora-wizard attach {self.run_dir}"
                    if status in ("running", "starting") else "")
        events_box = self.query_one("#events", TailLines)
        if events_box.border_subtitle != subtitle:
            events_box.border_subtitle = subtitle

        alert = self.query_one("#alert", Static)
        lines = self._alert_lines(status)
        alert.set_class(bool(lines), "-shown")
        alert.set_class(status in ("crashed", "failed"), "-error")
        self._update("#alert", Text("\n".join(lines)))

    def _update(self, selector: str, content: Text | str, layout: bool = True) -> None:
        """Show ``content`` in a Static unless it is already shown: redrawing is the screen's main cost,
        and a change of size (``layout``) costs a whole new layout, so fixed-size parts skip it."""
        if self._shown_content.get(selector) == content:
            return
        self._shown_content[selector] = content
        self.query_one(selector, Static).update(content, layout=layout)

    def _alert_lines(self, status: str) -> list[str]:
        """What a run that stopped short needs said: why, the log's last words, how to go on."""
        resume = f"continue it with: qlora-wizard resume {self.run_dir}"
        end = self.history.end
        if status == "crashed":
            tail = [f"train.log: {ln}" for ln in self.log_lines[-4:]]
            return ["crashed: the training process is gone without an end event", *tail, resume]
        if status == "failed":
            tail = [f"train.log: {ln}" for ln in self.log_lines[-3:]]
            return [f"failed: {end.message if end else '?'}", *tail]
        if status == "stopped" and end is not None:
            if end.abandoned:
                return [end.message or "stopped", resume]
            ck = end.checkpoint
            return [f"stopped at step {end.step or 0}" + (f"; checkpoint {ck}" if ck else ""), resume]
        return []

    # ---- actions ----------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """``s`` applies only to a running process not already asked to stop (dimmed otherwise); ``t`` and
        ``x`` show only once the run has finished."""
        if action == "stop":
            return True if self.running and not self.stopping else None
        if action in ("try_model", "export"):
            return self.finished
        return True

    def action_stop(self) -> None:
        """Ask, then stop the run gracefully (SIGTERM: it checkpoints and ends ``stopped``)."""

        def answered(stop: bool | None) -> None:
            if not stop:
                return
            try:
                sent = self._stop(self.run_dir)
            except UserError as exc:  # a damaged process record: nobody was signalled, and it says so
                self.notify(exc.one_line(), severity="error", timeout=15)
                return
            if sent:
                self.stopping = True
                self.notify("asked the run to save a checkpoint and stop")
                self._show()
            else:
                self.notify("the run is not training", severity="warning")

        self.app.push_screen(Confirm(
            f"Stop {self.run_dir.name}?",
            "It saves a checkpoint and ends; `qlora-wizard resume` continues it later.",
            yes="Stop", no="Keep training", danger=True), answered)

    def action_detach(self) -> None:
        """Leave; the training process goes on in its own session."""
        self.app.exit("detached" if self.status in ("running", "starting") else self.status)

    def action_try_model(self) -> None:
        """Open the try screen on this run's model (``escape`` there comes back here)."""
        from tui.screens.try_model import TryScreen

        self.app.push_screen(TryScreen(self.run_dir))

    def action_export(self) -> None:
        """Open the export dialog: a GGUF of this run's model, in a folder the person names."""
        from tui.dialogs.export import ExportDialog

        if not self.finished or isinstance(self.app.screen, ExportDialog):
            return
        self.app.push_screen(ExportDialog(self.run_dir))

    def action_show_log(self) -> None:
        """Open the tail of ``train.log``."""
        self._log_screen = LogScreen(self.run_dir, self.log_lines)
        self.app.push_screen(self._log_screen)
