"""Save SVG screenshots of the real app for the README: ``make screenshots``.

The wizard's six steps are taken on the offline demo (the demo model is created locally on first
use), with the GPU fixed to a 24 GB card so the memory step reads the same everywhere; the memory
and LoRA-target steps once more for Llama-3.1-8B from its real config in tests/fixtures (config only,
no weights).

The run screen is fed a recorded run (written here into a temporary directory, no training): a
QLoRA run of a 7B model on one GPU whose validation loss bottoms out at step 240 and then rises,
so the picture shows the curves, memory against the estimate and the overfitting diagnosis.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# The pictures show what is here; nothing is fetched (the Llama preset names a Hub dataset).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from engine.gpu import GpuInfo  # noqa: E402
from tui.app import RunApp  # noqa: E402
from engine.demo import DEMO_PRESET  # noqa: E402
from tui.draft import Draft, Services, load_draft  # noqa: E402
from tui.steps import STEP_NAMES, step_number  # noqa: E402

SIZE = (120, 40)
"""The terminal size every screenshot is taken at."""
OUT = ROOT / "screenshots"
GPU = GpuInfo(0, "NVIDIA GeForce RTX 4090", 24 * 2**30, int(23.4 * 2**30), (8, 9))
"""The GPU the wizard's screenshots show."""
LLAMA_CONFIG = ROOT / "tests" / "fixtures" / "hf-configs" / "meta-llama__Llama-3.1-8B"


async def shoot_wizard(draft: Draft, steps: list[str], prefix: str, gpus: tuple = (GPU,)) -> list[Path]:
    """One SVG per step of the wizard on ``draft``, on a machine with ``gpus``."""
    from tui.wizard import WizardApp

    written = []
    for step in steps:
        app = WizardApp(draft.__class__(draft.preset), services=Services(probe_gpus=lambda: list(gpus)), start=step)
        async with app.run_test(size=SIZE) as pilot:
            for _ in range(1200):
                await pilot.pause(0.05)
                d = app.draft
                if d.model_ready and (d.data_ready or app.data_error or step in ("model", "memory", "targets")) \
                        and not app.data_busy:
                    break
            app.screen.set_focus(None)
            await pilot.pause(0.3)
            OUT.mkdir(exist_ok=True)
            name = f"{prefix}{step_number(step)}-{step}.svg"
            app.save_screenshot(name, path=str(OUT))
            written.append(OUT / name)
    return written


def record_overfitting_run(run_dir: Path, total: int = 600, upto: int = 450) -> None:
    """Write the events of a run that is at step ``upto`` of ``total`` and overfitting."""
    t0 = 1_800_000_000.0
    start = {"kind": "start", "time": t0, "device": "cuda", "device_name": "NVIDIA H100 80GB HBM3",
             "preset": {"model": {"source": "Qwen/Qwen2.5-7B"}}, "total_steps": total,
             "data": {"examples": 4200, "supervised_tokens": 1_900_000},
             "estimate": {"total_bytes": int(21.4 * 2**30), "reserved_bytes": int(19.8 * 2**30)}}
    events = [start]
    for step in range(1, upto + 1):
        warm = min(1.0, step / 30)
        lr = 2e-4 * warm * 0.5 * (1 + math.cos(math.pi * step / total))
        loss = 0.9 + 1.4 * math.exp(-step / 90) + 0.05 * math.sin(step * 1.7) - 0.0004 * step
        events.append({"kind": "step", "time": t0 + 20 + step * 1.9, "step": step, "total_steps": total,
                       "epoch": step / 150, "loss": loss, "learning_rate": lr, "grad_norm": 0.6,
                       "tokens": 16000, "tokens_per_s": 8400 + 150 * math.sin(step / 7),
                       "mem_reserved": int(18.9 * 2**30), "mem_allocated": int(16.2 * 2**30)})
        if step % 30 == 0:
            val = 1.05 + 1.3 * math.exp(-step / 80) + 0.0000045 * (step - 240) ** 2 * (step > 240)
            events.append({"kind": "eval", "time": t0 + 20 + step * 1.9 + 5, "step": step, "eval_loss": val})
        if step % 150 == 0:
            events.append({"kind": "checkpoint", "time": t0 + 20 + step * 1.9 + 6, "step": step,
                           "path": f"runs/{run_dir.name}/checkpoints/checkpoint-{step}"})
    with open(run_dir / "events.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(ev) + "\n" for ev in events)


async def shoot_run_screen(run_dir: Path) -> Path:
    """The run screen of the recorded run, shown as running."""
    app = RunApp(run_dir, poll_interval=0.05, process_alive=lambda _: True)
    async with app.run_test(size=SIZE) as pilot:
        for _ in range(100):
            await pilot.pause(0.05)
            if app.screen.history.end is None and len(app.screen.history.steps) >= 450:
                break
        await pilot.pause(0.3)
        app.title = "qlora-wizard"
        app.sub_title = "runs/Qwen2.5-7B-20261123-101500"
        await pilot.pause(0.1)
        OUT.mkdir(exist_ok=True)
        app.save_screenshot("run.svg", path=str(OUT))
    return OUT / "run.svg"


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "Qwen2.5-7B-20261123-101500"
        run_dir.mkdir()
        record_overfitting_run(run_dir)
        paths = [asyncio.run(shoot_run_screen(run_dir))]
    paths += asyncio.run(shoot_wizard(load_draft(DEMO_PRESET), list(STEP_NAMES), "wizard-"))
    if LLAMA_CONFIG.is_dir():
        from engine.preset import load_preset

        preset = load_preset(ROOT / "presets" / "llama-3.1-8b-qlora.yaml")
        preset = preset.model_copy(update={"model": preset.model.model_copy(update={"source": str(LLAMA_CONFIG)})})
        paths += asyncio.run(shoot_wizard(Draft(preset), ["memory", "targets"], "llama-3.1-8b-"))
        two = (GPU, GpuInfo(1, GPU.name, GPU.total_bytes, GPU.free_bytes, GPU.compute_capability))
        paths += asyncio.run(shoot_wizard(Draft(preset), ["memory"], "llama-3.1-8b-2gpus-", gpus=two))
    for path in paths:
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
