"""The one settings object: a versioned, validated preset.

Everything the wizard asks ends up here; ``qlora-wizard --preset FILE`` reads the same schema and
a run directory keeps the exact copy it ran with. Each field's help text lives in its
``description`` and nowhere else: the TUI form and the docs read it from the schema.

Unknown keys are refused with the nearest valid name; out-of-range values with the field's path
and what is allowed. YAML is loaded with ``yaml.safe_load`` only and saved atomically.
"""

from __future__ import annotations

import difflib
import os
import unicodedata
from pathlib import Path
from typing import Any, Literal, Union, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from engine.errors import UserError, first_line

SCHEMA_VERSION = 1
"""The preset format written by this version; older versions are migrated on load when possible."""

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"
"""The YAML presets shipped with qlora-wizard."""

DEFAULT_DROP_PHRASES = (
    "as an ai language model",
    "as a language model",
    "as an ai assistant",
    "i'm sorry, but i cannot",
    "i am sorry, but i cannot",
    "i cannot fulfill",
    "openai's guidelines",
)
"""The guide's advice: drop refusals and boilerplate disclaimers copied from assistant models."""

MAX_STEPS = 10**9
"""Step counts and intervals (max_steps, eval_steps, save_steps, logging_steps) stay below this."""
MAX_SEED = 2**32 - 1
"""The largest seed numpy's and torch's generators all accept."""
MAX_NAME_BYTES = 255
"""The longest file name (in UTF-8 bytes) common file systems allow: the run name is one."""


def _control_character(text: str) -> str | None:
    """The first control character in a text (NUL, newline, tab, escape, DEL...) as Python writes
    it (``'\\x00'``), or None when there is none."""
    for ch in text:
        if unicodedata.category(ch) == "Cc":
            return repr(ch)
    return None


def _plain_text(v: str | None) -> str | None:
    """A path or name that reaches the file system, the Hub or a log line: no control characters."""
    if v is not None:
        bad = _control_character(v)
        if bad:
            raise ValueError(f"must not contain control characters: it has {bad}")
    return v


def _is_number_field(annotation: Any) -> bool:
    """Whether a field holds a number (``int``, ``float``, optionally ``None``), not a choice of words."""
    args = [a for a in (get_args(annotation) or (annotation,)) if a is not type(None)]
    return bool(args) and all(a in (int, float) for a in args)


class _Section(BaseModel):
    """Common configuration: no unknown keys, validate on assignment so the wizard's draft stays valid,
    no NaN or infinite numbers, and no true/false where a number belongs (pydantic would read it as 1 or 0)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_not_booleans(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, bool) and info.field_name and _is_number_field(cls.model_fields[info.field_name].annotation):
            raise ValueError("must be a number, not true or false")
        return v


class ModelSettings(_Section):
    """Which base model to fine-tune."""

    source: str = Field(
        description="A Hugging Face Hub id (org/name), a local model directory, a local .gguf file (converted "
        "once to a bf16 model folder in the cache), or 'builtin:tiny-llama' for the offline demo model that is "
        "created locally on first use."
    )
    revision: str | None = Field(None, description="A Hub branch, tag or commit; the default branch when empty.")
    trust_remote_code: bool = Field(
        False,
        description="Run Python code shipped with the model. Only for models you trust; needed by models "
        "whose architecture transformers does not know.",
    )
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = Field(
        "auto",
        description="Attention kernel: auto picks flash_attention_2 when installed and supported, else sdpa; packed "
        "rows never go through a dense mask (PyTorch's varlen kernel or SDPA per example instead).",
    )
    base_lr: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="The pretrained model's own peak learning rate, for the learning-rate rule; "
        "filled from the model family when known.",
    )
    pretrained_batch_tokens: int | None = Field(
        None, gt=0, le=10**10, description="The pretraining batch size in tokens, for the learning-rate rule."
    )

    @field_validator("source")
    @classmethod
    def _source_not_empty(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("must name a Hub id, a local model directory or builtin:tiny-llama")
        return _plain_text(v)

    _revision_plain = field_validator("revision")(_plain_text)


class QuantizationSettings(_Section):
    """How the frozen base weights are stored."""

    method: Literal["nf4", "fp4", "none"] = Field(
        "nf4", description="nf4 or fp4 load the base 4-bit through bitsandbytes (QLoRA); none keeps it 16-bit (LoRA)."
    )
    double_quant: bool = Field(True, description="Quantize the 4-bit scales too (saves about 0.37 bit per weight).")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="Precision of the matrix multiplications: auto is bfloat16 on GPUs that support it "
        "(compute capability 8.0+), float16 on older GPUs, float32 on the CPU.",
    )


class LoraSettings(_Section):
    """The trainable low-rank adapters."""

    r: int = Field(16, ge=1, le=1024, description="LoRA rank: adapter width; parameters grow linearly with it.")
    alpha: float = Field(32, gt=0, le=4096, description="LoRA scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input during training.")
    targets: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear",
        description="Layer names to adapt (e.g. [q_proj, v_proj]) or all-linear for every linear layer "
        "inside the blocks (never lm_head).",
    )
    init_from: str | None = Field(
        None,
        description="Start the adapters from a saved LoRA adapter (a folder in PEFT format, such as a finished "
        "run's adapter/) instead of fresh weights, to train it further; its rank, alpha and target layers are "
        "used. Empty for new adapters.",
    )

    @field_validator("targets")
    @classmethod
    def _targets_not_empty(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("must name at least one layer, or be all-linear")
            if len(set(v)) != len(v):
                raise ValueError("names a layer twice")
            for name in v:
                if not name.strip():
                    raise ValueError("has an empty layer name")
                bad = _control_character(name)
                if bad:
                    raise ValueError(f"layer name {name!r} has a control character: {bad}")
        return v

    _init_from_plain = field_validator("init_from")(_plain_text)


DataFormat = Literal["auto", "alpaca", "input_output", "prompt_completion", "text", "messages", "sharegpt",
                     "preference", "preference_messages"]


class DataSettings(_Section):
    """Where the examples come from and how they are cleaned and masked."""

    train: str = Field(
        description="A local JSONL, JSON, CSV or Parquet file, a Hub dataset id, or builtin:demo for the "
        "bundled demo set."
    )
    split: str = Field("train", description="The split to read from a Hub dataset.")
    validation: str | None = Field(None, description="A separate validation file or Hub split; else split off train.")
    validation_split: float = Field(
        0.1, ge=0, le=0.5, description="Share of the training examples held out for validation (0 for none)."
    )
    format: DataFormat = Field(
        "auto",
        description="Record layout: auto detects it from the keys (alpaca, input_output, prompt_completion, "
        "text, messages, sharegpt; for dpo and orpo the pairs: preference, preference_messages).",
    )
    train_on_inputs: bool = Field(False, description="Also train on the prompt tokens (normally masked out).")
    skip_bad_records: bool = Field(
        False, description="Skip malformed records (and report how many) instead of refusing to start."
    )
    drop_phrases: list[str] = Field(
        default_factory=lambda: list(DEFAULT_DROP_PHRASES),
        description="Drop examples containing any of these phrases (case-insensitive).",
    )
    dedupe: bool = Field(True, description="Drop exact duplicate examples.")
    max_examples: int | None = Field(None, ge=1, le=10**9, description="Use at most this many training examples.")

    _paths_plain = field_validator("train", "split", "validation")(_plain_text)


METHODS = ("sft", "dpo", "orpo")
"""What a run can teach: supervised fine-tuning, and the two preference methods (on pairs)."""
PREFERENCE_METHODS = ("dpo", "orpo")
"""The methods that train on pairs (a prompt, a chosen and a rejected answer)."""
DEFAULT_BETA = 0.1
"""TRL's default for DPO's beta and ORPO's lambda (the DPO and ORPO papers' value)."""


class TrainingSettings(_Section):
    """The optimization: batch, schedule, optimizer, intervals."""

    method: Literal["sft", "dpo", "orpo"] = Field(
        "sft",
        description="What the run teaches. sft: the responses of the data (supervised). dpo: Direct Preference "
        "Optimization, to prefer each pair's chosen answer over its rejected one, measured against the model "
        "before training (the reference). orpo: Odds Ratio Preference Optimization, supervised on the chosen "
        "answer plus a preference term, no reference. dpo and orpo train on pairs (prompt, chosen, rejected).",
    )
    beta: float = Field(
        DEFAULT_BETA, gt=0, le=100,
        description="dpo: how far the tuned model may move from the reference (higher keeps it closer). orpo: "
        "the weight (lambda) of the preference term beside the supervised loss. 0.1 for both (TRL's default, "
        "the papers' value).",
    )
    dpo_loss: Literal["sigmoid", "ipo", "hinge", "robust"] = Field(
        "sigmoid",
        description="dpo's loss (TRL's loss_type): sigmoid (the DPO paper's), ipo (bounded; beta is its tau), "
        "hinge (SLiC), robust (for noisy preference labels).",
    )
    reference: Literal["auto", "each_step", "precomputed"] = Field(
        "auto",
        description="dpo's reference log-probabilities, of the model as the run began (the base, or the adapter "
        "lora.init_from starts from), never a second copy of the weights. each_step: a pass beside every step "
        "(the adapter switched off, or its frozen starting copy). precomputed: once for all pairs before the "
        "first step, then no reference pass at all. auto: precomputed when the run covers the data at least "
        "once, else each_step.",
    )
    seq_len: int = Field(2048, ge=16, le=1_048_576, description="Longest example in tokens; longer ones are truncated.")
    micro_batch_size: int = Field(1, ge=1, le=4096, description="Examples per forward pass on one GPU.")
    gradient_accumulation_steps: int = Field(
        8, ge=1, le=65536, description="Micro batches per optimizer step; effective batch = micro batch x this."
    )
    epochs: float = Field(1.0, gt=0, le=1000, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(
        None, ge=1, lt=MAX_STEPS, description="Stop after this many optimizer steps (overrides epochs)."
    )
    learning_rate: float = Field(2e-4, gt=0, lt=1, description="Peak learning rate of the adapters.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="How the learning rate changes after warmup."
    )
    warmup_ratio: float = Field(0.03, ge=0, le=0.5, description="Share of the steps spent warming up the learning rate.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay on the adapters.")
    max_grad_norm: float = Field(
        1.0, ge=0, le=1e6, description="Clip gradients to this norm (0 turns clipping off)."
    )
    optimizer: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = Field(
        "adamw_torch",
        description="AdamW with 32-bit states, bitsandbytes 8-bit states, or their paged variants that spill "
        "to CPU memory under pressure.",
    )
    gradient_checkpointing: bool = Field(
        True, description="Recompute activations in the backward pass: far less memory, about 30 % slower."
    )
    packing: bool = Field(
        True, description="Padding-free packing: a micro batch is one row of real tokens, no padding computed."
    )
    chunked_loss: bool = Field(
        True,
        description="The loss on trained positions only, 1,024 at a time, for models whose output head is plain "
        "(Llama, Mistral, Qwen, Gemma, Phi...): 1.5 GiB at most with a 128k vocabulary instead of 1.5 MiB per "
        "token. false: transformers' loss, every position's logits at once.",
    )
    fused_kernels: Literal["auto", "liger", "off"] = Field(
        "auto",
        description="Liger Kernel's fused RMSNorm, RoPE, SwiGLU and linear cross-entropy (no logits held) on a "
        "CUDA GPU: auto uses them where installed (the gpu extra) for the models it supports; off keeps "
        "the engine's own chunked loss.",
    )
    seed: int = Field(
        42, ge=0, le=MAX_SEED, description="Seed for the data split, shuffling and adapter initialisation."
    )
    logging_steps: int = Field(
        1, ge=1, lt=MAX_STEPS, description="Log loss and speed every this many optimizer steps."
    )
    eval_steps: int | None = Field(
        None, ge=1, lt=MAX_STEPS, description="Validate every this many steps; empty for once per epoch and at the end."
    )
    save_steps: int = Field(
        50, ge=1, lt=MAX_STEPS, description="Save a resumable checkpoint every this many steps."
    )
    save_total_limit: int = Field(3, ge=1, le=1000, description="Keep at most this many checkpoints.")
    report_to: Literal["auto", "tensorboard", "wandb", "none"] = Field(
        "auto",
        description="Where the trainer also logs its curves, besides events.jsonl: tensorboard writes "
        "RUN_DIR/tensorboard/ (view it with `tensorboard --logdir RUN_DIR/tensorboard`), wandb sends them to "
        "Weights & Biases (needs wandb and its login); auto is tensorboard when the tensorboard package is "
        "installed (the tensorboard extra), else none.",
    )

    @model_validator(mode="after")
    def _method_settings(self) -> "TrainingSettings":
        if self.method == "sft":
            odd = [f"{k} {getattr(self, k)}" for k, default in (("dpo_loss", "sigmoid"), ("reference", "auto"))
                   if getattr(self, k) != default]
            if self.beta != DEFAULT_BETA:
                odd.insert(0, f"beta {self.beta:g}")
            if odd:
                what = "it is a setting" if len(odd) == 1 else "they are settings"
                raise ValueError(f"{', '.join(odd)} set for method sft: {what} of dpo and orpo; "
                                 f"set method: dpo or orpo, or remove {'it' if len(odd) == 1 else 'them'}")
        elif self.method == "orpo":
            if self.reference != "auto":
                raise ValueError(f"reference {self.reference} set for method orpo: orpo has no reference model; "
                                 "remove it, or set method: dpo")
            if self.dpo_loss != "sigmoid":
                raise ValueError(f"dpo_loss {self.dpo_loss} set for method orpo: orpo has one loss; remove it, "
                                 "or set method: dpo")
        return self


class DistributedSettings(_Section):
    """How many GPUs and machines train one run, and how they share the model."""

    gpus: Union[Literal["auto"], int] = Field(
        "auto",
        description="GPUs per machine: auto is every GPU this machine shows (CUDA_VISIBLE_DEVICES narrows it); "
        "a number uses that many. On a machine without a GPU, a number above 1 trains that many CPU processes "
        "(gloo), which tests the multi-GPU path anywhere.",
    )
    strategy: Literal["auto", "single", "ddp", "fsdp"] = Field(
        "auto",
        description="single: one GPU. ddp: every GPU holds the whole 4-bit model and trains its share of each "
        "batch (fastest when the model fits on one). fsdp: the model, adapters and optimizer states are "
        "sharded across the GPUs (FSDP-QLoRA), for a model too large for one. auto: one GPU when there is "
        "one, ddp when the model fits on each, fsdp when it fits only sharded.",
    )
    nodes: int = Field(
        1, ge=1, le=1024,
        description="Machines training together (each runs `qlora-wizard --preset FILE --nodes N --node-rank R "
        "--master HOST:PORT`); the effective batch is micro batch x accumulation x GPUs x machines.",
    )

    @field_validator("gpus", mode="before")
    @classmethod
    def _gpus_auto_or_count(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v.strip())
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1024):
            return v
        raise ValueError("must be auto or a number of GPUs from 1 to 1024")

    @model_validator(mode="after")
    def _strategy_fits_count(self) -> "DistributedSettings":
        if self.strategy == "single" and (self.nodes > 1 or (isinstance(self.gpus, int) and self.gpus > 1)):
            raise ValueError("strategy single trains on one GPU of one machine: set gpus: 1 and nodes: 1, "
                             "or strategy auto, ddp or fsdp")
        return self


class OutputSettings(_Section):
    """Where the run goes."""

    name: str | None = Field(
        None, description="Run name; the run directory is runs/<name>. Empty for model name and time."
    )
    runs_dir: str = Field("runs", description="Folder that holds the run directories.")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.strip() or "/" in v or v in (".", ".."):
            raise ValueError("must be a plain folder name without '/'")
        bad = _control_character(v)
        if bad:
            raise ValueError(f"must be a plain folder name without control characters: it has {bad}")
        size = len(v.encode("utf-8", "surrogatepass"))
        if size > MAX_NAME_BYTES:
            raise ValueError(f"must be a folder name of at most {MAX_NAME_BYTES} bytes: this one has {size:,}")
        return v

    _runs_dir_plain = field_validator("runs_dir")(_plain_text)


class Preset(_Section):
    """A whole QLoRA setup: model, quantization, LoRA, data, training and output."""

    version: Literal[1] = Field(SCHEMA_VERSION, description="Preset format version.")
    description: str | None = Field(None, description="A line saying what this preset is for.")
    model: ModelSettings = Field(description="The base model to fine-tune.")
    quantization: QuantizationSettings = Field(
        default_factory=QuantizationSettings, description="How the frozen base weights are stored (4-bit for QLoRA)."
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="The trainable low-rank adapters.")
    data: DataSettings = Field(description="The training (and validation) examples.")
    training: TrainingSettings = Field(
        default_factory=TrainingSettings, description="Batch, schedule, optimizer and intervals."
    )
    distributed: DistributedSettings = Field(
        default_factory=DistributedSettings, description="GPUs and machines: one GPU, DDP or FSDP, over one or more machines."
    )
    output: OutputSettings = Field(default_factory=OutputSettings, description="Where the run directory goes.")

    def to_yaml(self) -> str:
        """The preset as YAML text, fields in schema order, defaults included."""
        header = "# qlora-wizard preset (qlora-wizard --preset FILE)\n"
        return header + yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True, width=100)


# --------------------------------------------------------------------------------------------
# Loading and saving

KNOWN_ALIASES = {
    "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "targets",
    "lr": "learning_rate", "batch_size": "micro_batch_size", "per_device_train_batch_size": "micro_batch_size",
    "num_train_epochs": "epochs", "max_seq_length": "seq_len", "max_length": "seq_len", "sequence_len": "seq_len",
    "gradient_accumulation": "gradient_accumulation_steps", "model_name_or_path": "source", "path": "source",
    "dataset": "train", "optim": "optimizer", "warmup": "warmup_ratio", "scheduler": "lr_scheduler",
}
"""Names other fine-tuning tools use for our fields, so a preset ported from them gets a useful hint."""


def _fields_at(path: tuple, model: type[BaseModel] = Preset) -> list[str]:
    """The valid key names at a dotted location of the schema."""
    current: Any = model
    for part in path:
        field = current.model_fields.get(part) if isinstance(current, type) else None
        if field is None:
            return []
        ann = field.annotation
        current = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if current is None:
            return []
    return list(current.model_fields) if current is not None else []


def _number_text(v: Any) -> str:
    """A bound as a person reads it: 0.5, 1024, 4,294,967,295, 1,000,000 (never a rounded 4.29497e+09)."""
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        v = int(v)
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}" if abs(v) >= 10_000 else str(v)
    return f"{v:g}" if isinstance(v, float) else str(v)


def _allowed_text(err: dict) -> str:
    """What is allowed, in words, for one pydantic error."""
    ctx = err.get("ctx") or {}
    kind = err["type"]
    bounds = {
        "greater_than": "> {gt}",
        "greater_than_equal": ">= {ge}",
        "less_than": "< {lt}",
        "less_than_equal": "<= {le}",
    }
    if kind in bounds:
        return "allowed: " + bounds[kind].format(**{k: _number_text(ctx.get(k, 0)) for k in ("gt", "ge", "lt", "le")})
    if kind == "literal_error":
        return "allowed: " + str(ctx.get("expected", "")).replace("'", "")
    if kind == "finite_number":
        return "allowed: a finite number, not NaN or infinity"
    msg = err["msg"].removeprefix("Value error, ")
    return msg[0].lower() + msg[1:]


def describe_validation_error(exc: ValidationError, source: str) -> str:
    """One line naming the first problem in a preset: the field's path and what is allowed."""
    problems = []
    for err in exc.errors():
        # pydantic names union branches in the location; keep the field's own path.
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("literal"))))
        path = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            parent, key = loc[:-1], str(loc[-1])
            valid = _fields_at(parent)
            alias = KNOWN_ALIASES.get(key.lower())
            close = [alias] if alias in valid else difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            where = ".".join(map(str, parent)) or "the top level"
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys there: {', '.join(valid)}"
            problems.append(f"unknown key '{path}' ({hint})" if close else f"unknown key '{path}' at {where} ({hint})")
        elif err["type"] == "missing":
            problems.append(f"'{path}' is missing")
        else:
            value = err.get("input")
            shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
            if len(shown) > 80:  # a 300-character name or a 10**300 number: its start and its size
                size = f"{len(value):,} characters" if isinstance(value, str) else f"{len(shown):,} digits"
                shown = f"{shown[:40]}... ({size})"
            if isinstance(value, dict) and err["type"] == "value_error":  # a section's own check of its fields together
                problems.append(f"{path}: {_allowed_text(err)}")
            else:
                problems.append(f"{path} = {shown} is not valid ({_allowed_text(err)})")
    # Union errors repeat one problem per branch; keep each once, in order.
    unique = list(dict.fromkeys(problems))
    more = f" (and {len(unique) - 1} more)" if len(unique) > 1 else ""
    return f"preset {source}: {unique[0]}{more}"


def preset_from_dict(data: Any, source: str = "<preset>") -> Preset:
    """Validate a mapping (as read from YAML) into a Preset; UserError on any problem."""
    if not isinstance(data, dict):
        raise UserError(f"preset {source} is not a mapping of settings", "see presets/tiny-demo.yaml for the layout")
    version = data.get("version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise UserError(
            f"preset {source} has version {version!r}; this qlora-wizard reads version {SCHEMA_VERSION}",
            "update qlora-wizard or re-export the preset",
        )
    try:
        return Preset.model_validate(data)
    except ValidationError as exc:
        raise UserError(describe_validation_error(exc, source)) from None


def load_preset(path: str | os.PathLike) -> Preset:
    """Read and validate a YAML preset file (safe loading only)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"no preset file at {p}", "check the path, or list the shipped ones in presets/")
    if p.is_dir():
        raise UserError(f"{p} is a folder, not a preset file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read preset {p}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise UserError(f"preset {p} is not valid YAML{where}: {problem}") from None
    except ValueError as exc:  # a value PyYAML parses but Python cannot convert: a 5,000-digit number, 2024-13-45
        text = str(exc)
        reason = "a number too long to read" if "integer string conversion" in text else first_line(exc)
        raise UserError(f"preset {p} is not valid: {reason}", "no setting takes a value like that") from None
    if data is None:
        raise UserError(f"preset {p} is empty", "see presets/tiny-demo.yaml for the layout")
    return preset_from_dict(data, str(p))


def atomic_write_text(path: str | os.PathLike, text: str, exclusive: bool = False) -> None:
    """Write a file whole or not at all (``engine.files.atomic_write_text``: temp file, fsync, rename;
    ``exclusive`` links it into place only if no file of that name exists)."""
    from engine.files import atomic_write_text as write

    write(path, text, exclusive=exclusive)


def save_preset(preset: Preset, path: str | os.PathLike) -> Path:
    """Write the preset as YAML, atomically; returns the path written."""
    atomic_write_text(path, preset.to_yaml())
    return Path(path)


def shipped_presets() -> list[Path]:
    """The YAML presets shipped in presets/, sorted by name."""
    return sorted(PRESETS_DIR.glob("*.yaml"))


def _field(path: str):
    """The schema's field at a dotted path (``training.optimizer``); KeyError for no such field."""
    model: Any = Preset
    parts = path.split(".")
    for part in parts[:-1]:
        model = model.model_fields[part].annotation
    return model.model_fields[parts[-1]]


def choices(path: str) -> tuple[str, ...]:
    """The values a field with a fixed set of them allows, from its ``Literal`` in the schema: the one
    source for the forms, the prompts, argparse and the engine (``choices("training.optimizer")``).
    Empty for a field without a fixed set."""
    from typing import get_args, get_origin

    annotation = _field(path).annotation
    if get_origin(annotation) is Literal:
        return tuple(get_args(annotation))
    return ()


def field_help(path: str) -> str:
    """The help text of a field given its dotted path (``training.seq_len``)."""
    return _field(path).description or ""
