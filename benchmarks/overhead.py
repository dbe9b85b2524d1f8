"""What watching a run costs it: the offline demo run alone, and with the Textual run screen attached.

``python benchmarks/overhead.py``; about 6 minutes with the defaults on a 2-core CPU.

Each run is the real thing: ``qlora-wizard --preset presets/tiny-demo.yaml --detach --run-dir DIR``
starts the detached training process and returns; then, depending on the mode, this script

- ``none``: attaches nothing;
- ``headless``: starts the run screen (``tui.app.RunApp``, the app ``qlora-wizard attach`` opens) in
  a process of its own, headless (``run_async(headless=True, size=(120, 40))``): Textual lays out
  and renders every widget but writes nothing to a terminal;
- ``pty``: the same app on a pseudo-terminal of 120 x 40 (Textual's real Linux driver, the escape
  sequences written as to a terminal); this script reads and discards them, so what a terminal
  emulator would spend drawing them is not counted;
- ``wizard``: the way a person using the wizard runs it: the real ``WizardApp`` on the same preset,
  on a pseudo-terminal, opened on the review step; once it has read the model and checked the data
  (and at least 2 s after it started) it starts the run as ctrl+r does (its own ``start_run``,
  the run directory given) and switches to the run screen. Its start-up is over before the run
  begins, as it is for a person;
- ``beside`` (a control for ``wizard``): the same wizard, told not to start anything, idle on the
  review step once it has read the model and the data; then the run is started as for ``none``
  (by the CLI, so not the wizard's child) and followed by nothing. The wizard's presence alone;
- ``console``: the headless runner's follower, ``qlora-wizard attach --plain RUN`` (what
  ``qlora-wizard --preset`` shows after starting the run), on the same pseudo-terminal, where it
  draws its live line. Only its whole-process CPU time is known (start-up included).

The attached app is this script in ``--driver`` mode: ``RunApp`` with one addition, a timer every
0.5 s that samples the process's CPU time and exits the app once the screen shows the run ended (the
real app waits for a key). ``--tui`` picks the ``tui/`` package it runs: a commit's (default ``HEAD``,
extracted with ``git archive``, so edits in progress in the working tree are not measured) or the
working tree's. Its CPU time is taken from the kernel when it exits (``os.wait4``,
start-up and imports included) and, from the samples, over the training steps alone.

The run's training time comes from its ``events.jsonl``: the ``end`` event's ``elapsed_s`` (the
training process from its start, model load and saving included) and the span from the first to
the last ``step`` event (the training loop, 119 step intervals with its evaluations and
checkpoints). The modes alternate within each round (the order rotates), after one unmeasured
run that creates the demo model in the cache if needed. This script polls the training process
(``/proc/PID/stat``, for its CPU time) every 0.2 s in every mode alike.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import select
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

from engine.proc import pid_alive  # noqa: E402
ENDED = ("finished", "failed", "crashed", "stopped")
TICK_S = 0.2


# --------------------------------------------------------------------------------------------
# The attached app (a process of its own)


def driver(run_dir: Path, out: Path, headless: bool, size: tuple[int, int], tui_root: Path | None,
           wizard: bool = False, no_start: bool = False) -> int:
    import asyncio

    sys.path.insert(0, str(ROOT))
    if tui_root is not None:  # the ``tui`` package of a given commit first; ``engine`` from the working tree
        sys.path.insert(0, str(tui_root))
    import tui.app
    from tui.app import RunApp

    samples: list[list[float]] = []
    seen: dict = {}
    if wizard:
        app = _wizard_app(run_dir, samples, seen, ready_file=out.with_suffix(".ready") if no_start else None)
        ready = [time.time(), time.process_time()]
        result = app.run()
        out.write_text(json.dumps({"result": result, "samples": samples, "imported": ready,
                                   "exited": [time.time(), time.process_time()], "seen_at_end": seen,
                                   "tui_file": tui.app.__file__, "run_started": seen.get("run_started")}))
        return 0

    class BenchRunApp(RunApp):
        CSS_PATH = str(Path(tui.app.__file__).parent / "app.tcss")  # RunApp's; Textual looks next to the subclass

        def on_mount(self) -> None:
            # Textual calls RunApp.on_mount too (handlers run for every class in the MRO), which
            # opens the run screen; this one only adds the timer.
            self.set_interval(0.5, self._bench_tick)

        def _bench_tick(self) -> None:
            samples.append([time.time(), time.process_time()])
            status = getattr(self.screen, "status", None)
            if status in ENDED:
                seen.update(screen=type(self.screen).__name__, events=len(self.screen.events),
                            stack=[type(s).__name__ for s in self.screen_stack])
                self.exit(status)

    app = BenchRunApp(run_dir)
    ready = [time.time(), time.process_time()]
    if headless:
        result = asyncio.run(app.run_async(headless=True, size=size))
    else:
        result = app.run()
    out.write_text(json.dumps({"result": result, "samples": samples, "imported": ready,
                               "exited": [time.time(), time.process_time()], "seen_at_end": seen,
                               "tui_file": tui.app.__file__}))
    return 0


def _wizard_app(run_dir: Path, samples: list, seen: dict, ready_file: Path | None = None):
    """The wizard on the demo preset's review step; starts the run once the model and data are read
    (with ``ready_file``: only writes that file then, and idles until it is killed)."""
    import tui.wizard
    from engine.runs import create_run, start_process
    from tui.draft import Services, load_draft
    from tui.wizard import WizardApp

    def start_run(preset):  # the wizard's own start, into the given directory
        rd = create_run(preset, run_dir)
        start_process(rd)
        return rd

    opened = time.time()

    class BenchWizardApp(WizardApp):
        CSS_PATH = str(Path(tui.wizard.__file__).parent / "app.tcss")

        def on_mount(self) -> None:
            self.set_interval(0.5, self._bench_tick)

        def _bench_tick(self) -> None:
            samples.append([time.time(), time.process_time()])
            if ready_file is not None:
                if self.draft.model_ready and self.draft.data_ready and not ready_file.exists():
                    ready_file.write_text("ready")
                return
            if "run_started" not in seen:
                if time.time() - opened > 2 and self.draft.model_ready and self.draft.data_ready:
                    seen["run_started"] = [time.time(), time.process_time()]
                    self.start_run()
                return
            status = getattr(self.screen, "status", None)
            if status in ENDED:
                seen.update(screen=type(self.screen).__name__, events=len(self.screen.events),
                            stack=[type(s).__name__ for s in self.screen_stack])
                self.exit(status)

    return BenchWizardApp(load_draft(str(ROOT / "presets" / "tiny-demo.yaml")), services=Services(start_run=start_run),
                          start="review")


# --------------------------------------------------------------------------------------------
# One run


def _proc_cpu_s(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if fields[0] == "Z":
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _events(run_dir: Path) -> list[dict]:
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip()]


def one_run(mode: str, work: Path, tag: str, size: tuple[int, int], keep_events: bool = False,
            tui_root: Path | None = None) -> dict:
    run_dir = work / f"run-{tag}"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cli = [str(ROOT / ".venv" / "bin" / "qlora-wizard"), "--preset", "presets/tiny-demo.yaml", "--detach",
           "--run-dir", str(run_dir)]
    loadavg = Path("/proc/loadavg").read_text().split()[:3]
    if mode not in ("wizard", "beside"):
        subprocess.run(cli, cwd=ROOT, env=env, check=True, capture_output=True, text=True)

    app = master = None
    app_out = work / f"app-{tag}.json"
    pty_bytes = 0
    tail = b""
    if mode != "none":
        cmd = [sys.executable, str(Path(__file__).resolve()), "--driver", str(run_dir), "--driver-out", str(app_out),
               "--size", f"{size[0]}x{size[1]}"] + (["--headless"] if mode == "headless" else []) \
            + (["--wizard"] if mode in ("wizard", "beside") else []) + (["--no-start"] if mode == "beside" else []) \
            + (["--tui-root", str(tui_root)] if tui_root else [])
        if mode == "console":
            cmd = [str(ROOT / ".venv" / "bin" / "qlora-wizard"), "attach", "--plain", str(run_dir)]
        if mode in ("pty", "wizard", "beside", "console"):
            import fcntl
            import pty
            import struct
            import termios

            master, slave = pty.openpty()
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", size[1], size[0], 0, 0))
            app = subprocess.Popen(cmd, cwd=ROOT, env=dict(env, TERM="xterm-256color"), stdin=slave, stdout=slave,
                                   stderr=slave, start_new_session=True)
            os.close(slave)
        else:
            with open(work / f"app-{tag}.err", "wb") as app_err:
                app = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=app_err,
                                       stderr=app_err)

    if mode == "beside":  # the idle wizard first, then the run as for ``none``
        ready, deadline = app_out.with_suffix(".ready"), time.time() + 120
        while not ready.exists():
            if time.time() > deadline or os.wait4(app.pid, os.WNOHANG)[0]:
                raise SystemExit("the idle wizard did not get ready")
            if select.select([master], [], [], TICK_S)[0]:
                os.read(master, 1 << 16)
        subprocess.run(cli, cwd=ROOT, env=env, check=True, capture_output=True, text=True)

    # Follow the training process (and drain the pseudo-terminal) until both are done.
    pid = None
    if mode != "wizard":
        pid = json.loads((run_dir / "process.json").read_text())["pid"]
    train_cpu = None
    app_rusage = app_status = None
    app_exit_time = None
    train_exit_time = None
    deadline = time.time() + 600
    while time.time() < deadline:
        if master is not None:
            r, _, _ = select.select([master], [], [], TICK_S)
            if r:
                try:
                    data = os.read(master, 1 << 16)
                except OSError:  # the app closed its side
                    data = b""
                if data:
                    pty_bytes += len(data)
                    tail = (tail + data)[-4000:]
                else:
                    os.close(master)
                    master = None
        else:
            time.sleep(TICK_S)
        if pid is None:  # the wizard starts the run when it is ready
            try:
                pid = json.loads((run_dir / "process.json").read_text())["pid"]
            except (OSError, ValueError, KeyError):
                if os.wait4(app.pid, os.WNOHANG)[0]:
                    raise SystemExit(f"the wizard exited before starting the run:\n{tail.decode(errors='replace')[-3000:]}")
                continue
        if train_exit_time is None:
            c = _proc_cpu_s(pid)
            if c is not None:
                train_cpu = c
            if not pid_alive(pid):
                train_exit_time = time.time()
                if mode == "beside":
                    app.terminate()
        if app is not None and app_rusage is None:
            wpid, status, ru = os.wait4(app.pid, os.WNOHANG)
            if wpid:
                app_status, app_rusage, app_exit_time = os.waitstatus_to_exitcode(status), ru, time.time()
                app.returncode = app_status
        if train_exit_time is not None and (app is None or app_rusage is not None) and master is None:
            break
        if train_exit_time is not None and app_rusage is None and time.time() - train_exit_time > 30:
            app.kill()
    else:
        raise SystemExit(f"run {tag} did not end within 10 minutes")

    events = _events(run_dir)
    end = next(e for e in events if e["kind"] == "end")
    steps = [e for e in events if e["kind"] == "step"]
    t_first, t_last = steps[0]["time"], steps[-1]["time"]
    res = {
        "mode": mode, "tag": tag, "status": end.get("status"), "elapsed_s": end.get("elapsed_s"),
        "steps": len(steps), "events": len(events), "steps_span_s": t_last - t_first,
        "step_s_mean": (t_last - t_first) / (len(steps) - 1),
        "step_s_median": statistics.median(b["time"] - a["time"] for a, b in itertools.pairwise(steps)),
        "train_cpu_s": train_cpu, "train_cores": (train_cpu / end["elapsed_s"]) if train_cpu else None,
        "loadavg_before": loadavg, "final_loss": steps[-1].get("loss"),
    }
    if app is not None and mode != "beside":
        if app_status != 0:
            err = ((work / f"app-{tag}.err").read_text(errors="replace") if mode == "headless"
                   else tail.decode(errors="replace"))
            raise SystemExit(f"the attached app failed (exit {app_status}):\n{err[-3000:]}")
    if mode == "beside":
        pass  # nothing attached; the wizard's own figures are the ``wizard`` mode's
    elif mode == "console":
        cpu = app_rusage.ru_utime + app_rusage.ru_stime
        res.update({"app_cpu_s": cpu, "app_cpu_run_s": cpu, "app_share_of_run": cpu / end["elapsed_s"],
                    "app_cpu_steps_s": None, "app_maxrss": app_rusage.ru_maxrss * 1024, "pty_bytes": pty_bytes,
                    "app_exit_after_train_s": app_exit_time - train_exit_time if train_exit_time else None})
    elif app is not None:
        info = json.loads(app_out.read_text())
        samples = info["samples"]
        # The kernel's count, except for the wizard: it is the training process's parent, and a
        # reaped child's CPU time is added to its parent's. Its own clock at exit instead.
        cpu_total = info["exited"][1] if mode == "wizard" else app_rusage.ru_utime + app_rusage.ru_stime

        def cpu_at(t: float) -> float | None:
            # Linear interpolation of the app's CPU time at wall time t, from its 0.5 s samples.
            for (ta, ca), (tb, cb) in itertools.pairwise(samples):
                if ta <= t <= tb:
                    return ca + (cb - ca) * (t - ta) / (tb - ta)
            return None

        ca, cb = cpu_at(t_first), cpu_at(t_last)
        # From the run's start (the wizard: when it started it; attached: the app's own start) to its end.
        end_cpu = cpu_at(end["time"]) if isinstance(end.get("time"), (int, float)) else None
        if end_cpu is None:
            end_cpu = samples[-1][1] if samples else cpu_total
        run_cpu = end_cpu - (info["run_started"][1] if info.get("run_started") else 0.0)
        res.update({
            "app_result": info["result"], "app_seen_at_end": info["seen_at_end"], "app_tui_file": info["tui_file"],
            "app_cpu_s": cpu_total, "app_maxrss": app_rusage.ru_maxrss * 1024,
            "app_cpu_at_import_s": info["imported"][1],
            "app_cpu_steps_s": (cb - ca) if ca is not None and cb is not None else None,
            "app_first_sample_after_first_step": samples[0][0] > t_first if samples else None,
            "app_exit_after_train_s": app_exit_time - train_exit_time if train_exit_time else None,
            "pty_bytes": pty_bytes if mode in ("pty", "wizard") else None,
        })
        res["app_cpu_run_s"] = run_cpu
        res["app_share_of_run"] = run_cpu / end["elapsed_s"]
        if res["app_cpu_steps_s"] is not None:
            res["app_share_of_steps"] = res["app_cpu_steps_s"] / res["steps_span_s"]
    if keep_events:
        res["_events"] = events
    shutil.rmtree(run_dir, ignore_errors=True)
    return res


def idle_app(events: list[dict], work: Path, seconds: float, size: tuple[int, int], tui_root: Path | None) -> dict:
    """The headless app on a run that is alive but writes nothing: every step of a finished demo run
    already on screen (no ``end`` event), the run's process a ``sleep``. What an attached screen costs
    per second between events, as on a real model whose steps take seconds."""
    run_dir = work / "run-idle"
    run_dir.mkdir()
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events if e["kind"] != "end"))
    (run_dir / "train.log").write_text("".join(f"log line {i}\n" for i in range(300)))
    sleeper = subprocess.Popen(["sleep", str(int(seconds + 60))])
    (run_dir / "process.json").write_text(json.dumps({"pid": sleeper.pid, "start_time": None}))
    out = work / "app-idle.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    app = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--driver", str(run_dir), "--driver-out",
                            str(out), "--size", f"{size[0]}x{size[1]}", "--headless"]
                           + (["--tui-root", str(tui_root)] if tui_root else []), cwd=ROOT, env=env,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    time.sleep(seconds + 5)
    sleeper.kill()
    sleeper.wait()
    _, status, ru = os.wait4(app.pid, 0)
    app.returncode = os.waitstatus_to_exitcode(status)
    info = json.loads(out.read_text())
    # The window: from 5 s after the start (imports and the first drawing of 120 steps done) for ``seconds``.
    win = [(t, c) for t, c in info["samples"] if t0 + 5 <= t <= t0 + 5 + seconds]
    cpu = (win[-1][1] - win[0][1]) / (win[-1][0] - win[0][0])
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"seconds": win[-1][0] - win[0][0], "cpu_per_s": cpu, "app_cpu_s": ru.ru_utime + ru.ru_stime,
            "result": info["result"], "seen_at_end": info["seen_at_end"]}


def _tui_source(rev: str, work: Path) -> tuple[Path | None, str]:
    """Extract ``tui/`` of commit ``rev`` (``git archive``) into ``work``; or use the working tree."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--", "tui")
    if rev == "worktree":
        return None, f"working tree at {head[:12]}" + (" with uncommitted changes in tui/" if dirty else "")
    import io
    import tarfile

    commit = git("rev-parse", rev)
    data = subprocess.run(["git", "archive", commit, "tui"], cwd=ROOT, check=True, capture_output=True).stdout
    root = work / "tui-src"
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(root, filter="data")
    return root, f"tui/ of commit {commit[:12]}" + (" (the working tree's tui/ differs)" if dirty and commit == head
                                                     else "")


def _line(r: dict) -> str:
    s = (f"{r['mode']:8s} elapsed {r['elapsed_s']:6.2f} s, steps span {r['steps_span_s']:6.2f} s "
         f"({r['step_s_median'] * 1000:5.1f} ms/step median), training {r['train_cores']:.2f} cores, "
         f"load {' '.join(r['loadavg_before'])}")
    if r["mode"] not in ("none", "beside"):
        s += (f"; app CPU {r['app_cpu_s']:.2f} s in all, {r['app_cpu_run_s']:.2f} s during the run "
              f"({r['app_share_of_run']:.1%} of elapsed), during steps "
              f"{r['app_cpu_steps_s'] if r['app_cpu_steps_s'] is None else round(r['app_cpu_steps_s'], 2)} s"
              + (f" ({r['app_share_of_steps']:.1%})" if r.get("app_share_of_steps") is not None else "")
              + (f", {r['pty_bytes']:,} bytes to the terminal" if r.get("pty_bytes") else ""))
    return s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--modes", nargs="+", default=["none", "wizard", "pty", "console"],
                   choices=["none", "headless", "pty", "wizard", "beside", "console"])
    p.add_argument("--size", default="120x40", help="columns x rows of the app's screen")
    p.add_argument("--json", type=Path, help="write every measurement here")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--idle", type=float, default=20.0,
                   help="then seconds of the app on a live run that writes nothing (0: skip)")
    p.add_argument("--tui", default="HEAD",
                   help="the run screen of this commit (its tui/ folder, from git archive), or 'worktree' for the "
                        "files as they are now")
    p.add_argument("--driver", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--tui-root", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--driver-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--headless", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--wizard", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-start", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    size = tuple(int(x) for x in a.size.lower().split("x"))
    if a.driver:
        return driver(a.driver, a.driver_out, a.headless, size, a.tui_root, a.wizard, a.no_start)

    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="qlora-overhead-"))
    runs: list[dict] = []
    try:
        tui_root, tui_source = _tui_source(a.tui, work)
        print(f"run screen: {tui_source}", flush=True)
        print(f"demo run (presets/tiny-demo.yaml) with nothing / the run screen attached; {a.rounds} rounds, "
              f"modes {', '.join(a.modes)}; {os.cpu_count()} CPUs", flush=True)
        w = None
        if not a.no_warmup:
            w = one_run("none", work, "warmup", size, keep_events=True)
            print(f"  warm-up  {_line(w)}", flush=True)
        for r in range(a.rounds):
            k = r % len(a.modes)
            for mode in a.modes[k:] + a.modes[:k]:
                res = one_run(mode, work, f"{mode}-{r}", size, tui_root=tui_root)
                res["round"] = r + 1
                runs.append(res)
                print(f"  round {r + 1} {_line(res)}", flush=True)

        summary: dict = {}
        print()
        for mode in a.modes:
            rs = [x for x in runs if x["mode"] == mode]
            m = {"elapsed_s_median": statistics.median(x["elapsed_s"] for x in rs),
                 "steps_span_s_median": statistics.median(x["steps_span_s"] for x in rs),
                 "elapsed_s": [x["elapsed_s"] for x in rs], "steps_span_s": [x["steps_span_s"] for x in rs]}
            if mode not in ("none", "beside"):
                m["app_cpu_s_median"] = statistics.median(x["app_cpu_s"] for x in rs)
                m["app_cpu_run_s_median"] = statistics.median(x["app_cpu_run_s"] for x in rs)
                m["app_share_of_run_median"] = statistics.median(x["app_share_of_run"] for x in rs)
                steps_cpu = [x["app_cpu_steps_s"] for x in rs if x["app_cpu_steps_s"] is not None]
                if steps_cpu:
                    m["app_cpu_steps_s_median"] = statistics.median(steps_cpu)
                    m["app_share_of_steps_median"] = statistics.median(x["app_share_of_steps"] for x in rs
                                                                       if x.get("app_share_of_steps") is not None)
            summary[mode] = m
        base = summary.get("none")
        for mode, m in summary.items():
            line = (f"{mode:8s} median elapsed {m['elapsed_s_median']:.2f} s (runs {', '.join(f'{x:.2f}' for x in m['elapsed_s'])}),"
                    f" steps span {m['steps_span_s_median']:.2f} s")
            if base and mode != "none":
                m["elapsed_ratio"] = m["elapsed_s_median"] / base["elapsed_s_median"]
                m["steps_span_ratio"] = m["steps_span_s_median"] / base["steps_span_s_median"]
                line += f"; vs none: elapsed x{m['elapsed_ratio']:.3f}, steps x{m['steps_span_ratio']:.3f}"
                if "app_cpu_s_median" in m:
                    line += (f"; app CPU {m['app_cpu_s_median']:.2f} s in all, {m['app_cpu_run_s_median']:.2f} s "
                             f"during the run = {m['app_share_of_run_median']:.1%} of its time")
                if "app_cpu_steps_s_median" in m:
                    line += (f", {m['app_cpu_steps_s_median']:.2f} s during the steps = "
                             f"{m['app_share_of_steps_median']:.1%} of their span")
            print(line)
        idle = None
        if a.idle and w is not None:
            idle = idle_app(w["_events"], work, a.idle, size, tui_root)
            print(f"idle: the headless run screen on a live run with no new events used {idle['cpu_per_s']:.1%} of "
                  f"a core over {idle['seconds']:.0f} s (ended as {idle['result']})")
        print(f"wall time {time.time() - started:.0f} s")
        if a.json:
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(json.dumps({
                "command": "python benchmarks/overhead.py " + " ".join(sys.argv[1:]),
                "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "size": list(size), "tui": tui_source,
                "summary": summary, "idle": idle, "runs": runs}, indent=1))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
