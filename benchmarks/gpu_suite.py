"""One command for any GPU: throughput against the baselines, a profile of one engine step, and the
memory matrix, each result streamed to a JSON file as it finishes.

    python benchmarks/gpu_suite.py --out results/            # on an H100 / H200, wheels installed
    python benchmarks/gpu_suite.py --quick --out results/    # fewer rounds and cases
    python benchmarks/gpu_suite.py --dry-run --out /tmp/s    # on a CPU, the demo model (CI runs this)

The GPU machines have torch, transformers, peft and accelerate and no internet; the rest comes as
wheels (``benchmarks/fetch_wheels.sh`` downloads them where there is a network). Models are built
with random weights from the real configs in ``tests/fixtures/hf-configs/`` on the GPU, saved once
under ``--work``, and deleted after their cases (``--keep-models`` keeps them).

Sections (``--only`` picks some):

* ``env``: device, driver, versions, and the bf16 8192^3 matmul rate measured now (the MFU
  denominator of every other section);
* ``bench``: ``benchmarks/bench.py`` on the Llama-3.2-1B config (its recipe) and on the Llama-3.1-8B
  config at the shipped preset's settings (seq 2,048, micro batch 1, checkpointing, all linear r16),
  the engine against the plain recipe and TRL's padding-free SFTTrainer (where trl is installed); and
  the engine's dpo against TRL's DPOTrainer (``--method dpo``) on the Llama-3.2-1B config;
* ``profile``: one engine training process profiled with ``torch.profiler`` over a few steps after
  warm-up: top CUDA kernels and CPU ops by self time, kernel launches per step, the share of the
  step the GPU is idle, and the process's CPU time per step;
* ``memory``: the memory matrix of issue 12, each case one real ``python -m engine.train`` process
  (``benchmarks/gpu_check.py``): estimate against torch's peak reserved and the device's count;
* ``families``: the families of issue 22, Liger on and off, the same way;
* ``preference``: dpo (its reference each step and precomputed) and orpo on pairs that fill the
  sequence, the same way, with the last step's reward accuracy and margin;
* ``distributed``: issue 14 on a machine with two or more GPUs: one case on one GPU, then DDP and
  FSDP-QLoRA through torchrun on all of them (throughput ratio, the highest rank's peak against the
  per-GPU estimate); skipped, and said so, with one GPU.

Each finished measurement is appended to ``OUT/suite.jsonl`` at once (a run cut short keeps what it
measured); at the end ``OUT/suite.md`` holds the markdown tables, also printed. ``--max-minutes``
stops starting new work when the time is up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

CONFIGS = ROOT / "tests" / "fixtures" / "hf-configs"
SECTIONS = ("env", "bench", "profile", "memory", "families", "preference", "distributed")

MEMORY_MATRIX = [
    # name:seq:micro batch:checkpointing:targets:rank[:key=value]: what each case covers
    "Llama-3.1-8B:2048:1:ckpt:all:16:opt=adamw_8bit",          # the shipped Llama-3.1-8B preset
    "Qwen2.5-0.5B:4096:4:ckpt:all:16",                        # issue 12's worst row (151,936 vocabulary)
    "Llama-3.2-1B:512:8:nockpt:all:16",                       # short rows, no checkpointing, micro batch 8
    "Mistral-7B-v0.1:2048:2:nockpt:qv:8",                      # Mistral, q,v only, rank 8, no checkpointing
    "gemma-2b:1024:4:ckpt:all:64",                             # Gemma (256k vocabulary), rank 64
    "phi-2:2048:2:ckpt:all:16",                                # Phi (LayerNorm, fp32 block under autocast)
    "Qwen2.5-7B:4096:2:ckpt:all:32:opt=adamw_8bit",            # 7B, 8-bit AdamW
    "Llama-3.2-1B:2048:4:ckpt:all:16:quant=none",              # plain LoRA on a bf16 base
    "Llama-3.1-8B:8192:1:ckpt:qv:8",                           # long sequence
    "Llama-3.2-1B:4096:2:ckpt:all:16:attn=sdpa_packed",        # per-example SDPA (varlen ruled out)
    "Llama-3.2-1B:2048:2:ckpt:all:16:attn=eager",              # eager attention (dense scores)
    "Llama-3.1-8B:4096:2:nockpt:all:16:liger=on",              # Liger on ...
    "Llama-3.1-8B:4096:2:nockpt:all:16:liger=off",             # ... and off: same data and seed, so equal losses
]
"""At least one case per family (Llama, Qwen, Mistral, Gemma, Phi), 0.5B to 8B, sequence 512 to
8,192, micro batch 1 to 8, checkpointing on and off, q,v and all-linear, rank 8 to 64, nf4 and
none, 8-bit AdamW, each attention kind the engine picks, Liger on and off. Ordered so that the
most telling cases come first when ``--max-minutes`` cuts the list short."""

QUICK_MEMORY_MATRIX = MEMORY_MATRIX[:4]

FAMILIES_MATRIX = [
    # The families issue 22 put on the engine's loss and Liger (engine/arch.py), each with Liger on and
    # off on the same data and seed: equal losses, the speed ratio, and the estimate against the peak.
    "Qwen3-8B:2048:2:ckpt:all:16:liger=on", "Qwen3-8B:2048:2:ckpt:all:16:liger=off",
    "granite-3.0-2b:2048:4:ckpt:all:16:liger=on", "granite-3.0-2b:2048:4:ckpt:all:16:liger=off",
    "OLMo-2-7B:2048:2:ckpt:all:16:liger=on", "OLMo-2-7B:2048:2:ckpt:all:16:liger=off",
    "gemma-2-9b:2048:1:ckpt:all:16:liger=on", "gemma-2-9b:2048:1:ckpt:all:16:liger=off",
    "Qwen3-30B-A3B:1024:1:ckpt:qv:8",
]
"""Liger on the families first profiled in issue 22 (unmeasured until a GPU runs this) and one MoE."""

PREFERENCE_MATRIX = [
    # dpo and orpo on pairs whose prompt and each answer fill seq_len: 2 x micro batch full rows, no packing
    "Llama-3.2-1B:2048:2:ckpt:all:16:method=dpo:reference=each_step",       # dpo, the reference pass each step
    "Llama-3.2-1B:2048:2:ckpt:all:16:method=dpo:reference=precomputed",     # ... and precomputed before step 1
    "Llama-3.2-1B:2048:2:ckpt:all:16:method=orpo",                          # orpo: every position's logits held
    "Llama-3.1-8B:2048:1:ckpt:all:16:opt=adamw_8bit:method=dpo:reference=each_step",  # the shipped 8B preset, dpo
    "Llama-3.2-1B:2048:4:ckpt:all:16",                                      # sft on the same 4 rows of 2,048
]
"""Preference tuning (``training.method`` dpo and orpo): the estimate (both answers of each pair in one
padded batch, TRL's dpo log-probabilities 4,096 positions at a time, orpo's full logits) against the
measured peak; unmeasured until a GPU runs this. The sft case holds as many rows as the 1B pairs' cases."""

DISTRIBUTED_MATRIX = [
    # the same case on one GPU, then DDP and FSDP on every GPU: throughput ratio and memory per rank
    "Llama-3.2-1B:2048:2:ckpt:all:16:dropout=0",
    "Llama-3.2-1B:2048:2:ckpt:all:16:dropout=0:gpus={n}:strategy=ddp",
    "Llama-3.2-1B:2048:2:ckpt:all:16:dropout=0:gpus={n}:strategy=fsdp",      # FSDP-QLoRA's first GPU run
    "Llama-3.1-8B:2048:1:ckpt:all:16:opt=adamw_8bit:gpus={n}:strategy=fsdp",  # the shipped 8B preset, sharded
]
"""Issue 14's GPU checks, for a machine with two or more GPUs (``{n}``: every visible one). The lent
machines have one, so this section says it was skipped there."""

CONFIG_FOLDERS = {
    "Llama-3.2-1B": "meta-llama__Llama-3.2-1B", "Llama-3.1-8B": "meta-llama__Llama-3.1-8B",
    "Qwen2.5-0.5B": "Qwen__Qwen2.5-0.5B", "Qwen2.5-7B": "Qwen__Qwen2.5-7B",
    "Mistral-7B-v0.1": "mistralai__Mistral-7B-v0.1", "gemma-2b": "google__gemma-2b", "phi-2": "microsoft__phi-2",
    "Qwen3-8B": "Qwen__Qwen3-8B", "granite-3.0-2b": "ibm-granite__granite-3.0-2b-base",
    "OLMo-2-7B": "allenai__OLMo-2-1124-7B", "gemma-2-9b": "google__gemma-2-9b", "Qwen3-30B-A3B": "Qwen__Qwen3-30B-A3B",
}

KERNEL_LAUNCH_NAMES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx",
                       "cudaGraphLaunch")


# --------------------------------------------------------------------------------------------
# Streaming results


class Results:
    """Appends each result to ``suite.jsonl`` as it comes and keeps them for the tables."""

    def __init__(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.out, self.rows = out, []
        self.path = out / "suite.jsonl"

    def add(self, section: str, row: dict) -> dict:
        row = {"section": section, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **row}
        self.rows.append(row)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(f"[{section}] " + json.dumps({k: v for k, v in row.items() if k not in ("log_tail", "top")})[:400],
              flush=True)
        return row


# --------------------------------------------------------------------------------------------
# Sections


def env_section(cuda: bool) -> dict:
    """What ran where: device, driver, versions, and the matmul rate measured now."""
    import torch
    import transformers

    from bench import matmul_flops

    row = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "cuda": cuda}
    for pkg in ("peft", "accelerate", "bitsandbytes", "trl", "liger_kernel", "flash_attn"):
        try:
            row[pkg] = __import__(pkg).__version__
        except Exception:
            row[pkg] = None
    if cuda:
        row["device"] = torch.cuda.get_device_name(0)
        row["capability"] = list(torch.cuda.get_device_capability(0))
        try:
            row["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            row["driver"] = None
        row["matmul_tflops"] = round(matmul_flops(True, n=8192) / 1e12, 1)
    else:
        row["device"] = platform.processor() or platform.machine()
        row["cpu_cores"] = os.cpu_count()
        # A CPU is a dry run (the suite refuses to measure one): the rate means nothing, the code runs.
        row["matmul_tflops"] = round(matmul_flops(False, seconds=0.1, n=1024) / 1e12, 3)
    return row


def bench_cases(quick: bool, dry_run: bool) -> list[tuple[str, list[str]]]:
    """(name, bench.py arguments) for each throughput comparison; a case that names its own
    ``--baseline`` (dpo: TRL's DPOTrainer) keeps it."""
    if dry_run:
        # One baseline: its worker process is started, read and summed up as TRL's is (the TRL worker
        # itself trains in tests/test_bench_trl.py); each more is one more training process on the CPU.
        return [("demo", ["--rounds", "1", "--steps", "3", "--warmup", "1", "--examples", "24",
                          "--micro-batch", "4", "--seq-len", "256", "--matmul-size", "256", "--matmul-seconds", "0.1",
                          "--baseline", "plain"])]
    rounds = ["--rounds", "2" if quick else "3"]
    return [
        ("Llama-3.2-1B bench recipe", ["--config", str(CONFIGS / CONFIG_FOLDERS["Llama-3.2-1B"]), *rounds,
                                       "--steps", "12" if quick else "20"]),
        ("Llama-3.1-8B shipped preset (2048 x1, ckpt, all r16)",
         ["--config", str(CONFIGS / CONFIG_FOLDERS["Llama-3.1-8B"]), "--rounds", "1" if quick else "2",
          "--steps", "8" if quick else "12",
          "--warmup", "2", "--micro-batch", "1", "--seq-len", "2048", "--examples", "200"]),
        ("Llama-3.2-1B DPO against TRL's DPOTrainer (2048 x2, ckpt, all r16, reference each step)",
         ["--method", "dpo", "--baseline", "trl", "--config", str(CONFIGS / CONFIG_FOLDERS["Llama-3.2-1B"]),
          "--rounds", "1" if quick else "2", "--steps", "8" if quick else "12", "--warmup", "2",
          "--micro-batch", "2", "--seq-len", "2048", "--examples", "120", "--lr", "5e-6"]),
    ]


def bench_section(results: Results, work: Path, quick: bool, dry_run: bool, deadline: float) -> None:
    """The engine against the plain recipe and TRL, through bench.py, one process per run."""
    import importlib.util

    default = "plain,trl" if importlib.util.find_spec("trl") else "plain"
    for name, args in bench_cases(quick, dry_run):
        if time.time() > deadline:
            results.add("bench", {"case": name, "skipped": "time is up (--max-minutes)"})
            continue
        out = work / f"bench-{len(results.rows)}.json"
        baselines = args[args.index("--baseline") + 1] if "--baseline" in args else default
        cmd = [sys.executable, str(ROOT / "benchmarks" / "bench.py"), *args,
               *([] if "--baseline" in args else ["--baseline", baselines]), "--json", str(out)]
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        row = {"case": name, "command": " ".join(cmd[1:]), "exit": proc.returncode,
               "seconds": round(time.time() - t0, 1), "baselines": baselines,
               "method": args[args.index("--method") + 1] if "--method" in args else "sft"}
        if out.exists():
            data = json.loads(out.read_text())
            row["summary"] = data.get("summary")
            row["flops"] = data.get("flops")
        if proc.returncode != 0:
            row["log_tail"] = (proc.stdout + proc.stderr)[-3000:]
        results.add("bench", row)


class ProfileCallback:
    """Profiles steps ``warm + 1`` .. ``warm + steps`` of a training run and writes a summary."""

    def __init__(self, out: Path, warm: int, steps: int, cuda: bool) -> None:
        self.out, self.warm, self.steps, self.cuda = out, warm, steps, cuda
        self.prof = None

    def as_trainer_callback(self):
        from transformers import TrainerCallback

        outer = self

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if state.global_step == outer.warm and outer.prof is None:
                    outer.start()

            def on_step_end(self, args, state, control, **kw):
                if outer.prof is not None and state.global_step == outer.warm + outer.steps:
                    outer.stop()

        return _CB()

    def start(self) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        if self.cuda:
            torch.cuda.synchronize()
        self.cpu0, self.wall0 = time.process_time(), time.perf_counter()
        self.prof = profile(activities=activities)
        self.prof.__enter__()

    def stop(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - self.wall0, time.process_time() - self.cpu0
        self.prof.__exit__(None, None, None)
        self.out.write_text(json.dumps(summarize_profile(self.prof, self.steps, wall, cpu, self.cuda)))
        self.prof = False  # profiled once


def summarize_profile(prof, steps: int, wall_s: float, cpu_s: float, cuda: bool, top: int = 15) -> dict:
    """Top kernels and ops by self time, kernel launches per step, GPU idle share, CPU time per step."""
    averages = prof.key_averages()

    def rows(attr: str) -> list[dict]:
        ranked = sorted((e for e in averages if getattr(e, attr, 0) > 0), key=lambda e: -getattr(e, attr))[:top]
        return [{"name": e.key[:120], "self_ms_per_step": round(getattr(e, attr) / 1000 / steps, 3),
                 "calls_per_step": round(e.count / steps, 1)} for e in ranked]

    out = {"steps": steps, "wall_ms_per_step": round(1000 * wall_s / steps, 2),
           "process_cpu_ms_per_step": round(1000 * cpu_s / steps, 2),
           "cpu_cores_busy": round(cpu_s / max(wall_s, 1e-9), 2),
           "top_cpu_ops": rows("self_cpu_time_total")}
    if cuda:
        device_attr = "self_device_time_total" if hasattr(averages[0], "self_device_time_total") \
            else "self_cuda_time_total"
        out["top_cuda_kernels"] = rows(device_attr)
        launches = sum(e.count for e in averages if e.key in KERNEL_LAUNCH_NAMES)
        out["kernel_launches_per_step"] = round(launches / steps, 1)
        intervals = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                           if str(getattr(e, "device_type", "")).endswith("CUDA") and e.time_range.end > e.time_range.start)
        busy, end = 0.0, None
        for a, b in intervals:
            if end is None or a > end:
                busy += b - a
                end = b
            elif b > end:
                busy += b - end
                end = b
        out["gpu_busy_ms_per_step"] = round(busy / 1000 / steps, 2)
        out["gpu_idle_share"] = round(max(0.0, 1 - busy / 1e6 / max(wall_s, 1e-9)), 3)
    return out


def profile_worker(run_dir: Path, out: Path, warm: int, steps: int) -> int:
    """The engine's training process, in this process, with the profiler callback."""
    import torch

    from engine.train import run_training

    cb = ProfileCallback(out, warm, steps, torch.cuda.is_available())
    return run_training(run_dir, callbacks=(cb.as_trainer_callback(),))


def profile_section(results: Results, work: Path, quick: bool, dry_run: bool, keep: bool) -> None:
    """One engine run at the shipped Llama-3.1-8B preset's settings (the demo on a dry run), profiled."""
    import yaml

    from gpu_check import build_random_model, case_preset, write_long_text_data

    from engine.demo import ensure_demo_model

    warm, steps = (1, 2) if dry_run else (3, 3)
    data = write_long_text_data(work / "long.jsonl", records=60 if dry_run else 200,
                                chars=600 if dry_run else 9000)
    if dry_run:
        model_dir, case = ensure_demo_model(), "demo:256:4:ckpt:all:8"
    else:
        case = "Llama-3.1-8B:2048:1:ckpt:all:16:opt=adamw_8bit"
        model_dir = build_random_model(CONFIGS / CONFIG_FOLDERS["Llama-3.1-8B"], work / "models" / "Llama-3.1-8B",
                                       ensure_demo_model())
    run_dir = work / "runs" / "profile"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    (run_dir / "preset.yaml").write_text(yaml.safe_dump(case_preset(model_dir, data, case, warm + steps + 1)))
    out = work / "profile.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker-profile", str(run_dir), str(out),
           str(warm), str(steps)]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    row = {"case": case, "exit": proc.returncode, "seconds": round(time.time() - t0, 1)}
    if out.exists():
        row.update(json.loads(out.read_text()))
    else:
        row["log_tail"] = (proc.stdout + proc.stderr)[-3000:]
    results.add("profile", row)
    if not keep and not dry_run:
        shutil.rmtree(work / "models" / "Llama-3.1-8B", ignore_errors=True)


def memory_section(results: Results, work: Path, quick: bool, dry_run: bool, deadline: float, keep: bool,
                   section: str = "memory") -> None:
    """The memory matrix (``section`` memory), the families' (``families``) or the preference methods'
    (``preference``): estimate against measurement, one training process per case; each model is built
    once and deleted after its last case. The dry run's preference case is one of the memory matrix's
    moved, not one more (its time matters: the test suite runs it)."""
    from gpu_check import build_random_model, run_case, write_long_text_data

    from engine.demo import ensure_demo_model

    if dry_run and section == "families":
        # The families' matrix runs memory_section's code as the memory matrix does, on other models: the
        # dry run (the demo model alone) would only run the memory case again.
        results.add(section, {"case": "the families' matrix", "skipped": "dry run: the memory case runs this code"})
        return
    data = write_long_text_data(work / "long.jsonl", records=60 if dry_run else 600,
                                chars=600 if dry_run else 9000)
    if section == "families":
        cases = FAMILIES_MATRIX
    elif section == "preference":
        cases = ["demo:128:4:nockpt:qv:8:opt=adamw_8bit:method=dpo"] if dry_run else \
            (PREFERENCE_MATRIX[:3] if quick else PREFERENCE_MATRIX)
    else:
        cases = ["demo:256:2:ckpt:all:8"] if dry_run else (QUICK_MEMORY_MATRIX if quick else MEMORY_MATRIX)
    last_use = {c.split(":")[0]: i for i, c in enumerate(cases)}
    for i, case in enumerate(cases):
        name = case.split(":")[0]
        if time.time() > deadline:
            results.add(section, {"case": case, "skipped": "time is up (--max-minutes)"})
            continue
        if dry_run:
            model_dir = ensure_demo_model()
        else:
            model_dir = build_random_model(CONFIGS / CONFIG_FOLDERS[name], work / "models" / name, ensure_demo_model())
        row = run_case(model_dir, data, case, work / "runs", steps=3 if dry_run else 6)
        results.add(section, row)
        if not dry_run and not keep and last_use[name] == i:
            shutil.rmtree(work / "models" / name, ignore_errors=True)


def distributed_section(results: Results, work: Path, dry_run: bool, deadline: float, keep: bool) -> None:
    """DDP and FSDP through torchrun on every visible GPU against the same case on one: throughput,
    the highest rank's peak against the per-GPU estimate, the losses. Needs two GPUs or more; the
    dry run trains the demo with two gloo processes on the CPU."""
    from gpu_check import build_random_model, run_case, write_long_text_data

    from engine.demo import ensure_demo_model

    if dry_run:
        cases = ["demo:128:4:nockpt:all:8:dropout=0", "demo:128:4:nockpt:all:8:dropout=0:gpus=2:strategy=ddp"]
    else:
        import torch

        n = torch.cuda.device_count()
        if n < 2:
            results.add("distributed", {"case": "DDP/FSDP", "skipped": f"needs 2 or more GPUs; this machine has {n}"})
            return
        cases = [c.format(n=n) for c in DISTRIBUTED_MATRIX]
    data = write_long_text_data(work / "long-dist.jsonl", records=60 if dry_run else 600,
                                chars=600 if dry_run else 9000)
    last_use = {c.split(":")[0]: i for i, c in enumerate(cases)}
    single = None
    for i, case in enumerate(cases):
        name = case.split(":")[0]
        if time.time() > deadline:
            results.add("distributed", {"case": case, "skipped": "time is up (--max-minutes)"})
            continue
        model_dir = ensure_demo_model() if dry_run else build_random_model(
            CONFIGS / CONFIG_FOLDERS[name], work / "models" / name, ensure_demo_model())
        row = run_case(model_dir, data, case, work / "runs", steps=3 if dry_run else 8)
        if ":gpus=" not in case:
            single = row
        elif single and single.get("median_tokens_per_s") and name == single["case"].split(":")[0]:
            row["speedup_vs_one_gpu"] = round((row.get("median_tokens_per_s") or 0) / single["median_tokens_per_s"], 2)
        results.add("distributed", row)
        if not dry_run and not keep and last_use[name] == i:
            shutil.rmtree(work / "models" / name, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Report


def _gib(n) -> str:
    return "" if n is None else f"{n / 2**30:.2f}"


def _pct(x) -> str:
    return "" if x is None else f"{x * 100:+.1f} %"


def _memory_table(memory: list[dict], title: str, preference: bool = False) -> list[str]:
    """One markdown table of memory cases (none: no lines); ``preference`` adds the method, the
    reference and the last step's reward accuracy and margin."""
    lines: list[str] = []
    if memory:
        extra = (" method | reference | reward accuracy | reward margin |", "---|---|---:|---:|") if preference \
            else ("", "")
        lines += [f"## {title}", "",
                  "| case | attention | estimate reserved GiB | measured reserved GiB | error | allocated est/meas GiB "
                  "| device error | tok/s | final loss |" + extra[0] + " status |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|" + extra[1] + "---|"]
        for r in memory:
            cells = ""
            if preference:
                cells = (f" {r.get('method') or ''} | {r.get('reference') or ''} | "
                         f"{'' if r.get('reward_accuracy') is None else format(r['reward_accuracy'], '.2f')} | "
                         f"{'' if r.get('reward_margin') is None else format(r['reward_margin'], '+.4f')} |")
            lines.append(f"| {r['case']} | {r.get('attn') or ''} | {_gib(r.get('estimate_reserved'))} | "
                         f"{_gib(r.get('peak_reserved'))} | {_pct(r.get('reserved_error'))} | "
                         f"{_gib(r.get('estimate_allocated'))} / {_gib(r.get('peak_allocated'))} | "
                         f"{_pct(r.get('device_error'))} | {r.get('median_tokens_per_s') or 0:,.0f} | "
                         f"{'' if r.get('final_loss') is None else format(r['final_loss'], '.4f')} |{cells} "
                         f"{r.get('status') or r.get('skipped', '')} |")
        lines.append("")
    return lines


def markdown(rows: list[dict]) -> str:
    """The suite's tables."""
    lines: list[str] = []
    env = next((r for r in rows if r["section"] == "env"), None)
    if env:
        lines += ["## Machine", "", f"{env.get('device')} (driver {env.get('driver')}), torch {env.get('torch')}, "
                  f"transformers {env.get('transformers')}, peft {env.get('peft')}, bitsandbytes {env.get('bitsandbytes')}, "
                  f"trl {env.get('trl')}, liger-kernel {env.get('liger_kernel')}, flash-attn {env.get('flash_attn')}; "
                  f"matmul measured now: {env.get('matmul_tflops')} TFLOP/s", ""]
    bench = [r for r in rows if r["section"] == "bench"]
    if bench:
        lines += ["## Throughput (real tokens/s, median of interleaved runs)", "",
                  "| case | engine | plain | TRL | engine/plain | engine/TRL | engine MFU | largest loss difference | exit |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in bench:
            s = r.get("summary") or {}
            ratios = s.get("throughput_ratios") or {}
            diffs = (s.get("final_loss") or {}).get("max_step_diffs") or {}

            def num(x, fmt="{:,.0f}"):
                return "" if x is None else fmt.format(x)

            def median(who):
                return (s.get(who) or {}).get("median")

            lines.append(f"| {r['case']} | {num(median('engine'))} | {num(median('plain'))} | {num(median('trl'))} | "
                         f"{num(ratios.get('plain'), '{:.2f}x')} | {num(ratios.get('trl'), '{:.2f}x')} | "
                         f"{num((s.get('engine') or {}).get('mfu_vs_measured_matmul'), '{:.1%}')} | "
                         f"{num(max(diffs.values()) if diffs else None, '{:.1e}')} | "
                         f"{r.get('exit', r.get('skipped', ''))} |")
        lines.append("")
    for r in (r for r in rows if r["section"] == "profile"):
        lines += [f"## Profile of one engine step ({r['case']})", "",
                  f"wall {r.get('wall_ms_per_step')} ms/step, process CPU {r.get('process_cpu_ms_per_step')} ms/step "
                  f"({r.get('cpu_cores_busy')} cores busy), kernel launches {r.get('kernel_launches_per_step')}/step, "
                  f"GPU idle {r.get('gpu_idle_share')}", ""]
        for title, key in (("top CUDA kernels", "top_cuda_kernels"), ("top CPU ops", "top_cpu_ops")):
            lines += [f"| {title} | ms/step | calls/step |", "|---|---:|---:|"]
            lines += [f"| `{k['name']}` | {k['self_ms_per_step']} | {k['calls_per_step']} |"
                      for k in r.get(key, [])[:10]]
            lines.append("")
    for section, title in (("memory", "Memory: estimate against the engine's own runs"),
                           ("families", "Families: Liger on and off, estimate against the engine's own runs"),
                           ("preference", "Preference tuning: dpo and orpo, estimate against the engine's own runs")):
        lines += _memory_table([r for r in rows if r["section"] == section], title, preference=section == "preference")
    dist = [r for r in rows if r["section"] == "distributed"]
    if dist:
        lines += ["## Several GPUs: DDP and FSDP through torchrun", "",
                  "| case | world | estimate per GPU reserved GiB | highest rank reserved GiB | error | tok/s "
                  "| vs one GPU | final loss | status |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in dist:
            world = r.get("world") or {}
            lines.append(f"| {r['case']} | {world.get('describe', '1')} {world.get('strategy', '')} | "
                         f"{_gib(r.get('estimate_reserved'))} | {_gib(r.get('peak_reserved'))} | "
                         f"{_pct(r.get('reserved_error'))} | {r.get('median_tokens_per_s') or 0:,.0f} | "
                         f"{r.get('speedup_vs_one_gpu', '')} | "
                         f"{'' if r.get('final_loss') is None else format(r['final_loss'], '.4f')} | "
                         f"{r.get('status') or r.get('skipped', '')} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=False, default=ROOT / "benchmarks" / "results" / "suite",
                   help="folder for suite.jsonl and suite.md")
    p.add_argument("--work", type=Path, help="models, data and runs (default: OUT/work)")
    p.add_argument("--quick", action="store_true", help="fewer rounds, steps and memory cases")
    p.add_argument("--dry-run", action="store_true", help="on the CPU with the demo model: every section, tiny")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"sections to run, of {','.join(SECTIONS)}")
    p.add_argument("--max-minutes", type=float, default=8.0, help="start no new case after this long")
    p.add_argument("--keep-models", action="store_true", help="keep the random-weight models after their cases")
    p.add_argument("--worker-profile", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker_profile:
        run_dir, out, warm, steps = a.worker_profile
        return profile_worker(Path(run_dir), Path(out), int(warm), int(steps))

    only = [s.strip() for s in a.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        print(f"error: --only {','.join(unknown)}: the sections are {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not a.dry_run:
        print("error: no CUDA GPU here; run with --dry-run for the CPU check on the demo model", file=sys.stderr)
        return 2
    started = time.time()
    deadline = started + 60 * a.max_minutes
    work = a.work or a.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    results = Results(a.out)
    if "env" in only:
        results.add("env", env_section(cuda))
    if "bench" in only:
        bench_section(results, work, a.quick, a.dry_run, deadline)
    if "profile" in only:
        profile_section(results, work, a.quick, a.dry_run, a.keep_models)
    if "memory" in only:
        memory_section(results, work, a.quick, a.dry_run, deadline, a.keep_models)
    if "families" in only:
        memory_section(results, work, a.quick, a.dry_run, deadline, a.keep_models, section="families")
    if "preference" in only:
        memory_section(results, work, a.quick, a.dry_run, deadline, a.keep_models, section="preference")
    if "distributed" in only:
        distributed_section(results, work, a.dry_run, deadline, a.keep_models)
    report = markdown(results.rows)
    (a.out / "suite.md").write_text(report + "\n")
    print(report)
    print(f"suite: {time.time() - started:.0f} s; results in {results.path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
