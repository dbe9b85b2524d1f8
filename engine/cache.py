"""What qlora-wizard keeps in its cache, how large it is, and clearing it (``qlora-wizard cache``).

The cache is one folder (:func:`engine.demo.cache_root`: ``$QLORA_WIZARD_CACHE``, else
``$XDG_CACHE_HOME/qlora-wizard``, else ``~/.cache/qlora-wizard``). It holds:

- ``data/``: tokenized data sets (Arrow files), one entry per data source, data settings,
  sequence length, seed and tokenizer, so a rerun does not tokenize again (``engine.data.cache``);
- the offline demo model (``engine.demo``), made on first use;
- ``models/``: local ``.gguf`` files converted to bf16 model folders (``engine.gguf``, made again on
  the next run of the same file) and the real-model test fixture (``scripts/real_model.py``);
- ``last-draft.yaml``: the wizard's draft when it was left without starting a run.

Everything in it can be made again; clearing it loses no run (runs live in their own folders).
Models downloaded from the Hub are in huggingface_hub's cache (``HF_HOME``), which is not ours:
``hf cache`` manages it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from engine.errors import UserError, os_error

PARTS = ("data", "demo", "models", "drafts")


def _older_demo(name: str) -> bool:
    """A demo model of an older recipe (``tiny-llama-v1`` once the recipe is v2): the demo's too, so
    ``cache clear --only demo`` removes it."""
    import re

    from engine.demo import DEMO_MODEL_DIRNAME

    stem = DEMO_MODEL_DIRNAME.rsplit("-v", 1)[0]
    return re.fullmatch(rf"\.?{re.escape(stem)}-v\d+(\.tmp-.*)?", name) is not None
"""What ``qlora-wizard cache clear --only`` can name."""


@dataclass(frozen=True)
class CachePart:
    """One thing the cache holds."""

    name: str
    """``data``, ``demo``, ``models``, ``drafts`` or ``other``."""
    what: str
    """In words."""
    paths: tuple[Path, ...]
    bytes: int
    files: int


@dataclass(frozen=True)
class CacheReport:
    """The cache's place and what it holds."""

    root: Path
    parts: tuple[CachePart, ...]

    @property
    def bytes(self) -> int:
        """Everything, in bytes."""
        return sum(p.bytes for p in self.parts)

    def to_json(self) -> dict:
        """The stable JSON form of ``qlora-wizard cache --json``."""
        return {"root": str(self.root), "bytes": self.bytes,
                "parts": [{"name": p.name, "what": p.what, "paths": [str(x) for x in p.paths],
                           "bytes": p.bytes, "files": p.files} for p in self.parts]}


def _size(path: Path) -> tuple[int, int]:
    """Bytes and files under ``path`` (links are not followed)."""
    if path.is_symlink() or path.is_file():
        try:
            return path.lstat().st_size, 1
        except OSError:
            return 0, 0
    total = files = 0
    for dirpath, _dirs, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
                files += 1
            except OSError:
                pass
    return total, files


def _parts_paths(root: Path) -> dict[str, list[Path]]:
    from engine.demo import DEMO_MODEL_DIRNAME
    from engine.gguf import MODELS_DIRNAME

    out: dict[str, list[Path]] = {"data": [], "demo": [], "models": [], "drafts": [], "other": []}
    if not root.is_dir():
        return out
    for p in sorted(root.iterdir()):
        if p.name == "data":
            out["data"].append(p)
        elif p.name == DEMO_MODEL_DIRNAME or p.name.startswith(f".{DEMO_MODEL_DIRNAME}.tmp-") or _older_demo(p.name):
            out["demo"].append(p)
        elif p.name == MODELS_DIRNAME:
            out["models"].append(p)
        elif p.name.endswith("draft.yaml"):
            out["drafts"].append(p)
        else:
            out["other"].append(p)
    return out


WORDS = {"data": "tokenized data sets (made again by the next run of the same data)",
         "demo": "the offline demo model (made again on first use)",
         "models": "GGUF files converted to model folders, the real-model test fixture (made again when needed)",
         "drafts": "the wizard's kept draft",
         "other": "other files (not made by this version)"}


def cache_report(root: Path | None = None) -> CacheReport:
    """What the cache holds, part by part, with sizes."""
    from engine.demo import cache_root

    root = Path(root) if root is not None else cache_root()
    parts = []
    for name, paths in _parts_paths(root).items():
        if not paths:
            continue
        sizes = [_size(p) for p in paths]
        parts.append(CachePart(name, WORDS[name], tuple(paths), sum(b for b, _ in sizes), sum(f for _, f in sizes)))
    return CacheReport(root, tuple(parts))


def clear_cache(only: str | None = None, root: Path | None = None) -> CacheReport:
    """Remove the cache's contents (``only``: one of :data:`PARTS`); returns what was removed. Files
    of other programs that happen to be in the folder (``other``) are left alone."""
    if only is not None and only not in PARTS:
        raise UserError(f"--only {only} is not one of {', '.join(PARTS)}")
    report = cache_report(root)
    removed = []
    for part in report.parts:
        if part.name == "other" or (only is not None and part.name != only):
            continue
        for path in part.paths:
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise os_error(exc, "remove", exc.filename or path) from None
        removed.append(part)
    return CacheReport(report.root, tuple(removed))
