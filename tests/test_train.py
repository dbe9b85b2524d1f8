"""Real QLoRA on the CPU: a tiny Llama, NF4 through bitsandbytes, LoRA through peft, transformers' Trainer.

These tests run the training process the way a person does (``qlora-wizard --preset``, ``resume``,
signals) and assert on what they get: the events file, the exit status, the adapter.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from conftest import DEMO_PRESET as DEMO
from conftest import ROOT, events_of, run_cli, wait_for, write_preset
from engine.events import fold_history, read_events

pytestmark = pytest.mark.slow

def test_a_preset_can_ask_for_transformers_loss_instead(tmp_path, monkeypatch):
    """training.chunked_loss: false trains through the model's own forward and loss."""
    import engine.loss
    from engine.preset import load_preset
    from engine.runs import create_run
    from engine.train import run_training

    def never(*args, **kwargs):
        raise AssertionError("engine.loss was used although the preset turned it off")

    monkeypatch.setattr(engine.loss, "causal_lm_loss", never)
    run_dir = create_run(load_preset(write_preset(tmp_path, training__max_steps=2, training__chunked_loss=False)),
                         tmp_path / "run")
    assert run_training(run_dir) == 0
    end = [e for e in events_of(run_dir) if e["kind"] == "end"][-1]
    assert end["status"] == "finished" and end["step"] == 2


@pytest.fixture(scope="module")
def finished_run(demo_run) -> Path:
    """The session's short real demo run (30 steps, validated every 10), read and never written here."""
    return demo_run


def test_headless_run_finishes_with_exit_0_and_plain_lines(finished_run):
    log = (finished_run / "train.log").read_text()
    assert "Traceback" not in log
    events = events_of(finished_run)
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert events[-1]["status"] == "finished"
    steps = [e["step"] for e in events if e["kind"] == "step"]
    assert steps == list(range(1, 31))


def test_step_events_carry_what_the_screens_show(finished_run):
    step = next(e for e in events_of(finished_run) if e["kind"] == "step")
    for key in ("step", "total_steps", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_s", "mem_rss"):
        assert key in step, key
    assert step["total_steps"] == 30 and step["tokens_per_s"] > 0


def test_start_event_has_settings_data_estimate_and_device(finished_run):
    start = events_of(finished_run)[0]
    assert start["device"] == "cpu"
    assert start["data"]["supervised_tokens"] > 0
    assert start["estimate"]["total_bytes"] > 0
    assert start["preset"]["model"]["source"] == "builtin:tiny-llama"
    # which kernels run, and why: packed rows per example on the CPU, the engine's loss, no Liger here
    assert start["attn_implementation"] == "sdpa_packed" and start["fused_kernels"] is False
    assert start["kernels"].startswith("SDPA per example (packed rows, no mask); engine's chunked loss")


def test_loss_falls_on_training_and_validation(finished_run):
    h = fold_history(read_events(finished_run))
    losses = [s.loss for s in h.steps]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    evals = [e.eval_loss for e in h.evals]
    assert len(evals) >= 3
    assert evals[-1] < evals[0]


def test_end_event_reports_peak_memory_next_to_the_estimate(finished_run):
    end = events_of(finished_run)[-1]
    assert end["peak_rss"] > 0
    assert end["estimate_total"] > 0 and end["estimate_reserved"] > 0
    assert Path(end["adapter"]) == finished_run / "adapter"


def test_adapter_loads_with_peft_and_generates(finished_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = finished_run / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(adapter)
    model = PeftModel.from_pretrained(base, adapter)
    ids = tok("### Instruction:\n", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]
    assert isinstance(tok.decode(out[0]), str)


def test_lora_weights_changed_and_base_weights_did_not(tmp_path, monkeypatch):
    """In process, with a callback that snapshots every parameter before and after training."""
    import gc

    import torch
    from transformers import TrainerCallback

    import engine.loss
    from engine.runs import create_run
    from engine.preset import load_preset
    from engine.train import run_training

    seen: dict = {}

    class Snapshot(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            seen["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
            seen["frozen_in_loop"] = gc.get_freeze_count()

        def on_train_end(self, args, state, control, model=None, **kw):
            seen["after"] = {n: p.detach().clone() for n, p in model.named_parameters()}
            seen["trainable"] = {n for n, p in model.named_parameters() if p.requires_grad}

    # The loss of every micro batch is the engine's own (engine.loss), not transformers'.
    calls = {"train": 0, "eval": 0}
    real_loss = engine.loss.causal_lm_loss

    def counted(*args, **kwargs):
        calls["train" if torch.is_grad_enabled() else "eval"] += 1
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(engine.loss, "causal_lm_loss", counted)
    preset = load_preset(write_preset(tmp_path, training__max_steps=8))
    run_dir = create_run(preset, tmp_path / "run")
    with thawed_heap():
        assert run_training(run_dir, callbacks=(Snapshot(),)) == 0
        # The collector skipped the heap built before the loop while it ran, and walks it again after.
        assert seen["frozen_in_loop"] > 10_000 and gc.get_freeze_count() == 0
    assert calls["train"] == 8 * preset.training.gradient_accumulation_steps and calls["eval"] > 0
    before, after, trainable = seen["before"], seen["after"], seen["trainable"]
    assert trainable and all("lora_" in n for n in trainable)
    changed = [n for n in trainable if not torch.equal(before[n], after[n])]
    assert len(changed) == len(trainable)
    frozen_changed = [n for n in before if n not in trainable and not torch.equal(before[n], after[n])]
    assert frozen_changed == []
    # The base really is 4-bit: bitsandbytes keeps NF4 weights packed in uint8.
    assert any(p.dtype == torch.uint8 for n, p in before.items() if "q_proj.base_layer" in n)


def test_packed_and_padded_batches_give_the_same_per_example_loss():
    """Padding-free packing must not let examples see each other (fp32, within 1e-5)."""
    import torch
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, DataCollatorWithFlattening

    from engine import data as data_mod
    from engine.demo import ensure_demo_model
    from engine.preset import load_preset

    preset = load_preset(DEMO)
    tok = data_mod.load_tokenizer(preset.model)
    prepared = data_mod.prepare_data(preset.data, tok, preset.training.seq_len, preset.training.seed)
    feats = [{"input_ids": prepared.train[i]["input_ids"], "labels": prepared.train[i]["labels"]} for i in range(6)]
    model = AutoModelForCausalLM.from_pretrained(ensure_demo_model(), dtype=torch.float32,
                                                 attn_implementation="sdpa")
    model.config.use_cache = False
    model.eval()

    def per_example(logits, labels, boundaries):
        logp = torch.log_softmax(logits.float(), -1)
        out = []
        for start, end in boundaries:
            lab = labels[start + 1:end]
            lp = logp[start:end - 1]
            mask = lab != -100
            out.append(-(lp[mask].gather(-1, lab[mask].unsqueeze(-1))).mean().item())
        return out

    with torch.no_grad():
        padded = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100, return_tensors="pt")(feats)
        logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        padded_losses = []
        for i, f in enumerate(feats):
            n = len(f["input_ids"])
            padded_losses += per_example(logits[i], padded["labels"][i], [(0, n)])

        packed = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)(feats)
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        bounds, start = [], 0
        for f in feats:
            bounds.append((start, start + len(f["input_ids"])))
            start += len(f["input_ids"])
        labels = torch.tensor([t for f in feats for t in f["labels"]])
        packed_losses = per_example(logits, labels, bounds)
    assert len(packed_losses) == 6
    for a, b in zip(padded_losses, packed_losses):
        assert math.isclose(a, b, abs_tol=1e-5), (padded_losses, packed_losses)


def test_packed_sdpa_on_the_cpu_matches_padded_batches_and_is_what_the_engine_loads():
    """The engine's per-example SDPA for packed rows: the same logits and gradients as padded batches."""
    import torch
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq

    from engine import data as data_mod
    from engine.demo import ensure_demo_model
    from engine.plan import plan_device
    from engine.preset import load_preset
    from engine.attention import PACKED_BOUNDS_KEY, PACKED_SDPA
    from engine.train import _attn_implementation, _collator

    preset = load_preset(DEMO)
    cpu = plan_device(preset, [])
    assert _attn_implementation(preset, cpu) == PACKED_SDPA
    tok = data_mod.load_tokenizer(preset.model)
    prepared = data_mod.prepare_data(preset.data, tok, preset.training.seq_len, preset.training.seed)
    feats = [{"input_ids": prepared.train[i]["input_ids"], "labels": prepared.train[i]["labels"]} for i in range(6)]

    def run(attn, batch):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(ensure_demo_model(), dtype=torch.float32,
                                                     attn_implementation=attn)
        model.config.use_cache = False
        out = model(**batch)
        out.loss.backward()
        return out, model.model.layers[0].self_attn.q_proj.weight.grad

    packed = _collator(preset, tok, cpu)(feats)
    assert "cu_seq_lens_q" in packed
    # the boundaries travel as ints: the kernel never reads them back from the device
    assert packed[PACKED_BOUNDS_KEY] == tuple(packed["cu_seq_lens_q"].tolist())
    out_p, grad_p = run(PACKED_SDPA, packed)
    padded = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100, return_tensors="pt")(feats)
    out_d, grad_d = run("sdpa", padded)
    start = 0
    for i, f in enumerate(feats):
        n = len(f["input_ids"])
        torch.testing.assert_close(out_p.logits[0, start:start + n], out_d.logits[i, :n], atol=1e-4, rtol=1e-4)
        start += n
    assert math.isclose(out_p.loss.item(), out_d.loss.item(), abs_tol=1e-5)
    torch.testing.assert_close(grad_p, grad_d, atol=1e-4, rtol=1e-3)


def _start_detached(tmp_path: Path, **overrides) -> Path:
    preset = write_preset(tmp_path, **overrides)
    run_dir = tmp_path / "run"
    r = run_cli("--preset", str(preset), "--run-dir", str(run_dir), "--detach")
    assert r.returncode == 0, r.stderr
    assert "qlora-wizard attach" in r.stdout
    return run_dir


def _steps(run_dir: Path) -> list[int]:
    return [e.step for e in read_events(run_dir) if e.kind == "step"]


def _pid(run_dir: Path) -> int:
    return json.loads((run_dir / "process.json").read_text())["pid"]


def test_kill_9_is_crashed_sigterm_is_stopped_and_each_resume_goes_on_where_the_run_left_off(tmp_path):
    """SIGKILL leaves a crashed run that resumes from its last checkpoint; SIGTERM checkpoints the step
    it is at and ends stopped; a resume then finishes. The step numbers run on, and nothing before a
    checkpoint is trained twice."""
    run_dir = _start_detached(tmp_path, training__max_steps=60, training__save_steps=10)
    wait_for(lambda: any(e.kind == "checkpoint" for e in read_events(run_dir)) and len(_steps(run_dir)) >= 13)
    os.kill(_pid(run_dir), signal.SIGKILL)
    wait_for(lambda: json.loads(run_cli("runs", "--runs-dir", str(tmp_path), "--json").stdout)[0]["status"]
             == "crashed", timeout=30)
    assert "crashed" in run_cli("runs", "--runs-dir", str(tmp_path)).stdout
    last_ckpt = max(e.step for e in read_events(run_dir) if e.kind == "checkpoint")

    r = run_cli("resume", str(run_dir), "--detach", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resuming {run_dir} from checkpoint-{last_ckpt}" in r.stdout
    wait_for(lambda: len(fold_history(read_events(run_dir)).resumes) == 1
             and _steps(run_dir)[-1] >= last_ckpt + 5 and _steps(run_dir)[-1] < 60)
    os.kill(_pid(run_dir), signal.SIGTERM)
    end = wait_for(lambda: fold_history(read_events(run_dir)).end)
    assert end.status == "stopped" and end.checkpoint and Path(end.checkpoint).is_dir()
    stopped_at = end.step
    assert Path(end.checkpoint).name == f"checkpoint-{stopped_at}"
    assert json.loads(run_cli("runs", "--runs-dir", str(tmp_path), "--json").stdout)[0]["status"] == "stopped"

    r = run_cli("resume", str(run_dir), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    h = fold_history(read_events(run_dir))
    assert [s.step for s in h.steps] == list(range(1, 61)) and h.end.status == "finished"
    assert [e.resumed_from_step for e in h.resumes] == [last_ckpt, stopped_at]
    # Each resumed process starts right after its checkpoint: the crashed run's steps past its last
    # checkpoint are trained again, once; the stopped run's checkpoint was the step it stopped at.
    raw = _steps(run_dir)
    restarts = [i for i in range(1, len(raw)) if raw[i] <= raw[i - 1]]
    assert len(restarts) == 1 and raw[restarts[0]:] == list(range(last_ckpt + 1, 61))


def test_malformed_dataset_line_is_named_before_any_model_loads(tmp_path):
    data = tmp_path / "bad.jsonl"
    good = json.dumps({"instruction": "Say hi", "input": "", "output": "hi"})
    data.write_text("\n".join([good, good, '{"instruction": "oops", "output": }', good]) + "\n")
    preset = write_preset(tmp_path, data__train=str(data))
    t0 = time.time()
    r = run_cli("--preset", str(preset), "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 2
    assert r.stderr.startswith(f"error: {data} line 3: invalid JSON")
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # refused before a run was even created
    assert time.time() - t0 < 30


def test_ctrl_c_on_the_headless_runner_stops_with_130(tmp_path):
    preset = write_preset(tmp_path, training__max_steps=200, training__save_steps=1000)
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "tui.cli", "--preset", str(preset), "--run-dir", str(run_dir)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (run_dir / "events.jsonl").exists() and len(_steps(run_dir)) >= 3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert "stopped at step" in out
    assert f"qlora-wizard resume {run_dir}" in out
    assert fold_history(read_events(run_dir)).end.status == "stopped"


def test_closing_the_follower_leaves_training_running(tmp_path):
    """A dropped SSH session kills the follower (SIGHUP/SIGKILL); the training process goes on."""
    preset = write_preset(tmp_path, training__max_steps=25)
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    follower = subprocess.Popen([sys.executable, "-m", "tui.cli", "--preset", str(preset), "--run-dir",
                                 str(run_dir)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for(lambda: (run_dir / "events.jsonl").exists() and len(_steps(run_dir)) >= 2)
    os.killpg(follower.pid, signal.SIGKILL)  # the whole terminal session goes away
    follower.wait()
    end = wait_for(lambda: fold_history(read_events(run_dir)).end)
    assert end.status == "finished"
    r = run_cli("attach", str(run_dir))
    assert r.returncode == 0
    assert "finished at step 25" in r.stdout


def test_a_non_finite_loss_stops_the_run_with_a_suggestion(tmp_path):
    """A NaN in the adapters (as a too-high learning rate produces) ends the run as failed, in words."""
    import torch
    from transformers import TrainerCallback

    from engine.preset import load_preset
    from engine.runs import create_run
    from engine.train import EXIT_FAILED, run_training

    class Poison(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            if state.global_step == 3:
                with torch.no_grad():
                    next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))

    run_dir = create_run(load_preset(write_preset(tmp_path, training__max_steps=20)), tmp_path / "run")
    assert run_training(run_dir, callbacks=(Poison(),)) == EXIT_FAILED
    h = fold_history(read_events(run_dir))
    assert h.end.status == "failed"
    assert h.end.message.startswith("the loss became non-finite at step 4; try a lower learning rate")
    assert [s.step for s in h.steps] == [1, 2, 3, 4]
    assert not (run_dir / "adapter").exists()


@contextmanager
def thawed_heap():
    """The heap unfrozen for a look at ``engine.collector``'s own freezing (a worker's conftest freezes
    its modules), and frozen again after as it was."""
    import gc

    frozen = gc.get_freeze_count() > 0
    gc.unfreeze()
    try:
        yield
    finally:
        gc.unfreeze()
        if frozen:
            gc.collect()
            gc.freeze()


def test_the_collector_looks_less_often_frees_garbage_before_a_loop_and_unfreezes_after_it_fails():
    """engine.collector: a process's young-generation threshold goes up to 20,000, a higher one or a
    switched-off collector is left alone; garbage is collected before the heap is frozen for a loop,
    and a loop that raises still unfreezes it."""
    import gc
    import weakref

    from engine.collector import YOUNG_THRESHOLD, fewer_collections, kept_while_training

    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        fewer_collections()
        assert gc.get_threshold() == (YOUNG_THRESHOLD, 10, 10)
        gc.set_threshold(50_000, 5, 5)
        fewer_collections()
        assert gc.get_threshold() == (50_000, 5, 5)
        gc.set_threshold(0, 10, 10)
        fewer_collections()
        assert gc.get_threshold() == (0, 10, 10)
    finally:
        gc.set_threshold(*before)

    class Node:
        pass

    def garbage_cycle() -> weakref.ref:
        cycle = Node()
        cycle.itself = cycle
        return weakref.ref(cycle)

    enabled = gc.isenabled()
    gc.disable()  # no collection of its own between a cycle's making and the loop's start
    try:
        with thawed_heap():
            gone = garbage_cycle()
            with pytest.raises(RuntimeError):
                with kept_while_training():
                    # Garbage that was already there is freed before the rest is frozen for the loop.
                    assert gone() is None and gc.get_freeze_count() > 0
                    raise RuntimeError("the loop failed")
            assert gc.get_freeze_count() == 0

            # A heap frozen by whoever runs the loop stays frozen after it, with nothing added (frozen
            # objects that reference counting frees leave it); garbage is still freed first.
            gc.freeze()
            theirs = gc.get_freeze_count()
            gone = garbage_cycle()
            with kept_while_training():
                assert gone() is None and 0 < gc.get_freeze_count() <= theirs
            assert 0 < gc.get_freeze_count() <= theirs
    finally:
        if enabled:
            gc.enable()


def test_relative_paths_in_a_preset_mean_the_callers_directory(tmp_path):
    """`data.train: train.jsonl` is the file beside the person, not beside qlora-wizard."""
    import shutil

    from engine.demo import DEMO_DATA_FILE

    work = tmp_path / "project"
    work.mkdir()
    shutil.copy(DEMO_DATA_FILE, work / "train.jsonl")
    preset = write_preset(work, data__train="train.jsonl", training__max_steps=3)
    r = run_cli("--preset", preset.name, "--run-dir", "myrun", cwd=work)
    assert r.returncode == 0, r.stdout + r.stderr
    saved = yaml.safe_load((work / "myrun" / "preset.yaml").read_text())
    assert saved["data"]["train"] == str(work / "train.jsonl")
