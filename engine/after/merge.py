"""Merging the adapter into its base: ``qlora-wizard merge RUN_DIR --out DIR``.

The base model is loaded again in 16 bits (or fp32), never in 4 bits: merging into NF4 weights
would round the update into the quantization grid. peft's ``merge_and_unload`` adds each LoRA
update into its layer, and the result is a plain transformers model, saved (safetensors) with the
run's tokenizer and a generation config, so ``AutoModelForCausalLM.from_pretrained(DIR)`` loads it
with no peft at all.

The merge runs on the CPU (no GPU memory needed; it takes minutes for a 7-8B model). Before
anything loads it works out the memory and disk it needs and refuses, in one line, when the
machine's available memory (``MemAvailable`` in ``/proc/meminfo``) or the free space where
``--out`` goes is short. The merged folder is written beside ``--out`` and renamed into place, so
``--out`` is whole or absent.

The dtype (``--dtype``) defaults to the run's own load dtype: float32 for a run trained on the CPU
(the demo: the merged model then reproduces the adapter model's logits to 1e-4), the GPU's 16-bit
type (bfloat16, or float16 on older GPUs) for a run trained on one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine.after.session import (
    FinishedRun,
    finished_run,
    load_adapter_model,
    load_tokenizer,
    model_source,
    quiet_loading,
)
from engine.errors import UserError, first_line, os_error
from engine.files import settle_tree

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
"""``--dtype`` names and the torch dtypes they stand for."""

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

SAVE_SHARD = "5GB"
"""The largest safetensors file written; safetensors builds one file's bytes in memory before it
writes them, so this also bounds the extra memory of saving."""

SAVE_SHARD_BYTES = 5 * 10**9

RUNTIME_BYTES = 768 * 2**20
"""Memory of the process apart from the weights: Python, torch, transformers, peft (measured: about
600 MiB resident after importing them and loading the demo model on the CPU), with a margin."""

EXTRA_DISK_BYTES = 64 * 2**20
"""Disk beyond the weights: tokenizer (Llama-3's tokenizer.json is 9 MB), configs, index."""


def meminfo_available() -> int | None:
    """Memory the kernel says can be given to a new process without swapping (``MemAvailable``), or None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _existing_parent(path: Path) -> Path:
    """The nearest folder at or above ``path`` that exists (where its file system is asked)."""
    p = path.absolute()
    while not p.exists() and p.parent != p:
        p = p.parent
    return p


def check_output_folder(out: str | Path, flag: str = "--out") -> Path:
    """An output folder a person named, checked before anything slow starts: absent or empty, not a
    link, and writable where it goes (a scratch folder is made and removed beside it to prove it).
    Raises :class:`UserError` (one line) otherwise; creates nothing that stays."""
    import tempfile

    out = Path(out)
    if out.is_symlink():
        raise UserError(f"{flag} {out} is a symbolic link", "name a new folder")
    if out.exists():
        if not out.is_dir():
            raise UserError(f"{flag} {out} is a file", "name a new folder")
        if any(out.iterdir()):
            raise UserError(f"{flag} {out} already exists and is not empty", "name a new or empty folder")
    parent = _existing_parent(out.parent)
    if not parent.is_dir():
        raise UserError(f"{flag} {out} cannot be made: {parent} is a file, not a folder", "name another folder")
    try:
        probe = tempfile.mkdtemp(prefix=f".{out.name}.check-", dir=parent)
        os.rmdir(probe)
    except OSError as exc:
        raise os_error(exc, f"write {flag}", out) from None
    return out


@dataclass(frozen=True)
class MergePlan:
    """What a merge needs and what the machine has, worked out before anything loads."""

    run: FinishedRun
    out: Path
    dtype: str
    """The torch dtype name the merged weights are saved in."""
    params: int
    """Parameters of the merged model (the base's: LoRA adds none once merged)."""
    memory_needed: int
    memory_available: int | None
    disk_needed: int
    disk_free: int | None
    """Free bytes on the file system ``out`` goes to."""

    def summary(self) -> str:
        """One line: what the merge needs and what is there."""
        def gib(n: int | None) -> str:
            return "unknown" if n is None else f"{n / 2**30:.2f} GiB"

        return (f"merging {self.params:,} parameters in {self.dtype} on the CPU needs {gib(self.memory_needed)} of "
                f"memory ({gib(self.memory_available)} available) and {gib(self.disk_needed)} of disk at "
                f"{_existing_parent(self.out)} ({gib(self.disk_free)} free)")


def run_load_dtype(run: FinishedRun) -> str:
    """The dtype the run loaded its unquantized weights in: float32 on the CPU, the GPU's 16-bit type."""
    start = run.history.start
    if start is None or start.device != "cuda":
        return "float32"
    return start.compute_dtype if start.compute_dtype in ("bfloat16", "float16") else "bfloat16"


def plan_merge(run_dir, out, dtype: str | None = None) -> MergePlan:
    """Check a merge before it starts: a finished run, an ``out`` that is absent or empty, enough memory
    and disk. ``dtype``: ``bf16``, ``fp16``, ``fp32`` (or a torch name); None for the run's load dtype.
    Raises :class:`UserError` (one line) for each refusal."""
    run = finished_run(run_dir)
    dtype = DTYPES.get(dtype, dtype) if dtype else run_load_dtype(run)
    if dtype not in DTYPE_BYTES:
        raise UserError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}")
    out = check_output_folder(out)
    from engine.modelinfo import inspect_model

    preset = run.preset
    info = inspect_model(model_source(run), revision=preset.model.revision,
                         trust_remote_code=preset.model.trust_remote_code)
    weights = info.params_total * DTYPE_BYTES[dtype]
    memory = weights + min(weights, SAVE_SHARD_BYTES) + RUNTIME_BYTES
    disk = weights + EXTRA_DISK_BYTES
    from engine.runs import free_bytes

    plan = MergePlan(run, out, dtype, info.params_total, memory, meminfo_available(), disk,
                     free_bytes(_existing_parent(out)))
    refuse_when_short(plan, "merge", "pick a smaller --dtype")
    return plan


def refuse_when_short(plan, verb: str, smaller: str) -> None:
    """One line when a plan (``memory_needed``, ``memory_available``, ``disk_needed``, ``disk_free``,
    ``summary()``) needs more memory or disk than the machine has; ``smaller``: how to need less memory."""
    if plan.memory_available is not None and plan.memory_needed > plan.memory_available:
        raise UserError(f"not enough memory to {verb}: {plan.summary()}",
                        f"free memory, use a machine with more, or {smaller}")
    if plan.disk_free is not None and plan.disk_needed > plan.disk_free:
        raise UserError(f"not enough disk to {verb}: {plan.summary()}",
                        "free space there or pick an --out on another disk")


SENTENCEPIECE_FILE = "tokenizer.model"


def copy_sentencepiece_model(run: FinishedRun, folder: Path) -> bool:
    """Put the base model's SentencePiece model (``tokenizer.model``) into ``folder`` where the base has
    one and the saved tokenizer did not write it: llama.cpp's converter builds a GGUF's tokenizer from
    it (Llama 2, Mistral, Gemma). Returns whether one is there now."""
    target = folder / SENTENCEPIECE_FILE
    if target.is_file():
        return True
    source = model_source(run)
    local = Path(source)
    if local.is_dir():
        found = local / SENTENCEPIECE_FILE
        found = found if found.is_file() else None
    else:
        try:
            from transformers.utils import cached_file

            hit = cached_file(source, SENTENCEPIECE_FILE, revision=run.preset.model.revision,
                              _raise_exceptions_for_missing_entries=False,
                              _raise_exceptions_for_connection_errors=False)
        except Exception:  # noqa: BLE001 - no such file, or no network: the converter says what it lacks
            hit = None
        found = Path(hit) if hit else None
    if found is None:
        return False
    shutil.copyfile(found, target)
    return True


def merge_run(plan: MergePlan, progress: Callable[[str], None] | None = None) -> Path:
    """Merge the run's adapter into its base in ``plan.dtype`` and save the model, tokenizer and
    generation config to ``plan.out`` (whole or not at all); returns ``plan.out``."""
    import torch
    from transformers import AutoModelForCausalLM

    say = progress or (lambda line: None)
    run, out = plan.run, plan.out
    quiet_loading()
    preset = run.preset
    say(f"loading {preset.model.source} in {plan.dtype} on the CPU")
    try:
        base = AutoModelForCausalLM.from_pretrained(
            model_source(run), dtype=getattr(torch, plan.dtype), revision=preset.model.revision,
            trust_remote_code=preset.model.trust_remote_code, device_map={"": "cpu"})
    except Exception as exc:  # noqa: BLE001 - a missing download: one line
        raise UserError(f"cannot load the base model {preset.model.source}: {first_line(exc)}") from None
    say(f"merging the adapter of {run.run_dir}")
    model = load_adapter_model(run, base)
    merged = model.merge_and_unload(safe_merge=True)
    tokenizer = load_tokenizer(run)
    generation = merged.generation_config
    if generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id
    merged.config.use_cache = True

    say(f"saving to {out}")
    partial = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # A scratch folder of its own beside --out (never a fixed name that could be someone's).
        partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        merged.save_pretrained(partial, max_shard_size=SAVE_SHARD)
        tokenizer.save_pretrained(partial)
        copy_sentencepiece_model(run, partial)
        settle_tree(partial)
        if out.is_dir():
            out.rmdir()  # checked empty by plan_merge
        os.replace(partial, out)
    except OSError as exc:
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        raise os_error(exc, "write the merged model to", out) from None
    except BaseException:
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    return out
