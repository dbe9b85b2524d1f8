"""The live run screen, driven headless through Pilot and fed recorded runs (no training).

Every test writes an ``events.jsonl`` (and where it matters ``process.json`` and ``train.log``) into
a temporary run directory and asserts on the text a person would see on the screen.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import fake_training_process
from screen import screen_text, wait_for
from tui.app import RunApp

POLL = 0.05
"""A fast poll keeps the tests short; the app's default is 0.2 s."""


# ---------------------------------------------------------------------------------------------
# recorded runs


def _start(total: int = 80, device: str = "cpu") -> dict:
    return {"kind": "start", "time": 1000.0, "preset": {"model": {"source": "builtin:tiny-llama"}},
            "model": {"source": "/cache/tiny-llama"}, "device": device,
            "device_name": "CPU" if device == "cpu" else "NVIDIA H100 80GB HBM3",
            "data": {"examples": 100, "supervised_tokens": 5000},
            "estimate": {"total_bytes": 8 * 2**30, "reserved_bytes": 6 * 2**30},
            "total_steps": total, "resumed_from_step": None}


def _step(step: int, total: int, loss: float, t0: float = 1000.0, device: str = "cpu") -> dict:
    mem = {"mem_rss": 700 * 2**20} if device == "cpu" else {"mem_reserved": 5 * 2**30, "mem_allocated": 4 * 2**30}
    return {"kind": "step", "time": t0 + step * 0.5, "step": step, "total_steps": total, "epoch": step / total,
            "loss": loss, "learning_rate": 2e-4 * (1 - step / (total + 1)), "grad_norm": 1.0,
            "tokens": 2000, "tokens_per_s": 4321.0, **mem}


def _write(run_dir: Path, events: list[dict]) -> None:
    with open(run_dir / "events.jsonl", "a", encoding="utf-8") as fh:
        for ev in events:
            fh.write(json.dumps(ev) + "\n")


def _curve_run(run_dir: Path, total: int, val: list[tuple[int, float]], end: bool = True, device: str = "cpu") -> None:
    """A run whose training loss falls smoothly and whose validation losses are ``val``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    events = [_start(total, device)]
    evals = dict(val)
    for s in range(1, total + 1):
        events.append(_step(s, total, 3.0 * math.exp(-s / 8) + 0.5, device=device))
        if s in evals:
            events.append({"kind": "eval", "time": 1000 + s * 0.5, "step": s, "eval_loss": evals[s]})
    if end:
        events.append({"kind": "end", "time": 1000 + total * 0.5 + 1, "status": "finished", "step": total,
                       "adapter": str(run_dir / "adapter"), "elapsed_s": total * 0.5 + 1})
    _write(run_dir, events)


def _fake_process(run_dir: Path, proc: subprocess.Popen) -> None:
    """Record ``proc`` (started with ``-m engine.train RUN_DIR`` among its arguments, so it passes for
    the run's training process) as the run's training process, with its real start time."""
    from engine.proc import process_start_time

    (run_dir / "process.json").write_text(json.dumps({"pid": proc.pid, "start_time": process_start_time(proc.pid)}))


def _app(run_dir: Path) -> RunApp:
    return RunApp(run_dir, poll_interval=POLL)


# ---------------------------------------------------------------------------------------------


async def test_finished_run_shows_status_final_loss_full_bar_and_diagnosis(tmp_path):
    run_dir = tmp_path / "done"
    _curve_run(run_dir, 80, [(20, 1.60), (40, 1.20), (60, 1.05), (80, 1.02)])
    app = _app(run_dir)
    async with app.run_test(size=(100, 30)) as pilot:
        # The footer follows the finished state a refresh later: wait for the keys it offers then too.
        text = await wait_for(pilot, "FINISHED", "learning curves", "t Try it", "x Export", timeout=10)
        final = 3.0 * math.exp(-80 / 8) + 0.5
        assert "FINISHED" in text
        assert "step 80/80" in text
        assert f"loss {final:.4f}" in text
        assert "100%" in text
        assert "learning curves: good fit" in text
        assert "CPU" in text and "RSS" in text
        assert "finished at step 80" in text  # the events panel's last line
        # Nothing to stop: the binding is disabled; the finished run's model can be tried.
        assert app.screen.check_action("stop", ()) is None
        assert "t Try it" in text
        await pilot.press("d")
    assert app.return_value == "finished"


async def test_crashed_run_shows_log_line_and_how_to_resume(tmp_path):
    run_dir = tmp_path / "crashed"
    run_dir.mkdir()
    _write(run_dir, [_start(80)] + [_step(s, 80, 2.0) for s in range(1, 31)])
    (run_dir / "train.log").write_text("loading the model\nRuntimeError: CUDA error: an illegal memory access\n")
    # A pid that exists nowhere: the kernel's pid_max is far below it.
    (run_dir / "process.json").write_text(json.dumps({"pid": 2**30, "start_time": None}))
    app = _app(run_dir)
    async with app.run_test(size=(100, 30)) as pilot:
        text = await wait_for(pilot, "CRASHED", "illegal memory access", "qlora-wizard resume")
        assert "CRASHED" in text
        assert "RuntimeError: CUDA error: an illegal memory access" in text
        assert f"qlora-wizard resume {run_dir}" in text
        assert "step 30/80" in text and "38%" in text
        assert "Try it" not in text  # no adapter to try


async def test_overfitting_run_names_the_best_step(tmp_path):
    run_dir = tmp_path / "overfit"
    _curve_run(run_dir, 80, [(20, 1.50), (40, 1.10), (60, 1.30), (80, 1.55)])
    app = _app(run_dir)
    async with app.run_test(size=(100, 30)) as pilot:
        text = await wait_for(pilot, "overfitting")
        assert "learning curves: overfitting" in text
        assert "step 40" in text.split("learning curves")[1]


async def test_cuda_run_shows_reserved_memory_against_the_estimate(tmp_path):
    run_dir = tmp_path / "cuda"
    _curve_run(run_dir, 40, [], device="cuda")
    app = _app(run_dir)
    async with app.run_test(size=(100, 30)) as pilot:
        text = await wait_for(pilot, "reserved")
        assert "memory 5.00 GiB reserved of 6.00 GiB estimated" in text
        assert "NVIDIA H100" in text


async def test_live_run_shows_a_new_step_at_once_and_a_fast_run_once_a_second(tmp_path):
    from tui.screens.run import POLL_S, SHOW_EVERY_S

    run_dir = tmp_path / "live"
    run_dir.mkdir()
    total = 50
    t0 = time.time() - 10
    _write(run_dir, [_start(total)] + [_step(s, total, 2.0, t0=t0) for s in range(1, 6)])
    proc = fake_training_process(run_dir, 60)
    try:
        app = RunApp(run_dir)  # the real poll interval and redraw pace: the promise is about them
        async with app.run_test(size=(100, 30)) as pilot:
            text = await wait_for(pilot, "RUNNING", "step 5/50")
            assert "RUNNING" in text and "step 5/50" in text
            assert "ETA" in text and "ETA -" not in text
            assert "d leaves it training; come back with: qlora-wizard attach" in text
            assert app.screen.check_action("stop", ()) is True
            # A step after a quiet second (a real model's pace) shows within a poll or two.
            await pilot.pause(SHOW_EVERY_S)
            _write(run_dir, [_step(6, total, 1.5, t0=t0)])
            written = time.monotonic()
            text = await wait_for(pilot, "step 6/50", timeout=1.5)
            assert "step 6/50" in text
            # Within one or two polls on an idle machine; the suite's workers share two cores with training
            # processes, which can hold the poll thread and the event loop back by a poll or two more.
            assert time.monotonic() - written < 4 * POLL_S + 0.1
            # The next one right after (a fast run): batched into the next redraw, within a second and a poll.
            _write(run_dir, [_step(7, total, 1.4, t0=t0)])
            written = time.monotonic()
            text = await wait_for(pilot, "step 7/50", timeout=2.0)
            assert "step 7/50" in text
            assert time.monotonic() - written < SHOW_EVERY_S + 2 * POLL_S + 0.1
    finally:
        proc.kill()
        proc.wait()


STOPPABLE = r"""
import json, signal, sys, time
run_dir = sys.argv[1]
def stop(signum, frame):
    with open(run_dir + "/events.jsonl", "a") as fh:
        fh.write(json.dumps({"kind": "end", "time": time.time(), "status": "stopped", "step": 5,
                             "checkpoint": run_dir + "/checkpoints/checkpoint-5", "signal": "SIGTERM"}) + "\n")
    open(run_dir + "/got-signal", "w").write(signal.Signals(signum).name)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
time.sleep(60)
"""


async def test_stop_asks_then_sends_sigterm_and_the_run_ends_stopped(tmp_path):
    run_dir = tmp_path / "stoppable"
    run_dir.mkdir()
    _write(run_dir, [_start(50)] + [_step(s, 50, 2.0) for s in range(1, 6)])
    proc = subprocess.Popen([sys.executable, "-c", STOPPABLE, str(run_dir), "-m", "engine.train", str(run_dir.resolve())],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        _fake_process(run_dir, proc)
        app = _app(run_dir)
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_for(pilot, "RUNNING")
            await pilot.press("s")
            text = await wait_for(pilot, "Keep training")
            assert f"Stop {run_dir.name}?" in text
            await pilot.press("n")  # changed my mind: nothing is sent
            await pilot.pause(0.2)
            assert proc.poll() is None
            await pilot.press("s")
            await wait_for(pilot, "Keep training")
            await pilot.press("y")
            proc.wait(timeout=10)
            assert (run_dir / "got-signal").read_text() == "SIGTERM"
            text = await wait_for(pilot, "STOPPED", "qlora-wizard resume")
            assert "STOPPED" in text
            assert "stopped at step 5" in text
            assert f"qlora-wizard resume {run_dir}" in text
            assert app.screen.check_action("stop", ()) is None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_log_screen_shows_train_log_and_goes_back(tmp_path):
    run_dir = tmp_path / "logged"
    _curve_run(run_dir, 20, [])
    (run_dir / "train.log").write_text("".join(f"line {i} of the training output\n" for i in range(30)))
    app = _app(run_dir)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, "FINISHED")
        await pilot.press("l")
        text = await wait_for(pilot, "line 29 of the training output")
        assert "line 29 of the training output" in text
        assert "train.log" in text
        await pilot.press("escape")
        text = await wait_for(pilot, "FINISHED")
        assert "FINISHED" in text


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
async def test_lays_out_at_small_and_large_sizes(tmp_path, size):
    run_dir = tmp_path / "sized"
    _curve_run(run_dir, 80, [(20, 1.50), (40, 1.10), (60, 1.30), (80, 1.55)], end=False)
    (run_dir / "train.log").write_text("Traceback (most recent call last):\nMemoryError\n")
    (run_dir / "process.json").write_text(json.dumps({"pid": 2**30, "start_time": None}))
    app = _app(run_dir)
    async with app.run_test(size=size) as pilot:
        text = await wait_for(pilot, "CRASHED", "qlora-wizard resume", "Detach")
        lines = screen_text(app).splitlines()
        assert len(lines) == size[1]
        for phrase in ("CRASHED", "loss", "training loss", "validation loss", "learning rate", "memory",
                       "learning curves", "qlora-wizard resume", "Detach"):
            assert phrase in text, f"{phrase!r} is not on a {size[0]}x{size[1]} screen"
        # Every part got a place with room to draw in, and nothing fell off the bottom.
        # (an sft run's curves: the preference boxes stay hidden)
        for widget in app.screen.query("#status, #progress, #metrics, .curve, #diagnosis, #alert"):
            assert (widget.region.width > 0 and widget.region.height > 0) == widget.display, widget
        assert not app.screen.query_one("#margin-box").display and not app.screen.query_one("#acc-box").display
        assert app.screen.max_scroll_y == 0


def test_attach_without_a_terminal_prints_plain_lines(tmp_path):
    """Not a terminal (captured output): the plain follower, with no Textual in sight."""
    from conftest import run_cli

    run_dir = tmp_path / "plain"
    _curve_run(run_dir, 20, [])
    (run_dir / "preset.yaml").write_text("model:\n  source: builtin:tiny-llama\n")
    r = run_cli("attach", str(run_dir))
    assert r.returncode == 0, r.stderr
    assert "step 20/20" in r.stdout and "finished at step 20" in r.stdout
    assert "\x1b[" not in r.stdout


# ---------------------------------------------------------------------------------------------
# Snapshots at 80x24 (relative run directories, so the text does not depend on the temp folder)


@pytest.mark.parametrize("kind", ["overfitting", "crashed", "finished"])
async def test_snapshot(tmp_path, monkeypatch, kind):
    from screen import assert_snapshot

    monkeypatch.chdir(tmp_path)
    run_dir = Path("runs") / kind
    if kind == "crashed":
        run_dir.mkdir(parents=True)
        _write(run_dir, [_start(80)] + [_step(s, 80, 3.0 - s / 20) for s in range(1, 31)])
        (run_dir / "train.log").write_text("loading the model\nRuntimeError: CUDA error: an illegal memory access\n")
        (run_dir / "process.json").write_text(json.dumps({"pid": 2**30, "start_time": None}))
        wanted = "illegal memory access"
    elif kind == "overfitting":
        _curve_run(run_dir, 80, [(20, 1.50), (40, 1.10), (60, 1.30), (80, 1.55)])
        wanted = "overfitting"
    else:
        _curve_run(run_dir, 80, [(20, 1.50), (40, 1.10), (60, 0.95), (80, 0.90)], device="cuda")
        wanted = "FINISHED"
    app = _app(run_dir)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, wanted)
        await pilot.pause(0.2)
        assert_snapshot(f"run-{kind}-80x24", screen_text(app))


def _dpo_run(run_dir: Path, total: int, figures) -> None:
    """A finished dpo run whose steps carry ``figures(step)`` = (margin, accuracy, chosen, rejected)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    start = _start(total) | {"method": "dpo", "reference": "each_step",
                             "preset": {"model": {"source": "builtin:tiny-llama"}, "training": {"beta": 0.1}}}
    events = [start]
    for s in range(1, total + 1):
        margin, acc, chosen, rejected = figures(s)
        events.append(_step(s, total, 0.69 - 0.3 * s / total) | {
            "reward_margin": margin, "reward_accuracy": acc, "rewards_chosen": chosen, "rewards_rejected": rejected})
    events.append({"kind": "end", "time": 1000 + total, "status": "finished", "step": total,
                   "adapter": str(run_dir / "adapter"), "elapsed_s": total})
    _write(run_dir, events)


async def test_a_dpo_run_shows_its_reward_margin_and_preference_accuracy_curves(tmp_path):
    run_dir = tmp_path / "dpo"
    _dpo_run(run_dir, 40, lambda s: (0.02 * s, min(1.0, 0.5 + s / 60), 0.01 * s, -0.01 * s))
    app = _app(run_dir)
    async with app.run_test(size=(120, 30)) as pilot:
        text = await wait_for(pilot, "FINISHED", "reward margin", "preference accuracy", "learning curves:",
                              timeout=10)
        assert "margin +0.800" in text and "pref acc 100%" in text
        assert "learning rate" not in text.split("learning curves")[0].split("tok/s")[1]  # its box gave way
        assert "learning curves: learning the preference" in text
        assert app.screen.query_one("#margin-box").display and not app.screen.query_one("#lr-box").display


def test_the_preference_diagnosis_names_dpos_failure_signs():
    from engine.curves import diagnose_preferences

    def run(f):
        return diagnose_preferences([(s, *f(s)) for s in range(1, 41)], beta=0.1).verdict

    assert run(lambda s: (0.3 * s, 1.0, 0.1 * s, -0.2 * s)) == "margins exploding"  # 12 / 0.1 = 120 nats
    assert run(lambda s: (0.001 * (s % 3), 0.5, 0.0, 0.0)) == "accuracy at chance"
    assert run(lambda s: (0.02 * s, 0.9, -0.01 * s, -0.03 * s)) == "chosen rewards falling"
    assert run(lambda s: (0.02 * s, 0.9, 0.01 * s, -0.01 * s)) == "learning the preference"
    assert diagnose_preferences([(1, 0.0, 0.0, 0.0, 0.0)], 0.1).verdict == "too early to tell"
