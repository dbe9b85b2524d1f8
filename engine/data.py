"""Data in, tokenized examples out.

Sources (``data.train`` and ``data.validation``)
    A local ``.jsonl``/``.ndjson``, ``.json`` (a list of records; a file of JSON lines named
    ``.json`` is read as JSON lines), ``.csv`` (a header row, one record per row) or ``.parquet``
    file; a Hub dataset id (``org/name``, read with ``datasets.load_dataset(id, split=data.split)``);
    or ``builtin:demo``, the bundled demo set. With a Hub ``data.train``, ``data.validation`` names
    another split of the same dataset unless it is a local file.

Record formats (``data.format``; ``auto`` detects them from the keys of the first records)
    ``alpaca``            ``instruction``, optional ``input``, ``output``
    ``input_output``      ``input``, ``output``
    ``prompt_completion`` ``prompt``, ``completion``
    ``text``              ``text``: every token is trained
    ``messages``          ``messages``: a list of ``{role, content}`` (system, user, assistant)
    ``sharegpt``          ``conversations``: a list of ``{from, value}`` (system, human, gpt)

Prompt templates (plain; what the model sees)
    alpaca::

        ### Instruction:
        {instruction}

        ### Input:
        {input}

        ### Response:
        {output}</s>

    (without the ``### Input:`` section when ``input`` is empty). input_output is the same
    without the instruction section. prompt_completion is the prompt followed directly by the
    completion, no template: the prompt is taken to be exactly the text the model is given.
    The trained part is the response and the end-of-sequence token after it; the tokenizer's
    BOS token (if it adds one) comes first.

    Conversations (messages, sharegpt) are rendered with the tokenizer's chat template when it
    has one, and only the assistant turns (with their end-of-turn marker) are trained: each
    assistant turn is located by rendering the conversation prefix by prefix (the text between
    "everything before, with the generation prompt" and "everything up to this turn"). Without
    a chat template they use the plain layout ``### System:`` / ``### User:`` /
    ``### Assistant:``, each header line followed by the turn and a blank line, each assistant
    turn ending with the EOS token.

Bad records
    Invalid JSON, a record that is not an object, a missing field, text where a list was
    expected (or the other way round) and an empty response are bad records, named by file and
    line (CSV: row, the header being row 1; Parquet and Hub datasets: row, from 1; a JSON list:
    record, from 1). By default the first one is refused with a :class:`UserError`; with
    ``data.skip_bad_records`` they are skipped and counted.

Cleaning, split, tokenization
    Examples whose response (all assistant turns) contains one of ``data.drop_phrases``
    (case-insensitive) are dropped, then exact duplicates (``data.dedupe``). The validation set
    is ``data.validation`` or a ``data.validation_split`` share of the examples drawn with the
    run's seed (the training examples keep their file order); ``data.max_examples`` then keeps the
    first training examples. Prompt tokens get label -100 unless ``data.train_on_inputs``;
    examples longer than ``seq_len`` are truncated, and dropped when nothing trainable is left.

Supervised tokens are the labels actually trained: a causal LM never predicts the first token of
an example (labels shift by one, and the flattening collator masks each example's first label),
so an example contributes ``sum(labels[1:] != -100)``. Token counts are real tokens, no padding.

Nothing here imports torch, transformers or datasets at module level.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

from engine.errors import NeedsRemoteCode, UserError, first_line
from engine.preset import DataSettings, ModelSettings

CACHE_VERSION = 1
"""Bumped whenever the tokenized output for the same inputs changes, so old cache entries are not reused."""

FORMATS = ("alpaca", "input_output", "prompt_completion", "text", "messages", "sharegpt")

FORMAT_KEYS = {
    "alpaca": "instruction, input, output",
    "input_output": "input, output",
    "prompt_completion": "prompt, completion",
    "text": "text",
    "messages": "messages: [{role, content}]",
    "sharegpt": "conversations: [{from, value}]",
}

FILE_KINDS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
"""Local file types by extension."""

RESPONSE_KEY = {"alpaca": "output", "input_output": "output", "prompt_completion": "completion", "text": "text"}

ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
INPUT_OUTPUT_TEMPLATE = "### Input:\n{input}\n\n### Response:\n"
PLAIN_TURN_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}
PLAIN_TURN_END = "\n\n"

ROLE_NAMES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
}
"""Turn roles accepted in messages and ShareGPT conversations, mapped to system / user / assistant."""

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_DETECT_SAMPLE = 100


# --------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class BadRecord:
    """A record that cannot be used, with where it is and what is wrong."""

    source: str
    """The file (as written in the settings) or the Hub dataset."""
    unit: str
    """``line`` (JSON lines), ``row`` (CSV, Parquet, Hub) or ``record`` (a JSON list)."""
    number: int
    """1-based line, row or record number."""
    problem: str

    def __str__(self) -> str:
        return f"{self.source} {self.unit} {self.number}: {self.problem}"


@dataclass
class DataStats:
    """What went into the training data, for the wizard, the start event and the LR rule."""

    format: str
    examples: int = 0
    """Training examples after cleaning, split, cap and truncation."""
    validation_examples: int = 0
    tokens: int = 0
    """Real tokens in the training examples (no padding)."""
    supervised_tokens: int = 0
    """Training label positions that are actually trained (first label of each example excluded)."""
    validation_tokens: int = 0
    truncated: int = 0
    """Examples (training and validation) cut at seq_len."""
    removed_duplicates: int = 0
    removed_phrases: int = 0
    removed_empty: int = 0
    """Examples dropped because nothing trainable was left after truncation."""
    skipped_bad: int = 0
    """Bad records skipped (data.skip_bad_records)."""
    max_len: int = 0
    """Longest training example in tokens."""
    mean_len: float = 0.0
    """Mean training example length in tokens."""
    seq_len: int = 0
    """The sequence length the examples were cut at."""
    validation_supervised_tokens: int = 0

    def to_json(self) -> dict:
        """The stats as a JSON-ready dict (what the ``start`` event carries)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "DataStats":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def summary_lines(self) -> list[str]:
        """A few human lines describing the data."""
        share = f" ({100 * self.supervised_tokens / self.tokens:.0f} %)" if self.tokens else ""
        lines = [
            f"format: {self.format}",
            f"{self.examples:,} training examples, {self.validation_examples:,} validation examples",
            f"{self.tokens:,} training tokens, {self.supervised_tokens:,} of them trained{share}",
            f"example length: mean {self.mean_len:,.0f}, longest {self.max_len:,} tokens",
        ]
        if self.validation_examples:
            lines.append(
                f"{self.validation_tokens:,} validation tokens, {self.validation_supervised_tokens:,} of them scored"
            )
        if self.truncated:
            lines.append(f"{self.truncated:,} examples longer than {self.seq_len:,} tokens were truncated")
        removed = []
        if self.removed_duplicates:
            removed.append(f"{self.removed_duplicates:,} duplicates")
        if self.removed_phrases:
            removed.append(f"{self.removed_phrases:,} containing a drop phrase")
        if self.removed_empty:
            removed.append(f"{self.removed_empty:,} with nothing left to train after truncation")
        if self.skipped_bad:
            removed.append(f"{self.skipped_bad:,} bad records")
        if removed:
            lines.append("removed: " + ", ".join(removed))
        return lines


@dataclass
class PreparedData:
    """Tokenized examples ready for the trainer."""

    train: Any
    """``datasets.Dataset`` with columns ``input_ids`` and ``labels`` (lists of int)."""
    validation: Any | None
    """The same for validation, or None."""
    stats: DataStats
    format: str
    cache_path: Path | None = None
    """The cache entry these came from or were saved to."""
    cache_hit: bool = False


# --------------------------------------------------------------------------------------------
# Sources


@dataclass
class _Source:
    display: str
    kind: str  # jsonl json csv parquet hub
    path: Path | None = None
    hub_id: str | None = None
    split: str | None = None
    dataset: Any = None  # the loaded Hub dataset, once loaded


def resolve_data_path(spec: str) -> str:
    """``builtin:demo`` becomes the bundled demo file; anything else is returned unchanged."""
    from engine.demo import DEMO_DATA, DEMO_DATA_FILE

    if spec.strip() == DEMO_DATA:
        return str(DEMO_DATA_FILE)
    return spec


def _open_source(spec: str, split: str, setting: str) -> _Source:
    spec = spec.strip()
    if spec.startswith("builtin:"):
        resolved = resolve_data_path(spec)
        if resolved == spec:
            raise UserError(f"{setting}: unknown built-in data set '{spec}'", "the bundled one is builtin:demo")
        return _Source(display=spec, kind="jsonl", path=Path(resolved))
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
        return _Source(display=spec, kind=FILE_KINDS[ext], path=path)
    looks_local = ext in FILE_KINDS or spec.startswith((".", "/", "~"))
    if looks_local or not _HUB_ID.fullmatch(spec):
        raise UserError(f"{setting}: no data file at {spec}", "check the path (relative paths start where you run)")
    return _Source(display=spec, kind="hub", hub_id=spec, split=split)


def _validation_source(settings: DataSettings, train: _Source) -> _Source | None:
    spec = (settings.validation or "").strip()
    if not spec:
        return None
    if train.kind == "hub":
        path = Path(spec).expanduser()
        if not path.exists() and path.suffix.lower() not in FILE_KINDS and not spec.startswith("builtin:"):
            # Another split of the same Hub dataset.
            return _Source(display=f"{train.hub_id} split {spec}", kind="hub", hub_id=train.hub_id, split=spec)
    return _open_source(spec, settings.split, "data.validation")


def _load_hub(src: _Source):
    if src.dataset is not None:
        return src.dataset
    import datasets

    try:
        src.dataset = datasets.load_dataset(src.hub_id, split=src.split)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line a person can act on
        raise _hub_error(src, exc) from None
    return src.dataset


def _hub_error(src: _Source, exc: Exception) -> UserError:
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


# --------------------------------------------------------------------------------------------
# Reading raw records


def _iter_raw(src: _Source) -> Iterator[tuple[str, int, Any, str | None]]:
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
            ds = _load_hub(src)
            for i, row in enumerate(ds):
                yield "row", i + 1, row, None
    except OSError as exc:
        raise UserError(f"cannot read {src.display}: {exc.strerror or exc}") from None


def _iter_jsonl(path: Path) -> Iterator[tuple[str, int, Any, str | None]]:
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


def _iter_json(src: _Source) -> Iterator[tuple[str, int, Any, str | None]]:
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


def _iter_csv(src: _Source) -> Iterator[tuple[str, int, Any, str | None]]:
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


def _iter_parquet(src: _Source) -> Iterator[tuple[str, int, Any, str | None]]:
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


# --------------------------------------------------------------------------------------------
# Formats and validation


def detect_format(keys) -> str | None:
    """The record format that a record's keys indicate, or None."""
    keys = set(keys)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    if "input" in keys and "output" in keys:
        return "input_output"
    if "text" in keys:
        return "text"
    return None


def _unknown_format_error(src: _Source, unit: str, number: int, keys) -> UserError:
    shown = ", ".join(sorted(map(str, keys))) or "(none)"
    accepted = "; ".join(f"{fmt} ({k})" for fmt, k in FORMAT_KEYS.items())
    return UserError(
        f"{src.display}: cannot tell the data format from the keys {shown} ({unit} {number}); accepted: {accepted}",
        "rename the fields, or set data.format",
    )


def _as_text(rec: dict, key: str, required: bool = True) -> tuple[str | None, str | None]:
    """(text, problem) for one field; numbers are taken as their text."""
    if key not in rec or rec[key] is None:
        return (None, f"missing field '{key}'") if required else ("", None)
    value = rec[key]
    if isinstance(value, str):
        return value, None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value), None
    return None, f"field '{key}' is {_kind(value)}, expected text"


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", bool: "true/false"}.get(type(value), f"a {type(value).__name__}")


def _content_text(content: Any) -> str | None:
    """A turn's content: text, or a list of text parts (``[{type: text, text: ...}]``)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    return None


def _normalize(rec: Any, fmt: str) -> tuple[dict | None, str | None]:
    """The example in a fixed shape for its format, or the problem with the record."""
    if not isinstance(rec, dict):
        return None, f"a record must be an object with named fields, this is {_kind(rec)}"
    if fmt in ("alpaca", "input_output", "prompt_completion"):
        keys = {"alpaca": ("instruction", "input", "output"), "input_output": ("input", "output"),
                "prompt_completion": ("prompt", "completion")}[fmt]
        out = {}
        for key in keys:
            text, problem = _as_text(rec, key, required=not (fmt == "alpaca" and key == "input"))
            if problem:
                return None, problem
            out[key] = text
        response_key = keys[-1]
        if not out[response_key].strip():
            return None, f"empty response ('{response_key}' is empty)"
        if fmt == "alpaca" and not out["instruction"].strip() and not out["input"].strip():
            return None, "empty instruction"
        return out, None
    if fmt == "text":
        text, problem = _as_text(rec, "text")
        if problem:
            return None, problem
        if not text.strip():
            return None, "empty text"
        return {"text": text}, None
    # Conversations.
    key = "messages" if fmt == "messages" else "conversations"
    other = "conversations" if fmt == "messages" else "messages"
    if rec.get(key) is None and rec.get(other) is not None:
        key = other
    turns = rec.get(key)
    if turns is None:
        return None, f"missing field '{key}'"
    if not isinstance(turns, list):
        return None, f"field '{key}' is {_kind(turns)}, expected a list of turns"
    if not turns:
        return None, f"field '{key}' is an empty list"
    messages = []
    for i, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            return None, f"turn {i} is {_kind(turn)}, expected an object"
        role = turn.get("role", turn.get("from"))
        if not isinstance(role, str):
            return None, f"turn {i} has no role ('role' or 'from')"
        mapped = ROLE_NAMES.get(role.strip().lower())
        if mapped is None:
            return None, f"turn {i} has unknown role '{role}' (accepted: system, user, assistant; ShareGPT: human, gpt)"
        raw = turn.get("content", turn.get("value"))
        if raw is None:
            return None, f"turn {i} has no content ('content' or 'value')"
        content = _content_text(raw)
        if content is None:
            return None, f"turn {i} content is {_kind(raw)}, expected text"
        messages.append([mapped, content])
    last = max((i for i, m in enumerate(messages) if m[0] == "assistant"), default=None)
    if last is None:
        return None, "no assistant turn"
    for i, (role, content) in enumerate(messages):
        if role == "assistant" and not content.strip():
            return None, f"empty response (turn {i + 1})"
    return {"messages": messages[: last + 1]}, None  # turns after the last answer are never trained


def _response_text(example: dict, fmt: str) -> str:
    """The text the model is trained to produce (for the drop phrases)."""
    if fmt in ("messages", "sharegpt"):
        return "\n".join(c for r, c in example["messages"] if r == "assistant")
    return example[RESPONSE_KEY[fmt]]


@dataclass
class _Loaded:
    format: str
    examples: list  # (BadRecord location as (unit, number), example dict)
    bad: list = field(default_factory=list)
    records: int = 0
    removed_phrases: int = 0
    removed_duplicates: int = 0


def _read_sources(train_src: "_Source", val_src: "_Source | None", settings: DataSettings,
                  clean: bool = True) -> "tuple[_Loaded, _Loaded | None, list[BadRecord]]":
    """Read the training and validation sources; refuse bad records unless they may be skipped."""
    train = _read_examples(train_src, settings, clean=clean)
    val = _read_examples(val_src, settings, fmt=train.format, clean=clean) if val_src else None
    bad = train.bad + (val.bad if val else [])
    if bad and not settings.skip_bad_records:
        raise _bad_records_error(bad)
    _check_loaded(train, train_src, settings)
    if val is not None:
        _check_loaded(val, val_src, settings)
    return train, val, bad


def _read_examples(src: _Source, settings: DataSettings, fmt: str | None = None, limit: int | None = None,
                   clean: bool = True) -> _Loaded:
    """Read, validate and normalize a source's records (and clean them when asked).

    ``fmt`` forces a format (the validation set must match the training set); otherwise
    ``settings.format``, or detection from the first records. With ``limit`` reading stops after
    that many usable examples (for the preview)."""
    raw = _iter_raw(src)
    fmt = fmt or (settings.format if settings.format != "auto" else None)
    head: list = []
    if fmt is None:
        votes: Counter = Counter()
        first_keys = None
        objects = 0
        for item in raw:
            head.append(item)
            rec = item[2]
            if isinstance(rec, dict):
                if first_keys is None:
                    first_keys = (item[0], item[1], list(rec))
                detected = detect_format(rec)
                if detected:
                    votes[detected] += 1
                objects += 1
                if objects >= _DETECT_SAMPLE:
                    break
        if votes:
            fmt = votes.most_common(1)[0][0]
        elif first_keys is not None:
            raise _unknown_format_error(src, *first_keys)
        elif not head:
            raise UserError(f"{src.display} has no records", "check that it is the right file")
        else:
            fmt = "text"  # nothing parsed at all: every record is bad, reported below

    def records():
        yield from head
        yield from raw

    phrases = [p.lower() for p in settings.drop_phrases if p.strip()] if clean else []
    seen: set = set()
    loaded = _Loaded(format=fmt, examples=[])
    for unit, number, rec, problem in records():
        loaded.records += 1
        example = None
        if problem is None:
            example, problem = _normalize(rec, fmt)
        if problem is not None:
            loaded.bad.append(BadRecord(src.display, unit, number, problem))
            continue
        if phrases:
            response = _response_text(example, fmt).lower()
            if any(p in response for p in phrases):
                loaded.removed_phrases += 1
                continue
        if clean and settings.dedupe:
            key = hashlib.sha1(json.dumps(example, sort_keys=True, ensure_ascii=False).encode()).digest()
            if key in seen:
                loaded.removed_duplicates += 1
                continue
            seen.add(key)
        loaded.examples.append(((unit, number), example))
        if limit is not None and len(loaded.examples) >= limit:
            break
    return loaded


def _bad_records_error(bad: list[BadRecord]) -> UserError:
    more = len(bad) - 1
    tail = f" (and {more} more bad record{'s' if more != 1 else ''})" if more else ""
    return UserError(f"{bad[0]}{tail}", "fix the line or set data.skip_bad_records: true")


def _check_loaded(loaded: _Loaded, src: _Source, settings: DataSettings) -> None:
    if loaded.bad and not settings.skip_bad_records:
        raise _bad_records_error(loaded.bad)
    if not loaded.examples:
        if loaded.bad:
            raise UserError(f"{src.display}: every record is bad ({loaded.bad[0]})", "check that it is the right file")
        if loaded.records == 0:
            raise UserError(f"{src.display} has no records", "check that it is the right file")
        raise UserError(
            f"{src.display}: no examples left after cleaning ({loaded.removed_phrases} with a drop phrase, "
            f"{loaded.removed_duplicates} duplicates)",
            "check data.drop_phrases",
        )


def check_records(settings: DataSettings) -> tuple[str, int, list[BadRecord]]:
    """Read and validate the raw records, without any tokenizer (fast: run it first).

    Returns the format (detected or set), the number of usable training records (before
    cleaning and split) and the bad records of the training and validation sources. Raises
    :class:`UserError` on the first bad record unless ``data.skip_bad_records``, and on a source
    that cannot be read, has no usable record or whose format cannot be told.
    """
    train_src = _open_source(settings.train, settings.split, "data.train")
    val_src = _validation_source(settings, train_src)
    train, val, bad = _read_sources(train_src, val_src, settings, clean=False)
    return train.format, len(train.examples), bad


# --------------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(model: ModelSettings):
    """The model's tokenizer (with a pad token: EOS when it has none); one-line UserError on failure."""
    from engine.demo import resolve_model_source

    source = resolve_model_source(model.source)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=model.revision, trust_remote_code=model.trust_remote_code
        )
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line
        msg = first_line(exc)
        if "trust_remote_code" in str(exc) and not model.trust_remote_code:
            raise NeedsRemoteCode(
                f"the tokenizer of {model.source} needs Python code shipped with the model",
                "allow it with model.trust_remote_code: true if you trust the model's authors",
            ) from None
        raise UserError(
            f"cannot load the tokenizer of {model.source}: {msg}",
            "check the id or folder (and HF_TOKEN for private or gated models)",
        ) from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"the tokenizer of {model.source} has neither a padding nor an end-of-sequence token")
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise UserError(
            f"the tokenizer of {model.source} has no end-of-sequence token",
            "a model must learn where an answer ends; pick a model whose tokenizer defines one",
        )
    return tokenizer


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bool(with_special) and with_special[0] == bos and (not without or without[0] != bos)


def tokenizer_fingerprint(tokenizer) -> dict:
    """What identifies a tokenizer for the data cache."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    template = tokenizer.chat_template
    backend_hash = None
    if backend is not None:
        try:
            backend_hash = hashlib.sha256(backend.to_str().encode()).hexdigest()
        except Exception:  # noqa: BLE001 - a backend that cannot serialize: fall back to the rest
            backend_hash = None
    return {
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "chat_template": template if isinstance(template, str) else repr(template),
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "backend": backend_hash,
    }


# --------------------------------------------------------------------------------------------
# Rendering


@dataclass
class _Rendered:
    text: str
    spans: list  # [(start, end)] character ranges that are trained
    bos: bool  # put the BOS token in front
    eos: bool  # append the EOS token (trained)


class _TemplateRefused(Exception):
    pass


def _render(example: dict, fmt: str, tokenizer, adds_bos: bool) -> _Rendered:
    if fmt in ("alpaca", "input_output", "prompt_completion"):
        if fmt == "alpaca":
            template = ALPACA_TEMPLATE if example["input"].strip() else ALPACA_TEMPLATE_NO_INPUT
            prompt = template.format(instruction=example["instruction"], input=example["input"])
            response = example["output"]
        elif fmt == "input_output":
            prompt, response = INPUT_OUTPUT_TEMPLATE.format(input=example["input"]), example["output"]
        else:
            prompt, response = example["prompt"], example["completion"]
        return _Rendered(prompt + response, [(len(prompt), len(prompt) + len(response))], adds_bos, True)
    if fmt == "text":
        return _Rendered(example["text"], [(0, len(example["text"]))], adds_bos, True)
    messages = [{"role": r, "content": c} for r, c in example["messages"]]
    if isinstance(tokenizer.chat_template, str) and tokenizer.chat_template:
        return _render_chat(messages, tokenizer)
    return _render_plain_chat(messages, tokenizer, adds_bos)


def _render_plain_chat(messages: list[dict], tokenizer, adds_bos: bool) -> _Rendered:
    """The documented plain layout; each assistant turn is followed by the EOS token (trained)."""
    eos = tokenizer.eos_token
    text, spans = "", []
    for m in messages:
        text += PLAIN_TURN_HEADERS[m["role"]]
        if m["role"] == "assistant":
            start = len(text)
            text += m["content"] + eos
            spans.append((start, len(text)))
        else:
            text += m["content"]
        text += PLAIN_TURN_END
    text = text[: -len(PLAIN_TURN_END)]
    return _Rendered(text, spans, adds_bos, False)


def _apply_template(tokenizer, messages, add_generation_prompt=False) -> str:
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # noqa: BLE001 - jinja raise_exception and friends
        raise _TemplateRefused(first_line(exc)) from None
    return out if isinstance(out, str) else str(out)


def _render_chat(messages: list[dict], tokenizer) -> _Rendered:
    """Render with the chat template and locate the assistant turns prefix by prefix."""
    full = _apply_template(tokenizer, messages)
    specials = [s for s in getattr(tokenizer, "all_special_tokens", []) if s]
    spans = []
    prefix_ok = True
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        try:
            through = _apply_template(tokenizer, messages[: i + 1])
            if i:
                before = _apply_template(tokenizer, messages[:i], add_generation_prompt=True)
            else:  # nothing to render before a first assistant turn: its header ends where its text starts
                found = through.find(m["content"])
                before = through[: max(found, 0)]
        except _TemplateRefused:
            prefix_ok = False
            break
        if not (full.startswith(through) and through.startswith(before) and len(before) < len(through)):
            prefix_ok = False
            break
        start, end = len(before), len(through)
        # Whitespace after the end-of-turn marker is layout, not something to learn.
        stripped = full[start:end].rstrip()
        if stripped != full[start:end] and any(stripped.endswith(s) for s in specials):
            end = start + len(stripped)
        spans.append((start, end))
    if not prefix_ok:
        spans = _locate_assistant_turns(full, messages, specials)
    return _Rendered(full, spans, False, False)


def _locate_assistant_turns(full: str, messages: list[dict], specials: list[str]) -> list:
    """Fallback for templates that rewrite earlier turns: find each turn's content in order; an
    assistant turn's span is its content plus a special token (end-of-turn) right after it."""
    pos, spans = 0, []
    for m in messages:
        content = m["content"]
        found = full.find(content, pos)
        if found < 0 and content.strip():
            content = content.strip()
            found = full.find(content, pos)
        if found < 0:
            if m["role"] == "assistant":
                raise _TemplateRefused("the chat template changes the assistant text, so it cannot be located")
            continue
        end = found + len(content)
        if m["role"] == "assistant":
            rest = full[end:]
            for s in sorted(specials, key=len, reverse=True):
                if rest.lstrip(" ").startswith(s):
                    end += len(rest) - len(rest.lstrip(" ")) + len(s)
                    break
            spans.append((found, end))
        pos = end
    return spans


# --------------------------------------------------------------------------------------------
# Tokenizing


def _encode(rendered: list[_Rendered], tokenizer) -> list[tuple[Any, Any]]:
    """Token ids and a trained flag per token (numpy arrays) for each rendered example, BOS and
    EOS not yet added. Fast tokenizers: the whole text at once, a token is trained when its
    characters overlap a trained span. Slow tokenizers (no offsets): piece by piece."""
    import numpy as np

    if not rendered:
        return []
    out = []
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer([r.text for r in rendered], add_special_tokens=False, return_offsets_mapping=True)
        for r, ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"]):
            ids = np.asarray(ids, dtype=np.int64)
            flags = np.zeros(len(ids), dtype=bool)
            if len(ids):
                off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
                starts, ends = off[:, 0], off[:, 1]
                for a, b in r.spans:
                    flags |= (ends > a) & (starts < b)
                flags &= ends > starts
            out.append((ids, flags))
        return out
    for r in rendered:
        ids, flags, pos = [], [], 0
        bounds = []
        for a, b in r.spans:
            bounds += [(pos, a, False), (a, b, True)]
            pos = b
        bounds.append((pos, len(r.text), False))
        for a, b, trained in bounds:
            if b > a:
                piece = tokenizer(r.text[a:b], add_special_tokens=False)["input_ids"]
                ids += piece
                flags += [trained] * len(piece)
        out.append((np.asarray(ids, dtype=np.int64), np.asarray(flags, dtype=bool)))
    return out


@dataclass
class _Tokenized:
    input_ids: list = field(default_factory=list)  # numpy int32 arrays
    labels: list = field(default_factory=list)
    truncated: int = 0
    removed_empty: int = 0
    skipped_bad: int = 0

    def tokens(self) -> int:
        return int(sum(len(x) for x in self.input_ids))

    def supervised(self) -> int:
        return int(sum(int((lab[1:] != -100).sum()) for lab in self.labels))


def _tokenize_examples(examples: list, fmt: str, tokenizer, seq_len: int, train_on_inputs: bool,
                       source: str, skip_bad_records: bool) -> _Tokenized:
    """Render, tokenize, mask and truncate; examples are ((unit, number), example dict)."""
    import numpy as np

    adds_bos = _adds_bos(tokenizer)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    result = _Tokenized()
    chunk = 1000
    for start in range(0, len(examples), chunk):
        rendered = []
        for (unit, number), example in examples[start: start + chunk]:
            try:
                rendered.append(_render(example, fmt, tokenizer, adds_bos))
            except _TemplateRefused as exc:
                if not skip_bad_records:
                    raise UserError(
                        f"{source} {unit} {number}: the chat template refused this conversation ({exc})",
                        "fix the record or set data.skip_bad_records: true",
                    ) from None
                result.skipped_bad += 1
        for r, (ids, flags) in zip(rendered, _encode(rendered, tokenizer)):
            if r.bos:
                ids, flags = np.concatenate([[bos], ids]), np.concatenate([[False], flags])
            if r.eos:
                ids, flags = np.concatenate([ids, [eos]]), np.concatenate([flags, [True]])
            ids = ids.astype(np.int32)
            labels = ids.copy() if train_on_inputs else np.where(flags, ids, -100).astype(np.int32)
            if len(ids) > seq_len:
                ids, labels = ids[:seq_len], labels[:seq_len]
                result.truncated += 1
            if not (labels[1:] != -100).any():
                result.removed_empty += 1
                continue
            result.input_ids.append(ids)
            result.labels.append(labels)
    return result


def supervised_count(labels) -> int:
    """Label positions actually trained in one example: ``sum(labels[1:] != -100)``."""
    return sum(1 for lab in list(labels)[1:] if lab != -100)


# --------------------------------------------------------------------------------------------
# prepare_data


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _source_identity(src: _Source | None) -> Any:
    if src is None:
        return None
    if src.kind == "hub":
        ds = _load_hub(src)
        return {"hub": src.hub_id, "split": src.split, "fingerprint": getattr(ds, "_fingerprint", None)}
    return {"kind": src.kind, "sha256": _file_digest(src.path)}


def _split(examples: list, ratio: float, seed: int) -> tuple[list, list]:
    """Hold out round(n * ratio) examples (at least one when ratio > 0 and n >= 2), drawn with seed;
    both parts keep their file order."""
    n = len(examples)
    if ratio <= 0 or n < 2:
        return examples, []
    n_val = min(max(1, round(n * ratio)), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def _to_dataset(tok: _Tokenized):
    """A datasets.Dataset with int32 list columns input_ids and labels, built straight from Arrow."""
    import datasets
    import numpy as np
    import pyarrow as pa

    list_type = getattr(datasets, "List", None) or datasets.Sequence
    seq = list_type(datasets.Value("int32"))
    features = datasets.Features({"input_ids": seq, "labels": seq})
    offsets = np.zeros(len(tok.input_ids) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(x) for x in tok.input_ids])

    def column(arrays):
        values = np.concatenate(arrays).astype(np.int32) if arrays else np.zeros(0, dtype=np.int32)
        return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values)).cast(pa.list_(pa.int32()))

    return datasets.Dataset.from_dict(
        {"input_ids": column(tok.input_ids), "labels": column(tok.labels)}, features=features
    )


def default_data_cache_dir() -> Path:
    from engine.demo import cache_root

    return cache_root() / "data"


def prepare_data(
    settings: DataSettings, tokenizer, seq_len: int, seed: int, cache_dir: Path | None = None
) -> PreparedData:
    """Read, clean, split and tokenize the data; cached so a rerun does not tokenize again.

    Raises :class:`UserError` for bad records (unless ``data.skip_bad_records``) and unusable
    sources, as :func:`check_records` does.

    ``cache_dir`` is the folder that holds prepared data sets (default: ``data`` in the
    qlora-wizard cache, see :func:`engine.demo.cache_root`). The key covers the source bytes (or
    the Hub id, split and dataset fingerprint), the data settings, seq_len, seed and the
    tokenizer (name, size, chat template, vocabulary)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_data_cache_dir()
    train_src = _open_source(settings.train, settings.split, "data.train")
    val_src = _validation_source(settings, train_src)
    key_material = {
        "version": CACHE_VERSION,
        "train": _source_identity(train_src),
        "validation": _source_identity(val_src),
        "settings": settings.model_dump(mode="json"),
        "seq_len": seq_len,
        "seed": seed,
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    key = hashlib.sha256(json.dumps(key_material, sort_keys=True, default=str).encode()).hexdigest()[:24]
    entry = cache_dir / key
    hit = _load_cached(entry)
    if hit is not None:
        return hit

    train_loaded, val_loaded, bad = _read_sources(train_src, val_src, settings)
    fmt = train_loaded.format
    if val_loaded is not None:
        train_ex, val_ex = train_loaded.examples, val_loaded.examples
    else:
        train_ex, val_ex = _split(train_loaded.examples, settings.validation_split, seed)
    if settings.max_examples is not None:
        train_ex = train_ex[: settings.max_examples]

    tok_train = _tokenize_examples(train_ex, fmt, tokenizer, seq_len, settings.train_on_inputs,
                                   train_src.display, settings.skip_bad_records)
    tok_val = (_tokenize_examples(val_ex, fmt, tokenizer, seq_len, settings.train_on_inputs,
                                  val_src.display if val_src else train_src.display, settings.skip_bad_records)
               if val_ex else None)
    if not tok_train.input_ids:
        raise UserError(
            f"{train_src.display}: no example has anything left to train at seq_len {seq_len}",
            "raise training.seq_len or shorten the prompts",
        )
    lengths = [len(x) for x in tok_train.input_ids]
    stats = DataStats(
        format=fmt,
        examples=len(tok_train.input_ids),
        validation_examples=len(tok_val.input_ids) if tok_val else 0,
        tokens=tok_train.tokens(),
        supervised_tokens=tok_train.supervised(),
        validation_tokens=tok_val.tokens() if tok_val else 0,
        validation_supervised_tokens=tok_val.supervised() if tok_val else 0,
        truncated=tok_train.truncated + (tok_val.truncated if tok_val else 0),
        removed_duplicates=train_loaded.removed_duplicates + (val_loaded.removed_duplicates if val_loaded else 0),
        removed_phrases=train_loaded.removed_phrases + (val_loaded.removed_phrases if val_loaded else 0),
        removed_empty=tok_train.removed_empty + (tok_val.removed_empty if tok_val else 0),
        skipped_bad=len(bad) + tok_train.skipped_bad + (tok_val.skipped_bad if tok_val else 0),
        max_len=int(max(lengths)),
        mean_len=round(sum(lengths) / len(lengths), 2),
        seq_len=seq_len,
    )
    train_ds = _to_dataset(tok_train)
    val_ds = _to_dataset(tok_val) if tok_val and tok_val.input_ids else None
    saved = _save_cached(entry, train_ds, val_ds, stats)
    if saved is not None:
        return saved
    return PreparedData(train=train_ds, validation=val_ds, stats=stats, format=fmt, cache_path=None, cache_hit=False)


def _load_cached(entry: Path) -> PreparedData | None:
    stats_file = entry / "stats.json"
    if not stats_file.is_file():
        return None
    import datasets

    try:
        stats = DataStats.from_json(json.loads(stats_file.read_text(encoding="utf-8")))
        train = datasets.load_from_disk(str(entry / "train"))
        val = datasets.load_from_disk(str(entry / "validation")) if (entry / "validation").is_dir() else None
    except Exception:  # noqa: BLE001 - a damaged entry is rebuilt, not reported
        return None
    return PreparedData(train=train, validation=val, stats=stats, format=stats.format, cache_path=entry, cache_hit=True)


def _save_cached(entry: Path, train, val, stats: DataStats) -> PreparedData | None:
    """Save atomically (temp folder beside, then rename); None when the cache is not writable."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
    except OSError:
        return None
    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bar()
    try:
        train.save_to_disk(str(tmp / "train"))
        if val is not None:
            val.save_to_disk(str(tmp / "validation"))
        (tmp / "stats.json").write_text(json.dumps(stats.to_json(), indent=1), encoding="utf-8")
        try:
            os.rename(tmp, entry)
        except OSError:
            if not (entry / "stats.json").is_file():  # not a concurrent winner: a broken leftover
                shutil.rmtree(entry, ignore_errors=True)
                os.rename(tmp, entry)
    except OSError:
        return None
    finally:
        if bars:
            datasets.enable_progress_bar()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    saved = _load_cached(entry)
    if saved is not None:
        saved.cache_hit = False
    return saved


# --------------------------------------------------------------------------------------------
# Preview


def preview(settings: DataSettings, tokenizer, seq_len: int, n: int = 3) -> list[list[tuple[str, bool]]]:
    """The first n usable examples as the model sees them: (text piece, trained?) segments.

    Bad records are passed over (check_records reports them); drop phrases and duplicates are
    applied, truncation at seq_len too. The first token is never marked trained (nothing
    predicts it)."""
    src = _open_source(settings.train, settings.split, "data.train")
    loaded = _read_examples(src, settings, limit=n)
    tok = _tokenize_examples(loaded.examples, loaded.format, tokenizer, seq_len, settings.train_on_inputs,
                             src.display, skip_bad_records=True)
    return [_segments(ids.tolist(), labels.tolist(), tokenizer) for ids, labels in zip(tok.input_ids, tok.labels)]


def _segments(ids: list[int], labels: list[int], tokenizer) -> list[tuple[str, bool]]:
    trained = [i > 0 and lab != -100 for i, lab in enumerate(labels)]
    runs, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or trained[i] != trained[start]:
            runs.append((start, i, trained[start]))
            start = i

    def decode(part):
        return tokenizer.decode(part, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    out, previous = [], ""
    for a, b, flag in runs:
        upto = decode(ids[:b])
        piece = upto[len(previous):] if upto.startswith(previous) else decode(ids[a:b])
        previous = upto
        if out and out[-1][1] == flag:
            out[-1] = (out[-1][0] + piece, flag)
        elif piece:
            out.append((piece, flag))
    return out
