"""The benchmark's TRL baseline (``benchmarks/bench.py --baseline trl``): the baselines it accepts, its
summary against several baselines, and that TRL's padding-free SFTTrainer trains what the plain
recipe trains (the same labels, real tokens and per-step losses) on a tiny random model; and the
plumbing of ``--method dpo`` (its pairs, its one baseline, its tables) against TRL's DPOTrainer."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import ROOT


def _bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "benchmarks" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_baselines_are_plain_trl_or_both_in_order():
    bench = _bench()
    assert bench.parse_baselines("plain") == ["plain"]
    assert bench.parse_baselines("trl") == ["trl"]
    assert bench.parse_baselines("plain,trl") == ["plain", "trl"]
    assert bench.parse_baselines(" trl , plain,trl") == ["trl", "plain"]
    for bad in ("", "hf", "plain,unsloth"):
        with pytest.raises(Exception, match="baselines are plain, trl"):
            bench.parse_baselines(bad)


def _run(tokens_per_s: float, peak: int, losses: list[float], tokens: list[int], padded: list[int]) -> dict:
    steps = [{"step": i + 1, "loss": lo, "tokens": t, "padded": p}
             for i, (lo, t, p) in enumerate(zip(losses, tokens, padded))]
    return {"tokens_per_s": tokens_per_s, "peak_rss": peak, "steps": steps}


def test_summary_gives_the_engine_against_each_baseline():
    bench = _bench()
    tokens = [100, 120]
    results = {
        "plain": [_run(1000, 4 * 2**30, [2.0, 1.5], tokens, [200, 200]),
                  _run(1200, 4 * 2**30, [2.0, 1.5], tokens, [200, 200])],
        "trl": [_run(2000, 2 * 2**30, [2.0, 1.501], tokens, tokens),
                _run(2000, 2 * 2**30, [2.0, 1.501], tokens, tokens)],
        "engine": [_run(4400, 2**30, [2.0, 1.5], tokens, tokens),
                   _run(4400, 2**30, [2.0, 1.5], tokens, tokens)],
    }
    s = bench.summarize(results, ["plain", "trl"], cuda=False)
    assert s["throughput_ratios"] == pytest.approx({"plain": 4.0, "trl": 2.2})
    assert s["throughput_ratio"] == pytest.approx(4.0)  # the first baseline, as a plain-only run wrote it
    assert s["peak_rss"]["ratios"] == pytest.approx({"plain": 0.25, "trl": 0.5})
    assert s["final_loss"]["max_step_diffs"] == pytest.approx({"plain": 0.0, "trl": 0.001})
    assert s["same_tokens"] == {"plain": True, "trl": True}
    assert s["padding_shares"] == pytest.approx({"plain": 180 / 400, "trl": 0.0})

    table = bench.results_table(s, ["plain", "trl"], cuda=False, steps=2)
    lines = table.splitlines()
    assert lines[0] == "|  | plain recipe | TRL SFTTrainer | engine |"
    assert "| engine / this, throughput | **4.00x** | **2.20x** |  |" in lines
    assert "| engine / this, peak RSS | **0.25** | **0.50** |  |" in lines


@pytest.mark.slow
def test_trl_trains_the_same_tokens_and_losses_as_the_plain_recipe(tmp_path):
    """Both workers, as bench.py runs them, on a random 4-layer demo model: 3 optimizer steps of
    micro batch 4 on prompt-masked examples. TRL flattens each micro batch (no padding), the plain
    recipe pads; the real tokens per step and the losses must agree."""
    pytest.importorskip("trl")
    import datasets
    from transformers import AutoTokenizer

    from engine.demo import build_demo_model

    bench = _bench()
    model_dir = tmp_path / "model"
    build_demo_model(model_dir, pretrain_steps=0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids, labels = [], []
    for r in bench.make_records(12, longest=200):
        prompt = tok(f"### Instruction:\n{r['instruction']}\n\n### Response:\n", add_special_tokens=False).input_ids
        answer = tok(r["output"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        ids.append([tok.bos_token_id, *prompt, *answer])
        labels.append([-100] * (1 + len(prompt)) + answer)
    datasets.Dataset.from_dict({"input_ids": ids, "labels": labels}).save_to_disk(str(tmp_path / "tokenized"))
    spec = {
        "model": str(model_dir), "tokenized": str(tmp_path / "tokenized"), "seed": 42, "gradient_checkpointing": True,
        "lora_r": 8, "lora_alpha": 16, "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"],
        "micro_batch_size": 4, "steps": 3, "learning_rate": 2e-3, "lr_scheduler": "cosine", "warmup_ratio": 0.05,
        "output_dir": str(tmp_path / "out"), "trl_bf16_adapters": False,
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    runs = {}
    for worker in ("plain", "trl"):  # in this process (bench.py starts one each): the imports once
        out = tmp_path / f"{worker}.json"
        assert bench.main(["--worker", worker, "--spec", str(tmp_path / "spec.json"), "--out", str(out)]) == 0
        runs[worker] = json.loads(out.read_text())

    plain, trl = runs["plain"]["steps"], runs["trl"]["steps"]
    assert [s["step"] for s in trl] == [1, 2, 3]
    assert [s["tokens"] for s in trl] == [s["tokens"] for s in plain]
    assert all(s["padded"] == s["tokens"] for s in trl)  # padding-free
    assert sum(s["padded"] for s in plain) > sum(s["tokens"] for s in plain)  # the plain recipe pads
    # fp32 adapters on both sides: 5e-7 apart here; TRL's bf16 adapters were 2e-5 apart by step 3.
    for a, b in zip(plain, trl):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
    assert runs["trl"]["adapter_dtype_from_trl"] == ["torch.bfloat16"]  # TRL's own cast, undone for the run
    assert runs["trl"]["adapter_dtype_trained"] == ["torch.float32"]


def test_dpo_pairs_are_deterministic_and_fit_the_sequence_uncut():
    bench = _bench()
    pairs = bench.make_pairs(50, 128)
    assert pairs == bench.make_pairs(50, 128) and len(pairs) == 50
    for i, p in enumerate(pairs):
        assert set(p) == {"prompt", "chosen", "rejected"} and p["prompt"].startswith(f"{i}: ")
        assert p["chosen"] != p["rejected"] and p["prompt"].endswith("\n")
        # BOS + prompt + the longer answer + EOS, one token a character with the demo tokenizer
        assert 1 + len(p["prompt"]) + max(len(p["chosen"]), len(p["rejected"])) + 1 <= 128
    lengths = [len(p["prompt"]) + len(p["chosen"]) for p in pairs]
    assert min(lengths) < 60 and max(lengths) > 90  # spread, as real pairs are
    assert any(len(p["chosen"]) < len(p["rejected"]) for p in pairs)  # either side the longer


def test_dpo_runs_against_trls_dpotrainer_only(capsys):
    bench = _bench()
    for argv in (["--method", "dpo", "--baseline", "plain"], ["--method", "dpo", "--baseline", "plain,trl"],
                 ["--method", "dpo", "--engine-full-loss"]):
        with pytest.raises(SystemExit) as exc:
            bench.main(argv)
        assert exc.value.code == 2
        assert "--method dpo runs against --baseline trl only" in capsys.readouterr().err
    assert bench.PREFERENCE_WORKERS == {"trl": bench.trl_dpo_worker}


def test_dpo_summary_tables_put_the_losses_and_rewards_side_by_side():
    bench = _bench()
    tokens = [300, 280, 310]

    def run(tps, losses, margins):
        r = _run(tps, 2**30, losses, tokens, [360, 330, 360])
        for s, m in zip(r["steps"], margins):
            s.update(reward_margin=m, reward_accuracy=0.5)
        return r

    results = {"trl": [run(1000, [0.693147, 0.693147, 0.64], [0.0, 0.0, 0.11])] * 2,
               "engine": [run(1100, [0.693147, 0.693147, 0.64003], [0.0, 0.0, 0.1101])] * 2}
    s = bench.summarize(results, ["trl"], cuda=False)
    assert s["throughput_ratios"] == pytest.approx({"trl": 1.1})
    assert s["final_loss"]["first_step_diffs"] == {"trl": 0.0}
    assert s["final_loss"]["max_step_diffs"] == pytest.approx({"trl": 3e-5})
    table = bench.results_table(s, ["trl"], cuda=False, steps=3, method="dpo").splitlines()
    assert table[0] == "|  | TRL DPOTrainer | engine |"
    assert "| loss difference from the engine at step 1 | 0.0e+00 |  |" in table
    assert "| padding computed | 15% | the same (TRL's collator) |" in table
    # sft's table is as it was: no step-1 row
    assert not any("at step 1" in line for line in bench.results_table(s, ["trl"], cuda=False, steps=3).splitlines())

    losses = bench.loss_table(results, ["trl"]).splitlines()
    assert losses[0] == ("| step | trl loss | engine loss | trl - engine | trl margin | engine margin "
                         "| trl accuracy | engine accuracy |")
    assert losses[4] == "| 3 | 0.640000 | 0.640030 | -3.0e-05 | +0.11000 | +0.11010 | 0.500 | 0.500 |"
