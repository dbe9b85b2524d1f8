"""The memory of one training step on the CPU, measured, beside what ``engine.memory`` estimates for it:
sft, dpo (reference each step or precomputed) and orpo at the same rows.

    python benchmarks/preference_memory.py --json benchmarks/results/cpu-2026-12-06-preference-memory.json

about 6 minutes on a 2-core CPU. Each case is a fresh process (this script with ``--worker``) that
trains a real run in-process (``engine.train.run_training``: the engine's 4-bit model, LoRA, its
data and TRL's trainers for dpo and orpo) for three optimizer steps on a random-weight Llama built
here (hidden 256, 4 layers, a 32,000-entry vocabulary, so that activations and logits, not weights,
are what a step adds). A callback resets the kernel's resident-set high-water mark (``VmHWM``,
``/proc/self/clear_refs`` ``5``) as the second step begins, after the optimizer's states exist and
the step before has freed its gradients, and takes the resident set then as the baseline; the
step's memory is ``VmHWM`` after the last step minus that baseline. The worker runs with
``MALLOC_MMAP_THRESHOLD_=131072`` so that glibc hands every freed tensor back at once, and the
resident set follows the live tensors (PyTorch's CPU allocator does not cache).

What it is set beside: the estimate's per-step components for the run's own settings (the start
event's ``estimate``): ``activations`` + ``logits_and_loss`` + ``reference_pass`` + ``lora_gradients``
(the weights, adapters and optimizer states are in the baseline; the CUDA context, cuBLAS workspace
and allocator overhead do not exist on the CPU). Pairs fill ``seq_len`` (a prompt of a quarter of it,
each answer the rest: ``benchmarks/gpu_check.write_long_pair_data``), so a dpo micro batch of B pairs
is 2B full rows; sft trains on long text records, unpacked, B rows of ``seq_len``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.loss_memory import _reset_hwm, _status_kib  # noqa: E402  (the kernel's high-water mark)

MIB = 1024**2
MODEL = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=256, intermediate_size=688,
             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=32000,
             max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=10000.0,
             bos_token_id=1, eos_token_id=2, torch_dtype="float32")
"""The measured model: small weights, a Llama-2-sized vocabulary."""

STEP_COMPONENTS = ("activations", "logits_and_loss", "reference_pass", "lora_gradients")
"""The estimate's components that one step adds on top of the weights, adapters and optimizer states."""

# (name, method, reference, pairs or rows per micro batch, seq_len, gradient checkpointing)
CASES = [
    ("sft-4x512", "sft", None, 4, 512, True),
    ("dpo-2x512-each", "dpo", "each_step", 2, 512, True),
    ("dpo-2x512-pre", "dpo", "precomputed", 2, 512, True),
    ("orpo-2x512", "orpo", None, 2, 512, True),
    ("dpo-1x1024-each", "dpo", "each_step", 1, 1024, True),
    ("dpo-4x256-each", "dpo", "each_step", 4, 256, True),
    ("sft-4x512-nockpt", "sft", None, 4, 512, False),
    ("dpo-2x512-each-nockpt", "dpo", "each_step", 2, 512, False),
    ("orpo-2x512-nockpt", "orpo", None, 2, 512, False),
]
STEPS = 3


def case_preset(model_dir: Path, data: Path | str, case: list | tuple) -> dict:
    """The preset a case trains with (``tests/test_memory.py`` estimates the recorded cases from it)."""
    _, method, reference, mb, seq, ckpt = case
    training = {"method": method, "seq_len": seq, "micro_batch_size": mb, "gradient_accumulation_steps": 1,
                "max_steps": STEPS, "gradient_checkpointing": ckpt, "save_steps": 10_000, "logging_steps": 1,
                "packing": False, "eval_steps": 10_000}
    if reference:
        training["reference"] = reference
    return {"model": {"source": str(model_dir)}, "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
            "data": {"train": str(data), "format": "text" if method == "sft" else "preference",
                     "validation_split": 0.0, "dedupe": False},
            "training": training}


# --------------------------------------------------------------------------------------------
# The worker: one case, one process


def worker(model_dir: Path, case: list, run_dir: Path, out: Path) -> int:
    import yaml
    from transformers import TrainerCallback

    from benchmarks.gpu_check import write_long_pair_data, write_long_text_data
    from engine.events import fold_history, read_events
    from engine.train import run_training

    name, method, reference, mb, seq, ckpt = case
    pairs = method != "sft"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    data = run_dir.parent / f"{name}.jsonl"
    if pairs:
        write_long_pair_data(data, seq, records=2 * STEPS * mb)  # twice what the steps take
    else:
        write_long_text_data(data, records=2 * STEPS * mb, chars=seq + 64)
    preset = case_preset(model_dir, data, case)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    (run_dir / "preset.yaml").write_text(yaml.safe_dump(preset))
    seen: dict = {}

    class Measure(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 1:  # the second step: optimizer states made, the first step's gradients freed
                gc.collect()
                if not _reset_hwm():
                    raise RuntimeError("this kernel cannot reset the resident set's high-water mark")
                seen["baseline"] = _status_kib("VmRSS") * 1024

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == STEPS:
                seen["hwm"] = _status_kib("VmHWM") * 1024

    code = run_training(run_dir, callbacks=(Measure(),))
    h = fold_history(read_events(run_dir))
    comps = h.start.estimate.components if h.start else {}
    estimate = sum(comps.get(k, 0) for k in STEP_COMPONENTS)
    measured = seen["hwm"] - seen["baseline"] if "hwm" in seen else None
    out.write_text(json.dumps({
        "case": name, "method": method, "reference": h.start.reference if h.start else None, "pairs_or_rows": mb,
        "seq_len": seq, "gradient_checkpointing": ckpt, "exit": code, "status": h.end.status if h.end else None,
        "measured_step_bytes": measured, "estimate_step_bytes": estimate,
        "estimate_components": {k: comps.get(k, 0) for k in STEP_COMPONENTS},
        "error": round(estimate / measured - 1, 4) if measured else None,
        "baseline_rss": seen.get("baseline"),
    }))
    return code


# --------------------------------------------------------------------------------------------
# The driver


def build_model(folder: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from engine.demo import ensure_demo_model

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in MODEL.items() if k not in ("architectures",
                                                                                        "model_type")}))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(ensure_demo_model()).save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--cases", nargs="*", help="case names (default: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", nargs=4, metavar=("MODEL", "CASE", "RUN_DIR", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        model, case, run_dir, out = args.worker
        return worker(Path(model), json.loads(case), Path(run_dir), Path(out))

    work = Path(tempfile.mkdtemp(prefix="pref-memory-"))
    try:
        model_dir = build_model(work / "model")
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS=str(args.threads),
                   HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        results = []
        for case in CASES:
            if args.cases and case[0] not in args.cases:
                continue
            out = work / f"{case[0]}.json"
            t0 = time.time()
            log = open(work / f"{case[0]}.log", "w")
            subprocess.run([sys.executable, __file__, "--worker", str(model_dir), json.dumps(case),
                            str(work / "runs" / case[0]), str(out)], env=env, cwd=ROOT, check=False,
                           stdout=log, stderr=subprocess.STDOUT)
            log.close()
            r = json.loads(out.read_text()) if out.exists() else {
                "case": case[0], "exit": "no result", "log_tail": (work / f"{case[0]}.log").read_text()[-3000:]}
            r["seconds"] = round(time.time() - t0, 1)
            results.append(r)
            m, e = r.get("measured_step_bytes"), r.get("estimate_step_bytes")
            print(f"{r['case']:24} measured {m / MIB if m else float('nan'):8.1f} MiB  "
                  f"estimate {e / MIB if e else float('nan'):8.1f} MiB  error {r.get('error')}  "
                  f"({r['seconds']} s)", flush=True)
        import torch
        import transformers
        import trl

        record = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                  "threads": args.threads, "date": time.strftime("%Y-%m-%d"), "model": MODEL, "steps": STEPS,
                  "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                               "trl": trl.__version__},
                  "command": "python benchmarks/preference_memory.py " + " ".join(argv or sys.argv[1:]),
                  "results": results}
        if args.json:
            args.json.write_text(json.dumps(record, indent=1) + "\n")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
