"""What Python's garbage collector costs a training process, with the engine's settings
(``engine.collector``) and with CPython's defaults.

``python benchmarks/collector.py [--rounds 5] [--steps 4]``; about a minute with the defaults on a
2-core CPU.

Each case is the real training process, ``python -m engine.train RUN_DIR``, on a fresh run of the
offline demo preset (its data and its tiny Llama, in the qlora-wizard cache; the first round builds
them if needed, unmeasured). The process runs ``engine.train.main`` through a short driver that
counts the collector's passes and their time (``gc.callbacks``); in the ``default`` case the driver
first replaces ``engine.collector.fewer_collections`` and ``kept_while_training`` with functions that
do nothing, which is the engine as it ran before them. The process's CPU time (start-up, imports and
the interpreter's own last collection at exit included) comes from the kernel when it exits
(``os.wait4``). The cases alternate within each round, the order rotating.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CASES = ("default", "engine")

DRIVER = """
import contextlib, gc, json, sys, time
case, run_dir, out = sys.argv[1:4]
if case == "default":
    import engine.collector
    engine.collector.fewer_collections = lambda: None
    engine.collector.kept_while_training = contextlib.nullcontext
passes = {"s": 0.0, "n": 0, "full": 0, "t": 0.0}
def timed(phase, info):
    if phase == "start":
        passes["t"] = time.perf_counter()
    else:
        passes["s"] += time.perf_counter() - passes["t"]
        passes["n"] += 1
        passes["full"] += info["generation"] == 2
gc.callbacks.append(timed)
from engine.train import main
status = main([run_dir])
gc.callbacks.remove(timed)
with open(out, "w") as f:
    json.dump({"status": status, "gc_s": passes["s"], "collections": passes["n"], "full": passes["full"],
               "cpu_in_main_s": time.process_time(), "threshold": gc.get_threshold()}, f)
"""


def one(case: str, steps: int, scratch: Path) -> dict:
    import yaml

    from engine.preset import load_preset
    from engine.runs import create_run

    preset = yaml.safe_load((ROOT / "presets" / "tiny-demo.yaml").read_text())
    preset["training"].update(max_steps=steps, report_to="none")
    preset["output"] = {"runs_dir": str(scratch / "runs")}
    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / f"{case}.yaml"
    path.write_text(yaml.safe_dump(preset))
    run_dir = create_run(load_preset(path), scratch / "runs" / case)
    out = scratch / f"{case}.json"
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, case, str(run_dir), str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not out.is_file():
        log = run_dir / "train.log"
        raise SystemExit(f"the {case} case failed (exit {proc.returncode}): "
                         + (log.read_text()[-2000:] if log.is_file() else "no train.log"))
    result = json.loads(out.read_text())
    result["cpu_s"] = usage.ru_utime + usage.ru_stime
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="training steps of each run")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()

    results: dict[str, list[dict]] = {case: [] for case in CASES}
    with tempfile.TemporaryDirectory(prefix="qlora-wizard-collector-") as tmp:
        one("engine", 1, Path(tmp) / "warm-up")  # builds the demo model and data in the cache if needed
        for r in range(args.rounds):
            order = CASES[r % 2:] + CASES[:r % 2]
            for case in order:
                results[case].append(one(case, args.steps, Path(tmp) / f"{r}-{case}"))
    print(f"training process of the offline demo, {args.steps} steps, {args.rounds} rounds "
          f"(median; CPU time of the whole process)")
    print(f"{'case':<8} {'threshold':<16} {'cpu s':>6} {'gc s':>6} {'passes':>7} {'full':>5}")
    for case in CASES:
        rows = results[case]
        print(f"{case:<8} {str(tuple(rows[0]['threshold'])):<16} "
              f"{statistics.median(r['cpu_s'] for r in rows):6.2f} {statistics.median(r['gc_s'] for r in rows):6.2f} "
              f"{statistics.median(r['collections'] for r in rows):7.0f} {statistics.median(r['full'] for r in rows):5.0f}")
    base = statistics.median(r["cpu_s"] for r in results["default"])
    tuned = statistics.median(r["cpu_s"] for r in results["engine"])
    print(f"engine / default CPU time: {tuned / base:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"steps": args.steps, "rounds": args.rounds, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
