"""The guide's learning-rate rule, its arithmetic, the sourced family table and the LoRA note; for
dpo and orpo, whose loss is not a cross-entropy over supervised tokens, the methods' published rates
in place of the rule, in the hyperparameters step's view and in ``qlora-wizard lr``."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from conftest import run_cli, write_preset
from engine.demo import DEMO_PRESET
from engine.errors import UserError
from engine.lr import (LORA_LR_BAND, family_defaults, note_on_lora_range, note_on_rate, preference_advice,
                       suggest_learning_rate)


def test_the_guides_worked_example():
    s = suggest_learning_rate(5e-5, 2_000_000, 350, 1, 4_000_000)
    assert f"{s.learning_rate:.3g}" == "1.89e-06"
    assert s.arithmetic == "5e-05 x sqrt(2,000,000 / (350 / 1) / 4,000,000) = 1.89e-06"
    assert s.tokens_per_step == pytest.approx(2_000_000 / 350)
    assert s.to_json()["learning_rate"] == s.learning_rate


def test_epochs_divide_the_steps_not_the_tokens():
    # Three passes of 350 steps each over the same 2M supervised tokens: the same tokens per step.
    one = suggest_learning_rate(5e-5, 2_000_000, 350, 1, 4_000_000)
    three = suggest_learning_rate(5e-5, 2_000_000, 1050, 3, 4_000_000)
    assert three.learning_rate == pytest.approx(one.learning_rate)
    assert "(1,050 / 3)" in three.arithmetic


def test_square_root_scaling():
    base = suggest_learning_rate(3e-4, 1_000_000, 100, 1, 4_000_000).learning_rate
    quadruple = suggest_learning_rate(3e-4, 4_000_000, 100, 1, 4_000_000).learning_rate
    assert quadruple == pytest.approx(2 * base)
    # a fine-tuning batch as large as the pretraining batch keeps the base rate
    assert suggest_learning_rate(3e-4, 400_000_000, 100, 1, 4_000_000).learning_rate == pytest.approx(3e-4)


def test_fractional_epochs_and_token_counts_are_written_out():
    s = suggest_learning_rate(3e-4, 1_234_567.5, 200, 2.5, 4_000_000)
    assert "sqrt(1,234,567.5 / (200 / 2.5) / 4,000,000)" in s.arithmetic
    assert "/ 2.5)" in s.arithmetic
    assert s.learning_rate == pytest.approx(3e-4 * math.sqrt(1_234_567.5 / (200 / 2.5) / 4_000_000))


@pytest.mark.parametrize("args", [
    (0, 2_000_000, 350, 1, 4_000_000),
    (-5e-5, 2_000_000, 350, 1, 4_000_000),
    (5e-5, 0, 350, 1, 4_000_000),
    (5e-5, 2_000_000, 0, 1, 4_000_000),
    (5e-5, 2_000_000, 350, 0, 4_000_000),
    (5e-5, 2_000_000, 350, 1, 0),
    (5e-5, 2_000_000, 350, 1, None),
    (5e-5, float("nan"), 350, 1, 4_000_000),
    (5e-5, 2_000_000, float("inf"), 1, 4_000_000),
    ("5e-5", 2_000_000, 350, 1, 4_000_000),
    (5e-5, 2_000_000, True, 1, 4_000_000),
])
def test_bad_inputs_raise_user_error(args):
    with pytest.raises(UserError):
        suggest_learning_rate(*args)


def test_family_table_holds_only_sourced_values():
    llama = family_defaults("llama")
    assert (llama.base_lr, llama.pretrained_batch_tokens) == (3e-4, 4_000_000)
    assert "Llama 2" in llama.source and "Table 1" in llama.source
    mistral = family_defaults("Mistral")
    assert (mistral.base_lr, mistral.pretrained_batch_tokens) == (5e-5, 4_000_000)
    assert "guide" in mistral.source
    for unknown in ("qwen2", "gemma", "gemma2", "mixtral", "gpt2", "", None):
        assert family_defaults(unknown) is None


def test_llama_rate_depends_on_size():
    assert family_defaults("llama", 8_030_261_248).base_lr == 3e-4
    big = family_defaults("llama", 70_553_706_496)
    assert (big.base_lr, big.pretrained_batch_tokens) == (1.5e-4, 4_000_000)
    huge = family_defaults("llama", 405_000_000_000)
    assert huge.base_lr == 8e-5 and huge.pretrained_batch_tokens is None  # no single batch: ask
    assert "8e-5" in huge.source


def test_the_guides_mistral_example_through_the_table():
    d = family_defaults("mistral")
    s = suggest_learning_rate(d.base_lr, 2_000_000, 350, 1, d.pretrained_batch_tokens)
    assert f"{s.learning_rate:.3g}" == "1.89e-06"


def test_note_on_lora_range():
    low, high = LORA_LR_BAND
    assert note_on_lora_range(2e-4) is None
    assert note_on_lora_range(low) is None and note_on_lora_range(high) is None
    below = note_on_lora_range(1.89e-6)
    assert below and "full fine-tuning" in below and "1.89e-06" in below
    above = note_on_lora_range(3e-3)
    assert above and "above" in above
    with pytest.raises(UserError):
        note_on_lora_range(0)


# ---------------------------------------------------------------------------------------------
# dpo and orpo: the published rates instead of the rule


def test_preference_methods_get_their_published_rates_with_sources():
    assert preference_advice("sft") is None  # the rule's method
    dpo = preference_advice("dpo")
    assert dpo.learning_rate == 5e-6 and dpo.band == (5e-7, 5e-6)
    assert "TRL's DPO script" in dpo.source and "alignment-handbook" in dpo.source
    assert "DPO paper" in dpo.band_source and "1e-6" in dpo.band_source
    orpo = preference_advice("orpo")
    assert orpo.learning_rate == 8e-5 and orpo.band == (5e-6, 8e-5)
    assert "TRL's ORPO example" in orpo.source and "xfactlab/orpo" in orpo.band_source
    for advice in (dpo, orpo):
        low, high = advice.band
        assert low <= advice.learning_rate <= high
        assert advice.rule.startswith("the guide's rule is for supervised tokens")
        assert "0.1" in advice.beta
        assert advice.to_json()["range"] == [low, high] and advice.to_json()["method"] == advice.method
    assert "reference" in dpo.beta and "lambda" in orpo.beta


def test_a_preference_rate_outside_the_published_ones_gets_its_own_note():
    assert note_on_rate("dpo", 5e-6) is None and note_on_rate("dpo", 1e-6) is None
    above = note_on_rate("dpo", 2e-4)  # LoRA's sft rate is far too high for dpo
    assert above and "above the 5e-07 to 5e-06 that published dpo runs used" in above and "5e-06" in above
    below = note_on_rate("orpo", 1e-6)
    assert below and "below the 5e-06 to 8e-05 that published orpo runs used" in below and "8e-05" in below
    assert note_on_rate("orpo", 8e-5) is None
    # sft keeps LoRA's band
    assert note_on_rate("sft", 2e-4) is None and note_on_rate("sft", 3e-3) == note_on_lora_range(3e-3)
    with pytest.raises(UserError):
        note_on_rate("dpo", 0)


def _view_draft(method: str):
    """The demo draft with ``method`` and checked-data figures of its own (no model, no tokenizing)."""
    from tui.draft import DataReport, load_draft

    draft = load_draft(DEMO_PRESET)
    draft.set_many({"training.method": method, "training.max_steps": None, "training.epochs": 1.0,
                    "model.base_lr": 3e-4, "model.pretrained_batch_tokens": 4_000_000})
    draft.data = DataReport(stats=SimpleNamespace(examples=160, supervised_tokens=20_000), examples=[])
    return draft


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_the_hyperparameters_view_gives_a_preference_methods_rates_not_the_rule(method):
    from tui.steps.hyper import advice_lines, lr_view

    view = lr_view(_view_draft(method))
    assert view.method == method and view.advice == preference_advice(method)
    assert view.suggestion is None and view.missing is None  # the rule is not offered as the rate
    assert view.suggested_rate == preference_advice(method).learning_rate
    assert view.steps_per_epoch == 10 and view.steps == 10  # the batch's figures are still the data's
    lines = "\n".join(words for words, _ in advice_lines(view.advice))
    assert f"learning rate for {method}: the guide's rule is not used" in lines
    assert "the guide's rule is for supervised tokens" in lines and "published" in lines and "beta" in lines


def test_the_hyperparameters_view_for_sft_is_the_rule():
    from tui.steps.hyper import lr_view

    view = lr_view(_view_draft("sft"))
    assert view.method == "sft" and view.advice is None
    assert view.suggestion.learning_rate == pytest.approx(3e-4 * math.sqrt(20_000 / 10 / 4_000_000))
    assert view.suggested_rate == view.suggestion.learning_rate


@pytest.mark.parametrize("method,rate,source", [("dpo", "5e-06", "TRL's DPO script"),
                                                ("orpo", "8e-05", "TRL's ORPO example")])
def test_lr_for_a_preference_preset_prints_the_methods_rates(tmp_path, method, rate, source):
    preset = write_preset(tmp_path, training__method=method, training__learning_rate=2e-4)
    r = run_cli("lr", "--preset", str(preset), "--steps", "10")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith(f"learning rate for {method}: {rate} (suggested for LoRA)")
    assert "the guide's rule is for supervised tokens" in out and f"source: {source}" in out
    assert "lr = base_lr" not in out and "--steps: the rule's numbers, not used" in out
    assert "note: 0.0002 is above" in out and f"published {method} runs" in out
    r = run_cli("lr", "--preset", str(preset), "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data == {**preference_advice(method).to_json(), "beta": 0.1, "chosen_learning_rate": 2e-4,
                    "note": note_on_rate(method, 2e-4)}
    assert data["method"] == method and data["learning_rate"] == float(rate)


def test_lr_json_names_the_method_for_the_rule_too():
    r = run_cli("lr", "--base-lr", "5e-5", "--supervised-tokens", "2000000", "--steps", "350",
                "--pretrained-batch-tokens", "4000000", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["method"] == "sft" and f"{data['learning_rate']:.3g}" == "1.89e-06"
