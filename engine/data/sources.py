"""Where records come from: local files (JSON lines, JSON, CSV, Parquet), a Hub dataset, or the
bundled demo sets (``builtin:demo``, ``builtin:demo-pairs``), read as ``(unit, number, record,
problem)`` so that a bad record is named by its file and line (CSV: row, the header being row 1;
Parquet and Hub datasets: row, from 1; a JSON list: record, from 1)."""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from engine.errors import UserError, first_line
from engine.preset import DataSettings

FILE_KINDS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
"""Local file types by extension."""

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")

RawRecord = tuple[str, int, Any, "str | None"]
"""(unit, number, record, problem): where a record is, the record, and why it cannot be read (None if it can)."""


@dataclass
class Source:
    """One source of records, as the settings name it."""

    display: str
    """How the settings wrote it (what messages name)."""
    kind: str
    """``jsonl``, ``json``, ``csv``, ``parquet`` or ``hub``."""
    path: Path | None = None
    hub_id: str | None = None
    split: str | None = None
    dataset: Any = None
    """The loaded Hub dataset, once loaded."""


def builtin_data() -> dict[str, Path]:
    """The bundled data sets by name: ``builtin:demo`` (alpaca records) and ``builtin:demo-pairs``
    (its preference pairs, for dpo and orpo)."""
    from engine.demo import DEMO_DATA, DEMO_DATA_FILE
    from engine.demo_data import DEMO_PAIRS, DEMO_PAIRS_FILE

    return {DEMO_DATA: DEMO_DATA_FILE, DEMO_PAIRS: DEMO_PAIRS_FILE}


def resolve_data_path(spec: str) -> str:
    """A bundled data set's name (``builtin:demo``, ``builtin:demo-pairs``) becomes its file; anything
    else is returned unchanged."""
    path = builtin_data().get(spec.strip())
    return str(path) if path is not None else spec


def open_source(spec: str, split: str, setting: str) -> Source:
    """The source a setting (``data.train``) names; one-line UserError for a path that is not there."""
    spec = spec.strip()
    if spec.startswith("builtin:"):
        resolved = resolve_data_path(spec)
        if resolved == spec:
            raise UserError(f"{setting}: unknown built-in data set '{spec}'",
                            f"the bundled ones are {' and '.join(builtin_data())}")
        return Source(display=spec, kind="jsonl", path=Path(resolved))
    path = Path(spec).expanduser()
    ext = path.suffix.lower()
    if path.exists():
        if path.is_dir():
            raise UserError(
                f"{setting}: {spec} is a folder", "name a .jsonl, .json, .csv or .parquet file inside it"
            )
        if ext not in FILE_KINDS:
            raise UserError(
                f"{setting}: cannot read {spec}: unknown file type '{ext or '(none)'}'",
                "use a .jsonl, .json, .csv or .parquet file",
            )
        return Source(display=spec, kind=FILE_KINDS[ext], path=path)
    looks_local = ext in FILE_KINDS or spec.startswith((".", "/", "~"))
    if looks_local or not _HUB_ID.fullmatch(spec):
        raise UserError(f"{setting}: no data file at {spec}", "check the path (relative paths start where you run)")
    return Source(display=spec, kind="hub", hub_id=spec, split=split)


def validation_source(settings: DataSettings, train: Source) -> Source | None:
    """The validation source: ``data.validation`` (with a Hub ``data.train``, another split of it
    unless it is a local file), or None when the validation set is split off the training set."""
    spec = (settings.validation or "").strip()
    if not spec:
        return None
    if train.kind == "hub":
        path = Path(spec).expanduser()
        if not path.exists() and path.suffix.lower() not in FILE_KINDS and not spec.startswith("builtin:"):
            # Another split of the same Hub dataset.
            return Source(display=f"{train.hub_id} split {spec}", kind="hub", hub_id=train.hub_id, split=spec)
    return open_source(spec, settings.split, "data.validation")


def load_hub(src: Source):
    """The Hub dataset of a source (loaded once); one-line UserError for every way it can fail."""
    if src.dataset is not None:
        return src.dataset
    import datasets

    try:
        src.dataset = datasets.load_dataset(src.hub_id, split=src.split)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line a person can act on
        raise _hub_error(src, exc) from None
    return src.dataset


def _hub_error(src: Source, exc: Exception) -> UserError:
    """One line for a failure to load a Hub dataset."""
    name = type(exc).__name__
    msg = first_line(exc)
    what = f"dataset {src.hub_id}"
    if "Offline" in msg or "Offline" in name or isinstance(exc, ConnectionError):
        return UserError(
            f"cannot load {what}: the Hugging Face Hub cannot be reached ({msg})",
            "check the network (HF_HUB_OFFLINE must not be set), or use a local file",
        )
    if "Gated" in name or "gated" in msg:
        return UserError(f"{what} is gated", "accept its terms on huggingface.co and set HF_TOKEN")
    if name in ("DatasetNotFoundError", "RepositoryNotFoundError", "FileNotFoundError", "DataFilesNotFoundError"):
        return UserError(
            f"no local file or Hub dataset named {src.hub_id} ({msg})",
            "check the path or the id; private datasets need HF_TOKEN",
        )
    if "split" in msg.lower():
        return UserError(f"{what} has no split '{src.split}' ({msg})", "set data.split to one it has")
    if "config" in msg.lower():
        return UserError(
            f"{what} has several configurations ({msg})",
            "save the configuration you want as a local .jsonl or .parquet file and use that",
        )
    return UserError(f"cannot load {what}: {name}: {msg}")


def iter_raw(src: Source) -> Iterator[RawRecord]:
    """(unit, number, record, problem) for every record; problem is set when it cannot be parsed."""
    try:
        if src.kind == "jsonl":
            yield from _iter_jsonl(src.path)
        elif src.kind == "json":
            yield from _iter_json(src)
        elif src.kind == "csv":
            yield from _iter_csv(src)
        elif src.kind == "parquet":
            yield from _iter_parquet(src)
        else:
            ds = load_hub(src)
            for i, row in enumerate(ds):
                yield "row", i + 1, row, None
    except OSError as exc:
        raise UserError(f"cannot read {src.display}: {exc.strerror or exc}") from None


def _iter_jsonl(path: Path) -> Iterator[RawRecord]:
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield "line", number, None, f"not valid UTF-8 (byte {exc.start + 1})"
                continue
            if not line.strip():
                continue
            try:
                yield "line", number, json.loads(line), None
            except json.JSONDecodeError as exc:
                yield "line", number, None, f"invalid JSON ({exc.msg}: column {exc.colno})"


def _iter_json(src: Source) -> Iterator[RawRecord]:
    try:
        text = src.path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{src.display} is not valid UTF-8 text (byte {exc.start + 1})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several JSON values: JSON lines in a .json file
            yield from _iter_jsonl(src.path)
            return
        raise UserError(
            f"{src.display} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})",
            "fix the file, or write one record per line as .jsonl",
        ) from None
    if isinstance(data, dict):
        keys = ", ".join(list(data)[:5])
        raise UserError(
            f"{src.display} holds one JSON object (keys: {keys}), not a list of records",
            "make the file a JSON list of records, or JSON lines (.jsonl) with one record per line",
        )
    if not isinstance(data, list):
        raise UserError(f"{src.display} holds a single JSON {type(data).__name__}, not a list of records")
    for i, rec in enumerate(data):
        yield "record", i + 1, rec, None


def _iter_csv(src: Source) -> Iterator[RawRecord]:
    csv.field_size_limit(1 << 30)
    with open(src.path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            return
        except (csv.Error, UnicodeDecodeError) as exc:
            raise UserError(f"{src.display} row 1: cannot read the header ({exc})") from None
        header = [h.strip() for h in header]
        while True:
            row_number = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except UnicodeDecodeError as exc:
                raise UserError(f"{src.display} row {row_number}: not valid UTF-8 text ({exc.reason})") from None
            except csv.Error as exc:
                yield "row", row_number, None, f"invalid CSV ({exc})"
                continue
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                yield "row", row_number, None, f"has {len(row)} fields, the header has {len(header)}"
                continue
            yield "row", row_number, dict(zip(header, row)), None


def _iter_parquet(src: Source) -> Iterator[RawRecord]:
    try:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(src.path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds for a broken file
        raise UserError(f"cannot read {src.display} as Parquet: {first_line(exc)}") from None
    number = 0
    for batch in pf.iter_batches(batch_size=4096):
        for rec in batch.to_pylist():
            number += 1
            yield "row", number, rec, None
