"""Record formats: one class per format, registered in :data:`FORMATS`.

A format knows its keys (in words, for messages), how to tell itself from a record's keys, how to
normalize a record into a fixed shape (or say what is wrong with it), how to render an example as
the text the model sees with the trained character spans, and which text is the response (what
the drop phrases are matched against). Adding a format is one class with ``@register``; the
preset's ``data.format`` choices must name it too (a test checks both ways).

Prompt templates (plain; what the model sees)::

    ### Instruction:
    {instruction}

    ### Input:
    {input}

    ### Response:
    {output}</s>

(alpaca; without the ``### Input:`` section when ``input`` is empty). input_output is the same
without the instruction section. prompt_completion is the prompt followed directly by the
completion, no template: the prompt is taken to be exactly the text the model is given. The trained
part is the response and the end-of-sequence token after it; the tokenizer's BOS token (if it adds
one) comes first.

Conversations (messages, sharegpt) are rendered with the tokenizer's chat template when it has one,
and only the assistant turns (with their end-of-turn marker) are trained: each assistant turn is
located by rendering the conversation prefix by prefix (the text between "everything before, with
the generation prompt" and "everything up to this turn"). Without a chat template they use the
plain layout ``### System:`` / ``### User:`` / ``### Assistant:``, each header line followed by the
turn and a blank line, each assistant turn ending with the EOS token.

Preference pairs (``training.method`` dpo and orpo) are a prompt and two answers to it, the chosen
(preferred) one and the rejected one (:class:`RenderedPair`). ``preference`` takes three texts, the
prompt being exactly the text the model is given (as for prompt_completion) and each answer ending
with the EOS token. ``preference_messages`` takes two conversations that share their prompt turns and
differ in one final assistant turn each (or TRL's layout: ``prompt`` the turns, ``chosen`` and
``rejected`` the answers); with a chat template the prompt is the turns with the generation prompt,
each answer the text the template renders for the assistant turn, end-of-turn marker included (the
EOS appended only where the template ends the turn without a special token); without one, the plain
layout above, each answer ending with the EOS token. The drop phrases are matched against the
chosen answer.

Trying a trained model (``engine.after``), what a person types is rendered as the prompt part of a
one-turn example of the run's format (``render_prompt``), exactly as training rendered it: alpaca
reads a blank line as the end of the instruction and the start of its input; input_output and
prompt_completion (and preference) take the text as the input or the prompt; text is continued as it
is; a conversation (and preference_messages) is one user turn followed by the assistant's header (the
chat template's generation prompt).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from engine.errors import UserError, first_line

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


@dataclass
class Rendered:
    """An example as the text the model sees."""

    text: str
    spans: list
    """``[(start, end)]`` character ranges that are trained."""
    bos: bool
    """Put the BOS token in front."""
    eos: bool
    """Append the EOS token (trained)."""


class TemplateRefused(Exception):
    """The tokenizer's chat template would not render a conversation (or changes its assistant text)."""


class RecordFormat:
    """One record layout (subclass it and ``@register`` it)."""

    name: ClassVar[str]
    """The value of ``data.format`` that selects it."""
    keys: ClassVar[str]
    """Its keys in words, for the message that lists the accepted formats."""
    detect_rank: ClassVar[int]
    """Detection tries the formats in this order (lower first): the more specific keys win."""
    pair: ClassVar[bool] = False
    """A format of preference pairs (a prompt, a chosen and a rejected answer: dpo and orpo) rather
    than of single responses (sft)."""

    def detects(self, keys: set) -> bool:
        """Whether a record with these keys is in this format."""
        raise NotImplementedError

    def detects_record(self, rec: dict) -> bool:
        """Whether a record is in this format: by its keys (a format whose keys are another's too looks
        at the values)."""
        return self.detects(set(rec))

    def normalize(self, rec: dict) -> tuple[dict | None, str | None]:
        """The example in this format's fixed shape, or what is wrong with the record."""
        raise NotImplementedError

    def render(self, example: dict, tokenizer, adds_bos: bool) -> Rendered:
        """The text the model sees and the trained spans (``TemplateRefused`` when a chat template refuses)."""
        raise NotImplementedError

    def response_text(self, example: dict) -> str:
        """The text the model is trained to produce (what the drop phrases are matched against)."""
        raise NotImplementedError

    def render_prompt(self, prompt: str, tokenizer, adds_bos: bool) -> Rendered:
        """What a person typed as the model sees it in a one-turn exchange: the prompt part of
        ``render`` exactly as training rendered it, up to where the response starts (no spans)."""
        raise NotImplementedError

    def typed_prompt(self, example: dict) -> tuple[str, str]:
        """An example as (what a person would type, the reference answer): ``render_prompt`` of the
        first gives the prompt part of the example as trained (its first exchange, for conversations)."""
        raise NotImplementedError


FORMATS: dict[str, RecordFormat] = {}
"""Every format by name, in the order messages list them."""


def register(cls: type[RecordFormat]) -> type[RecordFormat]:
    """Add a format to :data:`FORMATS` (a class decorator)."""
    FORMATS[cls.name] = cls()
    return cls


def detect_format(keys) -> str | None:
    """The record format that a record's keys indicate, or None. Given the record itself (a dict),
    its values decide between formats with the same keys (pairs of texts or of conversations)."""
    record = keys if isinstance(keys, dict) else None
    keys = set(keys)
    for fmt in sorted(FORMATS.values(), key=lambda f: f.detect_rank):
        if fmt.detects(keys) if record is None else fmt.detects_record(record):
            return fmt.name
    return None


def accepted_formats() -> str:
    """The formats and their keys, in words (for the message when none can be told)."""
    return "; ".join(f"{f.name} ({f.keys})" for f in FORMATS.values())


# --------------------------------------------------------------------------------------------
# Field helpers


def _as_text(rec: dict, key: str, required: bool = True) -> tuple[str | None, str | None]:
    """(text, problem) for one field; numbers are taken as their text."""
    if key not in rec or rec[key] is None:
        return (None, f"missing field '{key}'") if required else ("", None)
    value = rec[key]
    if isinstance(value, str):
        return value, None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value), None
    return None, f"field '{key}' is {kind_of(value)}, expected text"


def kind_of(value: Any) -> str:
    """What a JSON value is, in words."""
    return {dict: "an object", list: "a list", bool: "true/false"}.get(type(value), f"a {type(value).__name__}")


def _content_text(content: Any) -> str | None:
    """A turn's content: text, or a list of text parts (``[{type: text, text: ...}]``)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    return None


# --------------------------------------------------------------------------------------------
# A prompt and a response


class _PromptResponse(RecordFormat):
    """A prompt built from some fields and a response field that is trained."""

    fields: ClassVar[tuple[str, ...]]
    """The fields, the response last."""
    optional: ClassVar[tuple[str, ...]] = ()

    @property
    def response_key(self) -> str:
        return self.fields[-1]

    def detects(self, keys: set) -> bool:
        return {f for f in self.fields if f not in self.optional} <= keys

    def normalize(self, rec: dict) -> tuple[dict | None, str | None]:
        out = {}
        for key in self.fields:
            text, problem = _as_text(rec, key, required=key not in self.optional)
            if problem:
                return None, problem
            out[key] = text
        if not out[self.response_key].strip():
            return None, f"empty response ('{self.response_key}' is empty)"
        return out, None

    def prompt(self, example: dict) -> str:
        """The text before the response."""
        raise NotImplementedError

    def render(self, example: dict, tokenizer, adds_bos: bool) -> Rendered:
        prompt, response = self.prompt(example), example[self.response_key]
        return Rendered(prompt + response, [(len(prompt), len(prompt) + len(response))], adds_bos, True)

    def response_text(self, example: dict) -> str:
        return example[self.response_key]

    def one_turn(self, prompt: str) -> dict:
        """The example whose prompt field holds what a person typed (the response empty); formats with
        several prompt fields say how a typed prompt splits into them."""
        return {self.fields[0]: prompt, self.response_key: ""}

    def typed_prompt(self, example: dict) -> tuple[str, str]:
        return example[self.fields[0]], example[self.response_key]

    def render_prompt(self, prompt: str, tokenizer, adds_bos: bool) -> Rendered:
        return Rendered(self.prompt(self.one_turn(prompt)), [], adds_bos, False)


@register
class Alpaca(_PromptResponse):
    """``instruction``, optional ``input``, ``output`` (the Stanford Alpaca layout)."""

    name = "alpaca"
    keys = "instruction, input, output"
    detect_rank = 2
    fields = ("instruction", "input", "output")
    optional = ("input",)

    def normalize(self, rec: dict) -> tuple[dict | None, str | None]:
        out, problem = super().normalize(rec)
        if out is not None and not out["instruction"].strip() and not out["input"].strip():
            return None, "empty instruction"
        return out, problem

    def prompt(self, example: dict) -> str:
        template = ALPACA_TEMPLATE if example["input"].strip() else ALPACA_TEMPLATE_NO_INPUT
        return template.format(instruction=example["instruction"], input=example["input"])

    def one_turn(self, prompt: str) -> dict:
        # A blank line separates the instruction from its input, as the template itself does.
        instruction, _, rest = prompt.partition("\n\n")
        return {"instruction": instruction, "input": rest, "output": ""}

    def typed_prompt(self, example: dict) -> tuple[str, str]:
        typed = example["instruction"] + (f"\n\n{example['input']}" if example["input"].strip() else "")
        return typed, example["output"]


@register
class InputOutput(_PromptResponse):
    """``input``, ``output``."""

    name = "input_output"
    keys = "input, output"
    detect_rank = 4
    fields = ("input", "output")

    def prompt(self, example: dict) -> str:
        return INPUT_OUTPUT_TEMPLATE.format(input=example["input"])


@register
class PromptCompletion(_PromptResponse):
    """``prompt``, ``completion``: the prompt is exactly the text the model is given."""

    name = "prompt_completion"
    keys = "prompt, completion"
    detect_rank = 3
    fields = ("prompt", "completion")

    def prompt(self, example: dict) -> str:
        return example["prompt"]


@register
class Text(RecordFormat):
    """``text``: every token is trained."""

    name = "text"
    keys = "text"
    detect_rank = 5

    def detects(self, keys: set) -> bool:
        return "text" in keys

    def normalize(self, rec: dict) -> tuple[dict | None, str | None]:
        text, problem = _as_text(rec, "text")
        if problem:
            return None, problem
        if not text.strip():
            return None, "empty text"
        return {"text": text}, None

    def render(self, example: dict, tokenizer, adds_bos: bool) -> Rendered:
        return Rendered(example["text"], [(0, len(example["text"]))], adds_bos, True)

    def response_text(self, example: dict) -> str:
        return example["text"]

    def render_prompt(self, prompt: str, tokenizer, adds_bos: bool) -> Rendered:
        return Rendered(prompt, [], adds_bos, False)  # plain text: the model continues it

    def typed_prompt(self, example: dict) -> tuple[str, str]:
        # No prompt in a text: its first third (at a space) is the start, the rest the continuation.
        text = example["text"]
        cut = text.rfind(" ", 0, max(1, len(text) // 3) + 1)
        cut = cut if cut > 0 else max(1, len(text) // 3)
        return text[:cut], text[cut:]


# --------------------------------------------------------------------------------------------
# Conversations


class _Conversation(RecordFormat):
    """A list of turns under ``key``; the assistant turns are trained."""

    key: ClassVar[str]
    """The field that holds the turns (the other conversation format's field is accepted too)."""

    def detects(self, keys: set) -> bool:
        return self.key in keys

    def normalize(self, rec: dict) -> tuple[dict | None, str | None]:
        key = self.key
        other = next(f.key for f in FORMATS.values() if isinstance(f, _Conversation) and f.key != key)
        if rec.get(key) is None and rec.get(other) is not None:
            key = other
        turns = rec.get(key)
        if turns is None:
            return None, f"missing field '{key}'"
        if not isinstance(turns, list):
            return None, f"field '{key}' is {kind_of(turns)}, expected a list of turns"
        if not turns:
            return None, f"field '{key}' is an empty list"
        messages, problem = _parse_turns(turns)
        if problem:
            return None, problem
        last = max((i for i, m in enumerate(messages) if m[0] == "assistant"), default=None)
        if last is None:
            return None, "no assistant turn"
        for i, (role, content) in enumerate(messages):
            if role == "assistant" and not content.strip():
                return None, f"empty response (turn {i + 1})"
        return {"messages": messages[: last + 1]}, None  # turns after the last answer are never trained

    def render(self, example: dict, tokenizer, adds_bos: bool) -> Rendered:
        messages = [{"role": r, "content": c} for r, c in example["messages"]]
        if isinstance(tokenizer.chat_template, str) and tokenizer.chat_template:
            return _render_chat(messages, tokenizer)
        return _render_plain_chat(messages, tokenizer, adds_bos)

    def response_text(self, example: dict) -> str:
        return "\n".join(c for r, c in example["messages"] if r == "assistant")

    def render_prompt(self, prompt: str, tokenizer, adds_bos: bool) -> Rendered:
        return _one_user_turn(prompt, tokenizer, adds_bos)

    def typed_prompt(self, example: dict) -> tuple[str, str]:
        # The first exchange: the last user turn before the first answer, and that answer.
        messages = example["messages"]
        first = next(i for i, (role, _) in enumerate(messages) if role == "assistant")
        user = next((c for r, c in reversed(messages[:first]) if r == "user"), "")
        return user, messages[first][1]


@register
class Messages(_Conversation):
    """``messages``: a list of ``{role, content}`` (system, user, assistant)."""

    name = "messages"
    keys = "messages: [{role, content}]"
    detect_rank = 0
    key = "messages"


@register
class ShareGPT(_Conversation):
    """``conversations``: a list of ``{from, value}`` (system, human, gpt)."""

    name = "sharegpt"
    keys = "conversations: [{from, value}]"
    detect_rank = 1
    key = "conversations"


def _parse_turns(turns: list) -> tuple[list | None, str | None]:
    """A list of turns as ``[role, content]`` (roles mapped to system / user / assistant), or what is
    wrong with the first bad turn (``turn N ...``)."""
    messages = []
    for i, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            return None, f"turn {i} is {kind_of(turn)}, expected an object"
        role = turn.get("role", turn.get("from"))
        if not isinstance(role, str):
            return None, f"turn {i} has no role ('role' or 'from')"
        mapped = ROLE_NAMES.get(role.strip().lower())
        if mapped is None:
            return None, (f"turn {i} has unknown role '{role}' (accepted: system, user, assistant; "
                          f"ShareGPT: human, gpt)")
        raw = turn.get("content", turn.get("value"))
        if raw is None:
            return None, f"turn {i} has no content ('content' or 'value')"
        content = _content_text(raw)
        if content is None:
            return None, f"turn {i} content is {kind_of(raw)}, expected text"
        messages.append([mapped, content])
    return messages, None


def _has_template(tokenizer) -> bool:
    """Whether the tokenizer has a chat template (a non-empty string)."""
    return isinstance(tokenizer.chat_template, str) and bool(tokenizer.chat_template)


def _one_user_turn(prompt: str, tokenizer, adds_bos: bool) -> Rendered:
    """What a person typed as one user turn followed by the assistant's header (the chat template's
    generation prompt, or the plain layout's)."""
    messages = [{"role": "user", "content": prompt}]
    if _has_template(tokenizer):
        return Rendered(_apply_template(tokenizer, messages, add_generation_prompt=True), [], False, False)
    return Rendered(PLAIN_TURN_HEADERS["user"] + prompt + PLAIN_TURN_END + PLAIN_TURN_HEADERS["assistant"],
                    [], adds_bos, False)


def _render_plain_chat(messages: list[dict], tokenizer, adds_bos: bool) -> Rendered:
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
    return Rendered(text, spans, adds_bos, False)


def _apply_template(tokenizer, messages, add_generation_prompt=False) -> str:
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # noqa: BLE001 - jinja raise_exception and friends
        raise TemplateRefused(first_line(exc)) from None
    return out if isinstance(out, str) else str(out)


def _render_chat(messages: list[dict], tokenizer) -> Rendered:
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
        except TemplateRefused:
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
    return Rendered(full, spans, False, False)


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
                raise TemplateRefused("the chat template changes the assistant text, so it cannot be located")
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
# Preference pairs (dpo, orpo)


@dataclass
class RenderedPair:
    """A preference pair as the text the model sees: the prompt, and the two answers that follow it."""

    prompt: str
    """The text the model is given (not trained)."""
    chosen: str
    """The preferred answer, as it follows the prompt (with a chat template's end-of-turn marker)."""
    rejected: str
    """The other answer, likewise."""
    bos: bool
    """Put the BOS token in front of the prompt."""
    eos: tuple[bool, bool]
    """Append the EOS token to the chosen answer, to the rejected answer."""


class _Pair(RecordFormat):
    """A prompt and two answers to it, the chosen (preferred) and the rejected one. Normalized to
    ``{"prompt": ..., "chosen": str, "rejected": str}``."""

    pair = True
    detect_keys: ClassVar[frozenset] = frozenset({"chosen", "rejected"})
    """The keys every record of a pair format has."""

    @staticmethod
    def _conversational(rec: dict) -> bool:
        """Whether the record's prompt or sides are lists (turns) rather than texts."""
        return any(isinstance(rec.get(k), list) for k in ("prompt", "chosen", "rejected"))

    def render_pair(self, example: dict, tokenizer, adds_bos: bool) -> RenderedPair:
        """The prompt and the two answers as the model sees them (``TemplateRefused`` when a chat
        template refuses the conversation)."""
        raise NotImplementedError

    def render(self, example: dict, tokenizer, adds_bos: bool) -> Rendered:
        # As one example: the prompt and the chosen answer (the answer trained).
        pair = self.render_pair(example, tokenizer, adds_bos)
        start = len(pair.prompt)
        return Rendered(pair.prompt + pair.chosen, [(start, start + len(pair.chosen))], pair.bos, pair.eos[0])

    def response_text(self, example: dict) -> str:
        return example["chosen"]


@register
class Preference(_Pair):
    """``prompt``, ``chosen``, ``rejected`` (texts): the prompt is exactly the text the model is given,
    each answer follows it directly and ends with the EOS token."""

    name = "preference"
    keys = "prompt, chosen, rejected"
    detect_rank = -2

    def detects(self, keys: set) -> bool:
        return {"prompt", *self.detect_keys} <= keys

    def detects_record(self, rec: dict) -> bool:
        # Texts (a record without its prompt too: normalizing it says what is missing).
        return self.detect_keys <= set(rec) and not self._conversational(rec)

    def normalize(self, rec: dict) -> tuple[dict | None, str | None]:
        out = {}
        for key in ("prompt", "chosen", "rejected"):
            if isinstance(rec.get(key), list):
                return None, (f"field '{key}' is a list, expected text (pairs of conversations: data.format "
                              f"preference_messages)")
            text, problem = _as_text(rec, key)
            if problem:
                return None, problem
            out[key] = text
        if not out["prompt"].strip():
            return None, "empty prompt ('prompt' is empty)"
        return out, None

    def render_pair(self, example: dict, tokenizer, adds_bos: bool) -> RenderedPair:
        return RenderedPair(example["prompt"], example["chosen"], example["rejected"], adds_bos, (True, True))

    def render_prompt(self, prompt: str, tokenizer, adds_bos: bool) -> Rendered:
        return Rendered(prompt, [], adds_bos, False)

    def typed_prompt(self, example: dict) -> tuple[str, str]:
        return example["prompt"], example["chosen"]


@register
class PreferenceMessages(_Pair):
    """``chosen``, ``rejected``: two conversations ({role, content} turns) that share their prompt turns
    and differ in one final assistant turn each; or TRL's layout, ``prompt`` the shared turns and
    ``chosen``/``rejected`` the answers. Rendered with the chat template, else the plain layout."""

    name = "preference_messages"
    keys = "chosen, rejected: [{role, content}], optional prompt"
    detect_rank = -1

    def detects(self, keys: set) -> bool:
        return self.detect_keys <= keys

    def detects_record(self, rec: dict) -> bool:
        return self.detect_keys <= set(rec) and self._conversational(rec)

    @staticmethod
    def _turns(rec: dict, key: str) -> tuple[list | None, str | None]:
        """One field's turns as ``[role, content]``, or what is wrong with it."""
        turns = rec.get(key)
        if turns is None:
            return None, f"missing field '{key}'"
        if isinstance(turns, str):
            return None, f"field '{key}' is text, expected a list of turns (pairs of texts: data.format preference)"
        if not isinstance(turns, list):
            return None, f"field '{key}' is {kind_of(turns)}, expected a list of turns"
        if not turns:
            return None, f"field '{key}' is an empty list"
        messages, problem = _parse_turns(turns)
        return messages, (f"{key} {problem}" if problem else None)

    def normalize(self, rec: dict) -> tuple[dict | None, str | None]:
        sides = []
        for key in ("chosen", "rejected"):
            turns, problem = self._turns(rec, key)
            if problem:
                return None, problem
            sides.append(turns)
        chosen, rejected = sides
        if rec.get("prompt") is not None:  # TRL's layout: the prompt turns, then each side's answer
            prompt, problem = self._turns(rec, "prompt")
            if problem:
                return None, problem
            chosen, rejected = prompt + chosen, prompt + rejected
        # The prompt is every turn before the first one where the two differ; each keeps its last turn.
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == 0:
            if len(chosen) == 1 and len(rejected) == 1:
                return None, "chosen and rejected share no prompt: each is only an answer (give the prompt turns)"
            return None, "chosen and rejected share no prompt: they differ from their first turn"
        if len(chosen) != shared + 1 or len(rejected) != shared + 1:
            return None, (f"chosen and rejected differ from turn {shared + 1} on: they must differ only in one "
                          f"final assistant turn each")
        for key, turns in (("chosen", chosen), ("rejected", rejected)):
            if turns[-1][0] != "assistant":
                return None, f"{key} ends with a {turns[-1][0]} turn, expected the assistant's answer"
        return {"prompt": chosen[:shared], "chosen": chosen[-1][1], "rejected": rejected[-1][1]}, None

    def render_pair(self, example: dict, tokenizer, adds_bos: bool) -> RenderedPair:
        prompt = [{"role": r, "content": c} for r, c in example["prompt"]]
        if not _has_template(tokenizer):
            # The plain layout of the messages format, up to the assistant's header; each answer ends with EOS.
            text = "".join(PLAIN_TURN_HEADERS[m["role"]] + m["content"] + PLAIN_TURN_END for m in prompt)
            return RenderedPair(text + PLAIN_TURN_HEADERS["assistant"], example["chosen"], example["rejected"],
                                adds_bos, (True, True))
        head = _apply_template(tokenizer, prompt, add_generation_prompt=True)
        full = [_apply_template(tokenizer, prompt + [{"role": "assistant", "content": example[side]}])
                for side in ("chosen", "rejected")]
        # The prompt is what the three renderings share (as TRL takes it: a template may add to the
        # generation prompt what the rendered answer does not have).
        shared = len(common_prefix(head, *full))
        specials = _special_texts(tokenizer)
        answers, eos = [], []
        for text in full:
            answer = text[shared:]
            # Whitespace after the end-of-turn marker is layout, not something to learn (as for sft).
            stripped = answer.rstrip()
            ends = any(stripped.endswith(s) for s in specials)
            answers.append(stripped if ends else answer)
            eos.append(not ends)  # a turn that ends without a special token gets the EOS
        return RenderedPair(head[:shared], answers[0], answers[1], False, (eos[0], eos[1]))

    def render_prompt(self, prompt: str, tokenizer, adds_bos: bool) -> Rendered:
        return _one_user_turn(prompt, tokenizer, adds_bos)

    def typed_prompt(self, example: dict) -> tuple[str, str]:
        # The last user turn of the prompt, and the chosen answer.
        user = next((c for r, c in reversed(example["prompt"]) if r == "user"), "")
        return user, example["chosen"]


def common_prefix(*seqs):
    """The longest prefix the sequences (texts, lists) share."""
    n = 0
    for items in zip(*seqs):
        if any(x != items[0] for x in items[1:]):
            break
        n += 1
    return seqs[0][:n]


def _special_texts(tokenizer) -> list[str]:
    """The tokenizer's special tokens as text (an end-of-turn marker is one)."""
    specials = [s for s in getattr(tokenizer, "all_special_tokens", []) if s]
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    specials += [t.content for t in added.values() if getattr(t, "special", False) and t.content]
    return specials


def get_format(name: str) -> RecordFormat:
    """The registered format of that name (a preset names one of the schema's choices)."""
    try:
        return FORMATS[name]
    except KeyError:
        raise UserError(f"data.format: unknown format {name!r}", f"accepted: {', '.join(FORMATS)}") from None
