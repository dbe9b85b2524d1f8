"""Never lose a run: the fault matrix.

Every run command of the command line against a missing, unwritable, finished, running and
crashed run directory; signals (one, two, three, during a checkpoint write); concurrent starts;
a full disk and a read-only one. Each case asserts the exit status, the one ``error:`` line, and
that no earlier file of the run changed. The runs are real (the demo model, real QLoRA on the
CPU); the disks are real small tmpfs mounts where this machine allows mounting.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, events_of, run_cli, snapshot, wait_for, write_preset
from engine.events import EndEvent, fold_history, read_events

pytestmark = pytest.mark.slow


def _steps(run_dir: Path) -> list[int]:
    return [e.step for e in read_events(run_dir) if e.kind == "step"]


def _end(run_dir: Path) -> EndEvent | None:
    return fold_history(read_events(run_dir)).end


def _pid(run_dir: Path) -> int:
    return json.loads((run_dir / "process.json").read_text())["pid"]


def _status(run_dir: Path) -> str:
    r = run_cli("runs", "--runs-dir", str(run_dir.parent), "--json")
    assert r.returncode == 0, r.stderr
    return {x["name"]: x for x in json.loads(r.stdout)}[run_dir.name]["status"]


def _one_error(r: subprocess.CompletedProcess, starts: str) -> None:
    """Exit 2 and exactly one line on stderr, the one that names the problem."""
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: {starts}"), lines[0]
    assert "Traceback" not in r.stdout + r.stderr


def _start(tmp_path: Path, name: str = "run", detach: bool = True, **overrides) -> tuple[Path, Path]:
    preset = write_preset(tmp_path, name=f"{name}.yaml", **overrides)
    run_dir = tmp_path / name
    args = ["--preset", str(preset), "--run-dir", str(run_dir)] + (["--detach"] if detach else [])
    r = run_cli(*args, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return run_dir, preset


def _wait_ended(run_dir: Path, timeout: float = 300) -> dict:
    from engine.runs import is_running

    end = wait_for(lambda: _end(run_dir), timeout=timeout)
    wait_for(lambda: not is_running(run_dir), timeout=60)
    return end


# ---------------------------------------------------------------------------------------------
# The run directories of the matrix, each made once for real


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """A run that finished, trained under umask 077 (so it must be private throughout)."""
    tmp = tmp_path_factory.mktemp("finished")
    before = os.umask(0o077)  # the training process inherits it
    try:
        run_dir, preset = _start(tmp, detach=False, training__max_steps=6, training__save_steps=3)
    finally:
        os.umask(before)
    assert _end(run_dir).status == "finished"
    return run_dir, preset


@pytest.fixture(scope="module")
def crashed(tmp_path_factory) -> tuple[Path, Path]:
    """A run killed with SIGKILL after its second checkpoint (steps 3 and 6)."""
    tmp = tmp_path_factory.mktemp("crashed")
    run_dir, preset = _start(tmp, training__max_steps=2000, training__save_steps=3)
    wait_for(lambda: len([e for e in read_events(run_dir) if e.kind == "checkpoint"]) >= 2)
    os.killpg(_pid(run_dir), signal.SIGKILL)
    wait_for(lambda: _status(run_dir) == "crashed", timeout=30)
    return run_dir, preset


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("stopped")
    run_dir, preset = _start(tmp, training__max_steps=2000, training__save_steps=1000)
    wait_for(lambda: len(_steps(run_dir)) >= 3)
    os.kill(_pid(run_dir), signal.SIGTERM)
    assert _wait_ended(run_dir).status == "stopped"
    return run_dir, preset


def _run_against(run_dir: Path, preset: Path, args: list[str], code: int, said: str) -> None:
    """One cell of the matrix: the command's exit status and words, and the run left as it was."""
    before = snapshot(run_dir)
    fill = dict(run=run_dir, preset=preset, parent=run_dir.parent)
    r = run_cli(*[a.format(**fill) for a in args])
    if code == 2:
        _one_error(r, said.format(**fill))
    else:
        assert r.returncode == code and said.format(**fill) in r.stdout, r.stdout + r.stderr
    assert snapshot(run_dir) == before


# ---------------------------------------------------------------------------------------------
# The matrix


@pytest.mark.parametrize("args", [
    ["attach", "--plain", "{run}"], ["resume", "{run}"], ["stop", "{run}"], ["resume", "{run}", "--max-steps", "9"],
])
def test_a_missing_run_directory_is_named_as_no_run(tmp_path, args):
    run_dir = tmp_path / "nope"
    r = run_cli(*[a.format(run=run_dir) for a in args])
    _one_error(r, f"there is no run at {run_dir}")
    assert not run_dir.exists()


def test_runs_in_a_missing_folder_is_named(tmp_path):
    _one_error(run_cli("runs", "--runs-dir", str(tmp_path / "nope")), f"--runs-dir {tmp_path / 'nope'} does not exist")


@pytest.mark.parametrize("args,code,said", [
    (["resume", "{run}"], 2, "{run} is finished (step 6 of 6; its adapter is in {run}/adapter); to train it longer"),
    (["resume", "{run}", "--max-steps", "6"], 2, "--max-steps 6 is not above the 6 steps this run has saved"),
    (["stop", "{run}"], 2, "{run} is not training (it finished at step 6 of 6)"),
    (["--preset", "{preset}", "--run-dir", "{run}"], 2, "{run} already holds a run"),
    (["attach", "--plain", "{run}"], 0, "finished at step 6"),
    (["runs", "--runs-dir", "{parent}"], 0, "finished"),
])
def test_a_finished_run_is_never_trained_again_by_accident(finished, args, code, said):
    _run_against(*finished, args, code, said)


@pytest.mark.parametrize("args,code,said", [
    (["stop", "{run}"], 2, "{run} is not training (it crashed at step"),
    (["--preset", "{preset}", "--run-dir", "{run}"], 2, "{run} already holds a run"),
    (["resume", "{run}", "--max-steps", "2"], 2, "--max-steps 2 is not above the 6 steps this run has saved"),
    (["attach", "--plain", "{run}"], 1, "crashed"),
    (["runs", "--runs-dir", "{parent}"], 0, "crashed"),
])
def test_a_crashed_run_is_reported_and_left_as_it_was(crashed, args, code, said):
    _run_against(*crashed, args, code, said)


@pytest.mark.parametrize("args,code,said", [
    (["resume", "{run}"], 2, "cannot write {run}/train.lock: Read-only file system"),
    (["resume", "{run}", "--max-steps", "50"], 2, "cannot write {run}/train.lock: Read-only file system"),
    (["stop", "{run}"], 2, "{run} is not training (it was stopped at step"),
    (["--preset", "{preset}", "--run-dir", "{run}"], 2, "{run} already holds a run"),
    (["--preset", "{preset}", "--run-dir", "{run}/inside"], 2, "cannot create the run directory {run}/inside: "
                                                               "Read-only file system"),
    (["attach", "--plain", "{run}"], 130, "stopped at step"),
    (["runs", "--runs-dir", "{parent}"], 0, "stopped"),
])
def test_a_run_on_a_read_only_disk_is_one_clear_line(stopped, bind_readonly, args, code, said):
    bind_readonly(stopped[0])
    _run_against(*stopped, args, code, said)


def test_a_running_run_refuses_a_second_process_and_stops_on_request(tmp_path):
    run_dir, preset = _start(tmp_path, training__max_steps=5000, training__save_steps=1000)
    try:
        wait_for(lambda: len(_steps(run_dir)) >= 2)
        kept = {f: (run_dir / f).read_bytes() for f in ("preset.yaml", "process.json")}
        _one_error(run_cli("resume", str(run_dir)), f"{run_dir} is still training")
        _one_error(run_cli("--preset", str(preset), "--run-dir", str(run_dir)), f"{run_dir} already holds a run")
        # A training process started by hand on a run that is training: refused before it writes anything.
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        r = subprocess.run([sys.executable, "-m", "engine.train", str(run_dir), "--resume"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.strip() == f"error: {run_dir} is already training; follow it with " \
                                                          f"`qlora-wizard attach {run_dir}`", r.stderr
        assert _status(run_dir) == "running"
        assert {f: (run_dir / f).read_bytes() for f in kept} == kept
        r = run_cli("stop", str(run_dir))
        assert r.returncode == 0 and f"asked {run_dir} to save a checkpoint and stop" in r.stdout
        end = _wait_ended(run_dir)
        assert end.status == "stopped" and end.checkpoint.endswith(f"checkpoint-{end.step}")
        assert [e["kind"] for e in events_of(run_dir)].count("start") == 1
    finally:
        try:
            os.killpg(_pid(run_dir), signal.SIGKILL)
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------
# A new run where it cannot be written


def test_a_run_directory_under_a_file_is_one_line_and_leaves_nothing(tmp_path):
    preset = write_preset(tmp_path)
    (tmp_path / "afile").write_text("x")
    run_dir = tmp_path / "afile" / "run"
    r = run_cli("--preset", str(preset), "--run-dir", str(run_dir))
    _one_error(r, f"cannot create the run directory {run_dir}: Not a directory; a part of that path is a file")
    assert (tmp_path / "afile").read_text() == "x"


def test_a_run_directory_on_a_read_only_disk_is_one_line(tmp_path, mount_tmpfs):
    preset = write_preset(tmp_path)
    ro = mount_tmpfs(tmp_path / "ro", readonly=True)
    r = run_cli("--preset", str(preset), "--run-dir", str(ro / "runs" / "run"))
    _one_error(r, f"cannot create the run directory {ro / 'runs' / 'run'}: Read-only file system")


def test_a_full_disk_at_the_start_leaves_no_empty_run_folder(tmp_path, mount_tmpfs):
    preset = write_preset(tmp_path)
    disk = mount_tmpfs(tmp_path / "disk", size="64k")
    with open(disk / "filler", "wb") as fh:  # fill it to the last byte
        try:
            fh.write(b"\0" * (1 << 20))
            fh.flush()
        except OSError:
            pass
    run_dir = disk / "runs" / "new" / "run"
    r = run_cli("--preset", str(preset), "--run-dir", str(run_dir))
    _one_error(r, f"cannot create the run directory {run_dir}: No space left on device; the disk is full")
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]  # runs/new/run and its parents: gone again


def test_a_disk_that_fills_during_training_keeps_the_last_checkpoint_and_resume_goes_on(tmp_path, mount_tmpfs):
    """The checkpoint being written when the disk filled is removed (it could never be resumed, and it
    holds the space); the end event says what is saved; with space freed, resume finishes the run."""
    disk = mount_tmpfs(tmp_path / "disk", size="3m")  # one demo checkpoint is 1.7 MB
    preset = write_preset(tmp_path, training__max_steps=6, training__save_steps=2)
    run_dir = disk / "run"
    r = run_cli("--preset", str(preset), "--run-dir", str(run_dir), timeout=600)
    assert r.returncode == 1, r.stdout + r.stderr
    end = events_of(run_dir)[-1]  # every line whole: the end was written after the space came back
    assert end["kind"] == "end" and end["status"] == "failed"
    assert end["message"].startswith(f"the disk holding {run_dir} is full")
    assert "saved: checkpoint-2 (step 2); steps 3-4 were not saved and resume trains them again; " \
           "removed the unfinished checkpoint-4; free space on it, then `qlora-wizard resume" in end["message"]
    assert f"failed: {end['message']}" in r.stdout
    assert end["checkpoint"] == str(run_dir / "checkpoints" / "checkpoint-2")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint-2"]

    subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
    r = run_cli("resume", str(run_dir), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    h = fold_history(read_events(run_dir))
    assert h.resumes[-1].resumed_from_step == 2
    assert [s.step for s in h.steps] == list(range(1, 7)) and h.end.status == "finished"


# ---------------------------------------------------------------------------------------------
# Resuming


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_finished_run_trains_longer_only_when_its_target_is_raised_and_keeps_its_adapter(tmp_path):
    run_dir, _ = _start(tmp_path, detach=False, training__max_steps=4, training__save_steps=2)
    first_adapter = _tree_digest(run_dir / "adapter")
    r = run_cli("resume", str(run_dir), "--max-steps", "7", timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"the finished adapter is kept in {run_dir / 'adapter-step-4'}" in r.stdout
    assert f"resuming {run_dir} from checkpoint-4 to step 7" in r.stdout
    assert _tree_digest(run_dir / "adapter-step-4") == first_adapter
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    assert yaml.safe_load((run_dir / "preset.yaml").read_text())["training"]["max_steps"] == 7
    h = fold_history(read_events(run_dir))
    assert [s.step for s in h.steps] == list(range(1, 8))
    assert h.resumes[-1].resumed_from_step == 4 and h.end.status == "finished" and h.end.step == 7


def test_a_checkpoint_cut_short_by_a_crash_is_named_and_resume_removes_it(crashed, tmp_path):
    """A kill in the middle of a checkpoint write leaves its folder without trainer_state.json (the
    trainer writes that last): `runs` names it, resume says it removes it and starts from the one before."""
    run_dir = tmp_path / "copy"
    shutil.copytree(crashed[0], run_dir)
    (run_dir / "checkpoints" / "checkpoint-6" / "trainer_state.json").unlink()
    r = run_cli("runs", "--runs-dir", str(tmp_path), "--json")
    assert "checkpoint-6 was cut short and cannot be resumed (resume removes it)" in json.loads(r.stdout)[0]["message"]
    r = run_cli("resume", str(run_dir), "--max-steps", "5", timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "removed checkpoint-6: the earlier process was cut short while writing it" in r.stdout
    assert f"resuming {run_dir} from checkpoint-3 to step 5" in r.stdout
    assert not (run_dir / "checkpoints" / "checkpoint-6").exists()
    assert _end(run_dir).status == "finished"


# ---------------------------------------------------------------------------------------------
# Signals: in the training process itself, at exact moments


class _Signals:
    """Sends SIGTERM to this very process at chosen moments of a real run: ``at_step`` (the number
    of signals sent as step ``global_step + 1`` begins) and ``in_checkpoint`` (sent in the middle
    of the next checkpoint write, after the weights and optimizer are on disk)."""

    def __init__(self, monkeypatch, at_step: tuple[int, int] = (0, 0), in_checkpoint: int = 0,
                 at_init: bool = False) -> None:
        from transformers import Trainer, TrainerCallback

        step, count = at_step
        outer = self

        class Callback(TrainerCallback):
            def on_init_end(self, args, state, control, **kw):
                if at_init:
                    os.kill(os.getpid(), signal.SIGTERM)

            def on_step_begin(self, args, state, control, **kw):
                if state.global_step == step:
                    for _ in range(count):
                        os.kill(os.getpid(), signal.SIGTERM)

        self.callback = Callback()
        self.left_in_checkpoint = in_checkpoint
        original = Trainer._save_rng_state

        def save_rng_state(trainer, output_dir):
            if outer.left_in_checkpoint and count and trainer.state.global_step > step:
                send, outer.left_in_checkpoint = outer.left_in_checkpoint, 0  # a third signal raises here
                for _ in range(send):
                    os.kill(os.getpid(), signal.SIGTERM)
            return original(trainer, output_dir)

        monkeypatch.setattr(Trainer, "_save_rng_state", save_rng_state)


def _train_in_process(tmp_path: Path, signals: _Signals, **overrides) -> tuple[Path, int]:
    from engine.preset import load_preset
    from engine.runs import create_run
    from engine.train import run_training

    preset = write_preset(tmp_path, training__max_steps=12, **overrides)
    run_dir = create_run(load_preset(preset), tmp_path / "run")
    return run_dir, run_training(run_dir, callbacks=(signals.callback,))


def _checkpoints(run_dir: Path) -> list[str]:
    folder = run_dir / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_two_signals_mid_step_still_save_every_step_trained(tmp_path, monkeypatch):
    """The issue's case: a second SIGTERM right after the first used to end the run 'at step 0'."""
    from engine.runs import newest_checkpoint

    run_dir, code = _train_in_process(tmp_path, _Signals(monkeypatch, at_step=(3, 2)), training__save_steps=100)
    assert code == 130
    end = _end(run_dir)
    assert end.status == "stopped" and end.step == 4
    assert end.message == "stopped at step 4 by SIGTERM; saved: checkpoint-4"
    assert _steps(run_dir) == [1, 2, 3, 4]
    assert newest_checkpoint(run_dir) == run_dir / "checkpoints" / "checkpoint-4"


def test_a_second_signal_during_the_checkpoint_write_lets_it_finish(tmp_path, monkeypatch):
    from engine.runs import newest_checkpoint

    signals = _Signals(monkeypatch, at_step=(3, 1), in_checkpoint=1)
    run_dir, code = _train_in_process(tmp_path, signals, training__save_steps=100)
    assert code == 130 and signals.left_in_checkpoint == 0  # the second signal did arrive mid-write
    end = _end(run_dir)
    assert end.status == "stopped" and end.step == 4
    assert newest_checkpoint(run_dir) == run_dir / "checkpoints" / "checkpoint-4"


def test_a_third_signal_abandons_the_checkpoint_and_the_end_says_what_is_saved(tmp_path, monkeypatch):
    from engine.runs import newest_checkpoint

    run_dir, code = _train_in_process(tmp_path, _Signals(monkeypatch, at_step=(3, 3)), training__save_steps=2)
    assert code == 130
    end = _end(run_dir)
    assert end.status == "stopped" and end.abandoned and end.step == 3
    assert end.message == ("abandoned at step 3 by a third SIGTERM: saved: checkpoint-2 (step 2); "
                              "step 3 was not saved and resume trains it again")
    assert end.checkpoint == str(run_dir / "checkpoints" / "checkpoint-2")
    assert _checkpoints(run_dir) == ["checkpoint-2"]
    assert newest_checkpoint(run_dir) == run_dir / "checkpoints" / "checkpoint-2"


def test_a_third_signal_during_the_checkpoint_write_removes_the_part_written_one(tmp_path, monkeypatch):
    signals = _Signals(monkeypatch, at_step=(2, 2), in_checkpoint=1)
    run_dir, code = _train_in_process(tmp_path, signals, training__save_steps=2)
    assert code == 130 and signals.left_in_checkpoint == 0
    end = _end(run_dir)
    assert end.abandoned and end.step == 3
    assert end.message == ("abandoned at step 3 by a third SIGTERM: saved: checkpoint-2 (step 2); step 3 was "
                              "not saved and resume trains it again; removed the unfinished checkpoint-3")
    assert _checkpoints(run_dir) == ["checkpoint-2"]


def test_a_signal_before_training_begins_ends_the_run_at_once(tmp_path, monkeypatch):
    run_dir, code = _train_in_process(tmp_path, _Signals(monkeypatch, at_init=True))
    assert code == 130
    end = _end(run_dir)
    assert end.status == "stopped" and end.step == 0
    assert end.message == "stopped before training began; nothing to save"
    assert _steps(run_dir) == [] and _checkpoints(run_dir) == []


def test_two_quick_sigterms_to_a_detached_run_keep_its_steps(tmp_path):
    """The same from outside, as `kill PID; kill PID` or a supervisor that repeats its TERM."""
    run_dir, _ = _start(tmp_path, training__max_steps=2000, training__save_steps=1000)
    wait_for(lambda: len(_steps(run_dir)) >= 3)
    pid = _pid(run_dir)
    os.kill(pid, signal.SIGTERM)
    os.kill(pid, signal.SIGTERM)
    end = _wait_ended(run_dir)
    assert end.status == "stopped" and end.step >= 3
    assert end.checkpoint == str(run_dir / "checkpoints" / f"checkpoint-{end.step}")
    assert max(_steps(run_dir)) == end.step


# ---------------------------------------------------------------------------------------------
# Two starts at the same moment


def test_of_two_runs_created_in_one_directory_at_once_exactly_one_gets_it(tmp_path):
    from engine.errors import UserError
    from engine.preset import load_preset
    from engine.runs import create_run

    presets = [load_preset(write_preset(tmp_path, name=f"{i}.yaml", training__seed=i)) for i in range(2)]
    for attempt in range(10):
        run_dir = tmp_path / f"run-{attempt}"
        barrier = threading.Barrier(2)
        results: list = [None, None]

        def create(i: int) -> None:
            barrier.wait()
            try:
                results[i] = create_run(presets[i], run_dir)
            except UserError as exc:
                results[i] = exc

        threads = [threading.Thread(target=create, args=(i,)) for i in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        winners = [i for i, r in enumerate(results) if isinstance(r, Path)]
        assert len(winners) == 1, results
        loser = results[1 - winners[0]]
        assert loser.one_line().startswith(f"{run_dir} already holds a run")
        assert load_preset(run_dir / "preset.yaml").training.seed == winners[0]  # the winner's, whole


def test_two_headless_starts_into_one_run_directory_start_one_run(tmp_path):
    preset = write_preset(tmp_path, training__max_steps=4)
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "tui.cli", "--preset", str(preset), "--run-dir", str(run_dir), "--detach"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]
    assert sorted(code for code, _, _ in results) == [0, 2], results
    loser = next(r for r in results if r[0] == 2)
    assert loser[2].strip() == f"error: {run_dir} already holds a run; resume it with `qlora-wizard resume " \
                               f"{run_dir}`, or pick another --run-dir"
    assert _wait_ended(run_dir).status == "finished"
    assert [e["kind"] for e in events_of(run_dir)].count("start") == 1


def test_two_resumes_at_once_start_one_process(stopped, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(stopped[0], run_dir)
    (run_dir / "process.json").unlink()
    starts_before = [e["kind"] for e in events_of(run_dir)].count("start")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "tui.cli", "resume", str(run_dir), "--max-steps", "20", "--detach"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]
    assert sorted(code for code, _, _ in results) == [0, 2], results
    loser = next(r for r in results if r[0] == 2)[2].strip()
    # Whichever check it met first: the lock taken by the other, or the process the other recorded.
    assert loser in (f"error: {run_dir} is already training; follow it with `qlora-wizard attach {run_dir}`",
                     f"error: {run_dir} is still training; follow it with `qlora-wizard attach {run_dir}`",
                     ), loser
    wait_for(lambda: [e.kind for e in read_events(run_dir)].count("start") == starts_before + 1)
    assert _wait_ended(run_dir).status == "finished"
    assert [e["kind"] for e in events_of(run_dir)].count("start") == starts_before + 1


def test_a_new_run_can_start_from_a_finished_runs_adapter(finished, tmp_path):
    """The other way to train a finished run longer, as its refusal says: lora.init_from."""
    run_dir, _ = finished
    old_steps = [e for e in read_events(run_dir) if e.kind == "step"]
    new_dir, _ = _start(tmp_path, detach=False, training__max_steps=2, lora__r=4,
                        lora__init_from=str(run_dir / "adapter"))
    saved = yaml.safe_load((new_dir / "preset.yaml").read_text())["lora"]
    assert (saved["r"], saved["init_from"]) == (16, str(run_dir / "adapter"))  # the adapter's rank, as run
    first = [e for e in read_events(new_dir) if e.kind == "step"][0]
    # The same first batch (same seed and data) costs far less with the trained adapter than with fresh ones.
    assert first.loss < old_steps[0].loss - 0.3, (first.loss, old_steps[0].loss)
    assert _end(new_dir).status == "finished"


def test_starting_from_something_that_is_not_an_adapter_is_one_line(tmp_path):
    (tmp_path / "notes").mkdir()
    preset = write_preset(tmp_path, lora__init_from=str(tmp_path / "notes"))
    r = run_cli("--preset", str(preset), "--run-dir", str(tmp_path / "run"))
    _one_error(r, f"lora.init_from: {tmp_path / 'notes'} has no adapter_config.json, so it is not a PEFT adapter")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# dpo: what a preference run adds to the matrix is its reference, which a resume must keep


DPO_PAIRS = dict(training__method="dpo", data__train="builtin:demo-pairs", data__validation_split=0,
                 data__max_examples=48, training__learning_rate=5e-4, training__micro_batch_size=4, training__gradient_accumulation_steps=1,
                 training__seq_len=128, training__logging_steps=1, training__max_steps=8)
"""A short dpo run on 48 of the demo pairs (a reference precomputed over all of them costs little) at a
rate the demo model moves at within a few steps, no validation."""

KILL_AT = """
import os, signal, sys
from transformers import TrainerCallback
from engine.train import run_training

class Kill(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)

sys.exit(run_training(sys.argv[1], callbacks=(Kill(),)))
"""
"""Trains a run in a process of its own that kills itself with SIGKILL as step ``argv[2] + 1`` begins."""


def _attempts(run_dir: Path) -> list[dict[int, object]]:
    """The step events of each process that trained the run, by step."""
    attempts: list[dict[int, object]] = []
    for e in read_events(run_dir):
        if e.kind == "start":
            attempts.append({})
        elif e.kind == "step":
            attempts[-1][e.step] = e
    return attempts


def _rewards(step) -> tuple[float, float]:
    return step.rewards_chosen, step.rewards_rejected


def test_a_dpo_run_killed_mid_run_resumes_against_its_reference_precomputed_from_the_starting_model(tmp_path):
    """TRL precomputes the reference log-probabilities when the trainer is built (``DPOTrainer.__init__``),
    before ``train`` loads the checkpoint, and keys their cache on a hash of the model as built: a resume
    must build the model as the run began, or its reference is the checkpoint's partly trained adapter.
    The steps after the checkpoint, trained by both processes from the same weights on the same
    batches, show it: their rewards are the same, where a reference computed with the trained adapter
    would make the first of them 0 (the policy measured against itself)."""
    from engine.preset import load_preset
    from engine.runs import create_run

    preset = write_preset(tmp_path, training__save_steps=4, training__reference="precomputed", **DPO_PAIRS)
    run_dir = create_run(load_preset(preset), tmp_path / "run")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", KILL_AT, str(run_dir), "6"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == -signal.SIGKILL, r.stdout[-3000:] + r.stderr[-3000:]
    assert _status(run_dir) == "crashed" and _steps(run_dir) == [1, 2, 3, 4, 5, 6]

    r = run_cli("resume", str(run_dir), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resuming {run_dir} from checkpoint-4" in r.stdout
    h = fold_history(read_events(run_dir))
    assert h.end.status == "finished" and [s.step for s in h.steps] == list(range(1, 9))
    assert (h.start.reference, h.resumes[0].reference, h.resumes[0].resumed_from_step) == (
        "precomputed", "precomputed", 4)
    killed, resumed = _attempts(run_dir)
    assert sorted(resumed) == [5, 6, 7, 8]  # steps 5 and 6, past the checkpoint, trained again, once
    # The reference is the base: at step 1 the fresh adapter (its update zero) scores the pairs as it does.
    assert _rewards(killed[1]) == pytest.approx((0, 0), abs=1e-3)
    for step in (5, 6):
        before, again = killed[step], resumed[step]
        assert sum(map(abs, _rewards(before))) > 2e-3, before  # the policy has moved from its reference
        assert _rewards(again) == pytest.approx(_rewards(before), rel=1e-3, abs=1e-4), (step, before, again)
        assert (again.loss, again.reward_margin) == pytest.approx((before.loss, before.reward_margin), rel=1e-3,
                                                                  abs=1e-4)


def _lora_key(key: str, adapter: str) -> str:
    """A saved adapter's weight name as the model in memory names it, under ``adapter``."""
    return key.replace(".lora_A.", f".lora_A.{adapter}.").replace(".lora_B.", f".lora_B.{adapter}.")


def test_a_dpo_run_from_an_sft_adapter_stopped_and_resumed_keeps_that_adapter_as_its_reference(
        demo_run, tmp_path, monkeypatch):
    """Started from a finished sft run's adapter (``lora.init_from``), the reference is TRL's frozen copy
    of it (adapter "ref", beside the trained "default"). Checkpoints hold both; a resume must leave "ref"
    the starting adapter, not make it the checkpoint's trained one: looked at in memory as training
    resumes, and in the rewards of the first step after the resume, which a reference equal to the
    resumed adapter would make 0 as they are at step 1, where the policy is still its reference."""
    import torch
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from engine.preset import load_preset
    from engine.runs import create_run
    from engine.train import run_training

    start = load_file(demo_run / "adapter" / "adapter_model.safetensors")
    preset = write_preset(tmp_path, training__save_steps=1000, training__reference="each_step",
                          lora__init_from=str(demo_run / "adapter"), **DPO_PAIRS)
    run_dir = create_run(load_preset(preset), tmp_path / "run")
    assert run_training(run_dir, callbacks=(_Signals(monkeypatch, at_step=(3, 1)).callback,)) == 130
    end = _end(run_dir)
    assert end.status == "stopped" and end.step == 4 and _checkpoints(run_dir) == ["checkpoint-4"]
    saved = load_file(run_dir / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors")

    resumed_with: dict[str, torch.Tensor] = {}

    class Look(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            resumed_with.update({n: p.detach().float().cpu().clone() for n, p in model.named_parameters()
                                 if ".lora_" in n})

    assert run_training(run_dir, resume=True, callbacks=(Look(),)) == 0
    h = fold_history(read_events(run_dir))
    assert h.end.status == "finished" and [s.step for s in h.steps] == list(range(1, 9))
    assert (h.resumes[0].resumed_from_step, h.resumes[0].reference) == (4, "each_step")
    # As training resumed: "default" is the checkpoint's adapter, "ref" still the one the run started from.
    assert any(not torch.equal(saved[k], start[k]) for k in start)
    assert all(torch.equal(resumed_with[_lora_key(k, "default")], saved[k].float()) for k in saved)
    assert all(torch.equal(resumed_with[_lora_key(k, "ref")], start[k].float()) for k in start)
    # The policy begins at its reference (step 1: every reward 0, not the 1e-4 of an adapter rounded to
    # bfloat16 against its exact copy); the first step after the resume is measured against the starting
    # adapter, from which four steps have moved it.
    stopped, resumed = _attempts(run_dir)
    assert _rewards(stopped[1]) == pytest.approx((0, 0), abs=1e-5)
    assert sum(map(abs, _rewards(resumed[5]))) > 2e-3, resumed[5]
    # The adapter written at the end is the trained one alone.
    adapter = run_dir / "adapter"
    written = load_file(adapter / "adapter_model.safetensors")
    assert not (adapter / "ref").exists() and set(written) == set(start)
    assert any(not torch.equal(written[k], start[k]) for k in start)


# ---------------------------------------------------------------------------------------------
# Security: never signal a stranger, never write into someone's folder or through a planted link


NAMESPACE_PROBE = r"""
import json, os, socket, subprocess, sys, time
from pathlib import Path

from engine.proc import process_start_time

root = Path(sys.argv[1])
victim = subprocess.Popen(["sleep", "300"])        # a stranger: the user's own, unrelated process
time.sleep(0.2)
vt = process_start_time(victim.pid)
here = socket.gethostname()
dead_launcher = {"pid": 4000000, "start_time": "1", "launch": {"procs_per_node": 2, "nodes": 1, "device": "cpu"}}
cases = {
    "pid -1": ({"pid": -1, "start_time": "1"}, None),
    "pid true": ({"pid": True, "start_time": vt}, None),
    "pid 0": ({"pid": 0, "start_time": "1"}, None),
    "pid 1": ({"pid": 1, "start_time": process_start_time(1)}, None),
    "pid as text": ({"pid": str(victim.pid), "start_time": vt}, None),
    "no start time": ({"pid": victim.pid}, None),
    "start time null": ({"pid": victim.pid, "start_time": None}, None),
    "not this run's process": ({"pid": victim.pid, "start_time": vt}, None),
    "not json": ("{pid: -1", None),
    "a rank of -1": (dead_launcher, [{"rank": 1, "local_rank": 1, "pid": -1, "start_time": "1", "host": here,
                                      "log": "x", "node": 0}]),
    "a rank that is a stranger": (dead_launcher, [{"rank": 1, "local_rank": 1, "pid": victim.pid, "start_time": vt,
                                                   "host": here, "log": "x", "node": 0}]),
    "another machine's rank": (dead_launcher, [{"rank": 1, "local_rank": 1, "pid": victim.pid, "start_time": vt,
                                                "host": here + "-elsewhere", "log": "x", "node": 1}]),
}
out = {}
for name, (record, ranks) in cases.items():
    run = root / name.replace(" ", "-").replace("'", "")
    run.mkdir()
    (run / "preset.yaml").write_text("version: 1\nmodel: {source: builtin:tiny-llama}\ndata: {train: builtin:demo}\n")
    (run / "events.jsonl").write_text("")
    (run / "process.json").write_text(record if isinstance(record, str) else json.dumps(record))
    if ranks is not None:
        (run / "ranks.json").write_text(json.dumps({"ranks": ranks}))
    r = subprocess.run([sys.executable, "-m", "tui.cli", "stop", str(run)], capture_output=True, text=True)
    alive = victim.poll() is None and os.path.exists(f"/proc/{victim.pid}")
    out[name] = {"code": r.returncode, "stderr": r.stderr, "victim_alive": alive}
    if not alive:
        victim = subprocess.Popen(["sleep", "300"])
        time.sleep(0.2)
victim.kill()
print(json.dumps(out))
"""


def test_stop_on_a_damaged_record_signals_nobody_inside_a_pid_namespace(tmp_path):
    """``stop`` with process records a damaged or edited file could hold: pid -1 (every process the user
    owns), true (pid 1), 0, 1, text, no start time, a live stranger's pid and start time, ranks of -1, of
    a stranger and of another machine. Run in a pid namespace of its own, so a wrong signal could reach
    only the namespace's processes, and a stranger there shows whether it did."""
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a pid namespace here ({(probe.stderr or 'unshare failed').strip()}); "
                    "this test needs root or unprivileged user namespaces")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", NAMESPACE_PROBE,
                        str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout.strip().splitlines()[-1])
    for name, got in results.items():
        assert got["victim_alive"], (name, got)
        assert got["code"] == 2, (name, got)
        lines = got["stderr"].strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in got["stderr"], (name, got)
        if name == "another machine's rank":  # not this machine's to signal: the run is simply not running here
            assert "is not training" in lines[0], (name, lines[0])
        else:
            assert "nobody was signalled" in lines[0], (name, lines[0])
    assert "pid -1" in results["pid -1"]["stderr"]
    assert "not this run's training process (it runs `sleep 300`)" in results["not this run's process"]["stderr"]


def test_a_live_process_of_another_run_is_not_this_runs(tmp_path):
    """A record naming a training process of another run (a copied run directory) is refused, and that
    process is not signalled."""
    from conftest import fake_training_process

    other, this = tmp_path / "other", tmp_path / "this"
    for d in (other, this):
        d.mkdir()
        (d / "preset.yaml").write_text("version: 1\nmodel: {source: builtin:tiny-llama}\ndata: {train: builtin:demo}\n")
        (d / "events.jsonl").write_text("")
    proc = fake_training_process(other)
    try:
        shutil.copy(other / "process.json", this / "process.json")
        r = run_cli("stop", str(this))
        _one_error(r, f"{this / 'process.json'} names pid {proc.pid}, which is not this run's training process")
        assert proc.poll() is None
        assert _status(this) != "running"
        r = run_cli("stop", str(other))  # its own record: signalled
        assert r.returncode == 0, r.stderr
        assert proc.wait(timeout=10) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_reused_pid_is_not_the_run_and_is_not_signalled(tmp_path):
    """The recorded pid now belongs to a later process (another start time): the run is not running,
    and the process holding the pid is left alone."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "preset.yaml").write_text("version: 1\nmodel: {source: builtin:tiny-llama}\ndata: {train: builtin:demo}\n")
    (run_dir / "events.jsonl").write_text("")
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-m", "engine.train",
                                 str(run_dir.resolve())])
    try:
        (run_dir / "process.json").write_text(json.dumps({"pid": stranger.pid, "start_time": "1"}))
        _one_error(run_cli("stop", str(run_dir)), f"{run_dir} is not training (it crashed at step 0)")
        assert stranger.poll() is None
    finally:
        stranger.kill()


@pytest.mark.parametrize("where", ["named", "here", "output.name"])
def test_a_folder_of_someones_files_is_never_a_run_directory(tmp_path, where):
    """``--run-dir`` (or output.name under runs_dir, or ``.``) naming a folder that holds files: refused
    before anything is written, the folder exactly as it was."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("chapter one\n")
    (theirs / "checkpoints").mkdir()
    (theirs / "checkpoints" / "checkpoint-5").mkdir()
    preset = write_preset(tmp_path, output__name="theirs")
    data = yaml.safe_load(preset.read_text())
    data["output"]["runs_dir"] = str(tmp_path)
    preset.write_text(yaml.safe_dump(data))
    before = snapshot(tmp_path)
    args = {"named": ["--run-dir", str(theirs)], "here": ["--run-dir", "."], "output.name": []}[where]
    r = run_cli("--preset", str(preset), *args, cwd=theirs if where == "here" else None)
    shown = "." if where == "here" else str(theirs)
    _one_error(r, f"{shown} already holds files (checkpoints, thesis.tex); a run directory must be new or empty")
    assert snapshot(tmp_path) == before
    assert sorted(p.name for p in theirs.iterdir()) == ["checkpoints", "thesis.tex"]


@pytest.mark.parametrize("command", [["resume", "{d}"], ["stop", "{d}"], ["eval", "{d}"], ["card", "{d}"],
                                     ["plot", "{d}"], ["merge", "{d}", "--out", "{d}/merged"]])
def test_commands_on_a_folder_that_only_looks_like_a_run_change_nothing(tmp_path, command):
    """A folder with someone's ``preset.yaml`` and an unfinished-looking ``checkpoints/checkpoint-3``
    but no events of a run: not a run, so nothing in it is removed or written."""
    d = tmp_path / "theirs"
    (d / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    (d / "checkpoints" / "checkpoint-3" / "weights.bin").write_bytes(b"theirs")
    (d / "preset.yaml").write_text("version: 1\nmodel: {source: builtin:tiny-llama}\ndata: {train: builtin:demo}\n")
    before = snapshot(d)
    r = run_cli(*[a.format(d=d) for a in command])
    _one_error(r, f"{d} is not a run directory of qlora-wizard (no events.jsonl)")
    assert snapshot(d) == before and sorted(p.name for p in d.iterdir()) == ["checkpoints", "preset.yaml"]


def test_resume_never_cleans_checkpoints_behind_a_link(stopped, tmp_path):
    """A run whose ``checkpoints`` is a link to another folder: that folder's unfinished-looking
    ``checkpoint-N`` folders are not the run's, and resume removes none of them."""
    from engine.runs import list_checkpoints, remove_incomplete_checkpoints

    run_dir = tmp_path / "copy"
    shutil.copytree(stopped[0], run_dir, ignore=shutil.ignore_patterns("checkpoints"))
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "checkpoint-7").mkdir(parents=True)
    (elsewhere / "checkpoint-7" / "theirs.txt").write_text("keep me")
    (run_dir / "checkpoints").symlink_to(elsewhere)
    assert list_checkpoints(run_dir) == [] and remove_incomplete_checkpoints(run_dir) == []
    assert (elsewhere / "checkpoint-7" / "theirs.txt").read_text() == "keep me"


@pytest.mark.parametrize("name", ["train.log", "events.jsonl"])
def test_a_link_planted_in_a_run_is_never_written_through(stopped, tmp_path, name):
    """``train.log`` or ``events.jsonl`` replaced by a link to someone's file: resume refuses in one line
    (O_NOFOLLOW), and their file is unchanged."""
    run_dir = tmp_path / "copy"
    shutil.copytree(stopped[0], run_dir)
    (run_dir / "process.json").unlink()
    victim = tmp_path / "their-file.txt"
    victim.write_text("theirs\n")
    if name == "events.jsonl":
        os.replace(run_dir / name, tmp_path / "events.keep")
        victim.write_text((tmp_path / "events.keep").read_text())  # so the run still reads as stopped
    (run_dir / name).unlink(missing_ok=True)
    (run_dir / name).symlink_to(victim)
    before = victim.read_bytes()
    r = run_cli("resume", str(run_dir), "--detach")
    if name == "train.log":
        _one_error(r, f"cannot write {run_dir.resolve() / 'train.log'}: Too many levels of symbolic links; "
                      "a symbolic link stands at that name")
    else:
        _one_error(r, f"{run_dir / name} is a symbolic link, not the run's own file")
    assert victim.read_bytes() == before
    assert not (run_dir / "process.json").exists()  # nothing started


def test_run_files_follow_the_umask(finished, stopped):
    """Every file and folder of a run has the mode the umask asks for: 0644/0755 under the usual 022
    (a stopped run: its checkpoint's safetensors files included, which the library makes 0600), and
    private throughout under umask 077 (a finished run: checkpoints and adapter included)."""
    run_dir, _ = stopped
    assert os.umask(os.umask(0o022)) == 0o022, "the tests run under the usual umask"
    checked = 0
    for p in run_dir.rglob("*"):
        if not p.is_symlink():
            assert p.stat().st_mode & 0o777 == (0o755 if p.is_dir() else 0o644), (p, oct(p.stat().st_mode))
            checked += p.name.endswith(".safetensors")
    assert checked, "the stopped run has a checkpoint with weights"
    private, _ = finished
    loose = [str(p) for p in private.rglob("*") if not p.is_symlink() and p.stat().st_mode & 0o077]
    assert not loose, loose
    assert (private / "adapter").is_dir() and list((private / "checkpoints").iterdir())
    assert not list(private.glob(".*")), "no scratch folder or temporary file is left in a finished run"
