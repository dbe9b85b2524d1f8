"""The run's prompt format as other programs read it: a Jinja chat template for the GGUF, an Ollama
Go template for the Modelfile, and the text that ends an answer.

A GGUF carries its prompt format as ``tokenizer.chat_template`` (Jinja, rendered by llama.cpp,
llama-cpp-python and LM Studio). :func:`format_template` writes one that renders a user message
exactly as training rendered the prompt part of an example (``RecordFormat.render_prompt``, the
text ``try`` shows):

- messages and sharegpt: the tokenizer's own chat template (the one training used), or, for a
  tokenizer without one, the plain ``### User:`` / ``### Assistant:`` layout training used then;
- alpaca: ``### Instruction:`` and, after the first blank line of the message, ``### Input:``
  (``try``'s rule), then ``### Response:``; input_output, prompt_completion and text likewise;
- the preference pairs of a dpo or orpo run as their single-response twins (:data:`AS_FORMAT`): a
  ``preference`` prompt is the exact text the model is given, as prompt_completion's, and
  ``preference_messages`` conversations are rendered as ``messages`` are.

An assistant message renders as its text followed by the trained end (the EOS for the plain
formats), so a conversation history reads as consecutive training examples.

Ollama reads Go templates, not Jinja. :func:`ollama_template` derives one by rendering the Jinja
template on placeholder messages and cutting the result at the placeholders, so its fixed text is
the Jinja template's own; :func:`ollama_render` renders it as Ollama would (for the tests and the
check that it agrees). Where Go templates cannot follow the Jinja one (alpaca's split of a message
at its first blank line into instruction and input), the whole message is the instruction and the
README says how to type an input.

Nothing here imports torch or transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import UserError, first_line

_U, _A, _U2, _S = "\x00USER\x00", "\x00ANSWER\x00", "\x00USER2\x00", "\x00SYSTEM\x00"
"""Placeholder messages (NUL-delimited: no template writes NUL)."""


def _prompt_response(head: str, body: str, bos: bool) -> str:
    """A template for a prompt/response format: each user message through ``body`` (Jinja, the message
    in ``c``), each assistant message as its text and the EOS."""
    return ((("{{ bos_token }}" if bos else "") + head +
             "{% for message in messages %}{% set c = message['content'] %}"
             "{% if message['role'] == 'user' %}" + body +
             "{% elif message['role'] == 'assistant' %}{{ c }}{{ eos_token }}{% endif %}{% endfor %}"))


ALPACA_BODY = ("{% set parts = c.split('\\n\\n') %}{% set rest = parts[1:] | join('\\n\\n') %}"
               "### Instruction:\n{{ parts[0] }}\n\n{% if rest | trim %}### Input:\n{{ rest }}\n\n{% endif %}"
               "### Response:\n")
"""alpaca: the first blank line ends the instruction; what follows, when not blank, is the input."""

INPUT_OUTPUT_BODY = "### Input:\n{{ c }}\n\n### Response:\n"
AS_TYPED_BODY = "{{ c }}"
"""prompt_completion and text: the message is the prompt exactly."""

PLAIN_CHAT = ("{% for message in messages %}"
              "{% if message['role'] == 'system' %}### System:\n{{ message['content'] }}\n\n"
              "{% elif message['role'] == 'user' %}### User:\n{{ message['content'] }}\n\n"
              "{% elif message['role'] == 'assistant' %}### Assistant:\n{{ message['content'] }}{{ eos_token }}\n\n"
              "{% endif %}{% endfor %}{% if add_generation_prompt %}### Assistant:\n{% endif %}")
"""messages/sharegpt with a tokenizer that has no chat template: the plain layout training used."""

AS_FORMAT = {"preference": "prompt_completion", "preference_messages": "messages"}
"""The pair formats (dpo, orpo) as the single-response format whose prompt they render alike (the prompt
part of a pair is rendered as that format's: ``RecordFormat.render_prompt``)."""

CHAT_FORMATS = ("messages", "sharegpt")
"""Formats rendered with the tokenizer's chat template (the plain chat layout without one)."""


def prompt_format_of(fmt: str) -> str:
    """The format whose prompt template a run of data format ``fmt`` takes (itself, or for a pair format
    its single-response twin, :data:`AS_FORMAT`)."""
    return AS_FORMAT.get(fmt, fmt)


def is_chat(fmt: str) -> bool:
    """Whether a run of data format ``fmt`` renders its prompts with the chat template (conversations)."""
    return prompt_format_of(fmt) in CHAT_FORMATS


_BODIES = {"alpaca": ALPACA_BODY, "input_output": INPUT_OUTPUT_BODY, "prompt_completion": AS_TYPED_BODY,
           "text": AS_TYPED_BODY}

NEXT_TURN = {"alpaca": "### Instruction:", "input_output": "### Input:", "plain_chat": "### User:"}
"""For the plain layouts: the header the model would write if it ran on into a next example (a stop too)."""


def tokenizer_template(tokenizer) -> str | None:
    """The tokenizer's own chat template (a string), or None."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) and template else None


def format_template(fmt: str, tokenizer, adds_bos: bool) -> str:
    """The Jinja chat template that renders a run of format ``fmt`` as training did (see the module)."""
    fmt = prompt_format_of(fmt)
    if fmt in CHAT_FORMATS:
        own = tokenizer_template(tokenizer)
        if own is not None:
            return own
        return ("{{ bos_token }}" if adds_bos else "") + PLAIN_CHAT
    if fmt not in _BODIES:
        raise UserError(f"cannot write a chat template for the data format {fmt!r}")
    return _prompt_response("", _BODIES[fmt], adds_bos)


def render(template: str, messages: list[dict], *, add_generation_prompt: bool, bos_token: str,
           eos_token: str) -> str:
    """Render a chat template as llama-cpp-python and transformers do (jinja2's sandbox, blocks trimmed)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                bos_token=bos_token, eos_token=eos_token)
    except Exception as exc:  # noqa: BLE001 - a template's own refusal is one line
        raise UserError(f"the chat template does not render: {first_line(exc)}") from None


@dataclass(frozen=True)
class GoTemplate:
    """An Ollama template cut from the Jinja one: the fixed text around each kind of message."""

    user: tuple[str, str]
    assistant: tuple[str, str]
    generation: str
    """After the last message (the assistant's header, where the template has one)."""
    system: tuple[str, str] | None = None
    """None where the Jinja template does not render a system message as a turn of its own."""
    notes: list[str] = field(default_factory=list)
    """Where Ollama renders differently from the Jinja template (said in the README)."""

    def text(self) -> str:
        """The Go template (Ollama's ``TEMPLATE``)."""
        q = _go_text
        parts = ["{{ range .Messages }}"]
        first = True
        for role, pair in (("system", self.system), ("user", self.user), ("assistant", self.assistant)):
            if pair is None:
                continue
            pre, post = pair
            parts.append(("{{ if" if first else "{{ else if") + f' eq .Role "{role}" }}}}' +
                         q(pre) + "{{ .Content }}" + q(post))
            first = False
        parts.append("{{ end }}{{ end }}" + q(self.generation))
        return "".join(parts)


def _go_text(s: str) -> str:
    """Fixed text inside a Go template (``{{`` would open an action)."""
    return s.replace("{{", '{{ "{{" }}')


def _between(text: str, start: str, end: str | None = None) -> tuple[str, str]:
    """(text before ``start``, text after it up to ``end``)."""
    i = text.index(start)
    rest = text[i + len(start):]
    return text[:i], (rest if end is None else rest[: rest.index(end)])


def ollama_template(template: str, *, bos_token: str, eos_token: str) -> GoTemplate:
    """The Go template that renders as the Jinja one does for user, assistant and system messages (see
    the module); BOS is left out (Ollama puts it in front itself, as the GGUF says)."""
    def r(messages, gen):
        out = render(template, messages, add_generation_prompt=gen, bos_token=bos_token, eos_token=eos_token)
        return out[len(bos_token):] if bos_token and out.startswith(bos_token) else out

    user = [{"role": "user", "content": _U}]
    one, one_gen = r(user, False), r(user, True)
    if _U not in one or not one_gen.startswith(one):
        raise UserError("the chat template does not render a user message as a turn of its own, so Ollama "
                        "cannot be given an equal template")
    user_pre, user_post = _between(one, _U)
    generation = one_gen[len(one):]
    answered = r(user + [{"role": "assistant", "content": _A}], False)
    if not answered.startswith(one) or _A not in answered:
        raise UserError("the chat template rewrites earlier turns, so Ollama cannot be given an equal template")
    assistant = _between(answered[len(one):], _A)
    system = None
    try:
        with_system = r([{"role": "system", "content": _S}] + user, False)
        if with_system.endswith(one) and _S in with_system[: len(with_system) - len(one)]:
            system = _between(with_system[: len(with_system) - len(one)], _S)
    except UserError:
        pass
    go = GoTemplate((user_pre, user_post), assistant, generation, system)
    notes = []
    if system is None:
        notes.append("the format has no system turn of its own: Ollama's SYSTEM is not shown to the model")
    two = [{"role": "user", "content": _U}, {"role": "assistant", "content": _A}, {"role": "user", "content": _U2}]
    if ollama_render(go, two) != r(two, True):
        notes.append("a conversation of several turns renders a little differently in Ollama than in llama.cpp")
    return GoTemplate(go.user, go.assistant, go.generation, go.system, notes)


def ollama_render(go: GoTemplate, messages: list[dict]) -> str:
    """What Ollama renders from ``go.text()`` for these messages (its template logic, in Python)."""
    out = []
    for m in messages:
        pair = {"user": go.user, "assistant": go.assistant, "system": go.system}.get(m["role"])
        if pair is not None:
            out.append(pair[0] + m["content"] + pair[1])
    return "".join(out) + go.generation


def modelfile(gguf_name: str, go: GoTemplate, stops: list[str], fmt: str) -> str:
    """The Ollama Modelfile: the GGUF, the template, the stops, greedy by default off (Ollama's own)."""
    lines = [f"# Ollama: ollama create NAME -f Modelfile, then ollama run NAME (data format: {fmt})",
             f"FROM ./{gguf_name}",
             f'TEMPLATE """{go.text()}"""']
    for stop in stops:
        lines.append(f"PARAMETER stop {_go_quoted(stop)}")
    return "\n".join(lines) + "\n"


def _go_quoted(s: str) -> str:
    """A Modelfile parameter value: JSON-style quoted (Ollama reads escapes such as \\n there)."""
    import json

    return json.dumps(s, ensure_ascii=False)


def answer_end(template: str, *, bos_token: str, eos_token: str, specials: list[str]) -> str | None:
    """The text that ends an assistant turn as training taught it: the special token right after an
    answer in the rendered template (``</s>``, ``<|im_end|>``, ``<end_of_turn>``), else None."""
    answered = render(template, [{"role": "user", "content": _U}, {"role": "assistant", "content": _A}],
                      add_generation_prompt=False, bos_token=bos_token, eos_token=eos_token)
    after = answered.split(_A, 1)[1] if _A in answered else ""
    after = after.lstrip(" ")
    for s in sorted((s for s in specials if s), key=len, reverse=True):
        if after.startswith(s):
            return s
    return None


def stops_for(fmt: str, end: str | None, uses_plain_chat: bool) -> list[str]:
    """The Modelfile's stop strings: the trained end of an answer, then, for the plain layouts, the
    header of a next example (a model that ran on would write it next)."""
    stops = [end] if end else []
    header = NEXT_TURN.get("plain_chat" if uses_plain_chat else prompt_format_of(fmt))
    if header and header not in stops:
        stops.append(header)
    return stops
