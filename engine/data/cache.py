"""The tokenized-data cache: a rerun with the same data, settings and tokenizer loads Arrow files
instead of tokenizing again. Entries are written to a temporary folder beside and renamed into
place, so a reader never sees half of one; a damaged entry is rebuilt, not reported."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from engine.data.sources import Source, load_hub
from engine.files import sha256_file

CACHE_VERSION = 2
"""Bumped whenever the tokenized output or its stats for the same inputs change, so old cache entries
are not reused (2: the stats count the examples that do not end with a stop token)."""


def default_data_cache_dir() -> Path:
    """``data`` in the qlora-wizard cache (see :func:`engine.demo.cache_root`)."""
    from engine.demo import cache_root

    return cache_root() / "data"


def source_identity(src: Source | None) -> Any:
    """What identifies a source's contents: the file's bytes, or the Hub id, split and fingerprint."""
    if src is None:
        return None
    if src.kind == "hub":
        ds = load_hub(src)
        return {"hub": src.hub_id, "split": src.split, "fingerprint": getattr(ds, "_fingerprint", None)}
    return {"kind": src.kind, "sha256": sha256_file(src.path)}


def cache_key(material: dict) -> str:
    """The entry name for everything the tokenized output depends on."""
    material = {"version": CACHE_VERSION, **material}
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:24]


def to_dataset(tok):
    """A datasets.Dataset with int32 list columns input_ids and labels, built straight from Arrow."""
    return columns_dataset({"input_ids": tok.input_ids, "labels": tok.labels})


def pairs_dataset(pairs):
    """A datasets.Dataset of tokenized preference pairs: int32 list columns prompt_ids, chosen_ids and
    rejected_ids (TRL's tokenized layout)."""
    return columns_dataset({"prompt_ids": pairs.prompt_ids, "chosen_ids": pairs.chosen_ids,
                            "rejected_ids": pairs.rejected_ids})


def columns_dataset(columns: dict):
    """A datasets.Dataset with an int32 list column per name (each a list of int arrays, one per row),
    built straight from Arrow."""
    import datasets
    import numpy as np
    import pyarrow as pa

    list_type = getattr(datasets, "List", None) or datasets.Sequence
    seq = list_type(datasets.Value("int32"))
    features = datasets.Features({name: seq for name in columns})

    def column(arrays):
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(x) for x in arrays])
        values = np.concatenate(arrays).astype(np.int32) if arrays else np.zeros(0, dtype=np.int32)
        return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values)).cast(pa.list_(pa.int32()))

    return datasets.Dataset.from_dict({name: column(arrays) for name, arrays in columns.items()},
                                      features=features)


def load_cached(entry: Path) -> tuple[Any, Any, dict] | None:
    """(train, validation or None, stats as JSON) of a cache entry; None when there is none (or it is damaged)."""
    stats_file = entry / "stats.json"
    if not stats_file.is_file():
        return None
    import datasets

    try:
        stats = json.loads(stats_file.read_text(encoding="utf-8"))
        train = datasets.load_from_disk(str(entry / "train"))
        val = datasets.load_from_disk(str(entry / "validation")) if (entry / "validation").is_dir() else None
    except Exception:  # noqa: BLE001 - a damaged entry is rebuilt, not reported
        return None
    return train, val, stats


def save_cached(entry: Path, train, val, stats: dict) -> bool:
    """Save atomically (temp folder beside, then rename); False when the cache is not writable."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
    except OSError:
        return False
    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bar()
    try:
        train.save_to_disk(str(tmp / "train"))
        if val is not None:
            val.save_to_disk(str(tmp / "validation"))
        (tmp / "stats.json").write_text(json.dumps(stats, indent=1), encoding="utf-8")
        try:
            os.rename(tmp, entry)
        except OSError:
            if not (entry / "stats.json").is_file():  # not a concurrent winner: a broken leftover
                shutil.rmtree(entry, ignore_errors=True)
                os.rename(tmp, entry)
    except OSError:
        return False
    finally:
        if bars:
            datasets.enable_progress_bar()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return True


FINGERPRINTS_DIR = "tokenizers"
"""The folder of the data cache that remembers each local tokenizer's fingerprint by its files'
identity (``engine.data.tokenize.tokenizer_files_identity``), so a start can find its cache entry
without loading the tokenizer."""


def remember_fingerprint(identity: str, fingerprint: dict, cache_dir: Path) -> None:
    """Keep a tokenizer's fingerprint under its files' identity (atomically; silently not where the
    cache cannot be written: it only saves time)."""
    folder = cache_dir / FINGERPRINTS_DIR
    target = folder / f"{identity}.json"
    if target.is_file():
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{identity}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(fingerprint, fh, sort_keys=True)
        os.replace(tmp, target)
    except OSError:
        pass


def recalled_fingerprint(identity: str | None, cache_dir: Path) -> dict | None:
    """The fingerprint remembered for a tokenizer's files' identity, or None."""
    if identity is None:
        return None
    try:
        data = json.loads((cache_dir / FINGERPRINTS_DIR / f"{identity}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None

