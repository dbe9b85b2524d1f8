"""Preference tuning (training.method dpo, orpo) end to end on the CPU: the demo pairs, TRL's loss,
the engine's process, events, checkpoints, stop and resume, as a person runs it (``--preset``,
``stop``, ``resume``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli, wait_for, write_preset
from engine.events import fold_history, read_events

PAIRS = dict(data__train="builtin:demo-pairs", data__validation_split=0.1, training__learning_rate=5e-4,
             training__micro_batch_size=4, training__gradient_accumulation_steps=1, training__seq_len=128,
             training__logging_steps=1)
"""The demo's pairs at a rate the tiny demo model moves at within a few steps, 40 of them held out."""


def _steps(run_dir: Path) -> list:
    return [e for e in read_events(run_dir) if e.kind == "step"]


def test_dpo_trains_on_the_demo_pairs_stops_resumes_and_keeps_only_its_adapter(tmp_path):
    preset = write_preset(tmp_path, training__method="dpo", training__max_steps=16, training__eval_steps=8,
                          training__save_steps=1000, **PAIRS)
    run_dir = tmp_path / "run"
    r = run_cli("--preset", str(preset), "--run-dir", str(run_dir), "--detach")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: len(_steps(run_dir)) >= 3 or fold_history(read_events(run_dir)).end)
    r = run_cli("stop", str(run_dir), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    end = wait_for(lambda: fold_history(read_events(run_dir)).end)
    assert end.status == "stopped" and Path(end.checkpoint).name == f"checkpoint-{end.step}"
    stopped_at = end.step

    r = run_cli("resume", str(run_dir), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    h = fold_history(read_events(run_dir))
    assert h.end.status == "finished" and [s.step for s in h.steps] == list(range(1, 17))
    assert h.resumes[0].resumed_from_step == stopped_at
    start = h.start
    assert start.method == "dpo" and start.reference == "each_step"  # 16 x 4 pairs: less than one pass
    assert start.data.examples > 100
    # Every step carries the preference figures TRL computed; the model learns to prefer the chosen answers.
    assert all(s.reward_margin is not None and s.reward_accuracy is not None for s in h.steps)
    assert all(s.tokens and s.tokens > 0 for s in h.steps)
    last = h.evals[-1]
    assert last.step == 16 and last.eval_reward_margin > 0 and last.eval_reward_accuracy >= 0.6
    # The follower says it in words.
    assert "DPO (reference each step) of builtin:tiny-llama" in r.stdout
    assert "margin +" in r.stdout and "pref acc" in r.stdout and "preference accuracy" in r.stdout
    # The adapter is the trained one alone: TRL's frozen reference copy is not written beside it.
    adapter = run_dir / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "ref").exists()
    assert not (run_dir / "checkpoints" / "README.md").exists()
    # eval scores the held-out pairs with both models: the tuned one prefers the chosen answers more often.
    r = run_cli("eval", str(run_dir), "--generations", "1", "--json")
    assert r.returncode == 0, r.stderr
    prefs = json.loads(r.stdout)["preferences"]
    assert prefs["pairs"] == start.data.validation_examples > 0 and prefs["beta"] == 0.1
    assert prefs["fine_tuned_accuracy"] > prefs["base_accuracy"] and prefs["reward_accuracy"] >= 0.6, prefs
    assert prefs["reward_margin"] > 0
    r = run_cli("eval", str(run_dir), "--generations", "0")
    assert "chosen answer likelier than rejected" in r.stdout and "validation pairs" in r.stdout
    # Its card names the method and the preference accuracy reached.
    r = run_cli("card", str(run_dir))
    assert r.returncode == 0, r.stderr
    card = (run_dir / "README.md").read_text()
    assert "trained with QLoRA by Direct Preference Optimization (DPO)" in card
    assert "- method: Direct Preference Optimization (DPO) on TRL's trainer, beta 0.1, loss sigmoid" in card
    assert "final preference accuracy on the validation pairs: " in card


def test_orpo_trains_without_a_reference_stops_resumes_and_evaluates_with_its_own_reward(tmp_path):
    # 30 steps: after its first (slow) steps an orpo step of the demo takes a fraction of a second, and the
    # stop must reach the run before it ends.
    preset = write_preset(tmp_path, training__method="orpo", training__max_steps=30, training__eval_steps=30,
                          training__save_steps=1000, **PAIRS)
    run_dir = tmp_path / "run"
    r = run_cli("--preset", str(preset), "--run-dir", str(run_dir), "--detach")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: _steps(run_dir) or fold_history(read_events(run_dir)).end)  # its first steps are its slowest
    r = run_cli("stop", str(run_dir), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    end = wait_for(lambda: fold_history(read_events(run_dir)).end)
    assert end.status == "stopped" and Path(end.checkpoint).name == f"checkpoint-{end.step}" and end.step < 30

    r = run_cli("resume", str(run_dir), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    h = fold_history(read_events(run_dir))
    assert h.end.status == "finished" and [s.step for s in h.steps] == list(range(1, 31))
    assert h.resumes[0].resumed_from_step == end.step
    assert h.start.method == "orpo" and h.start.reference is None
    # Every step carries ORPO's supervised part and its rewards (beta x the chosen and rejected answers'
    # mean log-probability per token: no reference model).
    assert all(s.nll_loss is not None and s.reward_accuracy is not None and s.reward_margin is not None
               and s.rewards_chosen < 0 and s.rewards_rejected < 0 for s in h.steps)
    last = h.evals[-1]
    assert last.step == 30 and last.eval_reward_accuracy is not None
    assert "ORPO of builtin:tiny-llama" in r.stdout
    # eval scores the held-out pairs with both models, and the reward as ORPO's own: the fine-tuned
    # model's, measured as the run measured it on the same pairs.
    r = run_cli("eval", str(run_dir), "--generations", "0", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    prefs = out["preferences"]
    assert prefs["pairs"] == h.start.data.validation_examples > 0 and prefs["beta"] == 0.1
    assert prefs["method"] == "orpo" and 0 <= prefs["base_accuracy"] <= 1 and 0 <= prefs["fine_tuned_accuracy"] <= 1
    assert prefs["reward_accuracy"] == pytest.approx(last.eval_reward_accuracy, abs=0.05), (prefs, last)
    assert prefs["reward_margin"] == pytest.approx(last.eval_reward_margin, abs=2e-3), (prefs, last)
    # Its supervised part lowered the loss of the chosen answers (the losses eval reports for pairs).
    assert out["fine_tuned"]["loss"] < out["base"]["loss"], out
    r = run_cli("eval", str(run_dir), "--generations", "0")
    assert "reward accuracy (orpo's, the fine-tuned model's)" in r.stdout, r.stdout


def test_dpo_on_supervised_data_and_sft_on_pairs_are_one_line_each(tmp_path):
    for method, data, said in (("dpo", "builtin:demo", "training.method dpo trains on pairs"),
                               ("sft", "builtin:demo-pairs", "training.method sft trains on single responses")):
        preset = write_preset(tmp_path, training__method=method, data__train=data)
        r = run_cli("--preset", str(preset), "--run-dir", str(tmp_path / f"run-{method}"))
        assert r.returncode == 2 and r.stderr.startswith("error: ") and said in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / f"run-{method}").exists()


def test_a_start_event_says_the_method_and_an_older_one_reads_as_sft():
    from engine.events import parse_event

    dpo = parse_event({"kind": "start", "time": 1.0, "method": "dpo", "reference": "precomputed"})
    assert (dpo.method, dpo.reference) == ("dpo", "precomputed")
    assert parse_event(json.loads(json.dumps(dpo.to_json()))) == dpo
    older = parse_event({"kind": "start", "time": 1.0})
    assert (older.method, older.reference) == ("sft", None)
