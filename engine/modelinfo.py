"""What is this model: facts read from its config, without downloading any weights.

The data classes here are the contract that the memory model, the wizard and the command line
read. ``inspect_model`` fills them.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from engine.config_check import check_config_sizes
from .errors import NeedsRemoteCode, UserError, first_line


@dataclass(frozen=True)
class TargetLayer:
    """One LoRA-targetable layer name inside the transformer blocks (e.g. ``q_proj``)."""

    name: str
    """The module's own name, the last part of its dotted path (what peft's ``target_modules`` takes)."""
    in_features: int
    """Input width of one such module."""
    out_features: int
    """Output width of one such module."""
    count: int
    """How many modules of this name the model has (usually one per layer)."""
    bias: bool
    """Whether the module has a bias (kept unquantized)."""
    kind: str = "linear"
    """``linear`` for ``torch.nn.Linear``, ``conv1d`` for transformers' ``Conv1D`` (GPT-2)."""
    shapes: tuple[tuple[int, int, int], ...] = ()
    """Only when modules of this name differ in shape: one ``(in_features, out_features, count)``
    per distinct shape, in model order. GPT-2's ``c_proj`` is 768->768 in attention and 3072->768
    in the MLP; peft's ``target_modules=["c_proj"]`` adapts both, so they form one entry whose
    ``in_features``/``out_features`` are the first shape's, ``count`` is all of them, and
    ``weight_params``/``lora_params`` sum over ``shapes``. Empty when every module is alike."""

    def _variants(self) -> tuple[tuple[int, int, int], ...]:
        return self.shapes or ((self.in_features, self.out_features, self.count),)

    @property
    def weight_params(self) -> int:
        """Weight parameters over all modules of this name (without biases)."""
        return sum(i * o * n for i, o, n in self._variants())

    def lora_params(self, rank: int) -> int:
        """LoRA parameters over all modules of this name: r x (in + out) per module."""
        return sum(rank * (i + o) * n for i, o, n in self._variants())


@dataclass(frozen=True)
class ModelInfo:
    """Everything the planner needs to know about a model, read from its config alone."""

    source: str
    """What the person typed: a local directory, a config.json path, a .gguf file or a Hub id."""
    model_type: str
    """``config.model_type``, e.g. ``llama``."""
    architecture: str
    """The class that would be built, e.g. ``LlamaForCausalLM``."""
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    context_length: int
    """``max_position_embeddings`` (or the model's equivalent)."""
    tie_word_embeddings: bool
    dtype: str
    """The checkpoint's dtype as written in the config (``bfloat16``, ``float16``, ``float32``)."""
    params_total: int
    """All parameters, tied embeddings counted once (what the Hub lists). Parameters only: buffers
    such as rotary ``inv_freq`` are not counted. Two exact partitions hold:
    ``params_total == params_embedding + params_head + params_blocks + params_outside_blocks`` and
    ``params_total == params_embedding + params_head + params_quantizable + params_other``."""
    params_embedding: int
    """Input embedding parameters outside the blocks: every ``nn.Embedding`` there (token
    embeddings, plus learned position embeddings such as GPT-2's ``wpe``). A tied output head's
    weight is counted here, once."""
    params_head: int
    """Output head parameters not shared with the embeddings: ``lm_head`` weight (0 when tied) plus
    its bias if it has one (GPT-J)."""
    params_blocks: int
    """Every parameter inside the repeated decoder layers (the ``ModuleList`` of
    ``num_hidden_layers`` blocks): projections, their biases, norms, routers, fused experts."""
    params_quantizable: int
    """Weights that bitsandbytes quantizes to 4 bit: the weights of modules inside the blocks whose
    type is exactly ``torch.nn.Linear`` or transformers' ``Conv1D`` (transformers 5 converts only
    those; subclasses such as Falcon's ``FalconLinear`` and fused expert tensors stay unquantized),
    less any module the model keeps in fp32. Biases, norms, embeddings and the head stay in the
    load dtype. A subset of ``params_blocks``."""
    params_other: int
    """Everything that is not embedding, head or quantizable: the final norm and anything else
    outside the blocks, plus inside the blocks the biases, norms, routers, fused expert tensors and
    Linear subclasses that bitsandbytes leaves alone; kept in the load dtype.
    ``params_total - params_embedding - params_head - params_quantizable``."""
    targets: tuple[TargetLayer, ...]
    """Every LoRA-targetable layer name inside the blocks, in model order."""
    default_targets: tuple[str, ...]
    """A sensible default: all block linears, never ``lm_head``."""
    weight_bytes: int | None
    """Bytes of the weights on disk (safetensors/bin index or files); None when unknown."""
    weight_bytes_source: str
    """Where ``weight_bytes`` came from: ``index``, ``files``, ``gguf`` (the size of a .gguf file: its
    quantized weights, not the bf16 folder the engine converts it to) or ``estimate`` (params x dtype size)."""
    is_moe: bool
    """Mixture of experts."""
    num_experts: int = 0
    notes: tuple[str, ...] = field(default_factory=tuple)
    vision: bool = False
    """A vision-language model (its config has a ``vision_config``) that transformers loads as a causal
    LM: the estimate covers text-only training; images are not modelled (``engine.memory`` says so)."""
    """Things a person should know (e.g. expert weights are fused parameters, not LoRA targets)."""
    family: str | None = None
    """Model family for the learning-rate table (``llama``, ``mistral``, ``qwen2`` ...)."""

    @property
    def params_outside_blocks(self) -> int:
        """Parameters outside the blocks that are neither embedding nor head (final norm etc.)."""
        return self.params_total - self.params_embedding - self.params_head - self.params_blocks

    @property
    def lora_target_candidates(self) -> list[str]:
        """The targetable layer names, in model order."""
        return [t.name for t in self.targets]

    def target(self, name: str) -> TargetLayer:
        """The layer called ``name``; KeyError if the model has none."""
        for t in self.targets:
            if t.name == name:
                return t
        raise KeyError(name)

    def to_json(self) -> dict:
        """The stable JSON form printed by ``qlora-wizard inspect --json``."""
        d = asdict(self)
        d["targets"] = [asdict(t) for t in self.targets]
        d["lora_target_candidates"] = self.lora_target_candidates
        d["default_targets"] = list(self.default_targets)
        d["notes"] = list(self.notes)
        return d


# --------------------------------------------------------------------------------------------
# inspect_model: torch, transformers, accelerate and huggingface_hub are imported inside the
# functions below, never at module import (``--help`` and the TUI's start must stay light).
# --------------------------------------------------------------------------------------------

_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_NOT_WEIGHTS = re.compile(
    r"^(training_args|optimizer|scheduler|rng_state.*|adapter_model|tokenizer.*)\.(bin|safetensors)$"
)
_HUB_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_LEGACY_FALCON_TYPES = ("RefinedWebModel", "RefinedWeb")
_LEGACY_FALCON_ARCHS = ("RWForCausalLM", "RWModel")
_DTYPE_BYTES = {
    "float32": 4, "float": 4, "float64": 8, "double": 8, "float16": 2, "half": 2, "bfloat16": 2,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "int8": 1, "uint8": 1,
}
_EXAMPLE = "a local model directory, its config.json, or a Hub id such as meta-llama/Llama-3.1-8B"


@dataclass
class _Located:
    """Where the config came from."""

    name: str  # what messages call the model: the Hub id, or the path as typed
    config_path: Path
    model_dir: Path | None  # local folder with the weights (and any own code); None for the Hub
    repo_id: str | None = None
    weights: tuple[int, str] | None = None  # (bytes, "index" | "files") when found


def inspect_model(source: str, revision: str | None = None, trust_remote_code: bool = False) -> ModelInfo:
    """Read a model's shape and sizes from its config alone, without downloading any weights.

    ``source`` is a local model directory (with ``config.json``), a path to a config file (any
    name ending in ``.json``; weights are looked for next to it when it is called
    ``config.json``), a local ``.gguf`` file (its config read from the header by
    :func:`engine.gguf.gguf_config`, dtype bfloat16 as the engine converts it; ``revision`` and
    ``trust_remote_code`` do not apply), or a Hub id ``org/name``. For a Hub id only ``config.json`` is downloaded
    (plus the small weights index json when the repo has one, for ``weight_bytes``); ``HF_TOKEN``,
    ``HF_HOME``, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` apply as usual. Without a network a
    cached config is used. ``revision`` (branch, tag or commit) applies to Hub ids only.

    Weight bytes: the ``metadata.total_size`` of ``model.safetensors.index.json`` (or
    ``pytorch_model.bin.index.json``) -> ``index``; else the sizes of the ``*.safetensors`` (else
    ``*.bin``) weight files -> ``files``; the size of a ``.gguf`` file -> ``gguf``; else
    ``params_total`` x the config dtype's size -> ``estimate``.

    The model is built on the meta device from its config (``AutoModelForCausalLM.from_config``)
    to get exact module names and shapes; this takes a few hundredths of a second once
    transformers is imported. ``trust_remote_code`` is always passed to transformers explicitly so
    it can never ask ``Do you wish to run the custom code? [y/N]`` on standard input.

    Raises :class:`NeedsRemoteCode` when the model needs its own Python code and
    ``trust_remote_code`` is False, and :class:`UserError` (one line) for every bad input: missing
    path, no ``config.json``, unreadable or non-JSON config, a ``.gguf`` that is missing, not GGUF,
    truncated or of an architecture transformers cannot read, no ``model_type``, a model type this
    transformers does not know, a model that is not a causal language model, an unknown, private
    or gated Hub id, an unknown revision, and a Hub that cannot be reached.
    """
    if not isinstance(source, str) or not source.strip():
        raise UserError("no model given", f"pass {_EXAMPLE}")
    source = source.strip()
    from engine.gguf import is_gguf

    if is_gguf(source):
        return _inspect_gguf(source)
    loc = _locate(source, revision)
    raw = _read_raw_config(loc.config_path)
    check_config_sizes(raw, loc.name)  # absurd sizes (ten million layers) refused before anything is built
    with _quiet_transformers():
        config, remote, notes = _load_config(raw, loc, revision, bool(trust_remote_code))
        _check_causal(config, loc.name, remote)
        _check_essential_sizes(config, raw, loc.config_path)
        model = _build_on_meta(config, loc.name, remote)
        return _analyse(model, config, raw, loc, notes)


def _inspect_gguf(source: str) -> ModelInfo:
    """A local ``.gguf`` file: the config from its header (``engine.gguf.gguf_config``), built on the
    meta device like any config; weight bytes are the file's size (``weight_bytes_source`` ``gguf``).
    The notes say what the file is and what the engine does with it before the first run."""
    from engine.gguf import CONVERT_DTYPE, converted_dir, gguf_config, is_complete, read_header, size_words

    path = Path(source).expanduser()
    header = read_header(path)
    config = gguf_config(path, header)
    raw = config.to_dict()
    check_config_sizes(raw, source)
    with _quiet_transformers():
        _check_causal(config, source, False)
        model = _build_on_meta(config, source, False)
        params = sum(p.numel() for p in model.parameters())  # shared (tied) parameters once
        converted = converted_dir(path)
        quant = header.quant_type
        what = f"a GGUF file ({quant})" if quant else "a GGUF file"
        if is_complete(converted):
            then = f"it was converted once to a {CONVERT_DTYPE} model folder in {converted}, which training loads"
        else:
            gb = params * 2 / 1e9
            then = (f"before the first run the engine converts it once to a {CONVERT_DTYPE} model folder of about "
                    f"{size_words(params * 2)} in the cache ({converted}), taking roughly a minute per GB of CPU "
                    f"time (about {max(1, round(gb))} min here)")
        notes = [f"{source} is {what}, read from its header. transformers dequantizes its weights to load "
                 f"them: {then}; bitsandbytes then quantizes the model again for QLoRA."]
        loc = _Located(source, path, path.parent, weights=(header.file_size, "gguf"))
        return _analyse(model, config, raw, loc, notes)


# ----------------------------------------------------------------------------- locating


def _locate(source: str, revision: str | None) -> _Located:
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir():
            cfg = path / "config.json"
            if not cfg.is_file():
                raise UserError(
                    f"{source} has no config.json",
                    "point to a Hugging Face model directory (the folder with config.json) "
                    "or to the config file itself",
                )
            return _Located(source, cfg, path, weights=_local_weight_bytes(path))
        if path.suffix.lower() == ".json":
            # weights are looked for next to a file called config.json, not next to any json
            weights = _local_weight_bytes(path.parent) if path.name == "config.json" else None
            return _Located(source, path, path.parent, weights=weights)
        raise UserError(f"{source} is a file but not a model config (.json)", f"pass {_EXAMPLE}")
    if _looks_like_hub_id(source):
        return _fetch_from_hub(source, revision)
    raise UserError(f"no such file or directory: {source}", f"pass {_EXAMPLE}")


def _looks_like_hub_id(text: str) -> bool:
    """``org/name`` with Hub-legal characters; anything path-like (``./``, ``/``, ``~``) is not."""
    if text.startswith((".", "/", "~")) or "\\" in text or text.lower().endswith(".json"):
        return False
    parts = text.split("/")
    return (
        len(parts) == 2
        and all(_HUB_PART.match(p) and len(p) <= 96 for p in parts)
        and ".." not in text
        and "--" not in text
    )


def _index_total(path: Path) -> int | None:
    try:
        total = json.loads(path.read_text(encoding="utf-8"))["metadata"]["total_size"]
        total = int(total)
    except Exception:
        return None
    return total if total > 0 else None


def _sum_weight_files(sizes: dict[str, int | None]) -> int | None:
    """Bytes of the top-level weight files: ``*.safetensors`` if any, else ``*.bin``."""
    top = {n: s for n, s in sizes.items() if "/" not in n and not _NOT_WEIGHTS.match(n)}
    st = {n: s for n, s in top.items() if n.endswith(".safetensors")}
    if any(not n.startswith("consolidated") for n in st):  # Mistral repos ship both layouts
        st = {n: s for n, s in st.items() if not n.startswith("consolidated")}
    chosen = st or {n: s for n, s in top.items() if n.endswith(".bin")}
    if not chosen or any(s is None for s in chosen.values()):
        return None
    total = sum(int(s) for s in chosen.values() if s is not None)
    return total or None


def _local_weight_bytes(folder: Path) -> tuple[int, str] | None:
    try:
        for name in _INDEX_FILES:
            if (folder / name).is_file():
                total = _index_total(folder / name)
                if total:
                    return total, "index"
        sizes = {}
        for f in folder.iterdir():
            if f.suffix in (".safetensors", ".bin") and f.is_file():
                sizes[f.name] = f.stat().st_size  # follows the Hub cache's symlinks
        total = _sum_weight_files(sizes)
        return (total, "files") if total else None
    except OSError:
        return None


# ----------------------------------------------------------------------------- the Hub


@contextmanager
def _quiet_hub() -> Iterator[None]:
    """No retry warnings or progress bars from huggingface_hub while we fetch a config."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )
    from huggingface_hub.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars_were_off = are_progress_bars_disabled()
    hf_logging.set_verbosity_error()
    disable_progress_bars()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if not bars_were_off:
            enable_progress_bars()


def _hub_offline() -> bool:
    try:
        from huggingface_hub import is_offline_mode

        return bool(is_offline_mode())
    except ImportError:  # older huggingface_hub
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)


def _hub_user_error(exc: BaseException, repo_id: str, revision: str | None, offline: bool) -> UserError:
    """Turn a huggingface_hub exception into one line a person can act on."""
    from huggingface_hub import errors as E

    if isinstance(exc, E.HFValidationError):
        return UserError(f"no such file or directory, and not a valid Hub id: {repo_id}", f"pass {_EXAMPLE}")
    if isinstance(exc, E.GatedRepoError):
        return UserError(
            f"{repo_id} is a gated model on the Hugging Face Hub and this account has no access to it",
            f"accept its terms on https://huggingface.co/{repo_id} and set HF_TOKEN to a token of that "
            "account (or run `hf auth login`)",
        )
    if isinstance(exc, E.RevisionNotFoundError):
        return UserError(
            f"{repo_id} has no revision {revision!r} on the Hugging Face Hub",
            "check the branch, tag or commit name",
        )
    if isinstance(exc, E.RepositoryNotFoundError):
        return UserError(
            f"no local path {repo_id} and no model {repo_id} on the Hugging Face Hub",
            "check the spelling; if the model is private or gated, set HF_TOKEN to a token that can read it",
        )
    if isinstance(exc, (E.LocalEntryNotFoundError, E.OfflineModeIsEnabled)) or not isinstance(exc, E.HfHubHTTPError):
        if isinstance(exc, E.EntryNotFoundError) and not isinstance(exc, E.LocalEntryNotFoundError):
            return UserError(
                f"{repo_id} on the Hugging Face Hub has no config.json",
                "is it a transformers model? pass a repository or a local directory with a config.json",
            )
        if offline:
            return UserError(
                f"offline mode is on (HF_HUB_OFFLINE) and {repo_id} is not in the local Hugging Face cache",
                "unset HF_HUB_OFFLINE to download its config, or pass a local model directory",
            )
        return UserError(
            f"cannot reach the Hugging Face Hub to fetch {repo_id}, and it is not in the local cache",
            "check the network connection (and HF_ENDPOINT or proxy settings), or pass a local model directory",
        )
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, E.EntryNotFoundError) or status == 404:
        return UserError(
            f"{repo_id} on the Hugging Face Hub has no config.json",
            "is it a transformers model? pass a repository or a local directory with a config.json",
        )
    if status in (401, 403):
        return UserError(
            f"the Hugging Face Hub refused access to {repo_id} ({status})",
            "if the model is private or gated, set HF_TOKEN to a valid token that can read it",
        )
    return UserError(
        f"the Hugging Face Hub answered {status or 'with an error'} for {repo_id}",
        "try again later, or pass a local model directory",
    )


def _fetch_from_hub(repo_id: str, revision: str | None) -> _Located:
    """Download config.json (and only that, plus a weights index) for a Hub id."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub import errors as E

    offline = _hub_offline()
    with _quiet_hub():
        info = None
        unreachable = offline
        if not offline:
            # One metadata call, without the download retries: it tells an unknown or private
            # repo apart quickly, gives the file sizes, and fails fast when there is no network.
            try:
                info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
            except (E.RepositoryNotFoundError, E.RevisionNotFoundError) as exc:
                raise _hub_user_error(exc, repo_id, revision, offline) from None
            except E.HfHubHTTPError as exc:
                status = getattr(getattr(exc, "response", None), "status_code", None)
                if status in (401, 403):
                    raise _hub_user_error(exc, repo_id, revision, offline) from None
                info = None  # a server hiccup: let the download (which retries) decide
            except Exception:
                unreachable = True  # no network: only the local cache can help now
        try:
            cfg = hf_hub_download(repo_id, "config.json", revision=revision, local_files_only=unreachable)
        except Exception as exc:
            raise _hub_user_error(exc, repo_id, revision, offline) from None
        weights = _hub_weight_bytes(repo_id, revision, info, Path(cfg).parent)
    return _Located(repo_id, Path(cfg), None, repo_id=repo_id, weights=weights)


def _hub_weight_bytes(repo_id: str, revision: str | None, info: Any, snapshot: Path) -> tuple[int, str] | None:
    """From the repo's file list when we have it (the index json, else file sizes); otherwise
    from what the local cache holds."""
    from huggingface_hub import hf_hub_download

    try:
        if info is not None:
            sizes = {s.rfilename: getattr(s, "size", None) for s in (info.siblings or [])}
            for name in _INDEX_FILES:
                if name in sizes:
                    total = _index_total(Path(hf_hub_download(repo_id, name, revision=revision)))
                    if total:
                        return total, "index"
            total = _sum_weight_files(sizes)
            return (total, "files") if total else None
        for name in _INDEX_FILES:
            try:
                path = hf_hub_download(repo_id, name, revision=revision, local_files_only=True)
            except Exception:
                continue
            total = _index_total(Path(path))
            if total:
                return total, "index"
        return _local_weight_bytes(snapshot)
    except Exception:
        return None  # sizes are a nicety: fall back to the estimate


# ----------------------------------------------------------------------------- the config


def _read_raw_config(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a text file", "point to the model's config.json") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}", "check the path and its permissions") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            "fix or re-download the model's config.json",
        ) from None
    except (ValueError, RecursionError) as exc:  # a number too long to convert, nesting too deep
        raise UserError(f"{path} cannot be read as a model config: {str(exc).splitlines()[0][:120]}",
                        "fix or re-download the model's config.json") from None
    if not isinstance(raw, dict):
        raise UserError(
            f"{path} is JSON but not a model config (expected an object)", "point to the model's config.json"
        )
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or not model_type.strip():
        raise UserError(
            f"{path} has no model_type, so it is not a transformers model config",
            "point to the config.json of a Hugging Face transformers model",
        )
    return raw


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings (legacy ``hidden_act`` etc.) while we inspect."""
    import warnings

    from transformers.utils import logging as tf_logging

    level = tf_logging.get_verbosity()
    tf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        tf_logging.set_verbosity(level)


def _is_remote_code_error(exc: BaseException) -> bool:
    return isinstance(exc, ValueError) and "trust_remote_code" in str(exc)


def _needs_code_error(name: str) -> NeedsRemoteCode:
    return NeedsRemoteCode(
        f"{name} needs its own Python code (trust_remote_code) to be built",
        "rerun with --trust-remote-code if you trust its authors",
    )


_COMMIT = re.compile(r"^[0-9a-f]{40}$")
"""A full git commit hash: a revision that can no longer move."""


def code_revision(source: str, revision: str | None = None) -> str | None:
    """The commit whose code a person agrees to run, for a Hub model: consent covers the code that
    was there when it was given, so the run's ``model.revision`` is pinned to this commit and a later
    push to the repository cannot change what trains.

    None for anything that is not a Hub id (a local folder or config file: its code is the files
    there). A full commit hash is returned as it is. Otherwise the Hub is asked which commit
    ``revision`` (the default branch when None) points to now; with ``HF_HUB_OFFLINE`` set, or the Hub
    out of reach, the commit of the cached snapshot is used (the one a load would read). A one-line
    :class:`UserError` when the repository or revision does not exist, or when neither the Hub nor
    the cache can say.
    """
    source = (source or "").strip()
    if not source or Path(source).expanduser().exists() or not _looks_like_hub_id(source):
        return None
    if revision and _COMMIT.match(revision):
        return revision
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub import errors as E

    offline = _hub_offline()
    with _quiet_hub():
        if not offline:
            try:
                sha = HfApi().model_info(source, revision=revision).sha
                if sha:
                    return sha
            except (E.RepositoryNotFoundError, E.RevisionNotFoundError) as exc:
                raise _hub_user_error(exc, source, revision, offline) from None
            except E.HfHubHTTPError as exc:
                if getattr(getattr(exc, "response", None), "status_code", None) in (401, 403):
                    raise _hub_user_error(exc, source, revision, offline) from None
            except Exception:  # noqa: BLE001 - no network: the cache decides
                pass
        try:
            cached = try_to_load_from_cache(source, "config.json", revision=revision)
        except Exception:  # noqa: BLE001 - an unreadable cache is no answer
            cached = None
    if isinstance(cached, str) and _COMMIT.match(Path(cached).parent.name):
        return Path(cached).parent.name  # .../snapshots/<commit>/config.json
    why = "offline mode is on (HF_HUB_OFFLINE)" if offline else "the Hugging Face Hub cannot be reached"
    at = f" at {revision!r}" if revision else ""
    raise UserError(
        f"cannot tell which commit of {source}{at} its code would run from: {why} and it is not in the local cache",
        "connect to the Hub once, or set model.revision to a full commit hash",
    )


def remote_code_words(source: str, revision: str | None) -> str:
    """How a run says that it runs the model's own code, and which: ``runs the model's own code
    (trust_remote_code: true in the preset) from org/name at revision <commit>``."""
    at = f" at revision {revision}" if revision else ""
    return f"runs the model's own code (trust_remote_code: true in the preset) from {source}{at}"


def _load_config(raw: dict, loc: _Located, revision: str | None, trust: bool) -> tuple[Any, bool, list[str]]:
    """The transformers config, whether the model's own code is used to build it, and notes.

    Without consent a model that needs its own code raises NeedsRemoteCode before transformers
    is asked anything. With consent the own code is used; if it cannot be loaded (e.g. a local
    folder without the .py files) a model transformers knows natively (or the 2023 Falcon
    format, which transformers' Falcon class ports) is built with the built-in class instead.
    """
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    notes: list[str] = []
    model_type = raw["model_type"]
    known = model_type in CONFIG_MAPPING
    auto_map = raw.get("auto_map") if isinstance(raw.get("auto_map"), dict) else None
    archs = raw.get("architectures") or []
    legacy_falcon = model_type in _LEGACY_FALCON_TYPES or any(a in _LEGACY_FALCON_ARCHS for a in archs)

    if (legacy_falcon or (auto_map and not known)) and not trust:
        raise _needs_code_error(loc.name)
    if not known and not auto_map and not legacy_falcon:
        raise UserError(
            f"transformers {transformers.__version__} does not know the model type {model_type!r} of {loc.name}",
            "upgrade transformers (pip install -U transformers) or check the config",
        )
    if trust and (auto_map or not known):
        where = loc.repo_id or str(loc.model_dir)
        try:
            config = AutoConfig.from_pretrained(
                where, revision=revision if loc.repo_id else None, trust_remote_code=True
            )
            return config, True, notes
        except Exception as exc:
            reason = first_line(exc).split(". ")[0].rstrip(".")
            if legacy_falcon:
                notes.append(
                    "The 2023 Falcon format (RWForCausalLM) ships its own code, which could not be "
                    "loaded here; inspected with transformers' built-in Falcon class (its port) instead."
                )
                return _native_falcon_config(raw), False, notes
            if not known:
                raise UserError(
                    f"could not load the own code of {loc.name}: {reason}",
                    "check that the model's .py files are there (or reachable on the Hub)",
                ) from None
            notes.append(
                f"The model's own code could not be loaded ({reason}); inspected with transformers' "
                f"built-in {model_type} classes instead."
            )
            trust = False
    try:
        config = AutoConfig.from_pretrained(str(loc.config_path), trust_remote_code=trust)
    except Exception as exc:
        if _is_remote_code_error(exc):
            raise _needs_code_error(loc.name) from None
        raise UserError(
            f"transformers cannot read the config of {loc.name}: {first_line(exc)}",
            "fix or re-download the model's config.json",
        ) from None
    return config, trust and bool(auto_map), notes


_LEGACY_FALCON_NAMES = {"n_layer": "num_hidden_layers", "n_head": "num_attention_heads", "n_embed": "hidden_size",
                        "n_head_kv": "num_kv_heads"}
"""The 2023 Falcon format's own key names and transformers' FalconConfig names for them. FalconConfig
reads none of the former (falcon-40b's ``n_layer: 60`` would silently become its default 32)."""


def _native_falcon_dict(raw: dict) -> dict:
    """A 2023-format Falcon config (RWForCausalLM) as transformers' built-in Falcon class reads it."""
    d = {_LEGACY_FALCON_NAMES.get(k, k): v for k, v in raw.items() if k != "auto_map"}
    d["model_type"] = "falcon"
    d["architectures"] = ["FalconForCausalLM"]
    return d


def _native_falcon_config(raw: dict) -> Any:
    from transformers import FalconConfig

    return FalconConfig.from_dict(_native_falcon_dict(raw))


ESSENTIAL_SIZES = {
    "hidden_size": "the width of every layer",
    "num_hidden_layers": "the number of layers",
    "num_attention_heads": "the number of attention heads",
    "vocab_size": "the vocabulary",
    "intermediate_size": "the width of the MLP",
}
"""The sizes without which a config does not describe a model: a config class fills a missing one
with its architecture's default (Llama: hidden_size 4096), which would describe another model."""


def _check_essential_sizes(config: Any, raw: dict, path: Path) -> None:
    """Refuse a config that lacks a size its class would otherwise fill with a default.

    A size counts as given when the file has it under transformers' standard name or the name
    the class maps it to (GPT-2's ``n_embd``). Sizes a class derives when absent (GPT-2's MLP
    width, ``n_inner: null`` meaning 4 x hidden) have no default to fall into and are not asked.
    A composite config (vision-language) is checked in its ``text_config`` when the file has one.
    """
    import inspect

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    given, legacy = raw, {}
    if text is not config:
        given = next((v for k, v in raw.items() if k.endswith("text_config") and isinstance(v, dict)), None)
        if given is None:
            return  # the composite's text part is its class's default by design, not a missing key
    elif type(config).__name__ == "FalconConfig" and raw.get("model_type") != "falcon":
        given, legacy = _native_falcon_dict(raw), {v: k for k, v in _LEGACY_FALCON_NAMES.items()}
    try:
        params = inspect.signature(type(text).__init__).parameters
    except (TypeError, ValueError):
        return
    aliases = getattr(text, "attribute_map", None) or {}
    for key, what in ESSENTIAL_SIZES.items():
        names = [n for n in (key, aliases.get(key)) if n]
        param = next((params[n] for n in names if n in params), None)
        if param is None or param.default in (None, inspect.Parameter.empty) or any(n in given for n in names):
            continue
        shown = " or ".join(repr(n) for n in dict.fromkeys([legacy.get(key, ""), *reversed(names)]) if n)
        raise UserError(
            f"{path} has no {shown} ({what}); transformers would silently use {type(text).__name__}'s default "
            f"{param.default}, which describes another model",
            "fix or re-download the model's config.json",
        )


def _check_causal(config: Any, name: str, remote: bool) -> None:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    archs = list(getattr(config, "architectures", None) or [])
    causal_arch = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    remote = remote and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    what = archs[0] if archs else config.model_type
    if getattr(config, "is_encoder_decoder", False):
        why = f"{what} is an encoder-decoder model"
    elif not remote and type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING and \
            getattr(config, "vision_config", None) is not None:
        raise UserError(
            f"{name} is a vision-language model ({what}); qlora-wizard trains, and estimates the memory of, "
            "text-only causal language models: neither its vision tower nor image data are modelled",
            "pick a text-only model, such as the language model this one is built on",
        )
    elif not remote and type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        why = f"{what} has no causal language model head in transformers"
    elif (
        config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES
        and not getattr(config, "is_decoder", False)
        and not causal_arch
    ):
        why = f"{what} is an encoder (masked language) model"
    else:
        return
    raise UserError(
        f"{name} is not a causal language model ({why})",
        "pick a decoder-only text model (Llama, Mistral, Qwen, Gemma, Phi ...)",
    )


def _build_on_meta(config: Any, name: str, remote: bool) -> Any:
    """The model with every parameter on the meta device: shapes, no memory, no weights."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        # torch.device("meta") is a thread-local mode (unlike accelerate's init_empty_weights,
        # which patches nn.Module for every thread) and also catches buffers.
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=remote)
    except Exception as exc:
        if _is_remote_code_error(exc):
            raise _needs_code_error(name) from None
        raise UserError(
            f"transformers could not build {name} from its config: {first_line(exc)}",
            "check the config values, or upgrade transformers",
        ) from None


# ----------------------------------------------------------------------------- counting


def _first_int(cfg: Any, *names: str) -> int | None:
    for n in names:
        try:
            v = getattr(cfg, n, None)
        except Exception:
            v = None
        if isinstance(v, bool) or v is None:
            continue
        if isinstance(v, (int, float)) and v > 0:
            return int(v)
    return None


def _fmt(n: int) -> str:
    if n >= 1_000_000_000:
        return f"{n / 1e9:.2f} B"
    if n >= 1_000_000:
        return f"{n / 1e6:.1f} M"
    return f"{n:,}"


def _find_blocks(model: Any, n_layers: int | None) -> str | None:
    """Dotted name of the ModuleList holding the decoder layers (``model.layers``, ``transformer.h``)."""
    import torch.nn as nn

    best: tuple[int, int, int, str] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            size = sum(p.numel() for p in mod.parameters())
            text_side = not any(w in name.lower() for w in ("vision", "visual", "audio", "image"))
            key = (1 if n_layers and len(mod) == n_layers else 0, int(text_side), size, name)
            if best is None or key[:3] > best[:3]:
                best = key
    return best[3] if best else None


def _analyse(model: Any, config: Any, raw: dict, loc: _Located, notes: list[str]) -> ModelInfo:
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D

    try:
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:  # other transformers versions

        def should_convert_module(full_name: str, patterns: list[str] | None = None) -> bool:
            return not any(full_name == p or full_name.endswith("." + p) for p in patterns or [])

    tc = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_layers = _first_int(tc, "num_hidden_layers", "n_layer", "num_layers") or 0
    blocks = _find_blocks(model, n_layers)
    prefix = blocks + "." if blocks else None

    def in_blocks(name: str) -> bool:
        return prefix is not None and name.startswith(prefix)

    # every distinct parameter once (tied ones share an object), under its first name
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())

    def safe(get: Any) -> Any:
        try:
            return get()
        except Exception:
            return None

    inp = safe(model.get_input_embeddings)
    out = safe(model.get_output_embeddings)
    inp_w = getattr(inp, "weight", None)
    out_w = getattr(out, "weight", None)
    tied_same = inp_w is not None and out_w is inp_w
    # On the meta device some versions leave the tie unapplied: trust the config then.
    tied_by_config = (
        not tied_same
        and inp_w is not None
        and out_w is not None
        and bool(getattr(tc, "tie_word_embeddings", False))
        and bool(getattr(model, "_tied_weights_keys", None))
        and tuple(out_w.shape) == tuple(inp_w.shape)
    )
    tied = tied_same or tied_by_config
    untie_fix = out_w.numel() if tied_by_config else 0
    total -= untie_fix

    embed_ids: set[int] = set()
    for name, mod in model.named_modules():
        if (isinstance(mod, nn.Embedding) and not in_blocks(name)) or mod is inp:
            embed_ids.update(id(p) for p in mod.parameters())
    head_ids = {id(p) for p in out.parameters()} - embed_ids if out is not None else set()
    params_embedding = sum(p.numel() for p in params.values() if id(p) in embed_ids)
    params_head = sum(p.numel() for p in params.values() if id(p) in head_ids) - untie_fix
    params_blocks = sum(p.numel() for n, p in params.items() if in_blocks(n))

    keep_fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    num_experts = _first_int(tc, "num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts") or 0
    quantizable = 0
    seen: set[int] = set()
    groups: dict[str, dict] = {}
    subclassed: set[str] = set()
    subclassed_params = 0
    linear_routers: set[str] = set()
    for name, mod in model.named_modules():
        if not in_blocks(name):
            continue
        is_conv1d = isinstance(mod, Conv1D)
        if not (is_conv1d or isinstance(mod, nn.Linear)):
            continue
        w = mod.weight
        if is_conv1d:
            in_f, out_f = int(w.shape[0]), int(w.shape[1])  # Conv1D stores (in, out)
        else:
            in_f, out_f = int(mod.in_features), int(mod.out_features)
        if is_conv1d or type(mod) is nn.Linear:
            if id(w) not in seen and (not keep_fp32 or should_convert_module(name, keep_fp32)):
                seen.add(id(w))
                quantizable += w.numel()
        else:
            subclassed.add(type(mod).__name__)
            subclassed_params += w.numel()
        parts = name.split(".")
        short = parts[-1] if not parts[-1].isdigit() else ".".join(parts[-2:])
        g = groups.setdefault(short, {"shapes": {}, "bias": False, "kind": "conv1d" if is_conv1d else "linear"})
        g["shapes"][(in_f, out_f)] = g["shapes"].get((in_f, out_f), 0) + 1
        g["bias"] = g["bias"] or getattr(mod, "bias", None) is not None
        last = parts[-1]
        # a router (out = number of experts) or a shared-expert gate (out = 1): not a default target
        is_gate = out_f == 1 and "gate" in last and not last.endswith("_proj")
        if num_experts > 1 and (out_f == num_experts or is_gate):
            linear_routers.add(short)

    targets = []
    for short, g in groups.items():
        shapes = [(i, o, n) for (i, o), n in g["shapes"].items()]
        (i0, o0, _), count = shapes[0], sum(n for _, _, n in shapes)
        targets.append(
            TargetLayer(
                name=short, in_features=i0, out_features=o0, count=count, bias=g["bias"], kind=g["kind"],
                shapes=tuple(shapes) if len(shapes) > 1 else (),
            )
        )
    default_targets = tuple(t.name for t in targets if t.name not in linear_routers)

    # Mixture of experts: fused 3-D expert tensors (transformers 5) and the router.
    # (3-D tensors of convolutions, e.g. Mamba's conv1d, are not experts)
    not_experts = {
        id(p)
        for n, m in model.named_modules()
        if in_blocks(n) and isinstance(m, (nn.Linear, Conv1D, nn.modules.conv._ConvNd))
        for p in m.parameters(recurse=False)
    }
    fused_names: list[str] = []
    fused_params = 0
    for n, p in params.items():
        if (
            in_blocks(n)
            and p.dim() >= 3
            and id(p) not in not_experts
            and ("expert" in n.lower() or (num_experts > 1 and p.shape[0] == num_experts))
        ):
            fused_params += p.numel()
            rel = n[len(prefix):].split(".", 1)[-1]  # drop the layer index
            if rel not in fused_names:
                fused_names.append(rel)
    is_moe = num_experts > 1 or bool(fused_names)
    dtype = _dtype_name(config, raw)
    if is_moe:
        routers = []
        for n, m in model.named_modules():
            if not in_blocks(n) or isinstance(m, (nn.Linear, Conv1D)):
                continue
            w = getattr(m, "weight", None)
            if w is not None and getattr(w, "dim", lambda: 0)() == 2 and num_experts and w.shape[0] == num_experts:
                rel = n[len(prefix):].split(".", 1)[-1]
                if rel not in [r for r, _ in routers]:
                    routers.append((rel, type(m).__name__))
        per_tok = _first_int(tc, "num_experts_per_tok", "moe_topk", "top_k")
        head = f"Mixture of experts: {num_experts or 'several'} experts per layer" + (
            f", {per_tok} active per token." if per_tok else "."
        )
        parts = [head]
        if fused_names:
            parts.append(
                f"The expert weights ({', '.join(fused_names)}; {_fmt(fused_params)} parameters) are fused "
                f"3-D tensors, not Linear modules: bitsandbytes leaves them unquantized (in {dtype}) and "
                "LoRA target_modules cannot reach them (peft's target_parameters can)."
            )
        parts.append(f"LoRA targets: {', '.join(default_targets) or 'none'}.")
        if routers:
            parts.append(
                "The router ("
                + ", ".join(f"{r}, {c}" for r, c in routers)
                + ") is not a Linear module: not quantized and not a LoRA target."
            )
        if linear_routers:
            parts.append(f"Router/gate linears left out of the defaults: {', '.join(sorted(linear_routers))}.")
        notes.append(" ".join(parts))
    if subclassed:
        notes.append(
            f"Block linears of type {', '.join(sorted(subclassed))} ({_fmt(subclassed_params)} parameters) "
            "subclass torch.nn.Linear, and bitsandbytes in transformers 5 converts only exact "
            "nn.Linear and Conv1D: they stay unquantized in 4-bit loading, although LoRA can target them."
        )
    qc = raw.get("quantization_config")
    if isinstance(qc, dict):
        notes.append(
            f"The checkpoint is already quantized ({qc.get('quant_method', 'unknown method')}); "
            "parameter counts are for the unquantized model."
        )

    hidden = _first_int(tc, "hidden_size", "n_embd", "d_model") or 0
    heads = _first_int(tc, "num_attention_heads", "n_head", "num_heads") or 0
    kv = _first_int(tc, "num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num")
    if getattr(tc, "multi_query", False) and not getattr(tc, "new_decoder_architecture", False):
        kv = 1  # Falcon-7B style multi-query attention
    weights = loc.weights
    if weights is None:
        weights = (total * _DTYPE_BYTES.get(dtype, 2), "estimate")
    return ModelInfo(
        source=loc.name,
        model_type=str(config.model_type),
        architecture=type(model).__name__,
        hidden_size=hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv or heads,
        intermediate_size=_first_int(tc, "intermediate_size", "n_inner", "ffn_hidden_size", "ffn_dim") or 4 * hidden,
        vocab_size=_first_int(tc, "vocab_size") or 0,
        context_length=_first_int(
            tc, "max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_sequence_length", "max_seq_len"
        )
        or 0,
        tie_word_embeddings=tied,
        dtype=dtype,
        params_total=total,
        params_embedding=params_embedding,
        params_head=params_head,
        params_blocks=params_blocks,
        params_quantizable=quantizable,
        params_other=total - params_embedding - params_head - quantizable,
        targets=tuple(targets),
        default_targets=default_targets,
        weight_bytes=weights[0],
        weight_bytes_source=weights[1],
        is_moe=is_moe,
        num_experts=num_experts if is_moe else 0,
        notes=tuple(notes),
        family=_family(raw.get("model_type"), str(config.model_type)),
        vision=getattr(config, "vision_config", None) is not None,
    )


def _dtype_name(config: Any, raw: dict) -> str:
    d = getattr(config, "dtype", None)
    if d is None:
        d = raw.get("dtype") or raw.get("torch_dtype")
    name = str(d).removeprefix("torch.") if d is not None else "float32"
    return "float32" if name in ("auto", "None", "") else name


def _family(raw_type: Any, model_type: str) -> str:
    from engine.arch import family

    return family(str(raw_type or model_type))


def require_weights(info: ModelInfo) -> None:
    """Refuse a local model folder that has a config but no weights, before anything tries to load it."""
    folder = Path(info.source)
    if folder.is_file():
        folder = folder.parent
    if folder.is_dir() and info.weight_bytes_source == "estimate":
        raise UserError(
            f"{info.source} has a config.json but no weights (*.safetensors or *.bin)",
            "download the whole model (huggingface-cli download ORG/NAME --local-dir DIR) or point at the folder that has them",
        )
