"""The sizes in a model's ``config.json``, checked before anything is built from them.

A config is data from anywhere (a Hub repository, a folder someone sent): ten million layers make
transformers build ten million modules (``inspect`` never returns), a zero or negative width or
head count fails deep inside torch, a vocabulary of 10^12 or a string where a count belongs gives a
traceback. :func:`check_config_sizes` refuses such a config in one line naming the key, in well under
a second, from the raw JSON alone: no transformers, no torch.

The bounds are far above every published model (the largest today: about 130 layers, hidden 16,384,
a vocabulary of 262,144, contexts of 10 million positions, 512 experts) and far below what would
hang or exhaust a machine. A key that is absent or ``null`` is not checked (transformers fills or
derives it). Only whole numbers are counts: ``true``, ``32.0`` and ``"32"`` are refused.
"""

from __future__ import annotations

from typing import Any

from engine.errors import UserError

# (names, what it is, lowest, highest): every name a config family uses for the size, as
# engine.modelinfo reads them (GPT-2's n_embd, the 2023 Falcon's n_embed, ChatGLM's multi_query_group_num...).
LAYERS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")
HIDDEN = ("hidden_size", "n_embd", "n_embed", "d_model")
HEADS = ("num_attention_heads", "n_head", "n_heads", "num_heads")
KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num")
EXPERTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
VOCAB = ("vocab_size", "padded_vocab_size")
CONTEXT = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_sequence_length", "max_seq_len")

SIZE_LIMITS: tuple[tuple[tuple[str, ...], str, int, int], ...] = (
    (LAYERS, "the number of layers", 1, 1000),
    (HIDDEN, "the width of every layer", 1, 1 << 17),
    (HEADS, "the number of attention heads", 1, 1 << 14),
    (KV_HEADS, "the number of key/value heads", 1, 1 << 14),
    (("intermediate_size", "n_inner", "ffn_hidden_size", "ffn_dim"), "the width of the MLP", 1, 1 << 20),
    (VOCAB, "the vocabulary", 1, 1 << 24),
    (CONTEXT, "the context length", 1, 1 << 26),
    (("head_dim", "kv_channels"), "the width of an attention head", 1, 1 << 14),
    (EXPERTS, "the number of experts", 0, 1 << 14),
    (("num_experts_per_tok", "moe_topk"), "the experts active per token", 0, 1 << 14),
    (("moe_intermediate_size",), "the width of an expert's MLP", 1, 1 << 20),
)
"""Each size a config may give, its names, what it means and the range allowed (inclusive)."""

PER_LAYER = {name for names, *_ in SIZE_LIMITS for name in names} - set(LAYERS + HIDDEN + VOCAB + CONTEXT)
"""Sizes a few architectures give per layer as a list (OpenELM's heads, Hunyuan's experts per token):
each entry is checked. The number of layers, the width, the vocabulary and the context are one number."""

MAX_EXPERT_LAYERS = 1 << 18
"""Layers x experts: the expert blocks a model has in all (DeepSeek-V3 15,616, Kimi K2 23,424). Code
that keeps every expert as its own modules builds this many of them."""

TEXT_PARTS = ("text_config", "llm_config", "language_config")
"""Where a composite (vision-language) config keeps its language model, checked like the top level."""


def _where(source: str) -> str:
    return source if source.endswith(".json") else f"config.json of {source}"


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return f"{str(value).lower()} (true/false)"
    if isinstance(value, str):
        return f"{value[:40]!r} (text)"
    if isinstance(value, float):
        return f"{value!r} (written with a decimal point)"
    if isinstance(value, (list, dict)):
        return f"a {'list' if isinstance(value, list) else 'mapping'}"
    return repr(value)[:40]


def _refuse(source: str, text: str) -> UserError:
    return UserError(f"{_where(source)}: {text}", "fix or re-download the model's config.json")


def _check_level(cfg: dict, source: str, prefix: str, lowest_zero: bool) -> None:
    """The sizes of one level of a config (the top, or a nested ``text_config``)."""
    found: dict[tuple[str, ...], tuple[str, int]] = {}
    for names, what, low, high in SIZE_LIMITS:
        low = 0 if lowest_zero else low
        for name in names:
            if name not in cfg or cfg[name] is None:
                continue
            value, key = cfg[name], prefix + name
            entries = value if isinstance(value, list) and name in PER_LAYER and 0 < len(value) <= 10_000 else [value]
            for entry in entries:
                if isinstance(entry, bool) or not isinstance(entry, int):
                    shown = _kind(value) if entries is not value else f"a list holding {_kind(entry)}"
                    raise _refuse(source, f"{key} = {shown} is not valid: {what} must be a whole number "
                                          f"from {low:,} to {high:,}")
                if not low <= entry <= high:
                    digits = int(entry.bit_length() * 0.30103) + 1  # str() refuses a number of 4,300 digits
                    shown = f"{entry:,}" if abs(entry) < 10**20 else f"a number of about {digits:,} digits"
                    at = " (in its list)" if entries is value else ""
                    raise _refuse(source, f"{key} = {shown}{at} is out of range for {what} ({low:,} to {high:,})")
            if not isinstance(value, list):
                found.setdefault(names, (key, value))

    layers, hidden, heads = found.get(LAYERS), found.get(HIDDEN), found.get(HEADS)
    kv, experts = found.get(KV_HEADS), found.get(EXPERTS)
    if heads and hidden and heads[1] > hidden[1]:
        raise _refuse(source, f"{heads[0]} = {heads[1]:,} is more attention heads than {hidden[0]} = {hidden[1]:,} "
                              "(each head needs at least one of the hidden dimensions)")
    if kv and heads and kv[1] and (kv[1] > heads[1] or heads[1] % kv[1]):
        raise _refuse(source, f"{kv[0]} = {kv[1]:,} does not divide {heads[0]} = {heads[1]:,} "
                              "(every key/value head serves the same number of attention heads)")
    if layers and experts and layers[1] * max(1, experts[1]) > MAX_EXPERT_LAYERS:
        raise _refuse(source, f"{layers[0]} = {layers[1]:,} with {experts[0]} = {experts[1]:,} makes "
                              f"{layers[1] * experts[1]:,} expert blocks (at most {MAX_EXPERT_LAYERS:,})")


def check_config_sizes(raw: dict, source: str) -> None:
    """Refuse a config whose sizes no real model has, before any config object or model is built.

    ``raw`` is the parsed ``config.json``; ``source`` names the model in the message (the Hub id or
    the folder as typed, or the path of a ``.json`` file). Checks the top level, the language model
    of a composite config (``text_config``) with the same bounds, and any other nested ``*_config``
    (a vision or audio tower, built with the model) for types and upper bounds. Raises
    :class:`UserError`, one line naming the key, the value and the range allowed.
    """
    _check_level(raw, source, "", lowest_zero=False)
    for key, value in raw.items():
        if not isinstance(value, dict) or not key.endswith("_config"):
            continue
        text_part = key.endswith(TEXT_PARTS)
        _check_level(value, source, f"{key}.", lowest_zero=not text_part)
