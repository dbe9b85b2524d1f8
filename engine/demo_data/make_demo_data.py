"""Write ``tiny-demo.jsonl``, the bundled demo data set (deterministic: same file on every run).

Run ``python engine/demo_data/make_demo_data.py`` to regenerate it. The records are in alpaca
format (``instruction``, ``input``, ``output``) and teach five small word tasks that a model with
a few hundred thousand parameters learns within a hundred optimizer steps: capitalise a word,
reverse it, spell it with dashes, double each letter, and shift each letter one step in the
alphabet. About a quarter of the records carry the word inside the instruction and leave
``input`` empty, so both alpaca prompt layouts appear.

``pretraining_text`` gives the generic text the demo base model is briefly pretrained on
(engine/demo.py): word-list entries with each word's forms ("lock: LOCK kcol l-o-c-k lloocckk
mpdl.") and plain sentences, never the instruction layout, so that fine-tuning has a base that
knows the words to adapt rather than everything to learn.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

OUT = Path(__file__).resolve().parent / "tiny-demo.jsonl"
SEED = 1234
EXAMPLES = 1500

WORDS = """
able acid aged also area army away baby back ball band bank base bath bear beat bell belt best
bird blow blue boat body bone book born both bowl busy cake call calm camp card care case cash
cast cell chat chip city clay club coal coat code cold come cook cool copy corn cost crew crop
dark data date dawn deal dear deep desk dish door down draw drop drum duck dust duty each earn
east easy edge else even ever face fact fair fall farm fast fear feel file fill film find fine
fire firm fish five flag flat flow food foot form four free frog fuel full game gate gift girl
glad goal gold golf good gray grow hair half hall hand hard head hear heat help hero high hill
home hope horn host hour idea iron item jazz join joke jump keep kind king kiss knee lake lamp
land last late lead leaf left less life lift line lion list live lock long look loud love luck
mail main make many mark mask meal meat milk mind mine miss mood moon most move name near neck
need nest news next nice nine node nose note open oven page pain pair palm park part past path
pink plan play plot pool poor port post pull pure push quiz race rain rank read real rest rice
rich ride ring rise road rock roof room root rope rose rule safe salt sand save seat seed ship
shop side sign silk sing size skin slow snow soap sock soft soil song soup star stay step stop
sun swim table tail talk tall task team tent test text tide time tiny tone tool town tree trip
true tune turn unit upon vast view vote wait walk wall warm wave weak wear week west wide wild
wind wine wing wire wise wish wolf wood word work yard year zero zone apple bread chair cloud
dance dream earth field fruit grape green heart horse house light money mouse music night ocean
paper party plant river round sheep smile sound space spoon storm sugar sweet tiger toast train
water whale wheel white world
""".split()

TASKS = {
    "upper": ("Write the word in capital letters.", "Write the word \"{w}\" in capital letters."),
    "reverse": ("Reverse the letters of the word.", "Reverse the letters of \"{w}\"."),
    "dashes": ("Spell the word with dashes between the letters.", "Spell \"{w}\" with dashes."),
    "double": ("Double every letter of the word.", "Double every letter of \"{w}\"."),
    "shift": ("Replace each letter with the next letter of the alphabet.", "Shift each letter of \"{w}\" by one."),
}


def answer(task: str, word: str) -> str:
    """The correct output of a task for a word."""
    if task == "upper":
        return word.upper()
    if task == "reverse":
        return word[::-1]
    if task == "dashes":
        return "-".join(word)
    if task == "double":
        return "".join(c + c for c in word)
    if task == "shift":
        letters = string.ascii_lowercase
        return "".join(letters[(letters.index(c) + 1) % 26] for c in word)
    raise ValueError(task)


def records(n: int = EXAMPLES, seed: int = SEED) -> list[dict]:
    """n distinct alpaca records, in a fixed shuffled order."""
    rng = random.Random(seed)
    combos = [(task, word, inline) for task in TASKS for word in WORDS for inline in (False, True)]
    rng.shuffle(combos)
    out = []
    seen = set()
    for task, word, inline in combos:
        if (task, word) in seen:  # one layout per (task, word): no near-duplicates across the split
            continue
        seen.add((task, word))
        if inline and rng.random() < 0.5:
            out.append({"instruction": TASKS[task][1].format(w=word), "input": "", "output": answer(task, word)})
        else:
            out.append({"instruction": TASKS[task][0], "input": word, "output": answer(task, word)})
        if len(out) == n:
            break
    return out


def pretraining_text(n_sentences: int = 3000, seed: int = 7) -> list[str]:
    """Generic text about words and letters for the demo base model (not the instruction layout):
    word-list entries with each word's forms, and a few plain sentences."""
    rng = random.Random(seed)
    sentences = [
        "I like the word {w}, and you like the word {v}.",
        "The {w} and the {v} are near the {u}.",
        "{W} is a word with {n} letters.",
    ]
    out = []
    for _ in range(n_sentences):
        w, v, u = rng.sample(WORDS, 3)
        if rng.random() < 0.8:
            forms = [answer(k, w) for k in TASKS]
            out.append(f"{w}: " + " ".join(forms) + ".")
        else:
            out.append(rng.choice(sentences).format(w=w, v=v, u=u, W=w.capitalize(), n=len(w)))
    return out


def main() -> None:
    lines = [json.dumps(r, ensure_ascii=False) for r in records()]
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} records to {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
