"""Data in, tokenized examples out: ``engine.data`` is a package.

- :mod:`engine.data.sources`: local files (JSON lines, JSON, CSV, Parquet), Hub datasets, the demo set.
- :mod:`engine.data.formats`: one class per record format in a registry (keys, detection,
  normalization, template, response text). Adding a format is one class there.
- :mod:`engine.data.tokenize`: the tokenizer, masking, truncation, supervised-token counting.
- :mod:`engine.data.cache`: the tokenized-data cache.
- here: the pipeline that joins them (:func:`check_records`, :func:`prepare_data`, :func:`preview`)
  and what it reports (:class:`DataStats`).

Sources (``data.train`` and ``data.validation``)
    A local ``.jsonl``/``.ndjson``, ``.json`` (a list of records; a file of JSON lines named
    ``.json`` is read as JSON lines), ``.csv`` (a header row, one record per row) or ``.parquet``
    file; a Hub dataset id (``org/name``, read with ``datasets.load_dataset(id, split=data.split)``);
    or ``builtin:demo``, the bundled demo set (``builtin:demo-pairs``: its preference pairs). With a
    Hub ``data.train``, ``data.validation`` names another split of the same dataset unless it is a
    local file.

Record formats (``data.format``; ``auto`` detects them from the keys of the first records)
    ``alpaca``            ``instruction``, optional ``input``, ``output``
    ``input_output``      ``input``, ``output``
    ``prompt_completion`` ``prompt``, ``completion``
    ``text``              ``text``: every token is trained
    ``messages``          ``messages``: a list of ``{role, content}`` (system, user, assistant)
    ``sharegpt``          ``conversations``: a list of ``{from, value}`` (system, human, gpt)

    Preference pairs, for ``training.method`` dpo and orpo (and only for them: each method refuses
    the other kind of data in one line, :func:`check_method`):

    ``preference``           ``prompt``, ``chosen``, ``rejected`` (texts)
    ``preference_messages``  ``chosen``, ``rejected``: conversations sharing their prompt turns (or
                             TRL's ``prompt`` turns with the answers in ``chosen``/``rejected``)

    Templates and the trained parts: :mod:`engine.data.formats`.

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
    first training examples. Masking and counting: :mod:`engine.data.tokenize`, which also counts the
    training examples that do not end with a stop token (:attr:`DataStats.unstopped`; a one-line
    warning in the summary, since the model does not learn to stop on them).

Pairs
    Tokenized into TRL's columns ``prompt_ids``, ``chosen_ids``, ``rejected_ids``
    (:func:`engine.data.tokenize.tokenize_pairs`); pairs with an empty answer, with identical answers
    or whose prompt leaves no answer token within seq_len are removed and counted, longer answers are
    cut. The drop phrases are matched against the chosen answer; ``data.train_on_inputs`` does not
    apply (the preference losses score the answers).

Nothing here imports torch, transformers or datasets at module level.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import random
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from engine.data.cache import (
    cache_key,
    default_data_cache_dir,
    load_cached,
    pairs_dataset,
    recalled_fingerprint,
    remember_fingerprint,
    save_cached,
    source_identity,
    to_dataset,
)
from engine.data.formats import FORMATS, accepted_formats, detect_format, get_format, kind_of
from engine.data.sources import Source, iter_raw, open_source, resolve_data_path, validation_source
from engine.data.tokenize import (
    load_tokenizer,
    segments,
    supervised_count,
    tokenize_examples,
    tokenize_pairs,
    tokenizer_files_identity,
    tokenizer_fingerprint,
)
from engine.errors import UserError
from engine.preset import DataSettings, ModelSettings

__all__ = [
    "FORMATS", "BadRecord", "DataStats", "PreparedData", "cached_prepared_data", "cached_stats", "check_method",
    "check_records", "default_data_cache_dir",
    "detect_format", "held_out_examples", "load_tokenizer", "prepare_data", "preview", "resolve_data_path",
    "supervised_count", "tokenizer_fingerprint",
]

_DETECT_SAMPLE = 100
"""Records whose keys vote on the format when ``data.format`` is ``auto``."""


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
    unstopped: int | None = None
    """Training examples whose trained part does not end with a stop token (the EOS, or the chat
    template's end-of-turn marker): they do not teach the model to stop. None where it was not
    counted (stats written before it was)."""
    unstopped_cut: int = 0
    """Of those, the ones cut at seq_len (the others: a chat template that ends a turn without a
    special token)."""
    stop_token: str = ""
    """The stop token the training examples end with (the most common one), e.g. ``</s>``."""
    stop_is_eos: bool = True
    """Whether that is the tokenizer's end-of-sequence token (else a chat template's end-of-turn marker)."""
    pairs: int = 0
    """Preference pairs (dpo, orpo): the training pairs (``examples`` is the same number); 0 for
    data of single responses. For pairs ``tokens`` counts each prompt twice (once per answer, as the
    trainer runs them), ``supervised_tokens`` is the answers' tokens (chosen + rejected), ``max_len``
    and ``mean_len`` are of the sequences prompt + answer, ``unstopped`` counts chosen answers."""
    prompt_tokens: int = 0
    """Prompt tokens of the training pairs, each prompt once."""
    chosen_tokens: int = 0
    """Chosen answer tokens of the training pairs."""
    rejected_tokens: int = 0
    """Rejected answer tokens of the training pairs."""
    removed_identical: int = 0
    """Pairs (training and validation) dropped because their two answers are the same."""
    removed_empty_side: int = 0
    """Pairs dropped because an answer is empty."""
    removed_prompt_too_long: int = 0
    """Pairs dropped because their prompt leaves no answer token within seq_len."""

    @property
    def paired(self) -> bool:
        """Whether the data is preference pairs (its format is a pair format)."""
        form = FORMATS.get(self.format)
        return bool(form is not None and form.pair)

    def to_json(self) -> dict:
        """The stats as a JSON-ready dict (what the ``start`` event carries)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "DataStats":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def summary_lines(self) -> list[str]:
        """A few human lines describing the data."""
        if self.paired:
            return self._pair_lines()
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
        return lines + self._closing_lines(removed)

    def _closing_lines(self, removed: list[str]) -> list[str]:
        """The summary's last lines: what cleaning removed (``removed``, and the bad records), and
        whether the examples teach the model to stop."""
        if self.skipped_bad:
            removed = [*removed, f"{self.skipped_bad:,} bad records"]
        stop = self.stop_line()
        return (["removed: " + ", ".join(removed)] if removed else []) + ([stop] if stop else [])

    def _pair_lines(self) -> list[str]:
        """The summary of preference pairs: pairs, tokens by part, lengths, cuts and removals."""
        n = self.pairs or self.examples
        lines = [
            f"format: {self.format}",
            f"{n:,} training pairs, {self.validation_examples:,} validation pairs",
            f"tokens of the training pairs: prompts {self.prompt_tokens:,}, chosen answers {self.chosen_tokens:,}, "
            f"rejected answers {self.rejected_tokens:,}",
            f"prompt + answer: mean {self.mean_len:,.0f}, longest {self.max_len:,} tokens",
        ]
        if self.truncated:
            lines.append(f"{self.truncated:,} pair{'' if self.truncated == 1 else 's'} longer than {self.seq_len:,} "
                         f"tokens: answers cut to fit")
        removed = []
        if self.removed_duplicates:
            removed.append(f"{self.removed_duplicates:,} duplicates")
        if self.removed_phrases:
            removed.append(f"{self.removed_phrases:,} with a drop phrase in the chosen answer")
        if self.removed_identical:
            removed.append(f"{self.removed_identical:,} with identical answers")
        if self.removed_empty_side:
            removed.append(f"{self.removed_empty_side:,} with an empty answer")
        if self.removed_prompt_too_long:
            removed.append(f"{self.removed_prompt_too_long:,} whose prompt fills seq_len {self.seq_len:,}")
        return lines + self._closing_lines(removed)

    def stop_line(self) -> str:
        """Whether every training example ends with the stop token, so the model learns to stop; a
        ``warning:`` line when some do not, with how many and why. Empty when it was not counted.
        For pairs, the chosen answers."""
        if self.unstopped is None:
            return ""
        token = self.stop_token or "the EOS"
        what = f"the end-of-sequence token {token}" if self.stop_is_eos else f"the end-of-turn marker {token}"
        if not self.unstopped:
            every = "every chosen answer ends" if self.paired else "every example ends"
            return f"{every} with {what}: the model learns to stop"
        n, cut = self.unstopped, min(self.unstopped_cut, self.unstopped)
        why, hints = [], []
        if cut:
            why.append(f"{cut:,} cut at seq_len {self.seq_len:,}")
            hints.append("raise training.seq_len or shorten them")
        if n - cut:
            why.append(f"{n - cut:,} whose template puts no special token after the answer")
            hints.append("pick a model whose chat template ends each turn with a special token")
        if self.paired:
            examples = "chosen answer does" if n == 1 else "chosen answers do"
        else:
            examples = "example does" if n == 1 else "examples do"
        return (f"warning: {n:,} of {self.examples:,} {examples} not end with {what} ({', '.join(why)}): "
                f"the model will not learn to stop on them; {'; '.join(hints)}")


@dataclass
class PreparedData:
    """Tokenized examples ready for the trainer."""

    train: Any
    """``datasets.Dataset`` with columns ``input_ids`` and ``labels`` (lists of int); for preference
    pairs ``prompt_ids``, ``chosen_ids`` and ``rejected_ids`` (TRL's tokenized layout)."""
    validation: Any | None
    """The same for validation, or None."""
    stats: DataStats
    format: str
    cache_path: Path | None = None
    """The cache entry these came from or were saved to."""
    cache_hit: bool = False


# --------------------------------------------------------------------------------------------
# Reading records


def _unknown_format_error(src: Source, unit: str, number: int, keys) -> UserError:
    shown = ", ".join(sorted(map(str, keys))) or "(none)"
    return UserError(
        f"{src.display}: cannot tell the data format from the keys {shown} ({unit} {number}); "
        f"accepted: {accepted_formats()}",
        "rename the fields, or set data.format",
    )


@dataclass
class _Loaded:
    format: str
    examples: list  # (BadRecord location as (unit, number), example dict)
    bad: list = field(default_factory=list)
    records: int = 0
    removed_phrases: int = 0
    removed_duplicates: int = 0


def check_method(fmt: str, method: str, settings: DataSettings, source: str) -> None:
    """Refuse, in one line, data of the wrong kind for the training method: single responses for
    dpo and orpo (which train on pairs), preference pairs for sft. ``source`` is how data.train is
    written; ``settings.format`` says whether the format was set or found in the file."""
    from engine.preset import PREFERENCE_METHODS

    form = get_format(fmt)
    wants_pairs = method in PREFERENCE_METHODS
    if form.pair == wants_pairs:
        return
    set_by_hand = settings.format != "auto"
    if wants_pairs:
        holds = (f"data.format is {fmt} ({form.keys})" if set_by_hand
                 else f"data.train ({source}) holds {fmt} records ({form.keys})")
        raise UserError(
            f"training.method {method} trains on pairs, but {holds}",
            ("set data.format: preference or preference_messages (or auto), or set training.method: sft"
             if set_by_hand else "give records with prompt, chosen and rejected (or chosen and rejected "
             "conversations), or set training.method: sft"),
        )
    holds = (f"data.format is {fmt}, preference pairs ({form.keys})" if set_by_hand
             else f"data.train ({source}) holds preference pairs ({form.keys})")
    raise UserError(f"{holds}; training.method {method} trains on single responses",
                    "set training.method: dpo or orpo")


def _read_sources(train_src: "Source", val_src: "Source | None", settings: DataSettings,
                  clean: bool = True, method: str | None = None) -> "tuple[_Loaded, _Loaded | None, list[BadRecord]]":
    """Read the training and validation sources; refuse data of the wrong kind for ``method`` (when
    given), and bad records unless they may be skipped."""
    train = _read_examples(train_src, settings, clean=clean, method=method)
    val = _read_examples(val_src, settings, fmt=train.format, clean=clean) if val_src else None
    bad = train.bad + (val.bad if val else [])
    if bad and not settings.skip_bad_records:
        raise _bad_records_error(bad)
    _check_loaded(train, train_src, settings)
    if val is not None:
        _check_loaded(val, val_src, settings)
    return train, val, bad


def _read_examples(src: Source, settings: DataSettings, fmt: str | None = None, limit: int | None = None,
                   clean: bool = True, method: str | None = None) -> _Loaded:
    """Read, validate and normalize a source's records (and clean them when asked).

    ``fmt`` forces a format (the validation set must match the training set); otherwise
    ``settings.format``, or detection from the first records. With ``limit`` reading stops after
    that many usable examples (for the preview). With ``method`` the format is checked against it
    (:func:`check_method`) before any record is read past the detection."""
    raw = iter_raw(src)
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

    form = get_format(fmt)
    if method is not None:
        check_method(fmt, method, settings, src.display)

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
            if isinstance(rec, dict):
                example, problem = form.normalize(rec)
            else:
                problem = f"a record must be an object with named fields, this is {kind_of(rec)}"
        if problem is not None:
            loaded.bad.append(BadRecord(src.display, unit, number, problem))
            continue
        if phrases:
            response = form.response_text(example).lower()
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


def _check_loaded(loaded: _Loaded, src: Source, settings: DataSettings) -> None:
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


def check_records(settings: DataSettings, method: str = "sft") -> tuple[str, int, list[BadRecord]]:
    """Read and validate the raw records, without any tokenizer (fast: run it first).

    Returns the format (detected or set), the number of usable training records (before
    cleaning and split) and the bad records of the training and validation sources. Raises
    :class:`UserError` on data of the wrong kind for ``method`` (``training.method``: pairs for dpo
    and orpo, single responses for sft), on the first bad record unless ``data.skip_bad_records``,
    and on a source that cannot be read, has no usable record or whose format cannot be told.
    """
    train_src = open_source(settings.train, settings.split, "data.train")
    val_src = validation_source(settings, train_src)
    train, val, bad = _read_sources(train_src, val_src, settings, clean=False, method=method)
    return train.format, len(train.examples), bad


# --------------------------------------------------------------------------------------------
# prepare_data


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


def prepare_data(
    settings: DataSettings, tokenizer, seq_len: int, seed: int, cache_dir: Path | None = None, method: str = "sft"
) -> PreparedData:
    """Read, clean, split and tokenize the data; cached so a rerun does not tokenize again.

    Raises :class:`UserError` for data of the wrong kind for ``method``, bad records (unless
    ``data.skip_bad_records``) and unusable sources, as :func:`check_records` does. Preference
    pairs come out as TRL's tokenized columns (``prompt_ids``, ``chosen_ids``, ``rejected_ids``).

    ``cache_dir`` is the folder that holds prepared data sets (default: ``data`` in the
    qlora-wizard cache, see :func:`engine.demo.cache_root`). The key covers the source bytes (or
    the Hub id, split and dataset fingerprint), the data settings, seq_len, seed and the
    tokenizer (name, size, chat template, vocabulary)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_data_cache_dir()
    train_src = open_source(settings.train, settings.split, "data.train")
    val_src = validation_source(settings, train_src)
    fingerprint = tokenizer_fingerprint(tokenizer)
    identity = tokenizer_files_identity(str(getattr(tokenizer, "name_or_path", "")))
    if identity is not None:
        remember_fingerprint(identity, fingerprint, cache_dir)
    entry = _cache_entry(cache_dir, settings, train_src, val_src, seq_len, seed, fingerprint)
    hit = _from_cache(entry)
    if hit is not None:
        check_method(hit.format, method, settings, train_src.display)
        return hit

    train_loaded, val_loaded, bad = _read_sources(train_src, val_src, settings, method=method)
    fmt = train_loaded.format
    if val_loaded is not None:
        train_ex, val_ex = train_loaded.examples, val_loaded.examples
    else:
        train_ex, val_ex = _split(train_loaded.examples, settings.validation_split, seed)
    if settings.max_examples is not None:
        train_ex = train_ex[: settings.max_examples]

    form = get_format(fmt)
    if form.pair:
        train_ds, val_ds, stats = _prepare_pairs(form, train_ex, val_ex, tokenizer, seq_len, settings,
                                                 train_src, val_src, train_loaded, val_loaded, bad)
        return _saved(entry, train_ds, val_ds, stats)
    tok_train = tokenize_examples(train_ex, form, tokenizer, seq_len, settings.train_on_inputs,
                                  train_src.display, settings.skip_bad_records)
    tok_val = (tokenize_examples(val_ex, form, tokenizer, seq_len, settings.train_on_inputs,
                                  val_src.display if val_src else train_src.display, settings.skip_bad_records)
               if val_ex else None)
    if not tok_train.input_ids:
        raise _nothing_to_train(tok_train, seq_len, train_src.display)
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
        unstopped=tok_train.unstopped,
        unstopped_cut=tok_train.unstopped_cut,
        **_stop_token(tok_train, tokenizer),
    )
    train_ds = to_dataset(tok_train)
    val_ds = to_dataset(tok_val) if tok_val and tok_val.input_ids else None
    return _saved(entry, train_ds, val_ds, stats)


def _saved(entry: Path, train_ds, val_ds, stats: DataStats) -> PreparedData:
    """Save prepared data into its cache entry and return it as read back (memory-mapped from the
    cache, like a later run's); as it is where the cache cannot be written."""
    if save_cached(entry, train_ds, val_ds, stats.to_json()):
        saved = _from_cache(entry)
        if saved is not None:
            saved.cache_hit = False
            return saved
    return PreparedData(train=train_ds, validation=val_ds, stats=stats, format=stats.format, cache_path=None,
                        cache_hit=False)


def _prepare_pairs(form, train_ex: list, val_ex: list, tokenizer, seq_len: int, settings: DataSettings,
                   train_src: Source, val_src: Source | None, train_loaded: "_Loaded", val_loaded: "_Loaded | None",
                   bad: list) -> tuple[Any, Any, DataStats]:
    """Tokenize preference pairs: the training and validation datasets (TRL's columns) and their stats."""
    tok_train = tokenize_pairs(train_ex, form, tokenizer, seq_len, train_src.display, settings.skip_bad_records)
    tok_val = (tokenize_pairs(val_ex, form, tokenizer, seq_len, val_src.display if val_src else train_src.display,
                              settings.skip_bad_records) if val_ex else None)
    if not len(tok_train):
        raise _no_pairs_left(tok_train, seq_len, train_src.display)

    def both(name: str) -> int:
        """A count of the training and the validation pairs together."""
        return getattr(tok_train, name) + (getattr(tok_val, name) if tok_val else 0)

    lengths = tok_train.lengths()
    stats = DataStats(
        format=form.name,
        examples=len(tok_train),
        pairs=len(tok_train),
        validation_examples=len(tok_val) if tok_val else 0,
        tokens=tok_train.tokens(),
        supervised_tokens=tok_train.supervised(),
        prompt_tokens=tok_train.prompt_tokens(),
        chosen_tokens=tok_train.chosen_tokens(),
        rejected_tokens=tok_train.rejected_tokens(),
        validation_tokens=tok_val.tokens() if tok_val else 0,
        validation_supervised_tokens=tok_val.supervised() if tok_val else 0,
        truncated=both("truncated"),
        removed_duplicates=train_loaded.removed_duplicates + (val_loaded.removed_duplicates if val_loaded else 0),
        removed_phrases=train_loaded.removed_phrases + (val_loaded.removed_phrases if val_loaded else 0),
        removed_identical=both("removed_identical"),
        removed_empty_side=both("removed_empty_side"),
        removed_prompt_too_long=both("removed_prompt_too_long"),
        skipped_bad=len(bad) + both("skipped_bad"),
        max_len=int(max(lengths)),
        mean_len=round(sum(lengths) / len(lengths), 2),
        seq_len=seq_len,
        unstopped=tok_train.unstopped,
        unstopped_cut=tok_train.unstopped_cut,
        **_stop_token(tok_train, tokenizer),
    )
    val_ds = pairs_dataset(tok_val) if tok_val and len(tok_val) else None
    return pairs_dataset(tok_train), val_ds, stats


def _cache_entry(cache_dir: Path, settings: DataSettings, train_src: Source, val_src: Source | None, seq_len: int,
                 seed: int, fingerprint: dict) -> Path:
    """The cache entry of this data, these settings and this tokenizer (its fingerprint)."""
    return cache_dir / cache_key({
        "train": source_identity(train_src),
        "validation": source_identity(val_src),
        # The sources count by what they hold (above), not by how their paths are written: the wizard's
        # train.jsonl and the run's /abs/path/train.jsonl are one entry.
        "settings": settings.model_dump(mode="json", exclude={"train", "validation"}),
        "seq_len": seq_len,
        "seed": seed,
        "tokenizer": fingerprint,
    })


def cached_stats(settings: DataSettings, model: ModelSettings, seq_len: int, seed: int,
                 cache_dir: Path | None = None, method: str = "sft") -> DataStats | None:
    """The statistics of data prepared before for this model's tokenizer, read without loading the
    tokenizer (or torch): a local model folder whose tokenizer files are as they were when the data
    was prepared, and a cache entry for this data and these settings. None otherwise (prepare it).
    Data of the wrong kind for ``method`` is refused from the stats' format, as
    :func:`prepare_data` refuses it."""
    found = _recalled_entry(settings, model, seq_len, seed, cache_dir)
    if found is None:
        return None
    entry, train_src = found
    try:
        stats = DataStats.from_json(json.loads((entry / "stats.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None
    if stats.format not in FORMATS:
        return None  # not this version's: prepare it
    check_method(stats.format, method, settings, train_src.display)
    return stats


def cached_prepared_data(settings: DataSettings, model: ModelSettings, seq_len: int, seed: int,
                         cache_dir: Path | None = None, method: str = "sft") -> PreparedData | None:
    """The data prepared before for this model's tokenizer, found as :func:`cached_stats` finds its
    statistics (without loading the tokenizer: a large vocabulary takes seconds to load); None where
    it is not there (prepare it)."""
    found = _recalled_entry(settings, model, seq_len, seed, cache_dir)
    if found is None:
        return None
    entry, train_src = found
    hit = _from_cache(entry)
    if hit is None or hit.format not in FORMATS:
        return None
    check_method(hit.format, method, settings, train_src.display)
    return hit


def _recalled_entry(settings: DataSettings, model: ModelSettings, seq_len: int, seed: int,
                    cache_dir: Path | None) -> tuple[Path, Source] | None:
    """(the cache entry, the training source) of this data prepared for this model's tokenizer, from
    the fingerprint remembered for its files; None where it cannot be found without loading it."""
    from engine.demo import resolve_model_source
    from engine.gguf import is_gguf

    if model.revision or model.trust_remote_code or is_gguf(model.source):
        return None  # a revision or shipped code can change what loads: load it
    cache_dir = Path(cache_dir) if cache_dir is not None else default_data_cache_dir()
    fingerprint = recalled_fingerprint(tokenizer_files_identity(resolve_model_source(model.source)), cache_dir)
    if fingerprint is None:
        return None
    train_src = open_source(settings.train, settings.split, "data.train")
    val_src = validation_source(settings, train_src)
    if "hub" in (train_src.kind, val_src and val_src.kind):
        return None  # a Hub dataset's identity is found by loading it
    return _cache_entry(cache_dir, settings, train_src, val_src, seq_len, seed, fingerprint), train_src


def _stop_token(tok, tokenizer) -> dict:
    """The stop token most training examples end with (the EOS when none does), and whether it is the EOS."""
    if tok.stop_ends:
        token_id = tok.stop_ends.most_common(1)[0][0]
        token = tokenizer.convert_ids_to_tokens(token_id)
    else:
        token_id, token = tokenizer.eos_token_id, tokenizer.eos_token
    return {"stop_token": str(token or ""), "stop_is_eos": token_id == tokenizer.eos_token_id}


def _nothing_to_train(tok, seq_len: int, source: str) -> UserError:
    """Why no training example is left, with the numbers: how many were cut before their response,
    how long their prompts are, and the seq_len (a power of two) that keeps at least 95 % of them."""
    others = []
    if tok.removed_empty > len(tok.removed_prompts):
        others.append(f"{tok.removed_empty - len(tok.removed_prompts):,} with nothing to train at any length")
    if tok.skipped_bad:
        others.append(f"{tok.skipped_bad:,} skipped as bad records")
    return _nothing_left(tok.removed_prompts, others, seq_len, source)


def _no_pairs_left(tok, seq_len: int, source: str) -> UserError:
    """Why no training pair is left: as :func:`_nothing_to_train` says it for examples."""
    others = []
    if tok.removed_identical:
        others.append(f"{tok.removed_identical:,} with identical answers")
    if tok.removed_empty_side:
        others.append(f"{tok.removed_empty_side:,} with an empty answer")
    if tok.skipped_bad:
        others.append(f"{tok.skipped_bad:,} skipped as bad records")
    return _nothing_left(tok.removed_prompts, others, seq_len, source, "pair", "answer")


def _nothing_left(removed_prompts: list, others: list[str], seq_len: int, source: str, noun: str = "example",
                  part: str = "response") -> UserError:
    """The message of :func:`_nothing_to_train`: ``removed_prompts`` the prompt lengths of those cut
    before their ``part``, ``others`` the other removals in words."""
    from engine.preset import TrainingSettings

    prompts = sorted(removed_prompts)
    n = len(prompts)
    if not prompts:
        why = f" ({' and '.join(others)})" if others else ""
        return UserError(f"{source}: no training {noun} has anything to train{why}",
                         "check the records and data.format")
    lo, hi = prompts[0], prompts[-1]
    span = f"{lo:,} tokens" if lo == hi else f"{lo:,} to {hi:,} tokens"
    if others:
        what = (f"{n:,} training {noun}{'s are' if n > 1 else ' is'} cut before the {part} (prompts are "
                f"{span}), and {' and '.join(others)}")
    elif n == 1:
        what = f"the one training {noun} is cut before its {part} (its prompt is {span})"
    else:
        what = f"all {n:,} training {noun}s are cut before their {part} (prompts are {span})"
    # An example whose first trained token comes after p tokens is kept from a seq_len of p + 1.
    bounds = {k: getattr(m, k) for m in TrainingSettings.model_fields["seq_len"].metadata for k in ("ge", "le")
              if hasattr(m, k)}
    need = prompts[math.ceil(0.95 * n) - 1] + 1
    suggest = min(bounds["le"], max(bounds["ge"], 1 << (need - 1).bit_length()))
    kept = bisect.bisect_left(prompts, suggest)
    keeps = "all of them" if kept == n else f"{100 * kept // n} % of them"
    return UserError(f"{source}: no {noun} has anything left to train at seq_len {seq_len}: {what}",
                     f"a training.seq_len of {suggest:,} keeps {keeps}")


def held_out_examples(settings: DataSettings, seed: int, n: int) -> tuple[str, list[dict], bool]:
    """Up to ``n`` of the run's validation examples, normalized (not tokenized), from the same split
    :func:`prepare_data` makes (``data.validation``, or the ``validation_split`` share drawn with
    ``seed``); where there is no validation set, the last ``n`` training examples instead.

    Returns the format, the examples (dicts in the format's shape) and whether they were held out."""
    train_src = open_source(settings.train, settings.split, "data.train")
    val_src = validation_source(settings, train_src)
    train_loaded, val_loaded, _ = _read_sources(train_src, val_src, settings)
    if val_loaded is not None:
        train_ex, val_ex = train_loaded.examples, val_loaded.examples
    else:
        train_ex, val_ex = _split(train_loaded.examples, settings.validation_split, seed)
    if val_ex:
        return train_loaded.format, [e for _, e in val_ex[:n]], True
    if settings.max_examples is not None:
        train_ex = train_ex[: settings.max_examples]
    return train_loaded.format, [e for _, e in train_ex[-n:]] if n > 0 else [], False


def _from_cache(entry: Path) -> PreparedData | None:
    """The prepared data of a cache entry, or None."""
    hit = load_cached(entry)
    if hit is None:
        return None
    train, val, stats = hit
    stats = DataStats.from_json(stats)
    return PreparedData(train=train, validation=val, stats=stats, format=stats.format, cache_path=entry,
                        cache_hit=True)


# --------------------------------------------------------------------------------------------
# Preview


PAIR_LABELS = ("prompt (not trained)", "chosen answer (preferred)", "rejected answer")
"""How a pair's three parts are labelled in the preview."""


def preview(settings: DataSettings, tokenizer, seq_len: int, n: int = 3) -> list[list[tuple[str, bool | None]]]:
    """The first n usable examples as the model sees them: (text piece, trained?) segments.

    Bad records are passed over (check_records reports them); drop phrases and duplicates are
    applied, truncation at seq_len too. The first token is never marked trained (nothing
    predicts it). A preference pair is its prompt (not trained), then its chosen answer, then its
    rejected answer (trained), each part after a label line: a segment whose flag is None (the label,
    not something the model sees, :data:`PAIR_LABELS`)."""
    src = open_source(settings.train, settings.split, "data.train")
    loaded = _read_examples(src, settings, limit=n)
    form = get_format(loaded.format)
    if form.pair:
        pairs = tokenize_pairs(loaded.examples, form, tokenizer, seq_len, src.display, skip_bad_records=True)
        return [_pair_segments(p.tolist(), c.tolist(), r.tolist(), tokenizer)
                for p, c, r in zip(pairs.prompt_ids, pairs.chosen_ids, pairs.rejected_ids)]
    tok = tokenize_examples(loaded.examples, form, tokenizer, seq_len,
                            settings.train_on_inputs, src.display, skip_bad_records=True)
    return [segments(ids.tolist(), labels.tolist(), tokenizer) for ids, labels in zip(tok.input_ids, tok.labels)]


def _pair_segments(prompt: list[int], chosen: list[int], rejected: list[int],
                   tokenizer) -> list[tuple[str, bool | None]]:
    """One pair as the preview shows it: each part after its label, the answers trained."""
    out: list[tuple[str, bool | None]] = []
    for label, answer in ((PAIR_LABELS[1], chosen), (PAIR_LABELS[2], rejected)):
        # Decoded together with the prompt, so that the answer's first characters read as they follow it.
        pieces = segments(prompt + answer, [-100] * len(prompt) + answer, tokenizer)
        if not out:
            out += [(f"{PAIR_LABELS[0]}:\n", None), *[p for p in pieces if not p[1]][:1]]
        previous = out[-1][0]
        out.append((("" if previous.endswith("\n") else "\n") + f"{label}:\n", None))
        out += [p for p in pieces if p[1]]
    return out


