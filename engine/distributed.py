"""Several GPUs and several machines: who trains, how many, and how they agree.

qlora-wizard does not launch processes of its own: a run over more than one process is started
through PyTorch's own launcher, ``torchrun`` (``python -m torch.distributed.run``), which starts
one training process (a *rank*) per GPU, and transformers' Trainer with accelerate underneath runs
DDP or FSDP across them. This module holds what the rest of the engine needs to know about that:

- :class:`World`: how many processes per machine and how many machines (``distributed.gpus`` and
  ``distributed.nodes`` against the GPUs this machine shows), decided by the launcher;
- :func:`choose_strategy`: single, DDP or FSDP, decided once by rank 0 (``distributed.strategy``);
- :class:`Rank`: this process's place in the world, read from the launcher's environment;
- :class:`Launch`: the torchrun command for one machine (``--nodes/--node-rank/--master``);
- the run's records of its ranks (``ranks.json``, one log per rank under ``logs/``), so ``stop``
  can reach every rank and a rank that dies is named, with its log's tail;
- :class:`Control`: a small gloo process group beside the training one, over which the ranks
  agree to stop at the same step and gather their memory, without a GPU synchronisation.

The pure parts import nothing heavy; torch loads only inside the functions that use it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from engine.errors import UserError

RANKS_FILE = "ranks.json"
"""The run's ranks on this machine (pid, start time, log), written by local rank 0 once all have started."""

LOGS_DIR = "logs"
"""Where each rank of a multi-process run writes its own output (``logs/rank-R.log``)."""

_STRATEGY_NAMES = {
    "single": ("one GPU", "one GPU"),
    "ddp": ("DDP", "DDP (each GPU holds the whole model and trains its share of each batch)"),
    "fsdp": ("FSDP", "FSDP (the model, adapters and optimizer states are sharded across the GPUs)"),
}
"""Each strategy of ``engine.memory.STRATEGIES``: (in a word, in words); read through the two below."""

STRATEGY_SHORT = {strategy: short for strategy, (short, _) in _STRATEGY_NAMES.items()}
"""Each strategy in a word, e.g. ``DDP``: the memory step's GPU line."""

STRATEGY_WORDS = {strategy: words for strategy, (_, words) in _STRATEGY_NAMES.items()}
"""Each strategy in words, what it does: ``estimate``'s strategy line."""

LAUNCHER_SIGNALS = "SIGTERM,SIGINT,SIGQUIT"
"""The signals torchrun turns into "stop every worker" (``TORCHELASTIC_SIGNALS_TO_HANDLE``). SIGHUP is
left out: the launcher runs in its own session, and a hangup must never end a run."""

WATCH_INTERVAL_S = 0.5
"""How often local rank 0 looks whether the other ranks on its machine are still alive."""


def log_path(run_dir: str | os.PathLike, rank: int) -> Path:
    """Where rank ``rank`` of a multi-process run writes its output."""
    return Path(run_dir) / LOGS_DIR / f"rank-{rank}.log"


# ---------------------------------------------------------------------------------------------
# The world: processes per machine x machines


def visible_gpus(gpus: list) -> list:
    """The GPUs CUDA will use: ``engine.gpu.probe_gpus()``'s list narrowed by ``CUDA_VISIBLE_DEVICES``
    (NVML lists every GPU of the machine, CUDA only the visible ones, renumbered from 0)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return list(gpus)
    wanted = [v.strip() for v in visible.split(",") if v.strip()]
    if not all(v.isdigit() for v in wanted):
        return list(gpus)  # UUIDs or MIG names: trust NVML's order
    by_index = {g.index: g for g in gpus}
    return [by_index[int(v)] for v in wanted if int(v) in by_index]


@dataclass(frozen=True)
class World:
    """How many processes train one run: ``procs_per_node`` on each of ``nodes`` machines."""

    procs_per_node: int = 1
    """Processes (GPUs, or CPU processes on a machine without one) per machine."""
    nodes: int = 1
    """Machines."""
    device: str = "cpu"
    """``cuda`` or ``cpu``: the processes' device (and so their backend)."""

    @property
    def size(self) -> int:
        """Processes in all: the world size the effective batch counts."""
        return self.procs_per_node * self.nodes

    @property
    def distributed(self) -> bool:
        """More than one process: the run goes through torchrun."""
        return self.size > 1

    @property
    def backend(self) -> str:
        """The collective backend: NCCL between GPUs, gloo between CPU processes."""
        return "nccl" if self.device == "cuda" else "gloo"

    def describe(self) -> str:
        """``2 GPUs``, ``1 GPU``, ``2 CPU processes``, ``8 GPUs x 2 machines``."""
        n = self.procs_per_node
        if self.device == "cuda":
            unit = "GPU" if n == 1 else "GPUs"
        else:
            unit = "CPU process" if n == 1 else "CPU processes"
        return f"{n} {unit}" if self.nodes == 1 else f"{n} {unit} x {self.nodes} machines"

    def to_json(self) -> dict:
        """What ``process.json`` and the start event record."""
        return {"procs_per_node": self.procs_per_node, "nodes": self.nodes, "device": self.device,
                "world_size": self.size}

    @classmethod
    def from_json(cls, raw: dict | None) -> World | None:
        """The world a run recorded; None for a run that recorded none (a single process)."""
        if not isinstance(raw, dict):
            return None
        try:
            return cls(int(raw["procs_per_node"]), int(raw.get("nodes", 1)), str(raw.get("device", "cpu")))
        except (KeyError, TypeError, ValueError):
            return None


def plan_world(preset, gpus: list | None = None) -> World:
    """The processes a run of ``preset`` starts on this machine: ``distributed.gpus`` (auto: every
    visible GPU, or one process on a machine without one) x ``distributed.nodes``.

    Raises :class:`UserError` when the preset asks for more GPUs than this machine shows."""
    if gpus is None:
        from engine.gpu import probe_gpus

        gpus = probe_gpus()
    gpus = visible_gpus(gpus)
    d = preset.distributed
    if d.strategy == "single":
        return World(1, 1, "cuda" if gpus else "cpu")
    if not gpus:
        return World(1 if d.gpus == "auto" else d.gpus, d.nodes, "cpu")
    if d.gpus == "auto":
        return World(len(gpus), d.nodes, "cuda")
    if d.gpus > len(gpus):
        shown = f"{len(gpus)} GPU{'s' if len(gpus) != 1 else ''}"
        raise UserError(f"distributed.gpus is {d.gpus}, but this machine shows {shown}",
                        f"set distributed.gpus to {len(gpus)} or auto (CUDA_VISIBLE_DEVICES narrows what is shown)")
    return World(d.gpus, d.nodes, "cuda")


def choose_strategy(preset, world: World, fits: Callable[[str], bool | None] | None = None) -> tuple[str, str]:
    """The strategy for ``world`` and why, in words: ``distributed.strategy``, or for ``auto`` one GPU
    when there is one process, DDP when the model fits on each GPU, FSDP when it fits only sharded.

    ``fits(strategy)`` says whether the estimate for that strategy fits each GPU (None: unknown, as
    on the CPU). Raises :class:`UserError` for a combination that cannot run."""
    asked = preset.distributed.strategy
    if not world.distributed:
        if asked in ("ddp", "fsdp"):
            return "single", f"{asked} asked for, but there is one process: trains on one device"
        return "single", "one process"
    if asked == "fsdp" and world.device == "cpu":
        # accelerate (1.x) turns FSDP on only for GPU-type process groups (AcceleratorState lists
        # MULTI_GPU, MULTI_NPU, ... but not MULTI_CPU): on CPU processes the Trainer would silently run DDP.
        raise UserError("distributed.strategy fsdp needs CUDA GPUs (accelerate shards models only across GPUs)",
                        "on the CPU use distributed.strategy ddp (or auto)")
    if asked in ("ddp", "fsdp"):
        return asked, "asked for in the preset"
    if world.device == "cpu":
        return "ddp", "several CPU processes: each holds the whole model"
    fits = fits or (lambda strategy: None)
    if fits("ddp") is not False:
        return "ddp", "the model fits on each GPU: DDP, the faster of the two"
    if fits("fsdp"):
        return "fsdp", "the model does not fit on one GPU but fits sharded across them"
    return "ddp", "it fits neither on one GPU nor sharded (see the memory estimate)"


# ---------------------------------------------------------------------------------------------
# This process's place in the world


@dataclass(frozen=True)
class Rank:
    """One training process's place: its rank among all, on its machine, and the world's size."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0

    @property
    def distributed(self) -> bool:
        """Started by torchrun as one of several processes."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: decides what all ranks share (the strategy) and writes the checkpoints' model files."""
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """Local rank 0: writes this machine's ``events.jsonl`` and ``ranks.json`` and watches its siblings."""
        return self.local_rank == 0

    @classmethod
    def from_env(cls, env: dict | None = None) -> Rank:
        """The launcher's variables (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``...); rank 0 of 1 without them."""
        env = os.environ if env is None else env

        def num(name: str, default: int) -> int:
            try:
                return int(env.get(name, default))
            except (TypeError, ValueError):
                return default

        return cls(num("RANK", 0), num("LOCAL_RANK", 0), num("WORLD_SIZE", 1), num("LOCAL_WORLD_SIZE", 1),
                   num("GROUP_RANK", 0))


# ---------------------------------------------------------------------------------------------
# Launching: the torchrun command for one machine


def parse_master(text: str) -> tuple[str, int]:
    """``HOST:PORT`` as (host, port); :class:`UserError` naming what is wrong otherwise."""
    host, sep, port = str(text).strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UserError(f"--master {text!r} is not HOST:PORT",
                        "name node 0's address and a free port, e.g. --master 10.0.0.1:29500")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class Launch:
    """How this machine starts its part of a run: the world, and for several machines its place."""

    world: World
    node_rank: int = 0
    """This machine's rank among the machines (0 is the one ``master`` names)."""
    master: str | None = None
    """``HOST:PORT`` of machine 0, where the machines meet; None on one machine."""

    def __post_init__(self) -> None:
        if self.world.nodes > 1:
            if self.master is None:
                raise UserError(f"a run on {self.world.nodes} machines needs --master HOST:PORT (machine 0's address)",
                                "start it on each machine with --nodes N --node-rank R --master HOST:PORT")
            parse_master(self.master)
        if not 0 <= self.node_rank < self.world.nodes:
            raise UserError(f"--node-rank {self.node_rank} is not between 0 and {self.world.nodes - 1}",
                            f"number the {self.world.nodes} machines 0 to {self.world.nodes - 1}")

    def command(self, run_dir: str | os.PathLike, resume: bool = False, python: str | None = None) -> list[str]:
        """torchrun, as ``python -m torch.distributed.run``, starting ``engine.train`` once per process."""
        cmd = [python or sys.executable, "-m", "torch.distributed.run",
               f"--nproc-per-node={self.world.procs_per_node}", "--max-restarts=0"]
        if self.world.nodes == 1:
            cmd.append("--standalone")  # a free local port for the rendezvous: runs side by side never clash
        else:
            host, port = parse_master(self.master)
            cmd += [f"--nnodes={self.world.nodes}", f"--node-rank={self.node_rank}",
                    f"--master-addr={host}", f"--master-port={port}"]
        cmd += ["-m", "engine.train", str(run_dir), "--launched"]
        return cmd + (["--resume"] if resume else [])

    def environment(self) -> dict:
        """Variables the launcher needs beyond the caller's."""
        env = {"TORCHELASTIC_SIGNALS_TO_HANDLE": LAUNCHER_SIGNALS}
        if self.world.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            # CPU processes share the cores (torchrun would give each one thread and say so in the log).
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.world.procs_per_node))
        return env

    def to_json(self) -> dict:
        """What ``process.json`` records of it."""
        return {**self.world.to_json(), "node_rank": self.node_rank, "master": self.master}

    @classmethod
    def from_json(cls, raw: dict | None) -> Launch | None:
        """The launch a run recorded; None for a single-process run."""
        world = World.from_json(raw)
        if world is None:
            return None
        return cls(world, int(raw.get("node_rank") or 0), raw.get("master"))


def shell_command(cmd: list[str]) -> str:
    """A command as one line a person can paste."""
    import shlex

    return " ".join(shlex.quote(c) for c in cmd)


# ---------------------------------------------------------------------------------------------
# The ranks of a run on this machine


@dataclass(frozen=True)
class RankRecord:
    """One rank as ``ranks.json`` records it."""

    rank: int
    local_rank: int
    pid: int
    start_time: str | None
    """``/proc/PID/stat``'s start time: tells the process from a later one with a reused pid."""
    host: str
    log: str
    node: int = 0
    """The machine's rank (torchrun's ``GROUP_RANK``): which ranks share a machine, even where
    containers on two machines carry the same host name."""


    @classmethod
    def from_json(cls, raw, where: str = "a rank record") -> RankRecord:
        """A record as written by :func:`this_rank_record`, every field checked for its type (a peer's
        or a file's word is data, never trusted as it comes); :class:`DamagedRecord` otherwise."""
        from engine.proc import DamagedRecord, checked_pid

        if not isinstance(raw, dict):
            raise DamagedRecord(f"{where} is not a rank record")
        known = {"rank", "local_rank", "pid", "start_time", "host", "log", "node"}
        ints = ("rank", "local_rank", "node")
        try:
            values = {k: raw[k] for k in known - {"node"}}
        except KeyError as exc:
            raise DamagedRecord(f"{where} has no {exc.args[0]!r}") from None
        values["node"] = raw.get("node", 0)
        for k in ints:
            if isinstance(values[k], bool) or not isinstance(values[k], int) or not 0 <= values[k] < 1 << 20:
                raise DamagedRecord(f"{where}: {k} = {values[k]!r} is not a rank number")
        checked_pid(values["pid"], where)
        if values["start_time"] is not None and not isinstance(values["start_time"], str):
            raise DamagedRecord(f"{where}: start_time = {values['start_time']!r} is not a start time")
        for k in ("host", "log"):
            if not isinstance(values[k], str) or "\0" in values[k]:
                raise DamagedRecord(f"{where}: {k} is not text")
        return cls(**values)


def this_rank_record(run_dir: str | os.PathLike, rank: Rank) -> RankRecord:
    """This process as a record."""
    from engine.proc import process_start_time

    pid = os.getpid()
    return RankRecord(rank.rank, rank.local_rank, pid, process_start_time(pid), socket.gethostname(),
                      str(log_path(run_dir, rank.rank)), rank.node_rank)


def write_ranks(run_dir: str | os.PathLike, records: list[RankRecord]) -> None:
    """Record this machine's ranks (local rank 0 does, once every rank has started)."""
    from engine.preset import atomic_write_text

    atomic_write_text(Path(run_dir) / RANKS_FILE, json.dumps({
        "written": time.time(), "ranks": [asdict(r) for r in records]}))


def read_ranks(run_dir: str | os.PathLike, strict: bool = False) -> list[RankRecord]:
    """This machine's ranks of the run's newest launch (records of another host are left out);
    empty when there are none (yet). A damaged file or entry is skipped, or with ``strict`` raises
    :class:`engine.proc.DamagedRecord` (``stop`` signals nobody on a damaged record's word)."""
    from engine.proc import DamagedRecord

    path = Path(run_dir) / RANKS_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError):
        if strict:
            raise DamagedRecord(f"{path} cannot be read; nobody was signalled") from None
        return []
    entries = raw.get("ranks") if isinstance(raw, dict) else None
    if not isinstance(entries, list):
        if strict:
            raise DamagedRecord(f"{path} is not a list of ranks; nobody was signalled")
        return []
    out, host = [], socket.gethostname()
    for i, entry in enumerate(entries):
        try:
            record = RankRecord.from_json(entry, f"{path} entry {i + 1}")
        except DamagedRecord:
            if strict:
                raise
            continue
        if record.host == host:
            out.append(record)
    return out


def rank_alive(record: RankRecord, run_dir: str | os.PathLike) -> bool:
    """Whether the recorded rank is still running: the same process (not a reused pid), this run's."""
    from engine.proc import verified_quietly

    return verified_quietly(record.pid, record.start_time, run_dir)


def dead_ranks(records: list[RankRecord], run_dir: str | os.PathLike) -> list[RankRecord]:
    """The ones of ``records`` (ranks of this machine) that are gone."""
    return [r for r in records if not rank_alive(r, run_dir)]


ERROR_WORDS = ("Error", "error", "Traceback", "Killed", "Exception", "exception", "Segmentation", "Aborted")
"""Words that make a log line worth quoting as a rank's last word."""


def stopped_marker(run_dir: str | os.PathLike, rank: int) -> Path:
    """The file a rank leaves when a stop ended it (``logs/rank-R.stopped``): a sibling that sees it
    gone knows it left for a stop, not a fault."""
    return Path(run_dir) / LOGS_DIR / f"rank-{rank}.stopped"


def mark_stopped(run_dir: str | os.PathLike, rank: Rank) -> None:
    """Say, for the watchdog of this machine, that a stop ends this rank (never raises)."""
    if rank.distributed:
        try:
            from engine.files import open_append

            os.close(open_append(stopped_marker(run_dir, rank.rank)))
        except OSError:
            pass


def clear_stopped(run_dir: str | os.PathLike, rank: Rank) -> None:
    """Remove this rank's marker of an earlier launch's stop (a resume begins)."""
    try:
        stopped_marker(run_dir, rank.rank).unlink()
    except OSError:
        pass


def left_for_a_stop(run_dir: str | os.PathLike, dead: list[RankRecord]) -> bool:
    """Whether every one of the ``dead`` ranks ended because a stop reached it."""
    return bool(dead) and all(stopped_marker(run_dir, r.rank).exists() for r in dead)


def describe_dead(dead: list[RankRecord]) -> str:
    """A dead rank in words: which, its pid, and its log's last error lines (a rank killed from
    outside has none: that is said instead)."""
    from engine.files import file_tail

    first = dead[0]
    tail = file_tail(first.log, 40)
    start = next((i for i in range(len(tail) - 1, -1, -1) if "Traceback" in tail[i]), None)
    said = tail[start:][-3:] if start is not None else [ln for ln in tail if any(w in ln for w in ERROR_WORDS)][-2:]
    said = [ln.strip() for ln in said]
    who = (f"ranks {', '.join(str(r.rank) for r in dead)} died (rank {first.rank}, pid {first.pid}, first)"
           if len(dead) > 1 else f"rank {first.rank} (pid {first.pid}) died")
    if said:
        return f"{who}; its log {first.log} ends: " + " | ".join(said)
    return (f"{who} with no error in its log {first.log}: killed from outside (the machine's OOM killer, "
            "kill -9?); torchrun's summary in train.log has its exit status")


class Watchdog:
    """A thread in local rank 0 that notices another rank of its machine dying.

    A rank killed (the machine's OOM killer, ``kill -9``, a segfault in a kernel) leaves the others
    waiting in a collective forever on NCCL. The watchdog sees the pid gone within
    ``WATCH_INTERVAL_S`` and calls ``on_dead`` with the dead ranks; ``on_dead`` ends the run."""

    def __init__(self, records: list[RankRecord], on_dead: Callable[[list[RankRecord]], None],
                 run_dir: str | os.PathLike, interval: float = WATCH_INTERVAL_S) -> None:
        self.run_dir = run_dir
        self.records = [r for r in records if r.pid != os.getpid()]
        self.on_dead = on_dead
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="rank-watchdog", daemon=True)

    def start(self) -> Watchdog:
        """Start watching."""
        if self.records:
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching (the run is ending by itself: siblings exit on their own now)."""
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            dead = dead_ranks(self.records, self.run_dir)
            if dead and not self._stop.is_set():
                self.on_dead(dead)
                return


# ---------------------------------------------------------------------------------------------
# The control channel between ranks (torch)


class Control:
    """Collectives the ranks use to agree, on a gloo group beside the training one so they never
    wait on the GPU: stop at the same step, gather memory and tokens, share rank 0's decisions.
    A single process gets the same calls, answered locally."""

    def __init__(self, rank: Rank) -> None:
        self.rank = rank
        self.group = None

    def start(self, device: str, timeout_s: float = 1800.0) -> Control:
        """Join the process group (NCCL on GPUs, gloo on the CPU) and open the gloo control group."""
        if not self.rank.distributed:
            return self
        import datetime

        import torch
        import torch.distributed as dist

        if device == "cuda":
            torch.cuda.set_device(self.rank.local_rank)
        if not dist.is_initialized():
            backend = "nccl" if device == "cuda" else "gloo"
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        self.group = dist.new_group(backend="gloo") if device == "cuda" else dist.group.WORLD
        return self

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any (a stop asked of one rank stops all at the same step)."""
        if self.group is None:
            return flag
        import torch
        import torch.distributed as dist

        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())

    def gather(self, obj, check: Callable | None = None) -> list:
        """Every rank's ``obj`` (JSON: numbers, text, lists, mappings), in rank order, on every rank.

        Sent as JSON bytes in tensors, never pickled: unpickling what a peer sends would run any code
        it chose. ``check`` validates each peer's value (a :class:`ValueError` or :class:`TypeError`
        from it is a refused message)."""
        if self.group is None:
            return [obj]
        import torch
        import torch.distributed as dist

        mine = _encode(obj)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.rank.world_size)]
        dist.all_gather(sizes, torch.tensor([len(mine)], dtype=torch.int64), group=self.group)
        lengths = [_checked_length(int(n.item()), i) for i, n in enumerate(sizes)]
        box = torch.zeros(max(lengths), dtype=torch.uint8)
        box[:len(mine)] = torch.frombuffer(bytearray(mine), dtype=torch.uint8)
        out = [torch.zeros(max(lengths), dtype=torch.uint8) for _ in range(self.rank.world_size)]
        dist.all_gather(out, box, group=self.group)
        return [_decode(t[:n].numpy().tobytes(), i, check) for i, (t, n) in enumerate(zip(out, lengths))]

    def share(self, obj, check: Callable | None = None):
        """Rank 0's ``obj`` (JSON, as :meth:`gather` sends it) on every rank."""
        if self.group is None:
            return obj
        import torch
        import torch.distributed as dist

        mine = _encode(obj) if self.rank.is_main else b""
        size = torch.tensor([len(mine)], dtype=torch.int64)
        dist.broadcast(size, src=0, group=self.group)
        length = _checked_length(int(size.item()), 0)
        box = torch.zeros(length, dtype=torch.uint8)
        if self.rank.is_main:
            box[:] = torch.frombuffer(bytearray(mine), dtype=torch.uint8)
        dist.broadcast(box, src=0, group=self.group)
        return _decode(box.numpy().tobytes(), 0, check)

    def close(self) -> None:
        """Leave the process group (quietly: a peer may be gone already)."""
        if self.group is None:
            return
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass
        self.group = None


MAX_MESSAGE_BYTES = 1 << 20
"""The longest message a rank accepts from a peer on the control channel (records and numbers are
a few hundred bytes)."""


def _encode(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def _checked_length(n: int, rank: int) -> int:
    if not 0 < n <= MAX_MESSAGE_BYTES:
        raise RuntimeError(f"rank {rank} sent a control message of {n} bytes (allowed: 1 to {MAX_MESSAGE_BYTES})")
    return n


def _decode(raw: bytes, rank: int, check: Callable | None):
    try:
        value = json.loads(raw.decode("utf-8"))
        if check is not None:
            check(value)
    except (UnicodeDecodeError, ValueError, TypeError) as exc:
        raise RuntimeError(f"rank {rank} sent a control message that is refused: {exc}") from None
    return value


def check_count(value) -> None:
    """A peer's count (tokens): a whole number, not negative."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{value!r} is not a count")


def check_numbers(value) -> None:
    """A peer's measurements: a mapping of names to numbers (or None)."""
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)))
            for k, v in value.items()):
        raise ValueError("not a mapping of names to numbers")
