"""The guide's learning-rate rule, its arithmetic, the sourced family table and the LoRA note."""

from __future__ import annotations

import math

import pytest

from engine.errors import UserError
from engine.lr import LORA_LR_BAND, family_defaults, note_on_lora_range, suggest_learning_rate


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
