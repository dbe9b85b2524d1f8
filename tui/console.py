"""The headless console runner: follows a run's ``events.jsonl`` and shows it.

On a terminal it draws a rich progress display (step, loss, validation loss, tokens/s, ETA); when
output is not a terminal (``nohup ... > log``) it prints one plain line per event. It only reads
the events file, like every other front end, so it can follow a run it did not start.

Ctrl-C here asks the training process to save a checkpoint and stop (exit status 130). Closing
the terminal ends only this follower: the training process is in its own session and goes on.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

from engine.curves import diagnose_history
from engine.errors import EXIT_FAILED, EXIT_STOPPED, run_exit_status
from engine.events import (
    POLL_S,
    CheckpointEvent,
    EndEvent,
    ErrorEvent,
    EvalEvent,
    Event,
    EventTail,
    RunHistory,
    StartEvent,
    StepEvent,
    extend_history,
    fold_history,
)
from engine.runs import is_running, log_tail, stop_run
from tui.format import duration, gib


def _float(value, spec: str) -> str:
    """A number as ``spec`` formats it; anything else (None, a NaN written as text) as it is."""
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def describe(event: Event) -> str:
    """One plain line for an event (what ``nohup`` logs show)."""
    if isinstance(event, StartEvent):
        resumed = event.resumed_from_step
        head = f"resumed from step {resumed}" if resumed else ("resumed from the beginning"
                                                              if event.resume_requested else "start")
        on = event.device_name or "?"
        if event.world_words:
            on = f"{event.world_words} ({on})"
        units = "pairs" if event.method != "sft" else "examples"
        method = {"dpo": "DPO", "orpo": "ORPO"}.get(event.method, "")
        if method and event.reference:
            method += f" (reference {event.reference.replace('_', ' ')})"
        return (f"{head}: {method + ' of ' if method else ''}{event.model_source} on {on}, "
                f"{event.data.examples or '?'} {units}, {event.data.supervised_tokens or '?'} supervised tokens, "
                f"{event.total_steps or '?'} steps, memory estimate {gib(event.estimate.total_bytes)}"
                + (f"; kernels: {event.kernels}" if event.kernels else "")
                + (f"; {event.remote_code}" if event.remote_code else ""))
    if isinstance(event, StepEvent):
        parts = [f"step {event.step}/{event.total_steps}", f"epoch {event.epoch:.2f}",
                 f"loss {_float(event.loss, '.4f')}"]
        if event.learning_rate is not None:
            parts.append(f"lr {event.learning_rate:.2e}")
        if event.grad_norm is not None:
            parts.append(f"grad {_float(event.grad_norm, '.3f')}")
        if event.reward_margin is not None:
            parts.append(f"margin {event.reward_margin:+.3f}")
        if event.reward_accuracy is not None:
            parts.append(f"pref acc {event.reward_accuracy:.0%}")
        parts.append(f"{event.tokens_per_s or 0:,.0f} tok/s")
        if event.mem_reserved:
            parts.append(f"mem {gib(event.mem_reserved)}" + (" (highest rank)" if event.ranks else ""))
        return "  ".join(parts)
    if isinstance(event, EvalEvent):
        line = f"eval at step {event.step}: validation loss {_float(event.eval_loss, '.4f')}"
        if event.eval_reward_accuracy is not None:
            line += (f", preference accuracy {event.eval_reward_accuracy:.0%}, "
                     f"margin {_float(event.eval_reward_margin, '+.3f')}")
        return line
    if isinstance(event, CheckpointEvent):
        return f"checkpoint at step {event.step}: {event.path}"
    if isinstance(event, ErrorEvent):
        return f"error: {event.message}"
    if isinstance(event, EndEvent):
        peak = event.peak_reserved or event.peak_rss
        peak_txt = f"; peak memory {gib(peak)}" if peak else ""
        if event.estimate_total and event.peak_reserved:
            peak_txt += f" (estimate {gib(event.estimate_reserved)} reserved)"
        if event.status == "finished":
            where = f"adapter in {event.adapter}" if event.adapter else (event.message or "no adapter here")
            return f"finished at step {event.step} in {duration(event.elapsed_s)}: {where}{peak_txt}"
        if event.status == "stopped":
            if event.abandoned:
                return f"stopped: {event.message}"
            ck = event.checkpoint
            return f"stopped at step {event.step or 0}" + (f"; checkpoint {ck}" if ck else "") + peak_txt
        return f"failed: {event.message}"
    return str(event)


def exit_status(history: RunHistory) -> int:
    """The headless exit status a run's end stands for (a run with no end: failed)."""
    return run_exit_status(history.end.status if history.end else "failed", bad_input=history.bad_input)


class _Display:
    """Plain lines, or a rich live progress display on a terminal."""

    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.progress = None
        self.task = None
        self.started_at = time.time()

    def __enter__(self):
        if self.tty:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss [cyan]{task.fields[loss]}[/] val [magenta]{task.fields[val]}[/]"),
                TextColumn("{task.fields[speed]} tok/s"), TextColumn("eta"), TimeRemainingColumn(),
                refresh_per_second=4,
            )
            self.progress.__enter__()
            self.task = self.progress.add_task("training", total=None, loss="-", val="-", speed="-")
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def line(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text)
        else:
            print(text, flush=True)

    def show(self, event: Event, history: RunHistory) -> None:
        if self.progress is None:
            self.line(describe(event))
            return
        if isinstance(event, StepEvent):
            val = _float(history.evals[-1].eval_loss, ".4f") if history.evals else "-"
            self.progress.update(self.task, completed=event.step, total=event.total_steps,
                                 loss=_float(event.loss, ".4f"), val=val, speed=f"{event.tokens_per_s or 0:,.0f}")
        elif isinstance(event, StartEvent):
            self.progress.update(self.task, total=event.total_steps, completed=event.resumed_from_step or 0)
            self.line(describe(event))
        elif isinstance(event, EvalEvent):
            self.progress.update(self.task, val=_float(event.eval_loss, ".4f"))
            self.line(describe(event))
        else:
            self.line(describe(event))


def follow_run(run_dir: str | Path, tty: bool | None = None) -> int:
    """Show a run from its first event until it ends; returns the headless exit status."""
    run_dir = Path(run_dir)
    tty = sys.stdout.isatty() if tty is None else tty
    tail = EventTail(run_dir)
    history = fold_history([])
    stop_sent = False

    def _interrupt(signum, frame):
        nonlocal stop_sent
        if not stop_sent and stop_run(run_dir):
            stop_sent = True
            display.line("stopping: saving a checkpoint (Ctrl-C again leaves the run going in the background)")
        else:
            raise KeyboardInterrupt

    old = signal.signal(signal.SIGINT, _interrupt)
    display = _Display(tty)
    try:
        with display:
            gone_since = None
            while True:
                new = tail.read_new()
                history = extend_history(history, new)
                for ev in new:
                    display.show(ev, history)
                if history.end is not None and not is_running(run_dir):
                    break
                if not is_running(run_dir):
                    # Give the last write a moment to land before calling it a crash.
                    gone_since = gone_since or time.time()
                    if time.time() - gone_since > 1.0 and not tail.read_new():
                        display.line("the training process is gone without an end event: it crashed")
                        for ln in log_tail(run_dir, 5):
                            display.line(f"  train.log: {ln}")
                        display.line(f"continue it with: qlora-wizard resume {run_dir}")
                        return EXIT_FAILED
                else:
                    gone_since = None
                time.sleep(POLL_S)
    except KeyboardInterrupt:
        print(f"\nleft the run going in the background; follow it again with: qlora-wizard attach {run_dir}")
        return EXIT_STOPPED
    finally:
        signal.signal(signal.SIGINT, old)
    code = exit_status(history)
    d = diagnose_history(history)
    if d is not None and d.verdict != "too early to tell":
        print(f"learning curves: {d.verdict}: {d.message}")
    if code == EXIT_STOPPED:
        print(f"continue it with: qlora-wizard resume {run_dir}")
    return code
