"""Run this engine's real training process on a GPU and set its peak memory beside the estimate.

Weights cannot be downloaded on the GPU machines, so each model is built with random weights from
a real ``config.json`` (``tests/fixtures/hf-configs/``) and saved locally with the demo's
character-level tokenizer (token ids stay far below every vocabulary, the logits still span the
model's full vocabulary). The data are plain-text records long enough that every micro batch
holds ``micro_batch x seq_len`` real tokens, which is what the estimate assumes.

Each case is one ``python -m engine.train RUN_DIR`` process, so each peak is that run's own.

    python benchmarks/gpu_check.py --configs DIR --out results.json \
        --case Llama-3.2-1B:2048:1:ckpt:all:16 --case Qwen2.5-0.5B:4096:4:nockpt:qv:8:opt=adamw_8bit

A case is NAME:SEQ:MICRO_BATCH:ckpt|nockpt:all|qv:RANK, then optional KEY=VALUE fields:
``opt=`` an optimizer of the preset (default adamw_torch), ``quant=nf4|none``, ``attn=`` a kernel
(``eager``; ``sdpa_packed`` forces per-example SDPA where PyTorch's varlen kernel would be chosen),
``liger=on|off`` (``training.fused_kernels`` liger or off; default auto), ``dropout=``,
``gpus=N`` and ``strategy=ddp|fsdp`` (several processes through torchrun, as ``distributed:`` in a
preset; the peaks are then the highest rank's, each rank's in ``ranks``), ``method=dpo|orpo``
(preference tuning, ``training.method``: the case trains on pairs whose prompt and each answer fill
SEQ, so a micro batch is ``2 x MICRO_BATCH`` full rows, as the estimate assumes; the row adds the
method, the reference and the last step's reward accuracy and margin) and, for dpo,
``reference=each_step|precomputed`` (``training.reference``; default the preset's auto).
``benchmarks/gpu_suite.py`` runs the matrix of these.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.events import EndEvent, fold_history, read_events  # noqa: E402


def build_random_model(config_dir: Path, out_dir: Path, tokenizer_dir: Path) -> Path:
    """A bf16 checkpoint with random weights from ``config_dir/config.json`` (made on the GPU, once)."""
    if (out_dir / "model.safetensors.index.json").exists() or (out_dir / "model.safetensors").exists():
        return out_dir
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(config_dir)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out_dir, max_shard_size="5GB")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    del model
    torch.cuda.empty_cache()
    return out_dir


def write_long_text_data(path: Path, records: int = 600, chars: int = 9000, seed: int = 0) -> Path:
    """Plain-text records of ``chars`` characters (one token each with the demo tokenizer)."""
    rng = random.Random(seed)
    words = ["alpha", "river", "stone", "cloud", "lamp", "green", "north", "seven", "paper", "quiet"]
    with open(path, "w") as fh:
        for i in range(records):
            text = " ".join(rng.choice(words) for _ in range(chars // 5))[:chars]
            fh.write(json.dumps({"text": f"{i} {text}"}) + "\n")
    return path


def write_long_pair_data(path: Path, seq_len: int, records: int = 48, seed: int = 0) -> Path:
    """Preference pairs (``prompt``, ``chosen``, ``rejected`` texts) that fill ``seq_len`` with the demo
    tokenizer (one token a character): BOS, a prompt of about a quarter of it, then each answer and its
    EOS up to ``seq_len`` exactly, so each side is one full row and nothing is cut. Deterministic."""
    rng = random.Random(seed)
    words = ["alpha", "river", "stone", "cloud", "lamp", "green", "north", "seven", "paper", "quiet"]

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n // 5 + 1))[:n]

    prompt_chars = max(4, seq_len // 4)
    answer_chars = seq_len - prompt_chars - 2  # BOS in front of the prompt, EOS after the answer
    if answer_chars < 2:
        raise ValueError(f"seq_len {seq_len} is too short for a prompt and two answers")
    with open(path, "w") as fh:
        for i in range(records):
            prompt = f"{i} " + text(prompt_chars)
            prompt = prompt[:prompt_chars - 1] + "\n"
            chosen, rejected = text(answer_chars), text(answer_chars)
            if chosen == rejected:  # never, at these lengths; the engine would drop the pair
                rejected = "x" + rejected[1:]
            fh.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    return path


PREFERENCE_METHODS = ("dpo", "orpo")
"""The case methods that train on pairs (``method=``)."""


def parse_case(case: str) -> dict:
    """A case string as its fields (see the module docstring); ValueError for a malformed one."""
    parts = case.split(":")
    if len(parts) < 6:
        raise ValueError(f"case {case!r}: want NAME:SEQ:MICRO_BATCH:ckpt|nockpt:all|qv:RANK[:KEY=VALUE...]")
    name, seq, mb, ckpt, targets, rank = parts[:6]
    extra = dict(p.split("=", 1) for p in parts[6:])
    unknown = set(extra) - {"opt", "quant", "attn", "liger", "dropout", "gpus", "strategy", "method", "reference"}
    if unknown or ckpt not in ("ckpt", "nockpt") or targets not in ("all", "qv"):
        raise ValueError(f"case {case!r}: unknown field(s) {sorted(unknown)}" if unknown else f"case {case!r}")
    method, reference = extra.get("method", "sft"), extra.get("reference", "auto")
    if method not in ("sft", *PREFERENCE_METHODS):
        raise ValueError(f"case {case!r}: method {method!r}: want sft, dpo or orpo")
    if reference not in ("auto", "each_step", "precomputed") or (reference != "auto" and method != "dpo"):
        raise ValueError(f"case {case!r}: reference {reference!r}: each_step or precomputed, for method=dpo only")
    return {"name": name, "seq": int(seq), "mb": int(mb), "ckpt": ckpt == "ckpt", "targets": targets,
            "rank": int(rank), "opt": extra.get("opt", "adamw_torch"), "quant": extra.get("quant", "nf4"),
            "attn": extra.get("attn", "auto"), "liger": extra.get("liger", "auto"),
            "dropout": float(extra.get("dropout", 0.05)), "gpus": int(extra.get("gpus", 1)),
            "strategy": extra.get("strategy", "auto"), "method": method, "reference": reference}


FORCE_PACKED_SDPA = (
    "import sys, runpy, engine.attention as a; a.torch_varlen_supported = lambda cc: False; "
    "sys.argv = ['engine.train', *sys.argv[1:]]; runpy.run_module('engine.train', run_name='__main__')"
)
"""The training process with PyTorch's varlen kernel ruled out, so per-example SDPA is measured."""


def case_preset(model_dir: Path, data: Path, case: str, steps: int) -> dict:
    """The preset a case trains with."""
    c = parse_case(case)
    attn = c["attn"] if c["attn"] in ("eager", "flash_attention_2") else ("sdpa" if c["attn"] != "auto" else "auto")
    pairs = c["method"] in PREFERENCE_METHODS
    method = {"method": c["method"]} if pairs else {}
    if c["method"] == "dpo" and c["reference"] != "auto":
        method["reference"] = c["reference"]
    return {
        "model": {"source": str(model_dir), "attn_implementation": attn},
        "quantization": {"method": c["quant"]},
        "lora": {"r": c["rank"], "alpha": 2 * c["rank"], "dropout": c["dropout"],
                 "targets": "all-linear" if c["targets"] == "all" else ["q_proj", "v_proj"]},
        "data": {"train": str(data), "format": "preference" if pairs else "text", "validation_split": 0.0,
                 "dedupe": False},
        "training": {**method, "seq_len": c["seq"], "micro_batch_size": c["mb"], "gradient_accumulation_steps": 1,
                     "max_steps": steps, "gradient_checkpointing": c["ckpt"], "save_steps": 10_000,
                     "optimizer": c["opt"], "logging_steps": 1,
                     "fused_kernels": {"on": "liger", "off": "off"}.get(c["liger"], "auto")},
        "distributed": {"gpus": c["gpus"], "strategy": c["strategy"]},
    }


def run_case(model_dir: Path, data: Path, case: str, runs: Path, steps: int, timeout: int = 900) -> dict:
    """Train ``steps`` optimizer steps for one case; returns estimate and measurement. A dpo or orpo
    case trains on pairs filling its seq_len (``write_long_pair_data``, beside ``data``) instead:
    twice the pairs its steps take, so the preset's reference auto runs it each step."""
    import yaml

    c = parse_case(case)
    if c["method"] in PREFERENCE_METHODS:
        pairs = 2 * steps * c["mb"] * c["gpus"]
        data = data.parent / f"pairs-{c['seq']}-{pairs}.jsonl"
        if not data.exists():
            write_long_pair_data(data, c["seq"], records=pairs)
    preset = case_preset(model_dir, data, case, steps)
    run_dir = runs / case.replace(":", "_").replace("=", "-")
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    (run_dir / "preset.yaml").write_text(yaml.safe_dump(preset))
    env = None
    if c["gpus"] > 1:  # through torchrun, as the engine launches several processes
        import os

        from engine.distributed import Launch, World

        cuda = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                              capture_output=True, text=True).stdout.strip() == "True"
        launch = Launch(World(c["gpus"], 1, "cuda" if cuda else "cpu"))
        command = launch.command(run_dir)
        env = dict(os.environ, **launch.environment())
    elif c["attn"] == "sdpa_packed":
        command = [sys.executable, "-c", FORCE_PACKED_SDPA, str(run_dir)]
    else:
        command = [sys.executable, "-m", "engine.train", str(run_dir)]
    t0 = time.time()
    with open(run_dir / "train.log", "w") as log:
        try:
            code = subprocess.call(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            code = 124
    h = fold_history(read_events(run_dir))
    start, end = h.start, h.end or EndEvent(status="crashed")
    speeds = sorted(s.tokens_per_s or 0 for s in h.steps[1:]) or [0]
    out = {
        "case": case, "exit": code, "status": end.status, "message": end.message,
        "seconds": round(time.time() - t0, 1),
        "attn": start and start.attn_implementation, "compute_dtype": start and start.compute_dtype,
        "kernels": start and start.kernels, "fused_kernels": start and start.fused_kernels,
        "estimate_allocated": start and start.estimate.allocated_bytes,
        "device_name": start and start.device_name, "versions": start and start.versions,
        "estimate_total": end.estimate_total, "estimate_reserved": end.estimate_reserved,
        "peak_reserved": end.peak_reserved, "peak_allocated": end.peak_allocated,
        "peak_device_used": end.peak_device_used, "device_used_before": end.device_used_before,
        "peak_rss": end.peak_rss,
        "median_tokens_per_s": speeds[len(speeds) // 2],
        "tokens_per_step": h.steps[-1].tokens if h.steps else None,
        "final_loss": h.steps[-1].loss if h.steps else None,
        "world": start.world.to_json() if start and start.world else None, "ranks": end.ranks,
        "method": start.method if start else c["method"],
    }
    if out["method"] in PREFERENCE_METHODS:
        last = h.steps[-1] if h.steps else None
        out.update(reference=start and start.reference,
                   reward_accuracy=last and last.reward_accuracy, reward_margin=last and last.reward_margin)
    if out["peak_reserved"] and out["estimate_reserved"]:
        out["reserved_error"] = round(out["estimate_reserved"] / out["peak_reserved"] - 1, 4)
    if out["peak_device_used"] and out["estimate_total"]:
        own = out["peak_device_used"] - (out["device_used_before"] or 0)
        out["process_device_bytes"] = own
        out["device_error"] = round(out["estimate_total"] / own - 1, 4)
    if code != 0:
        logs = [run_dir / "train.log", *sorted((run_dir / "logs").glob("rank-*.log"))]
        out["log_tail"] = "\n".join(p.read_text()[-1500:] for p in logs if p.is_file())[-4000:]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", type=Path, required=True, help="folder of <org>__<name>/config.json")
    p.add_argument("--tokenizer", type=Path, required=True, help="the demo model folder (its tokenizer)")
    p.add_argument("--work", type=Path, default=Path("/tmp/gpu-check"))
    p.add_argument("--case", action="append", required=True, help="NAME:SEQ:MB:ckpt|nockpt:all|qv:RANK")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    data = write_long_text_data(args.work / "long.jsonl")
    results = []
    for case in args.case:
        name = case.split(":")[0]
        config_dir = next(d for d in args.configs.iterdir() if d.name.endswith("__" + name))
        model_dir = build_random_model(config_dir, args.work / "models" / name, args.tokenizer)
        result = run_case(model_dir, data, case, args.work / "runs", args.steps)
        print(json.dumps({k: v for k, v in result.items() if k != "log_tail"}), flush=True)
        if "log_tail" in result:
            print(result["log_tail"], flush=True)
        results.append(result)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
