"""Memory and time of the output head + loss with a large vocabulary: full logits against chunked cross-entropy.

``python benchmarks/loss_memory.py``; about 50 minutes with the defaults on a 2-core CPU (one torch
thread per measurement, so its CPU time is its work even when the machine is busy; ``--threads``).

Only the head and the loss are measured: hidden states (1 x T x hidden, as one packed row) go
through ``lm_head`` (a vocab x hidden weight) and the causal-LM loss, forward and backward, in the
model's dtype (bfloat16 by default, as the real configs load):

- ``full``: what the engine does now (transformers' way): ``F.linear`` for the whole row, then
  transformers' own ``ForCausalLMLoss`` (upcast to fp32, shift the labels, ``cross_entropy`` with
  ``reduction="sum"`` divided by the number of trained labels, as the Trainer calls it);
- ``chunk-N``: the same sum computed N tokens at a time; each chunk's ``lm_head`` + fp32 upcast +
  ``cross_entropy`` runs under ``torch.utils.checkpoint`` (non-reentrant), so the chunk's logits
  are freed after the forward and recomputed, one chunk at a time, in the backward;
- ``engine-N`` (with ``--engine``): the engine's own loss, ``engine.loss.causal_lm_loss`` with
  chunks of N: the trained positions gathered first (no logits for masked ones), then as chunk-N.

Each measurement is a fresh process (a worker: this script with ``--worker``), so its memory high
water mark is its own. The worker builds the tensors, runs one unmeasured step of the same size
and variant (oneDNN builds its kernels per shape; a training run repeats its shapes), then resets
the kernel's resident-set high water mark (``/proc/self/clear_refs`` ``5``) and takes the resident
set as its baseline; then ``--iters`` timed steps (the worker's time is the fastest). The peak extra
memory is ``VmHWM`` minus that baseline, read after the first forward (the forward's peak) and after
the last backward (the step's peak).
PyTorch has no allocator statistics on the CPU; its CPU allocator does not cache, and the worker
runs with ``MALLOC_MMAP_THRESHOLD_=131072`` so that glibc hands freed tensors back at once, so the
resident set follows the live tensors. The gradients w.r.t. the hidden states stay (they are the
step's result), the same in every variant.

The variants alternate within each round (the order rotates), ``--repeats`` rounds per size.
After the rounds, one more worker per variant runs with the head's weight trainable and saves the
loss and both gradients; they are compared with the full variant's (max abs difference). The
timed rounds keep the head frozen, as the engine's QLoRA runs do (LoRA targets do not include
``lm_head``), and compare loss and hidden-state gradient as well.

The script also prints what ``engine.memory`` predicts for the loss: ``LOSS_BYTES_PER_LOGIT`` x
tokens x vocabulary (the ``logits_and_loss`` component of ``estimate_training_memory`` for the real
config at micro batch 1 x T tokens), which is an estimate of the allocated peak on a GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIGS = ROOT / "tests" / "fixtures" / "hf-configs"
DEFAULT_MODELS = ("meta-llama__Llama-3.2-1B", "Qwen__Qwen2.5-0.5B")
MIB = 1024**2
GIB = 1024**3


# --------------------------------------------------------------------------------------------
# The worker: one variant, one size, in its own process


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(spec: dict) -> dict:
    import resource

    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint
    from transformers.loss.loss_utils import ForCausalLMLoss

    tokens, hidden_size, vocab = spec["tokens"], spec["hidden"], spec["vocab"]
    dtype = getattr(torch, spec["dtype"])
    chunk = spec["chunk"]  # 0: full logits
    torch.set_num_threads(spec["threads"])

    def full_loss(h, w, labels, n_items):
        logits = F.linear(h, w)  # what LlamaForCausalLM.forward does: lm_head in the model's dtype
        return ForCausalLMLoss(logits, labels, vocab_size=w.shape[0], num_items_in_batch=n_items)

    def _chunk_sum(h, w, y):
        logits = F.linear(h, w).float()
        return F.cross_entropy(logits, y, ignore_index=-100, reduction="sum")

    def chunked_loss(h, w, labels, n_items):
        shift = F.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1)
        flat = h.reshape(-1, h.shape[-1])
        total = None
        for i in range(0, flat.shape[0], chunk):
            part = checkpoint(_chunk_sum, flat[i:i + chunk], w, shift[i:i + chunk], use_reentrant=False)
            total = part if total is None else total + part
        return total / n_items

    def engine_loss(h, w, labels, n_items):
        from engine.loss import causal_lm_loss

        return causal_lm_loss(h, lambda x: F.linear(x, w), labels, num_items_in_batch=n_items, chunk=chunk)

    loss_fn = engine_loss if spec.get("engine") else chunked_loss if chunk else full_loss

    def make(n_tokens: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        h = torch.randn(1, n_tokens, hidden_size, generator=g).to(dtype).requires_grad_(True)
        labels = torch.randint(0, vocab, (1, n_tokens), generator=g)
        # Mask a prompt-like span in every 512 tokens (as the engine masks prompts), ~20 %.
        pos = torch.arange(n_tokens)
        labels[0, (pos % 512) < 100] = -100
        shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]
        n_items = (shifted != -100).sum()
        return h, labels, n_items

    g = torch.Generator().manual_seed(spec["seed"] + 1)
    weight = (torch.randn(vocab, hidden_size, generator=g) * 0.02).to(dtype)
    weight.requires_grad_(spec["train_head"])

    h, labels, n_items = make(tokens, spec["seed"])
    # Warm-up: one step of this very size and variant (oneDNN builds its kernels per shape; a
    # training run repeats the same shapes step after step). Not measured.
    loss_fn(h, weight, labels, n_items).backward()
    h.grad = weight.grad = None
    gc.collect()

    reset_ok = _reset_hwm()
    base_kib = _status_kib("VmRSS")
    base_hwm = _status_kib("VmHWM")
    steps = []
    for it in range(spec["iters"]):
        h.grad = weight.grad = None
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        c0, t0 = time.process_time(), time.perf_counter()
        loss = loss_fn(h, weight, labels, n_items)
        t1 = time.perf_counter()
        fwd_hwm = _status_kib("VmHWM")
        loss.backward()
        t2, c2 = time.perf_counter(), time.process_time()
        r2 = resource.getrusage(resource.RUSAGE_SELF)
        steps.append({"forward_s": t1 - t0, "backward_s": t2 - t1, "step_s": t2 - t0, "step_cpu_s": c2 - c0,
                      "step_user_s": r2.ru_utime - r0.ru_utime, "step_sys_s": r2.ru_stime - r0.ru_stime,
                      "minor_faults": r2.ru_minflt - r0.ru_minflt,
                      "cores_used": (c2 - c0) / (t2 - t0), "hwm_after_forward": fwd_hwm * 1024})
    hwm = _status_kib("VmHWM")
    after_kib = _status_kib("VmRSS")
    maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    best = min(steps, key=lambda x: x["step_s"])

    save = {"loss": loss.detach().float(), "grad_h": h.grad}
    if spec["train_head"]:
        save["grad_w"] = weight.grad
    torch.save(save, spec["save"])
    return {
        "loss": float(loss), "n_items": int(n_items),
        "forward_s": best["forward_s"], "backward_s": best["backward_s"], "step_s": best["step_s"],
        "step_cpu_s": min(x["step_cpu_s"] for x in steps),
        "step_user_s": min(x["step_user_s"] for x in steps), "step_sys_s": min(x["step_sys_s"] for x in steps),
        "cores_used": best["cores_used"], "iterations": steps,
        "baseline_rss": base_kib * 1024, "hwm_reset_ok": reset_ok, "hwm_at_baseline": base_hwm * 1024,
        "peak_extra_forward": steps[0]["hwm_after_forward"] - base_kib * 1024, "peak_extra": (hwm - base_kib) * 1024,
        "rss_after_extra": (after_kib - base_kib) * 1024, "ru_maxrss": maxrss_kib * 1024,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------------
# The driver


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def predicted(config_dir: Path, tokens: int, chunks: list[int] = ()) -> dict:
    """What engine.memory says about the loss at micro batch 1 x ``tokens`` for this config: with
    transformers' loss, and with the engine's own loss in chunks of each of ``chunks``."""
    from engine import memory
    from engine.modelinfo import inspect_model

    info = inspect_model(str(config_dir))
    est = memory.estimate_training_memory(info, memory.MemorySettings(micro_batch_size=1, seq_len=tokens))
    engine = {f"engine-{c}": memory.estimate_training_memory(
        info, memory.MemorySettings(micro_batch_size=1, seq_len=tokens, loss_chunk=c)).loss_peak_bytes
        for c in chunks}
    return {"loss_bytes_per_logit": memory.LOSS_BYTES_PER_LOGIT,
            "logits_and_loss": est.loss_peak_bytes, "engine_logits_and_loss": engine,
            "allocator_overhead_of_loss": int(memory.LOSS_FRAGMENTATION * est.loss_peak_bytes),
            "formula": f"{memory.LOSS_BYTES_PER_LOGIT} x {tokens} x {info.vocab_size}"}


def _run_worker(spec: dict, work: Path) -> dict:
    spec_file = work / "spec.json"
    spec_file.write_text(json.dumps(spec))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    w0 = time.time()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_file)],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        print(proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"worker failed (exit {proc.returncode}): {spec}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["process_s"] = time.time() - w0
    res["loadavg_before"] = spec["loadavg"]
    return res


def _compare(ref: Path, other: Path) -> dict:
    import torch

    a, b = torch.load(ref), torch.load(other)
    out = {}
    for k in a:
        x, y = a[k].float(), b[k].float()
        out[k] = {"max_abs_diff": float((x - y).abs().max()), "max_abs": float(x.abs().max())}
        if k == "loss":
            out[k]["values"] = [float(x), float(y)]
        del x, y
    del a, b
    gc.collect()
    return out


def _fmt_gib(n: float) -> str:
    return f"{n / GIB:6.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                   help=f"config folders under {CONFIGS} (hidden size and vocabulary are read from them)")
    p.add_argument("--tokens", nargs="+", type=int, default=[2048, 8192], help="tokens in the micro batch")
    p.add_argument("--chunks", nargs="+", type=int, default=[1024, 256], help="chunk sizes to measure")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds per size")
    p.add_argument("--iters", type=int, default=2,
                   help="timed steps per worker after its warm-up step (the fastest is its time)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads in the worker (1: its CPU time is its work, even on a busy machine)")
    p.add_argument("--no-check", action="store_true", help="skip the runs with a trainable head")
    p.add_argument("--engine", action="store_true",
                   help="also measure the engine's own loss (engine.loss) with each chunk size")
    p.add_argument("--json", type=Path, help="write every measurement here")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker.read_text()))))
        return 0

    import signal

    import torch

    def _terminate(signum, frame):
        raise SystemExit(128 + signum)  # through the finally below: the work folder is removed

    signal.signal(signal.SIGTERM, _terminate)
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="loss-memory-"))
    # 0: full; N > 0: chunk-N (this script's); -N: engine-N (engine.loss).
    variants = [0] + list(a.chunks) + ([-c for c in a.chunks] if a.engine else [])
    name = {0: "full"} | {c: f"chunk-{c}" for c in a.chunks} | {-c: f"engine-{c}" for c in a.chunks}
    results: list[dict] = []
    print(f"head + loss, forward + backward, {a.dtype}, {a.threads} threads, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}); peak = extra resident memory "
          f"over the baseline after setup (VmHWM); {a.repeats} interleaved rounds", flush=True)
    try:
        for model in a.models:
            cfg_dir = CONFIGS / model
            cfg = json.loads((cfg_dir / "config.json").read_text())
            hidden, vocab = cfg["hidden_size"], cfg["vocab_size"]
            for tokens in a.tokens:
                pred = predicted(cfg_dir, tokens, list(a.chunks) if a.engine else [])
                print(f"\n{model}: hidden {hidden}, vocab {vocab:,}, {tokens} tokens; engine.memory predicts "
                      f"logits_and_loss = {pred['formula']} = {pred['logits_and_loss'] / GIB:.3f} GiB "
                      f"(+{pred['allocator_overhead_of_loss'] / GIB:.3f} GiB allocator overhead on a GPU)",
                      flush=True)
                entry = {"model": model, "hidden": hidden, "vocab": vocab, "tokens": tokens, "predicted": pred,
                         "runs": {name[v]: [] for v in variants}, "check": {}}
                for r in range(a.repeats):
                    order = variants[r % len(variants):] + variants[:r % len(variants)]
                    for v in order:
                        if v and abs(v) >= tokens:
                            continue
                        need = 12 * (abs(v) or tokens) * vocab + 2 * vocab * hidden
                        if _mem_available() < 1.15 * need + GIB:
                            raise SystemExit(f"not enough free memory for {name[v]} at {tokens} tokens "
                                             f"({_mem_available() / GIB:.1f} GiB available)")
                        spec = {"tokens": tokens, "hidden": hidden, "vocab": vocab, "dtype": a.dtype, "chunk": abs(v),
                                "engine": v < 0, "threads": a.threads, "seed": 1000 + tokens, "train_head": False,
                                "iters": a.iters,
                                "save": str(work / f"{name[v]}-r{r}.pt"),
                                "loadavg": Path("/proc/loadavg").read_text().split()[:3]}
                        res = _run_worker(spec, work)
                        entry["runs"][name[v]].append(res)
                        print(f"  round {r + 1} {name[v]:10s} step {res['step_s']:6.2f} s, CPU {res['step_cpu_s']:6.2f} s"
                              f" (fwd {res['forward_s']:5.2f}"
                              f" bwd {res['backward_s']:5.2f}), peak extra {_fmt_gib(res['peak_extra'])} GiB "
                              f"(forward {_fmt_gib(res['peak_extra_forward'])}), loss {res['loss']:.6f}, "
                              f"{res['cores_used']:.2f} cores, load {' '.join(spec['loadavg'])}", flush=True)
                # Frozen-head rounds: loss and hidden-state gradients against full's (round 1).
                cmp_frozen = {}
                for v in variants[1:]:
                    if abs(v) < tokens:
                        cmp_frozen[name[v]] = _compare(work / "full-r0.pt", work / f"{name[v]}-r0.pt")
                entry["compare_frozen_head"] = cmp_frozen
                if not a.no_check:
                    for v in variants:
                        if v and abs(v) >= tokens:
                            continue
                        spec = {"tokens": tokens, "hidden": hidden, "vocab": vocab, "dtype": a.dtype, "chunk": abs(v),
                                "engine": v < 0, "threads": a.threads, "seed": 1000 + tokens, "train_head": True, "iters": 1,
                                "save": str(work / f"{name[v]}-check.pt"),
                                "loadavg": Path("/proc/loadavg").read_text().split()[:3]}
                        entry["check"][name[v]] = {"run": _run_worker(spec, work)}
                    for v in variants[1:]:
                        if abs(v) < tokens:
                            entry["check"][name[v]]["compare"] = _compare(work / "full-check.pt",
                                                                         work / f"{name[v]}-check.pt")
                for f in work.glob("*.pt"):
                    f.unlink()
                _summarise(entry, variants, name)
                results.append(entry)
        print(f"\nwall time {time.time() - started:.0f} s")
        if a.json:
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(json.dumps({
                "command": "python benchmarks/loss_memory.py " + " ".join(sys.argv[1:]),
                "date": time.strftime("%Y-%m-%d"), "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "torch": torch.__version__, "dtype": a.dtype, "threads": a.threads, "repeats": a.repeats,
                "results": results}, indent=1))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _summarise(entry: dict, variants: list[int], name: dict) -> None:
    runs = entry["runs"]
    summary = {}
    for v in variants:
        rs = runs[name[v]]
        if not rs:
            continue
        summary[name[v]] = {
            "step_s_median": statistics.median(r["step_s"] for r in rs),
            "step_s_min": min(r["step_s"] for r in rs), "step_s_max": max(r["step_s"] for r in rs),
            "step_cpu_s_median": statistics.median(r["step_cpu_s"] for r in rs),
            "step_cpu_s_min": min(r["step_cpu_s"] for r in rs), "step_cpu_s_max": max(r["step_cpu_s"] for r in rs),
            **({"step_user_s_median": statistics.median(r["step_user_s"] for r in rs),
                "step_sys_s_median": statistics.median(r["step_sys_s"] for r in rs)} if "step_user_s" in rs[0] else {}),
            "peak_extra_median": statistics.median(r["peak_extra"] for r in rs),
            "peak_extra_forward_median": statistics.median(r["peak_extra_forward"] for r in rs),
        }
    f = summary["full"]
    tv = entry["tokens"] * entry["vocab"]
    print(f"  {'variant':10s} {'step s (min-max)':>20s} {'CPU s (min-max)':>20s} {'peak GiB':>9s} {'B/logit':>8s}"
          f" {'time x':>7s} {'CPU x':>6s} {'mem x':>6s}"
          f"  loss / grad_h / grad_w max abs diff vs full")
    for k, s in summary.items():
        s["bytes_per_logit"] = s["peak_extra_median"] / tv
        s["bytes_per_token"] = s["peak_extra_median"] / entry["tokens"]
        s["time_ratio"] = s["step_s_median"] / f["step_s_median"]
        s["cpu_time_ratio"] = s["step_cpu_s_median"] / f["step_cpu_s_median"]
        if "step_user_s_median" in s:
            s["user_time_ratio"] = s["step_user_s_median"] / f["step_user_s_median"]
        s["memory_ratio"] = s["peak_extra_median"] / f["peak_extra_median"]
        diffs = ""
        if k != "full":
            c = entry["compare_frozen_head"].get(k, {})
            ck = entry["check"].get(k, {}).get("compare", {})
            diffs = (f"  frozen head: {c['loss']['max_abs_diff']:.1e} / {c['grad_h']['max_abs_diff']:.1e}"
                     + (f"; trained head: {ck['loss']['max_abs_diff']:.1e} / {ck['grad_h']['max_abs_diff']:.1e}"
                        f" / {ck['grad_w']['max_abs_diff']:.1e} (max |grad_w| {ck['grad_w']['max_abs']:.1e})"
                        if ck else ""))
        print(f"  {k:10s} {s['step_s_median']:7.2f} ({s['step_s_min']:.2f}-{s['step_s_max']:.2f}) "
              f"{s['step_cpu_s_median']:7.2f} ({s['step_cpu_s_min']:.2f}-{s['step_cpu_s_max']:.2f}) "
              f"{_fmt_gib(s['peak_extra_median']):>9s} {s['bytes_per_logit']:8.2f} {s['time_ratio']:6.2f}x "
              f"{s['cpu_time_ratio']:5.2f}x "
              + (f"(user {s['step_user_s_median']:.2f} s x{s['user_time_ratio']:.2f}, sys {s['step_sys_s_median']:.2f} s) "
                 if "user_time_ratio" in s else "")
              + f"{s['memory_ratio']:5.3f}{diffs}", flush=True)
    entry["summary"] = summary
    print(f"  measured full peak / engine.memory's logits_and_loss: "
          f"{f['peak_extra_median'] / entry['predicted']['logits_and_loss']:.3f}", flush=True)
    for k, want in entry["predicted"].get("engine_logits_and_loss", {}).items():
        if k in summary:
            summary[k]["predicted"] = want
            print(f"  measured {k} peak {_fmt_gib(summary[k]['peak_extra_median'])} GiB / engine.memory's "
                  f"logits_and_loss with loss_chunk={k.split('-')[1]} ({_fmt_gib(want)} GiB): "
                  f"{summary[k]['peak_extra_median'] / want:.3f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
