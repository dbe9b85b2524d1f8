"""From rendered examples to token ids and labels: the tokenizer, masking and truncation.

Prompt tokens get label -100 unless ``data.train_on_inputs``; examples longer than ``seq_len`` are
truncated, and dropped when nothing trainable is left. Supervised tokens are the labels actually
trained: a causal LM never predicts the first token of an example (labels shift by one, and the
flattening collator masks each example's first label), so an example contributes
``sum(labels[1:] != -100)``. Token counts are real tokens, no padding.

Stopping: an example teaches the model to stop when each of its trained parts (the response; each
assistant turn of a conversation) ends with a stop token, the EOS or a special token such as the chat
template's end-of-turn marker (:func:`stop_token_ids`). Those that do not are counted, and how many of
them were cut at seq_len (the rest: a chat template that ends a turn without a special token).

Preference pairs (:func:`tokenize_pairs`) are not masked: they become TRL's tokenized columns, the
prompt's tokens and each answer's, split where the tokenizations of the prompt and of prompt + answer
part; a pair's chosen answer is what must end with a stop token.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from engine.data.formats import Rendered, RecordFormat, RenderedPair, TemplateRefused, common_prefix
from engine.errors import NeedsRemoteCode, UserError, first_line
from engine.preset import ModelSettings


def load_tokenizer(model: ModelSettings):
    """The model's tokenizer (with a pad token: EOS when it has none); one-line UserError on failure."""
    from engine.demo import resolve_model_source
    from engine.gguf import local_model

    source = local_model(resolve_model_source(model.source))  # a .gguf: its converted folder, converted once
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


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS token in front of a text by itself."""
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
    name = str(getattr(tokenizer, "name_or_path", ""))
    if name and os.path.isdir(name):
        # The wizard may name a model folder relative to where it runs; the run's preset names it
        # absolutely. The same folder is the same tokenizer: one cache entry for both.
        name = os.path.realpath(name)
    return {
        "name_or_path": name,
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "chat_template": template if isinstance(template, str) else repr(template),
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "backend": backend_hash,
    }


def _refused(exc: TemplateRefused, source: str, unit: str, number: int, skip_bad_records: bool) -> None:
    """A conversation the chat template refused: one line naming the record, unless bad records are
    skipped (the caller counts it)."""
    if not skip_bad_records:
        raise UserError(f"{source} {unit} {number}: the chat template refused this conversation ({exc})",
                        "fix the record or set data.skip_bad_records: true") from None


TOKENIZER_FILE_PREFIXES = ("tokenizer", "special_tokens_map", "added_tokens", "chat_template", "vocab", "merges",
                           "spiece", "sentencepiece", "config.json")
"""The files of a model folder that a tokenizer loads from (``config.json`` can name its class)."""


def tokenizer_files_identity(folder: str) -> str | None:
    """What identifies the tokenizer of a local model folder without loading it: the folder, each file
    it loads from (name, size, modification time) and the versions of the libraries that read them.
    None for anything but a folder (a Hub id's files are only found by loading it)."""
    from importlib.metadata import PackageNotFoundError, version

    if not folder or not os.path.isdir(folder):
        return None
    real = os.path.realpath(folder)
    try:
        files = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(real)
                       if e.is_file() and e.name.startswith(TOKENIZER_FILE_PREFIXES))
        versions = [version(name) for name in ("transformers", "tokenizers")]
    except (OSError, PackageNotFoundError):
        return None
    material = repr((real, files, versions)).encode()
    return hashlib.sha256(material).hexdigest()[:24]


def stop_token_ids(tokenizer) -> set[int]:
    """The tokens that end an answer: the EOS and the other special tokens (a chat template's
    end-of-turn marker such as ``<end_of_turn>`` or ``<|im_end|>``); BOS, UNK and a padding token
    other than the EOS do not end anything."""
    ids = {i for i in (getattr(tokenizer, "all_special_ids", None) or []) if i is not None}
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids |= {i for i, t in added.items() if getattr(t, "special", False)}
    eos = tokenizer.eos_token_id
    for other in (tokenizer.bos_token_id, tokenizer.unk_token_id, tokenizer.pad_token_id):
        if other is not None and other != eos:
            ids.discard(other)
    if eos is not None:
        ids.add(eos)
    return ids


def _encode(rendered: list[Rendered], tokenizer) -> list[tuple[Any, Any]]:
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
class Tokenized:
    """Token ids and labels of a set of examples, and what happened to the rest."""

    input_ids: list = field(default_factory=list)
    """numpy int32 arrays."""
    labels: list = field(default_factory=list)
    truncated: int = 0
    removed_empty: int = 0
    skipped_bad: int = 0
    removed_prompts: list = field(default_factory=list)
    """Of the examples removed because truncation left nothing to train: the tokens in front of their
    first trained token, each (the example is kept from a seq_len of that plus one)."""
    unstopped: int = 0
    """Kept examples with a trained part that does not end with a stop token (they do not teach the
    model to stop)."""
    unstopped_cut: int = 0
    """Of those, the ones cut at seq_len."""
    stop_ends: Counter = field(default_factory=Counter)
    """The stop tokens the kept examples end with: token id -> examples."""

    def tokens(self) -> int:
        """Real tokens."""
        return int(sum(len(x) for x in self.input_ids))

    def supervised(self) -> int:
        """Label positions trained (the first of each example excluded)."""
        return int(sum(int((lab[1:] != -100).sum()) for lab in self.labels))


def tokenize_examples(examples: list, fmt: RecordFormat, tokenizer, seq_len: int, train_on_inputs: bool,
                      source: str, skip_bad_records: bool) -> Tokenized:
    """Render, tokenize, mask and truncate; examples are ((unit, number), example dict)."""
    import numpy as np

    bos_first = adds_bos(tokenizer)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    stops = stop_token_ids(tokenizer)
    result = Tokenized()
    chunk = 1000
    for start in range(0, len(examples), chunk):
        rendered = []
        for (unit, number), example in examples[start: start + chunk]:
            try:
                rendered.append(fmt.render(example, tokenizer, bos_first))
            except TemplateRefused as exc:
                _refused(exc, source, unit, number, skip_bad_records)
                result.skipped_bad += 1
        for r, (ids, flags) in zip(rendered, _encode(rendered, tokenizer)):
            if r.bos:
                ids, flags = np.concatenate([[bos], ids]), np.concatenate([[False], flags])
            if r.eos:
                ids, flags = np.concatenate([ids, [eos]]), np.concatenate([flags, [True]])
            ids = ids.astype(np.int32)
            labels = ids.copy() if train_on_inputs else np.where(flags, ids, -100).astype(np.int32)
            whole = labels
            cut = len(ids) > seq_len
            if cut:
                ids, labels, flags = ids[:seq_len], labels[:seq_len], flags[:seq_len]
                result.truncated += 1
            if not (labels[1:] != -100).any():
                result.removed_empty += 1
                trained_at = np.flatnonzero(whole[1:] != -100)
                if len(trained_at):  # cut before its response (else: nothing to train at any length)
                    result.removed_prompts.append(int(trained_at[0]) + 1)
                continue
            # The last token of each trained part (response, assistant turn) must be a stop token.
            last = ids[np.flatnonzero(flags[:-1] > flags[1:])].tolist() + ([int(ids[-1])] if flags[-1] else [])
            if last and all(t in stops for t in last):
                result.stop_ends[last[-1]] += 1
            else:
                result.unstopped += 1
                result.unstopped_cut += int(cut)
            result.input_ids.append(ids)
            result.labels.append(labels)
    return result


@dataclass
class TokenizedPairs:
    """Token ids of a set of preference pairs (TRL's tokenized layout), and what happened to the rest."""

    prompt_ids: list = field(default_factory=list)
    """numpy int32 arrays: each prompt, the BOS first where the tokenizer adds one."""
    chosen_ids: list = field(default_factory=list)
    """The chosen answers' tokens, each ending with its stop token (unless cut at seq_len)."""
    rejected_ids: list = field(default_factory=list)
    """The rejected answers' tokens, likewise."""
    truncated: int = 0
    """Pairs whose answers (one or both) were cut at seq_len."""
    removed_identical: int = 0
    """Pairs whose two answers are the same (as text, or as the tokens left within seq_len)."""
    removed_empty_side: int = 0
    """Pairs with an empty (or blank) answer."""
    removed_prompt_too_long: int = 0
    """Pairs whose prompt leaves no answer token within seq_len."""
    skipped_bad: int = 0
    removed_prompts: list = field(default_factory=list)
    """The prompt lengths of the pairs removed for their prompt (each is kept from a seq_len of that plus one)."""
    unstopped: int = 0
    """Kept pairs whose chosen answer does not end with a stop token."""
    unstopped_cut: int = 0
    """Of those, the ones cut at seq_len."""
    stop_ends: Counter = field(default_factory=Counter)
    """The stop tokens the kept chosen answers end with: token id -> pairs."""

    def __len__(self) -> int:
        """The pairs kept."""
        return len(self.prompt_ids)

    def prompt_tokens(self) -> int:
        """Prompt tokens, each prompt once."""
        return int(sum(len(x) for x in self.prompt_ids))

    def chosen_tokens(self) -> int:
        """Chosen answer tokens."""
        return int(sum(len(x) for x in self.chosen_ids))

    def rejected_tokens(self) -> int:
        """Rejected answer tokens."""
        return int(sum(len(x) for x in self.rejected_ids))

    def tokens(self) -> int:
        """Real tokens a pass runs: each side is the prompt and its answer, so each prompt counts twice."""
        return 2 * self.prompt_tokens() + self.chosen_tokens() + self.rejected_tokens()

    def supervised(self) -> int:
        """Answer tokens, both sides (what the preference loss scores)."""
        return self.chosen_tokens() + self.rejected_tokens()

    def lengths(self) -> list[int]:
        """The length of each sequence a pass runs: prompt + chosen and prompt + rejected of every pair."""
        return [len(p) + len(a) for p, c, r in zip(self.prompt_ids, self.chosen_ids, self.rejected_ids)
                for a in (c, r)]


def tokenize_pairs(examples: list, fmt: RecordFormat, tokenizer, seq_len: int, source: str,
                   skip_bad_records: bool) -> TokenizedPairs:
    """Render and tokenize preference pairs (examples are ((unit, number), pair dict)), split each at
    the prompt boundary and cut at seq_len.

    The prompt, prompt + chosen and prompt + rejected are tokenized as wholes and the prompt is the
    tokens all three share (as TRL does): a token that would merge across the boundary belongs to the
    answers, so prompt + answer is exactly the tokenization of the whole text. Pairs with an empty
    answer, with identical answers, or whose prompt leaves no answer token within seq_len are removed
    and counted; a longer prompt + answer has the answer cut."""
    import numpy as np

    bos_first = adds_bos(tokenizer)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    stops = stop_token_ids(tokenizer)
    result = TokenizedPairs()
    chunk = 1000
    for start in range(0, len(examples), chunk):
        rendered: list[RenderedPair] = []
        for (unit, number), example in examples[start: start + chunk]:
            if not example["chosen"].strip() or not example["rejected"].strip():
                result.removed_empty_side += 1
                continue
            if example["chosen"] == example["rejected"]:
                result.removed_identical += 1
                continue
            try:
                rendered.append(fmt.render_pair(example, tokenizer, bos_first))
            except TemplateRefused as exc:
                _refused(exc, source, unit, number, skip_bad_records)
                result.skipped_bad += 1
        if not rendered:
            continue
        texts = [t for r in rendered for t in (r.prompt, r.prompt + r.chosen, r.prompt + r.rejected)]
        enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
        for i, r in enumerate(rendered):
            head, whole_chosen, whole_rejected = enc[3 * i: 3 * i + 3]
            shared = len(common_prefix(head, whole_chosen, whole_rejected))
            prompt = ([bos] if r.bos else []) + list(head[:shared])
            answers = [list(whole[shared:]) + ([eos] if add_eos else [])
                       for whole, add_eos in ((whole_chosen, r.eos[0]), (whole_rejected, r.eos[1]))]
            room = seq_len - len(prompt)
            if room <= 0:
                result.removed_prompt_too_long += 1
                result.removed_prompts.append(len(prompt))
                continue
            cut = any(len(a) > room for a in answers)
            chosen, rejected = (a[:room] for a in answers)
            if chosen == rejected:
                result.removed_identical += 1
                continue
            result.truncated += int(cut)
            if chosen and chosen[-1] in stops:
                result.stop_ends[chosen[-1]] += 1
            else:
                result.unstopped += 1
                result.unstopped_cut += int(len(answers[0]) > room)
            result.prompt_ids.append(np.asarray(prompt, dtype=np.int32))
            result.chosen_ids.append(np.asarray(chosen, dtype=np.int32))
            result.rejected_ids.append(np.asarray(rejected, dtype=np.int32))
    return result


def supervised_count(labels) -> int:
    """Label positions actually trained in one example: ``sum(labels[1:] != -100)``."""
    return sum(1 for lab in list(labels)[1:] if lab != -100)


def segments(ids: list[int], labels: list[int], tokenizer) -> list[tuple[str, bool]]:
    """An example as (text piece, trained?) runs, decoded; the first token is never trained."""
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
