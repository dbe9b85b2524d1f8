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


EXPLODED_LOG_RATIO = 50.0
"""A reward margin of more than this many nats (margin / beta: how much likelier the model makes the
chosen answer than the rejected one, beyond the reference) means the rejected answers are being
driven towards probability zero: the loss is near zero and tells nothing more."""

CHANCE_ACCURACY = 0.55
"""Preference accuracy at or below this (over the last quarter of the steps) is chance: the model
does not tell the chosen answer from the rejected one."""

FALLING_REWARD = 0.05
"""Chosen rewards this far below zero, and lower than over the first quarter of the steps, are
falling: the chosen answers become less likely than under the reference."""


def diagnose_preferences(steps: list[tuple[int, float, float, float, float]], beta: float) -> Diagnosis:
    """DPO's and ORPO's failure signs from the step events' figures, each (step, margin, accuracy,
    chosen reward, rejected reward): margins that explode, accuracy stuck at chance, chosen rewards
    falling along with the rejected ones; else a good sign."""
    if len(steps) < 8:
        return Diagnosis("too early to tell", "the preference diagnosis needs at least eight logged steps")
    quarter = max(2, len(steps) // 4)
    first, last = steps[:quarter], steps[-quarter:]
    margin = _mean([m for _, m, _, _, _ in last])
    accuracy = _mean([a for _, _, a, _, _ in last])
    chosen_first, chosen_last = _mean([c for _, _, _, c, _ in first]), _mean([c for _, _, _, c, _ in last])
    rejected_last = _mean([r for _, _, _, _, r in last])
    if margin / max(beta, 1e-12) > EXPLODED_LOG_RATIO:
        return Diagnosis(
            "margins exploding",
            f"the reward margin reached {margin:.2f} (beta {beta:g}: {margin / beta:.0f} nats): the rejected answers "
            f"are being pushed towards probability zero and the loss has nothing left to teach; keep an earlier "
            f"checkpoint, lower the learning rate, or raise beta",
        )
    if accuracy <= CHANCE_ACCURACY:
        return Diagnosis(
            "accuracy at chance",
            f"preference accuracy is {accuracy:.0%} over the last steps, no better than a coin: the model does not "
            f"tell the chosen answers from the rejected ones; check that chosen and rejected differ in what you "
            f"want taught, raise the learning rate, or train longer",
        )
    if chosen_last < -FALLING_REWARD and chosen_last < chosen_first and rejected_last < chosen_last:
        return Diagnosis(
            "chosen rewards falling",
            f"the chosen answers' reward fell to {chosen_last:+.3f} while the rejected ones' fell faster "
            f"({rejected_last:+.3f}): the margin grows because both answers become less likely, a known DPO "
            f"failure; lower the learning rate, raise beta, or use orpo (which also trains on the chosen answers)",
        )
    return Diagnosis(
        "learning the preference",
        f"preference accuracy {accuracy:.0%} and a reward margin of {margin:+.3f} over the last steps, the chosen "
        f"answers' reward {chosen_last:+.3f}",
    )


def diagnose_history(history) -> Diagnosis | None:
    """The diagnosis of a run's history (``engine.events.RunHistory``): for dpo and orpo the
    preference figures' (``diagnose_preferences``), once there are eight logged steps; else the loss
    curves' (``diagnose``), once there are validation losses. NaN losses (a diverged run) are left out."""
    from engine.events import finite

    start = history.start
    if start is not None and start.method != "sft":
        beta = (start.preset.get("training") or {}).get("beta") or 0.1
        figures = [(s.step, s.reward_margin, s.reward_accuracy, s.rewards_chosen, s.rewards_rejected)
                   for s in history.steps
                   if None not in (s.reward_margin, s.reward_accuracy, s.rewards_chosen, s.rewards_rejected)]
        return diagnose_preferences(figures, float(beta)) if figures else None
    if not history.evals:
        return None
    return diagnose([(s.step, v) for s in history.steps if (v := finite(s.loss)) is not None],
                    [(e.step, v) for e in history.evals if (v := finite(e.eval_loss)) is not None])
