"""After the run: try the model, compare it with the base, merge it, share it (issue 13).

USABLE: :class:`TrySession`, :class:`Decoding`, :class:`Example` and :func:`evaluate_run` follow the
shared contract (the try screen builds on them).

- :mod:`engine.after.session`: :class:`TrySession`, one loaded model answering with the adapter on
  or off (the base's answer comes from the same model with the adapter switched off, no copy);
  :func:`finished_run`, the check every command here starts with.
- :mod:`engine.after.evaluate`: :func:`evaluate_run`, validation loss and perplexity of base and
  fine-tuned side by side, and generated answers against references (``RUN_DIR/eval.json``).
- :mod:`engine.after.merge`: :func:`plan_merge` (memory and disk, checked first) and :func:`merge_run`,
  the adapter merged into the base reloaded in 16 bits or fp32, saved for ``from_pretrained``.
- :mod:`engine.after.card`: :func:`write_card` (``RUN_DIR/README.md``) and :func:`push_run` (the Hub).
- :mod:`engine.after.plot`: :func:`write_curves`, the loss curves as SVG and PNG.

Nothing here imports torch, transformers or peft at module level.
"""

from __future__ import annotations

from engine.after.card import PushPlan, plan_push, push_run, write_card
from engine.after.evaluate import evaluate_run
from engine.after.merge import MergePlan, merge_run, plan_merge
from engine.after.plot import write_curves
from engine.after.session import Decoding, Example, FinishedRun, TrySession, finished_run

__all__ = ["Decoding", "Example", "FinishedRun", "MergePlan", "PushPlan", "plan_push", "TrySession", "evaluate_run", "finished_run",
           "merge_run", "plan_merge", "push_run", "write_card", "write_curves"]
