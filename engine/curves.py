"""Reading learning curves: the guide's diagnosis of underfitting, overfitting and a good fit.

From the guide the project follows:
- Underfit: training loss flat, or still falling steadily at the end of training.
- Overfit: training loss keeps falling while validation loss reaches a minimum and then rises;
  the minimum is where training should have stopped.
- Good fit: both fall to a plateau with a small gap between them (validation a little above
  training).

Pure functions over (step, loss) points; no torch, no UI.
"""

from __future__ import annotations

from dataclasses import dataclass

RISE_FRACTION = 0.02
"""Validation loss this far (2 %) above its minimum, at the end, counts as rising: smaller moves
are noise between evaluations of a few hundred examples."""

FALLING_FRACTION = 0.03
"""Training loss that fell more than 3 % over the last quarter of training is still falling."""

FLAT_FRACTION = 0.02
"""Training loss that moved less than 2 % from the first to the last quarter never learned."""

MIN_EVALS = 3
"""Fewer validation points than this say nothing about a trend."""


@dataclass(frozen=True)
class Diagnosis:
    """What the curves say, in words."""

    verdict: str
    """``overfitting``, ``underfitting``, ``good fit`` or ``too early to tell``."""
    message: str
    """One or two sentences for a person."""
    best_step: int | None = None
    """The step with the lowest validation loss (where an overfitting run should have stopped)."""


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def diagnose(train: list[tuple[int, float]], validation: list[tuple[int, float]]) -> Diagnosis:
    """The guide's diagnosis from training and validation losses, each a list of (step, loss)."""
    if len(validation) < MIN_EVALS or len(train) < 8:
        return Diagnosis("too early to tell", "the diagnosis needs at least three validation losses")
    best_step, best = min(validation, key=lambda p: p[1])
    last_val = validation[-1][1]
    quarter = max(2, len(train) // 4)
    first_q = _mean([l for _, l in train[:quarter]])
    last_q = _mean([l for _, l in train[-quarter:]])
    prev_q = _mean([l for _, l in train[-2 * quarter:-quarter]]) if len(train) >= 2 * quarter else first_q

    if best_step != validation[-1][0] and last_val > best * (1 + RISE_FRACTION) and last_q <= prev_q:
        return Diagnosis(
            "overfitting",
            f"validation loss was lowest at step {best_step} ({best:.4f}) and has risen to {last_val:.4f} "
            f"while training loss kept falling: the checkpoint nearest step {best_step} is the one to keep; "
            f"train fewer steps or on more data next time",
            best_step,
        )
    if abs(first_q - last_q) <= FLAT_FRACTION * first_q:
        return Diagnosis(
            "underfitting",
            "training loss stayed flat: the adapters are not learning; try a higher learning rate, a larger "
            "rank or more target layers",
            best_step,
        )
    if prev_q - last_q > FALLING_FRACTION * prev_q:
        return Diagnosis(
            "underfitting",
            "training loss is still falling steadily at the end: more steps (or epochs) would help",
            best_step,
        )
    gap = last_val - last_q
    return Diagnosis(
        "good fit",
        f"training and validation loss both levelled off with a small gap ({gap:+.3f})",
        best_step,
    )


def diagnose_history(history) -> Diagnosis | None:
    """The diagnosis of a run's history (``engine.events.RunHistory``), once it has validation losses;
    NaN losses (a diverged run) are left out."""
    from engine.events import finite

    if not history.evals:
        return None
    return diagnose([(s.step, v) for s in history.steps if (v := finite(s.loss)) is not None],
                    [(e.step, v) for e in history.evals if (v := finite(e.eval_loss)) is not None])
