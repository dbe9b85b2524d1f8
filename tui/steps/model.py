"""The model step: a Hub id, a model folder, a .gguf file or the built-in demo; its config is read
and its facts shown (sizes, heads, vocabulary, context, parameters, weight size and the layer names
LoRA can target).

The model source is the step's own field (typed, or from a shipped preset or a recent run), so the
declaration has no form fields; nothing must be done before it.
"""

from __future__ import annotations

import os

from tui.steps.base import Step


def model_facts(info) -> list[tuple[str, str]]:
    """The facts the model step shows, as (label, value) rows."""
    from tui.format import count, size

    heads = f"{info.num_attention_heads} query / {info.num_key_value_heads} key-value"
    rows = [
        ("architecture", f"{info.architecture} ({info.model_type})"),
        ("parameters", f"{count(info.params_total)} ({info.params_total:,})"),
        ("hidden size", f"{info.hidden_size:,}"),
        ("layers", f"{info.num_hidden_layers}"),
        ("attention heads", heads),
        ("intermediate size", f"{info.intermediate_size:,}"),
        ("vocabulary", f"{info.vocab_size:,}"),
        ("context", f"{info.context_length:,} tokens"),
        ("weights", f"{size(info.weight_bytes)} GGUF file, dequantized to {info.dtype} for training"
                    if info.weight_bytes_source == "gguf" else f"{size(info.weight_bytes)} in {info.dtype}"
                    + ("" if info.weight_bytes_source != "estimate" else " (estimated from the parameters)")),
    ]
    if info.is_moe:
        rows.append(("experts", f"{info.num_experts}"))
    rows.append(("LoRA-targetable", ", ".join(info.lora_target_candidates)))
    return rows


def recent_models(runs_dir: str | os.PathLike = "runs", limit: int = 5) -> list[str]:
    """Models of the newest runs, newest first, each once."""
    from engine.runs import list_runs

    seen: list[str] = []
    for run in sorted(list_runs(runs_dir), key=lambda r: r.name, reverse=True):
        if run.model and run.model not in seen:
            seen.append(run.model)
    return seen[:limit]


STEP = Step("model", "Model")
"""The model step: its one field, the model source, is its own (read, not just set)."""
