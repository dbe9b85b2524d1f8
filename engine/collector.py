"""Python's cyclic garbage collector, set for processes that build a large heap and keep it.

A training process (``python -m engine.train``) and a command that loads a model (``qlora-wizard
eval``, ``merge``, ``try``, ``export``) spend their first seconds importing torch, transformers, peft
and bitsandbytes and building a model: a few hundred thousand objects, nearly all of which live as
long as the process. CPython's default thresholds collect the young generation every 700 net
allocations and the whole heap every hundred such collections, so the collector walks that growing,
live heap over and over and finds next to nothing. accelerate then collects the whole heap once more
at the start of every ``Trainer.train`` (``Accelerator.free_memory``).

Measured on the offline demo (a 4-step training process on a 2-core CPU, Python 3.11, torch 2.13;
``python benchmarks/collector.py``, benchmarks/RESULTS.md): the collector took 1.18 s of the process's
7.69 s of CPU time in 1,348 passes, 8 of them over the whole heap; with ``fewer_collections`` and
``kept_while_training``, 0.58 s in 103 passes, and the process 6.98 s.

Nothing here changes what is freed, only when the collector looks: reference counting frees what it
always freed, and cycles are still found, at a larger allocation count.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

YOUNG_THRESHOLD = 20_000
"""Net allocations between two collections of the young generation (CPython's default: 700). The
older generations keep their ratios, so the whole heap is walked 30 times less often too."""


def fewer_collections() -> None:
    """Raise the young generation's threshold to ``YOUNG_THRESHOLD``; at the start of a process's
    ``main``, before the heavy imports. A higher threshold someone set already is kept."""
    young, middle, old = gc.get_threshold()
    if 0 < young < YOUNG_THRESHOLD:  # 0: the collector is off; leave it so
        gc.set_threshold(YOUNG_THRESHOLD, middle, old)


@contextmanager
def kept_while_training() -> Iterator[None]:
    """Around a training loop: what is garbage already is collected first (a model's load can leave
    tensors in reference cycles, on the GPU too, which must be freed before the loop, as accelerate's
    collection at the start of ``Trainer.train`` would), then every object that is left (the imported
    modules, the model, the data) is moved to the permanent generation (``gc.freeze``) until the loop
    ends, so the loop's collections, accelerate's full one among them, walk only what the loop itself
    allocates. Those objects are alive throughout the loop anyway; afterwards (normally or by an
    exception) they go back to the oldest generation (``gc.unfreeze``) and are collected as before.
    Where part of the heap is frozen already (by whoever runs the loop in its interpreter: a test
    worker freezes its modules), it is left as it is: ``gc.unfreeze`` would thaw theirs too."""
    gc.collect()
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
