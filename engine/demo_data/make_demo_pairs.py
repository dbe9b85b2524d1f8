"""Write ``tiny-demo-pairs.jsonl``, the bundled preference pairs (``builtin:demo-pairs``; deterministic:
same file on every run).

Run ``python -m engine.demo_data.make_demo_pairs`` from the repository root to regenerate it. The
records are in the ``preference`` format (``prompt``, ``chosen``, ``rejected``) on the five word tasks
of the demo data set (``make_demo_data.py``): the prompt is the alpaca layout the demo's records are
rendered with (``engine.data.formats``: the word in the input, or inside the instruction with no
input), the chosen answer is the task's correct output, the rejected one a plausible wrong answer:
the output of another of the five tasks for the same word, or the word unchanged.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from engine.data.formats import ALPACA_TEMPLATE, ALPACA_TEMPLATE_NO_INPUT
from engine.demo_data import DEMO_PAIRS_FILE
from engine.demo_data.make_demo_data import TASKS, WORDS, answer

OUT: Path = DEMO_PAIRS_FILE
SEED = 4321
PAIRS = 400


def wrong_answers(task: str, word: str) -> list[str]:
    """The plausible wrong answers to a task for a word: the other tasks' outputs and the word
    unchanged (none equal to the right one), without repeats, in a fixed order."""
    right = answer(task, word)
    out = []
    for candidate in [answer(other, word) for other in TASKS if other != task] + [word]:
        if candidate != right and candidate not in out:
            out.append(candidate)
    return out


def pairs(n: int = PAIRS, seed: int = SEED) -> list[dict]:
    """n distinct preference pairs (one per task and word), in a fixed shuffled order."""
    rng = random.Random(seed)
    combos = [(task, word) for task in TASKS for word in WORDS]
    rng.shuffle(combos)
    out = []
    for task, word in combos[:n]:
        if rng.random() < 0.25:  # the word inside the instruction, as about a quarter of the demo records
            prompt = ALPACA_TEMPLATE_NO_INPUT.format(instruction=TASKS[task][1].format(w=word))
        else:
            prompt = ALPACA_TEMPLATE.format(instruction=TASKS[task][0], input=word)
        out.append({"prompt": prompt, "chosen": answer(task, word), "rejected": rng.choice(wrong_answers(task, word))})
    return out


def main() -> None:
    """Write the file."""
    lines = [json.dumps(r, ensure_ascii=False) for r in pairs()]
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} pairs to {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
