#!/usr/bin/env bash
# Wheels for a GPU machine without internet: what it needs to run the engine and the benchmarks
# (python -m engine.train, benchmarks/bench.py including --baseline trl, benchmarks/gpu_check.py)
# when it has only Python 3.12, torch, transformers, peft, accelerate and triton (and what those
# require) installed.
#
# Why: such a machine cannot reach a package index, so what is missing has to travel with the
# working tree, as wheels for Python 3.12 on x86-64 Linux (manylinux), fetched here:
# bitsandbytes, datasets, pydantic, trl, liger-kernel, nvidia-ml-py and whatever of their own
# requirements is not there already (datasets: pyarrow, pandas, dill, multiprocess, xxhash, ...;
# pydantic: pydantic-core, annotated-types, typing-inspection). Each wheel is downloaded with
# `pip download --no-deps`, its METADATA is read, and each requirement (markers evaluated for
# CPython 3.12 on Linux x86-64) that is neither fetched nor already there is fetched too.
# "Already there" is the closure of what torch, transformers, peft, accelerate and triton require,
# read from this machine's installed packages (./.venv, or $PYTHON), less the packages asked for and
# pydantic's own (this machine's newer typer pulls pydantic in; a GPU machine's may not).
#
#     benchmarks/fetch_wheels.sh [--slim] [DEST]          # DEST defaults to wheels/ (git-ignored)
#
# --slim instead counts as there exactly what the image of the GPU machines lent to this project
# holds (as listed for it on 2026-11-17: torch, transformers, peft, accelerate, triton, pyarrow,
# pandas, xxhash, fsspec, nvidia-ml-py, psutil, ...; not bitsandbytes, datasets, pydantic, trl).
# Without it the set is too large to travel: a call to such a machine carries at most 64 MiB in
# all, working tree included, and pyarrow (~52 MiB) plus bitsandbytes (~41 MiB, CUDA libraries for
# every CUDA version) alone exceed it. With --slim it is about 46 MiB (bitsandbytes most of it).
#
# On the GPU machine, with the folder carried (the device tool's `carry: ["wheels"]`):
#
#     python3 -m pip install --no-index --find-links wheels bitsandbytes datasets pydantic trl liger-kernel nvidia-ml-py
#
# (pip checks every requirement against what is installed and the folder, and fails naming what
# is missing.) Where the environment is read-only, unpack them beside it instead:
#
#     python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site wheels/*.whl && export PYTHONPATH=/tmp/site
#
# DEST is emptied of *.whl first (two versions of one package stop the whole install). The
# versions are the ones tested here; PACKAGES='name==version ...' overrides the list.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SLIM=0
DEST=""
for arg in "$@"; do
    case "$arg" in
        --slim) SLIM=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "unknown option $arg" >&2; exit 2 ;;
        *) DEST="$arg" ;;
    esac
done
DEST="${DEST:-$ROOT/wheels}"
PACKAGES="${PACKAGES:-bitsandbytes==0.50.2 datasets==5.2.0 pydantic==2.14.4 trl==1.16.0 liger-kernel==0.8.5 nvidia-ml-py==13.615.71}"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
mkdir -p "$DEST"
rm -f "$DEST"/*.whl

# The Python packages of the GPU machines' image (names as listed for it, 2026-11-17).
DEVICE_IMAGE="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"
if [ "$SLIM" = 1 ]; then EXTRA_PRESENT="$DEVICE_IMAGE"; else EXTRA_PRESENT=""; fi

PACKAGES="$PACKAGES" DEST="$DEST" EXTRA_PRESENT="$EXTRA_PRESENT" ROOT="$ROOT" SLIM="$SLIM" "$PYTHON" - <<'PY'
import email.parser
import os
import re
import subprocess
import sys
import zipfile
from collections import deque
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename

BASE = ["torch", "transformers", "peft", "accelerate", "triton"]
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
          "implementation_name": "cpython", "platform_python_implementation": "CPython"}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]
dest = Path(os.environ["DEST"])


def wanted(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate(TARGET | {"extra": e}) for e in (extras or {""}))


def installed_closure(names: list[str]) -> set[str]:
    """What these packages and their requirements are, as installed here (names only)."""
    seen, todo = set(), deque((n, frozenset()) for n in names)
    while todo:
        name, extras = todo.popleft()
        key = canonicalize_name(name)
        seen.add(key)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if wanted(req, set(extras)) and canonicalize_name(req.name) not in seen:
                todo.append((req.name, frozenset(req.extras)))
    return seen


if os.environ["SLIM"] == "1":  # what the GPU machines' image holds, as listed for it
    present = {canonicalize_name(n) for n in os.environ["EXTRA_PRESENT"].split()}
else:
    # This machine's versions can require more than the GPU machine's do (typer 0.29, which transformers
    # requires, needs pydantic; older ones do not): never count the packages asked for, nor pydantic's own.
    present = installed_closure(BASE) - {canonicalize_name(Requirement(s).name) for s in os.environ["PACKAGES"].split()}
    present -= {"pydantic", "pydantic-core", "annotated-types", "typing-inspection"}
queue = deque((Requirement(s), "asked for") for s in os.environ["PACKAGES"].split())
fetched: dict[str, tuple[Path, str]] = {}  # name -> (wheel, version)
specs: dict[str, list[tuple[SpecifierSet, str]]] = {}
skipped: dict[str, str] = {}
while queue:
    req, why = queue.popleft()
    key = canonicalize_name(req.name)
    specs.setdefault(key, []).append((req.specifier, why))
    if key in present:
        skipped.setdefault(key, why)
        continue
    if key in fetched:
        continue
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", "-d", str(dest)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    before = set(dest.glob("*.whl"))
    subprocess.run(cmd + [f"{req.name}{req.specifier}"], check=True)
    new = [w for w in set(dest.glob("*.whl")) - before
           if canonicalize_name(parse_wheel_filename(w.name)[0]) == key]
    if not new:  # pip found it in the folder already (it was fetched under another spelling)
        new = [w for w in dest.glob("*.whl") if canonicalize_name(parse_wheel_filename(w.name)[0]) == key]
    wheel = new[0]
    version = str(parse_wheel_filename(wheel.name)[1])
    fetched[key] = (wheel, version)
    with zipfile.ZipFile(wheel) as z:
        meta_name = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        meta = email.parser.Parser().parsestr(z.read(meta_name).decode())
    for line in meta.get_all("Requires-Dist") or []:
        dep = Requirement(line)
        if wanted(dep, set(req.extras)):
            queue.append((dep, f"{req.name} {version}"))

conflicts = [f"{name} {version} does not satisfy {spec} ({why})"
             for name, (_, version) in fetched.items()
             for spec, why in specs.get(name, []) if not spec.contains(version, prereleases=True)]
total = 0
print(f"\nwheels in {dest}:")
for name, (wheel, version) in sorted(fetched.items()):
    size = wheel.stat().st_size
    total += size
    print(f"  {size / 2**20:7.2f} MiB  {wheel.name}")
print(f"  {total / 2**20:7.2f} MiB  in all, {len(fetched)} wheels")
print("already there (not fetched): " + ", ".join(f"{n} (for {w})" for n, w in sorted(skipped.items())))
tree = subprocess.run(["git", "-C", os.environ["ROOT"], "ls-files", "-z", "-co", "--exclude-standard"],
                      capture_output=True, check=False).stdout.split(b"\0")
tree_bytes = sum(os.path.getsize(os.path.join(os.environ["ROOT"], f.decode()))
                 for f in tree if f and os.path.isfile(os.path.join(os.environ["ROOT"], f.decode())))
print(f"working tree that travels beside them: {tree_bytes / 2**20:.2f} MiB")
limit = 64 * 2**20
if total + tree_bytes > limit:
    big = sorted(fetched.items(), key=lambda kv: -kv[1][0].stat().st_size)[:3]
    print(f"\nWARNING: {(total + tree_bytes) / 2**20:.1f} MiB is over the 64 MiB that one call to the GPU machine "
          f"carries. Largest: " + ", ".join(f"{n} {w.stat().st_size / 2**20:.1f} MiB" for n, (w, _) in big) + ".")
    if os.environ["SLIM"] != "1":
        print("The lent GPU machines' image already has pyarrow, pandas, xxhash, fsspec and nvidia-ml-py: "
              "run with --slim to leave out what it holds.")
    else:
        print("Carry it in two calls to one warm machine (installed packages stay while it is held).")
for c in conflicts:
    print(f"WARNING: {c}")
top = " ".join(canonicalize_name(Requirement(s).name) for s in os.environ["PACKAGES"].split())
print(f"\non the GPU machine (folder carried as {dest.name}/):\n"
      f"  python3 -m pip install --no-index --find-links {dest.name} {top}\n"
      f"or, where its environment is read-only:\n"
      f"  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site {dest.name}/*.whl "
      f"&& export PYTHONPATH=/tmp/site")
sys.exit(1 if conflicts else 0)
PY
