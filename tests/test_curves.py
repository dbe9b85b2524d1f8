"""The guide's learning-curve diagnosis, on curves shaped like the three cases it describes."""

from __future__ import annotations

import math

from engine.curves import diagnose


def curve(fn, steps=100):
    return [(s, fn(s)) for s in range(1, steps + 1)]


def evals(fn, every=10, steps=100):
    return [(s, fn(s)) for s in range(every, steps + 1, every)]


def test_overfitting_names_the_step_with_the_lowest_validation_loss():
    train = curve(lambda s: 3.0 * math.exp(-s / 30) + 0.2)
    val = evals(lambda s: 1.0 + 0.0004 * (s - 40) ** 2)  # minimum at step 40, then rising
    d = diagnose(train, val)
    assert d.verdict == "overfitting"
    assert d.best_step == 40
    assert "lowest at step 40" in d.message


def test_still_falling_at_the_end_is_underfitting():
    train = curve(lambda s: 4.0 - 0.02 * s)
    val = evals(lambda s: 4.1 - 0.02 * s)
    d = diagnose(train, val)
    assert d.verdict == "underfitting" and "still falling" in d.message


def test_flat_training_loss_is_underfitting():
    d = diagnose(curve(lambda s: 2.0 + 0.001 * math.sin(s)), evals(lambda s: 2.05))
    assert d.verdict == "underfitting" and "flat" in d.message


def test_both_plateau_with_a_small_gap_is_a_good_fit():
    train = curve(lambda s: 2.0 * math.exp(-s / 10) + 1.0)
    val = evals(lambda s: 2.0 * math.exp(-s / 10) + 1.05)
    d = diagnose(train, val)
    assert d.verdict == "good fit"


def test_too_few_validation_points():
    assert diagnose(curve(lambda s: 1.0), evals(lambda s: 1.0, every=50)).verdict == "too early to tell"
