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

from engine.events import EventTail, extend_history, fold_history
from engine.runs import is_running, log_tail, stop_run
from tui.format import duration, gib

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_STOPPED = 0, 1, 2, 130
POLL_S = 0.2


def describe(event: dict) -> str:
    """One plain line for an event (what ``nohup`` logs show)."""
    kind = event.get("kind")
    if kind == "start":
        d = event.get("data") or {}
        est = (event.get("estimate") or {}).get("total_bytes")
        resumed = event.get("resumed_from_step")
        head = f"resumed from step {resumed}" if resumed else ("resumed from the beginning"
                                                              if event.get("resume_requested") else "start")
        return (f"{head}: {(event.get('model') or {}).get('source', '?')} on {event.get('device_name', '?')}, "
                f"{d.get('examples', '?')} examples, {d.get('supervised_tokens', '?')} supervised tokens, "
                f"{event.get('total_steps', '?')} steps, memory estimate {gib(est)}")
    if kind == "step":
        parts = [f"step {event.get('step')}/{event.get('total_steps')}", f"epoch {event.get('epoch', 0):.2f}",
                 f"loss {event.get('loss'):.4f}" if isinstance(event.get("loss"), float) else f"loss {event.get('loss')}"]
        if event.get("learning_rate") is not None:
            parts.append(f"lr {event['learning_rate']:.2e}")
        if event.get("grad_norm") is not None:
            parts.append(f"grad {event['grad_norm']:.3f}")
        parts.append(f"{event.get('tokens_per_s', 0):,.0f} tok/s")
        if event.get("mem_reserved"):
            parts.append(f"mem {gib(event['mem_reserved'])}")
        return "  ".join(parts)
    if kind == "eval":
        return f"eval at step {event.get('step')}: validation loss {event.get('eval_loss'):.4f}"
    if kind == "checkpoint":
        return f"checkpoint at step {event.get('step')}: {event.get('path')}"
    if kind == "error":
        return f"error: {event.get('message')}"
    if kind == "end":
        status = event.get("status")
        peak = event.get("peak_reserved") or event.get("peak_rss")
        peak_txt = f"; peak memory {gib(peak)}" if peak else ""
        if event.get("estimate_total") and event.get("peak_reserved"):
            peak_txt += f" (estimate {gib(event.get('estimate_reserved'))} reserved)"
        if status == "finished":
            return f"finished at step {event.get('step')} in {duration(event.get('elapsed_s'))}: " \
                   f"adapter in {event.get('adapter')}{peak_txt}"
        if status == "stopped":
            if event.get("abandoned"):
                return f"stopped: {event.get('message')}"
            ck = event.get("checkpoint")
            return f"stopped at step {event.get('step', 0)}" + (f"; checkpoint {ck}" if ck else "") + peak_txt
        return f"failed: {event.get('message')}"
    return str(event)


def exit_status(history) -> int:
    """The headless exit status a run's end stands for."""
    end = history.end
    if end is None:
        return EXIT_FAILED
    status = end.get("status")
    if status == "finished":
        return EXIT_OK
    if status == "stopped":
        return EXIT_STOPPED
    return EXIT_BAD_INPUT if any(e.get("bad_input") for e in history.errors) else EXIT_FAILED


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

    def show(self, event: dict, history) -> None:
        kind = event["kind"]
        if self.progress is None:
            self.line(describe(event))
            return
        if kind == "step":
            val = f"{history.evals[-1]['eval_loss']:.4f}" if history.evals else "-"
            loss = event.get("loss")
            self.progress.update(self.task, completed=event.get("step", 0), total=event.get("total_steps"),
                                 loss=f"{loss:.4f}" if isinstance(loss, float) else str(loss), val=val,
                                 speed=f"{event.get('tokens_per_s', 0):,.0f}")
        elif kind == "start":
            self.progress.update(self.task, total=event.get("total_steps"),
                                 completed=event.get("resumed_from_step") or 0)
            self.line(describe(event))
        elif kind == "eval":
            self.progress.update(self.task, val=f"{event.get('eval_loss'):.4f}")
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
    if history.evals and history.steps:
        from engine.curves import diagnose

        d = diagnose([(e["step"], e["loss"]) for e in history.steps if isinstance(e.get("loss"), float)],
                     [(e["step"], e["eval_loss"]) for e in history.evals])
        if d.verdict != "too early to tell":
            print(f"learning curves: {d.verdict}: {d.message}")
    if code == EXIT_STOPPED:
        print(f"continue it with: qlora-wizard resume {run_dir}")
    return code
