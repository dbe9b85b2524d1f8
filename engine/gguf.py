"""A local ``.gguf`` file as the model source: read its header, convert it once to a Hugging Face folder.

Many people hold a model only as a GGUF (llama.cpp's single-file format, usually quantized to 4 to 8
bits in its own block formats). transformers reads the file's metadata as a config and dequantizes
its tensors when it loads it; bitsandbytes then quantizes the model again to NF4 for QLoRA. The engine
does the dequantizing once:

- :func:`gguf_config`: the transformers config from the file's header alone (no tensor is read), for
  ``inspect``, ``estimate`` and the wizard's model step. The file is checked first (the GGUF magic
  bytes, a header that ends where it says, tensors that fit in the file) so a wrong or truncated file
  is one :class:`~engine.errors.UserError` line, never a traceback from deep inside a library.
- :func:`convert_gguf`: the weights dequantized into an ordinary bf16 safetensors folder, with the
  tokenizer and generation config, that ``from_pretrained`` loads like any model folder. It is kept
  in the cache (:func:`converted_dir`: ``<cache>/models/<stem>-<hash>``, the hash of the file's path,
  size and modification time, so an edited or replaced file is converted again) and built whole or not
  at all: written into an ``mkdtemp`` folder beside its place and renamed into it, a ``.complete``
  marker inside, one converter at a time (a lock file), so a killed or concurrent conversion never
  leaves a half-written model that is taken for a whole one.
- :func:`local_model`: what every place that loads a model by the preset's name calls (training, the
  tokenizer for the data, ``try``, ``eval``, ``merge``): a ``.gguf`` becomes its converted folder
  (converted on first use), anything else is returned unchanged.

The header's config is read by transformers from a copy of the header without the vocabulary's
arrays (gguf-py walks Gemma's 262,144 tokens in about 20 s on a CPU core; the copy reads in under a
second) and remembered beside the converted folder (``<stem>-<hash>.header.json``): the second
look reads no metadata.

Nothing here imports torch or transformers at module level.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import mmap
import os
import re
import shutil
import struct
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from engine.errors import UserError, first_line, os_error
from engine.files import atomic_write_text, open_append, settle_tree

GGUF_SUFFIX = ".gguf"
MODELS_DIRNAME = "models"
"""The cache's folder of models made here: converted GGUFs and the real-model test fixture."""
COMPLETE_MARKER = ".complete"
"""Written into a converted folder last, before it is renamed into place: no marker, not a model."""
INFO_FILE = "gguf_source.json"
"""What a converted folder was made from, when, and what it cost."""
CONVERT_DTYPE = "bfloat16"
"""The dtype the weights are dequantized to (and the dtype :func:`gguf_config` reports)."""
STALE_TEMP_S = 3600
"""Temporary folders of conversions older than this were left by a killed process and are removed."""

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
# GGUF metadata value types: the fixed-size ones (struct format), 8 = string, 9 = array.
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_MAX_COUNT = 1 << 32  # more tensors, keys or array items than this is a damaged header
_WHAT_TO_PASS = "pass a .gguf file, a Hugging Face model folder or a Hub id"


def is_gguf(source: Any) -> bool:
    """Whether ``source`` names a local GGUF file: a path whose name ends in ``.gguf`` (any case).

    The name decides (the file need not exist: a missing ``model.gguf`` is then reported as a missing
    GGUF file, not looked up on the Hub), except that an existing folder is never a GGUF (a model
    folder may be called ``something.gguf``). ``builtin:`` names and Hub ids never end in ``.gguf``.
    """
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        return False
    name = source.strip()
    if name.startswith("builtin:") or not name.lower().endswith(GGUF_SUFFIX):
        return False
    if len(Path(name).name) <= len(GGUF_SUFFIX):  # ".gguf" alone names nothing
        return False
    return not Path(name).expanduser().is_dir()


# --------------------------------------------------------------------------------------------
# The header


@dataclass(frozen=True)
class GgufTensor:
    """One tensor of the file, as its header describes it."""

    name: str
    shape: tuple[int, ...]
    """In ggml order (fastest-moving dimension first)."""
    ggml_type: int
    offset: int
    """From the start of the data section."""
    nbytes: int


@dataclass(frozen=True)
class GgufHeader:
    """A GGUF file's header: what it says about itself, checked against the file's size."""

    path: Path
    version: int
    metadata: dict[str, Any]
    """Scalars and strings as they are; arrays as their length, except short numeric ones."""
    tensors: tuple[GgufTensor, ...]
    data_start: int
    file_size: int
    spans: tuple[tuple[str, int, int, bool], ...] = ()
    """Each metadata entry's key, byte range in the file (start of its key, end of its value) and
    whether it is an array."""

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) and arch else None

    @property
    def quant_type(self) -> str | None:
        """The file's quantization as llama.cpp names it (``Q4_K_M``, ``Q8_0``, ``F16``): from
        ``general.file_type`` when the header says, else the type holding most of the bytes."""
        import gguf

        file_type = self.metadata.get("general.file_type")
        if isinstance(file_type, int) and not isinstance(file_type, bool):
            try:
                name = gguf.LlamaFileType(file_type).name
            except ValueError:
                name = None
            if name and name != "GUESSED":
                return name.removeprefix("MOSTLY_").removeprefix("ALL_")
        by_type: dict[int, int] = {}
        for t in self.tensors:
            by_type[t.ggml_type] = by_type.get(t.ggml_type, 0) + t.nbytes
        if not by_type:
            return None
        top = max(by_type, key=by_type.get)
        try:
            return gguf.GGMLQuantizationType(top).name
        except ValueError:
            return None


def _damaged(path: Path, why: str) -> UserError:
    return UserError(f"{path} is not a readable GGUF file: {why}",
                     "re-download it (a copy cut short is the usual cause), or " + _WHAT_TO_PASS)


def read_header(path: str | os.PathLike) -> GgufHeader:
    """Parse a GGUF file's header (metadata and tensor table) and check that every tensor lies
    inside the file; no tensor data is read. One-line :class:`UserError` for: no such file, a folder,
    an unreadable file, a file that is not GGUF (its first bytes are not ``GGUF``), a GGUF version
    transformers does not read, a header that ends early or makes no sense, a tensor type this
    ``gguf`` package does not know, and tensors that run past the end of the file (a truncated copy).
    """
    import gguf

    p = Path(path).expanduser()
    try:
        st = p.stat()
    except FileNotFoundError:
        raise UserError(f"no such file: {path}", _WHAT_TO_PASS) from None
    except OSError as exc:
        raise os_error(exc, "read", p) from None
    if p.is_dir():
        raise UserError(f"{path} is a folder, not a .gguf file",
                        "pass the .gguf file itself, or drop the .gguf from a model folder's name")
    size = st.st_size
    if size < 24:
        if size >= 4 and p.read_bytes()[:4] == _MAGIC:
            raise _damaged(p, f"it is only {size} bytes long, shorter than any GGUF header")
        raise UserError(f"{path} is not a GGUF file (it is {size} bytes long, without the GGUF magic bytes)",
                        "re-download it, or " + _WHAT_TO_PASS)
    try:
        with open(p, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as blob:
            if blob[:4] != _MAGIC:
                raise UserError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)",
                                "check the file, or " + _WHAT_TO_PASS)
            return _parse(p, blob, size, gguf.GGML_QUANT_SIZES)
    except UserError:
        raise
    except (struct.error, IndexError, OverflowError, MemoryError, UnicodeDecodeError):
        raise _damaged(p, "its header ends early or is damaged") from None
    except OSError as exc:
        raise os_error(exc, "read", p) from None


def _parse(p: Path, blob: mmap.mmap, size: int, quant_sizes: dict) -> GgufHeader:
    version = struct.unpack_from("<I", blob, 4)[0]
    if version not in _VERSIONS:
        if version == 1:
            raise UserError(f"{p} is a GGUF version 1 file, which transformers does not read",
                            "convert it again with a current llama.cpp (convert_hf_to_gguf.py), or " + _WHAT_TO_PASS)
        raise _damaged(p, f"it says it is GGUF version {version}; transformers reads versions 2 and 3")
    tensor_count, kv_count = struct.unpack_from("<QQ", blob, 8)
    if tensor_count > _MAX_COUNT or kv_count > _MAX_COUNT:
        raise _damaged(p, "its header counts more tensors or keys than any model has")
    pos = 24

    def string(at: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", blob, at)
        at += 8
        if at + n > size:
            raise IndexError
        return blob[at:at + n].decode("utf-8", errors="replace"), at + n

    def skip_string(at: int) -> int:
        (n,) = struct.unpack_from("<Q", blob, at)
        at += 8 + n
        if at > size:
            raise IndexError
        return at

    metadata: dict[str, Any] = {}
    spans = []
    for _ in range(kv_count):
        start = pos
        key, pos = string(pos)
        (vtype,) = struct.unpack_from("<I", blob, pos)
        pos += 4
        if vtype in _SCALAR:
            (metadata[key],) = struct.unpack_from(_SCALAR[vtype], blob, pos)
            pos += struct.calcsize(_SCALAR[vtype])
        elif vtype == 8:
            metadata[key], pos = string(pos)
        elif vtype == 9:
            etype, count = struct.unpack_from("<IQ", blob, pos)
            pos += 12
            if count > _MAX_COUNT:
                raise _damaged(p, f"its metadata key {key} holds an array longer than any model has")
            if etype in _SCALAR:
                width = struct.calcsize(_SCALAR[etype])
                if pos + width * count > size:
                    raise IndexError
                metadata[key] = (list(struct.unpack_from(f"<{count}{_SCALAR[etype][1]}", blob, pos))
                                 if count <= 64 else count)
                pos += width * count
            elif etype == 8:
                for _ in range(count):
                    pos = skip_string(pos)
                metadata[key] = count
            else:
                raise _damaged(p, f"its metadata key {key} holds an array of type {etype}, which no GGUF writer makes")
        else:
            raise _damaged(p, f"its metadata key {key} has the unknown value type {vtype}")
        spans.append((key, start, pos, vtype == 9))
    tensors = []
    for _ in range(tensor_count):
        name, pos = string(pos)
        (ndim,) = struct.unpack_from("<I", blob, pos)
        pos += 4
        if ndim > 8:
            raise _damaged(p, f"its tensor {name} has {ndim} dimensions")
        dims = struct.unpack_from(f"<{ndim}Q", blob, pos)
        pos += 8 * ndim
        ggml_type, offset = struct.unpack_from("<IQ", blob, pos)
        pos += 12
        if ggml_type not in quant_sizes:
            raise UserError(f"{p} holds tensor {name} in ggml type {ggml_type}, which this gguf package does not know",
                            "upgrade it (pip install -U gguf transformers), or " + _WHAT_TO_PASS)
        block, type_size = quant_sizes[ggml_type]
        elements = 1
        for d in dims:
            elements *= d
        tensors.append(GgufTensor(name, tuple(dims), ggml_type, offset, elements // block * type_size))
    alignment = _alignment(metadata)
    data_start = (pos + alignment - 1) // alignment * alignment
    needed = max((data_start + t.offset + t.nbytes for t in tensors), default=pos)
    if needed > size:
        raise UserError(f"{p} is truncated: its tensors need {needed:,} bytes but the file has {size:,}",
                        "the download or copy was cut short: fetch the file again")
    if not tensors:
        raise _damaged(p, "it holds no tensors")
    return GgufHeader(p, version, metadata, tuple(tensors), data_start, size, tuple(spans))


def _alignment(metadata: dict[str, Any]) -> int:
    """Where the file's tensor data (and each tensor in it) starts: a multiple of this many bytes."""
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0:
        return _DEFAULT_ALIGNMENT
    return alignment


# --------------------------------------------------------------------------------------------
# Where converted models live


def models_root() -> Path:
    """``<cache>/models``: converted GGUFs and the real-model test fixture (both can be made again)."""
    from engine.demo import cache_root

    return cache_root() / MODELS_DIRNAME


def _file_key(path: Path) -> tuple[Path, os.stat_result]:
    p = Path(path).expanduser()
    try:
        resolved = p.resolve(strict=True)
        return resolved, resolved.stat()
    except FileNotFoundError:
        raise UserError(f"no such file: {path}", _WHAT_TO_PASS) from None
    except OSError as exc:
        raise os_error(exc, "read", p) from None


def converted_dir(path: str | os.PathLike) -> Path:
    """Where the converted folder of this GGUF file lives (whether or not it exists yet):
    ``<cache>/models/<stem>-<12 hex digits>``, the digits a hash of the file's resolved path, size and
    modification time (a file changed in place, or another file at that path, gets another folder).
    A missing file is a :class:`UserError`."""
    resolved, st = _file_key(Path(path))
    digest = hashlib.sha256(f"{resolved}\0{st.st_size}\0{st.st_mtime_ns}".encode("utf-8", "surrogateescape"))
    # named as the person named it (the Hub cache's model.gguf is a link to a blob with a hash for a name)
    name = Path(path).expanduser().name
    name = name[: -len(GGUF_SUFFIX)] if name.lower().endswith(GGUF_SUFFIX) else name
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-")[:64] or "model"
    return models_root() / f"{stem}-{digest.hexdigest()[:12]}"


def _remembered_config_path(path: Path) -> Path:
    target = converted_dir(path)
    return target.with_name(target.name + ".header.json")


def is_complete(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a whole converted model (its ``.complete`` marker is there)."""
    return (Path(folder) / COMPLETE_MARKER).is_file()


# --------------------------------------------------------------------------------------------
# The config


@contextmanager
def _quiet() -> Iterator[None]:
    """No warnings, info lines or progress bars from transformers and gguf-py while we read or convert
    (the legacy GGUF loader draws its own tqdm bar on stderr: that one is swallowed)."""
    import contextlib
    import io
    import logging
    import warnings

    from transformers.utils import logging as tf_logging

    level = tf_logging.get_verbosity()
    bars = tf_logging.is_progress_bar_enabled()
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()
    gguf_logger = logging.getLogger("gguf")
    gguf_level = gguf_logger.level
    gguf_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        tf_logging.set_verbosity(level)
        if bars:
            tf_logging.enable_progress_bar()
        gguf_logger.setLevel(gguf_level)


def _cannot_read(path: Path, arch: str | None, exc: BaseException) -> UserError:
    import transformers

    what = f"architecture {arch!r}" if arch else "this file"
    return UserError(
        f"transformers {transformers.__version__} cannot read the GGUF {path} ({what}): {first_line(exc, 200)}",
        "upgrade transformers (pip install -U transformers), or use the model's original Hugging Face "
        "folder or Hub id instead of the GGUF",
    )


def _plain(config: Any) -> Any:
    """The config as an ordinary, unquantized bf16 model's: no ``quantization_config``."""
    if getattr(config, "quantization_config", None) is not None or "quantization_config" in vars(config):
        try:
            delattr(config, "quantization_config")
        except AttributeError:
            config.quantization_config = None
            vars(config).pop("quantization_config", None)
    config.dtype = CONVERT_DTYPE
    return config


def gguf_config(path: str | os.PathLike, header: GgufHeader | None = None) -> Any:
    """The transformers config of a GGUF file, from its header alone (no tensor is read).

    The file is checked first (:func:`read_header`); then transformers builds the config from the
    metadata (``AutoConfig.from_pretrained(folder, gguf_file=name)``). Any ``quantization_config`` is
    removed and ``dtype`` is ``bfloat16``: the config describes the plain model the engine converts
    the file to. One-line :class:`UserError` for a missing, unreadable, non-GGUF or truncated file and
    for an architecture this transformers cannot read. The result is remembered in the cache for the
    same file (path, size, modification time) and transformers version. ``header``: the file's
    :func:`read_header`, when the caller has it already.
    """
    p = Path(path).expanduser()
    return _config(p, header if header is not None else read_header(p))


def _config(p: Path, header: GgufHeader) -> Any:
    import transformers
    from transformers import AutoConfig

    remembered = None
    try:
        remembered = _remembered_config_path(p)
        if remembered.is_file():
            data = json.loads(remembered.read_text(encoding="utf-8"))
            if data.get("transformers_version") == transformers.__version__:
                with _quiet():
                    config = AutoConfig.from_pretrained(str(remembered))
                config._name_or_path = str(p.parent)  # as read from the file itself
                return _plain(config)
    except UserError:
        raise
    except Exception:  # noqa: BLE001 - a damaged memo is read again from the file
        pass
    try:
        config = _config_from_metadata(p, header)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line
        raise _cannot_read(p, header.architecture, exc) from None
    config = _plain(config)
    if remembered is not None:
        try:
            remembered.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(remembered, config.to_json_string())
        except OSError:
            pass  # a nicety: the next look reads the file again
    return config


_TOKENIZER_ARRAYS = "tokenizer.ggml."
"""The metadata arrays a config is not made of (the vocabulary, its scores, types and merges):
262,144 strings in Gemma 3's file, which transformers' reader (gguf-py) takes about 20 seconds to
walk on a CPU core."""


def _config_from_metadata(p: Path, header: GgufHeader) -> Any:
    """transformers' config of the GGUF ``p`` (``AutoConfig.from_pretrained(folder, gguf_file=...)``),
    read from a copy of its header without the tokenizer's arrays or any tensor's data: the same
    config in a second instead of half a minute for a large vocabulary. The copy keeps every other
    metadata entry byte for byte and each tensor's name (transformers reads the names for
    ``tie_word_embeddings``); it is written in a temporary folder beside the converted models and
    removed (where that folder cannot be written, transformers reads the whole file). Where the file
    gives no ``<architecture>.vocab_size``, transformers counts the vocabulary's tokens; so does this."""
    from transformers import AutoConfig

    try:
        root = models_root()
        root.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".gguf-header-", dir=root)
    except OSError:  # a cache that cannot be written: transformers reads the whole file
        with _quiet():
            return AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)
    try:
        _write_header_only(p, header, Path(tmp) / p.name)
        with _quiet():
            config = AutoConfig.from_pretrained(tmp, gguf_file=p.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    config._name_or_path = str(p.parent)  # as read from the file itself
    arch, tokens = header.architecture, header.metadata.get(_TOKENIZER_ARRAYS + "tokens")
    if isinstance(tokens, int) and f"{arch}.vocab_size" not in header.metadata:
        config.vocab_size = tokens
    return config


def _write_header_only(p: Path, header: GgufHeader, out: Path) -> None:
    """A GGUF at ``out`` with ``p``'s metadata less the tokenizer's arrays, and a one-number F32 tensor
    under each of its tensors' names."""
    alignment = _alignment(header.metadata)
    kept = [(a, b) for key, a, b, array in header.spans if not (array and key.startswith(_TOKENIZER_ARRAYS))]
    parts = [_MAGIC, struct.pack("<IQQ", header.version, len(header.tensors), len(kept))]
    with open(p, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as blob:
        parts.extend(blob[a:b] for a, b in kept)
    for i, t in enumerate(header.tensors):
        name = t.name.encode("utf-8")
        parts.append(struct.pack("<Q", len(name)) + name + struct.pack("<IQIQ", 1, 1, 0, i * alignment))
    head = b"".join(parts)
    pad = -len(head) % alignment
    out.write_bytes(head + bytes(pad + alignment * len(header.tensors)))


# --------------------------------------------------------------------------------------------
# Converting


def size_words(n: int | float) -> str:
    """Bytes in words: GiB from 1 GiB up (two decimals), else MiB or KiB."""
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.0f} KiB"


def _tree_bytes(folder: Path) -> int:
    total = 0
    for dirpath, _dirs, names in os.walk(folder):
        for name in names:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _remove_stale_temp_dirs(parent: Path, name: str) -> None:
    now = time.time()
    for p in parent.glob(f".{name}.tmp-*"):
        try:
            if now - p.lstat().st_mtime > STALE_TEMP_S and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _load_dequantized(p: Path) -> Any:
    """The model transformers builds from the GGUF, its weights dequantized to bf16; every weight must
    come from the file."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = dict(gguf_file=p.name, dtype=torch.bfloat16, output_loading_info=True)
    try:
        from transformers import GgufConfig
    except ImportError:
        try:
            from transformers.utils.quantization_config import GgufConfig
        except ImportError:  # older transformers always dequantize a GGUF
            GgufConfig = None
    if GgufConfig is not None:
        kwargs["quantization_config"] = GgufConfig(gguf_file=p.name, dequantize=True)
    model, loading = AutoModelForCausalLM.from_pretrained(str(p.parent), **kwargs)
    missing = sorted(loading.get("missing_keys") or ())
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise UserError(f"the GGUF {p} lacks weights the model needs ({shown}); transformers would start "
                        "them at random",
                        "use the model's original Hugging Face folder or Hub id instead of the GGUF")
    return model


def _plain_model(loaded: Any) -> Any:
    """An ordinary bf16 model (no quantizer, no quantization_config) holding the loaded weights."""
    import torch
    from transformers import AutoModelForCausalLM

    config = _plain(loaded.config)
    state = loaded.state_dict()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    # strict: every weight the model has must come from the file, and nothing else.
    model.load_state_dict(state, strict=True, assign=True)
    # buffers the state dict does not carry (rotary frequencies) are taken from the loaded model
    loaded_buffers = dict(loaded.named_buffers())
    for name, buf in list(model.named_buffers()):
        if buf.is_meta and name in loaded_buffers:
            owner, _, leaf = name.rpartition(".")
            (model.get_submodule(owner) if owner else model)._buffers[leaf] = loaded_buffers[name]
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.generation_config = loaded.generation_config
    model.eval()
    return model


def convert_gguf(path: str | os.PathLike, out: str | os.PathLike | None = None,
                 log: Callable[[str], Any] | None = print) -> Path:
    """Convert a GGUF file into an ordinary Hugging Face model folder (bf16 safetensors, tokenizer,
    generation config) and return the folder.

    ``out`` defaults to :func:`converted_dir`. A complete folder there (its ``.complete`` marker) is
    reused as it is. The folder is written into an ``mkdtemp`` folder beside ``out`` and renamed into
    place, under a lock, so it is whole or absent; a folder at ``out`` that is not a complete
    conversion is refused, never overwritten (unless it is empty). ``log`` (one line per call, None for
    silence) is told what happens and what it cost (seconds, GiB written).

    The weights are dequantized by transformers (``GgufConfig(dequantize=True)`` where that exists;
    older versions always dequantize), copied into a model built from the plain config (every weight
    accounted for, ``strict``) and saved with ``save_pretrained``. Needs about twice the bf16 model in
    memory, on the CPU. One-line :class:`UserError` for a bad file, an architecture transformers
    cannot load, a full disk or a folder in the way.
    """
    say = log or (lambda line: None)
    p = Path(path).expanduser()
    header = read_header(p)
    target = Path(out).expanduser() if out is not None else converted_dir(p)
    if is_complete(target):
        say(f"using the converted model in {target}")
        return target
    config = gguf_config(p, header)
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        # One converter of a folder at a time, across processes (every rank of a run may ask).
        lock = open_append(parent / f".{target.name}.lock")
    except OSError as exc:
        raise os_error(exc, "write into", parent,
                       "set QLORA_WIZARD_CACHE to a writable folder" if out is None else None) from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_complete(target):  # another process finished it while this one waited
            say(f"using the converted model in {target}")
            return target
        _refuse_in_the_way(target)
        _remove_stale_temp_dirs(parent, target.name)
        quant = header.quant_type
        say(f"converting {p} ({size_words(header.file_size)}{', ' + quant if quant else ''}, {config.model_type}) "
            f"to a bf16 model folder in {target}: transformers dequantizes it on the CPU, "
            "roughly a minute per GB written")
        started = time.perf_counter()
        _build(p, header, target, started)
        seconds = time.perf_counter() - started
        say(f"converted in {seconds:.0f} s: {size_words(_tree_bytes(target))} written to {target}")
        return target
    finally:
        os.close(lock)  # releases the lock


def _build(p: Path, header: GgufHeader, target: Path, started: float) -> None:
    """Write the converted model into an ``mkdtemp`` folder beside ``target`` and rename it into place."""
    import transformers

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _write_converted(p, tmp, header)
        info = {"source": str(p.resolve()), "size": header.file_size, "mtime_ns": p.stat().st_mtime_ns,
                "architecture": header.architecture, "quantization": header.quant_type, "dtype": CONVERT_DTYPE,
                "transformers": transformers.__version__, "seconds": round(time.perf_counter() - started, 1)}
        atomic_write_text(tmp / INFO_FILE, json.dumps(info, indent=1) + "\n")
        atomic_write_text(tmp / COMPLETE_MARKER, f"converted {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        settle_tree(tmp)
        if target.is_dir() and not target.is_symlink():
            target.rmdir()  # empty: checked by _refuse_in_the_way
        os.rename(tmp, target)
    except OSError as exc:
        raise os_error(exc, "write the converted model to", target) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _refuse_in_the_way(target: Path) -> None:
    """A link, a file or a non-empty folder that is not a complete conversion stands at ``target``."""
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise UserError(f"{target} is in the way of the converted model (a file or a link, not a converted folder)",
                        "remove it, or pick another folder")
    if target.is_dir() and any(target.iterdir()):
        raise UserError(f"{target} already holds files but is not a complete converted model",
                        "remove it (qlora-wizard cache clear --only models, for the cache), or pick another folder")


def _write_converted(p: Path, into: Path, header: GgufHeader) -> None:
    """Load, dequantize and save the model, tokenizer and generation config into ``into``."""
    from transformers import AutoTokenizer

    try:
        with _quiet():
            loaded = _load_dequantized(p)
            model = _plain_model(loaded)
            del loaded
            tokenizer = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    except UserError:
        raise
    except MemoryError:
        raise UserError(f"not enough memory to dequantize {p}", "converting needs about twice the bf16 "
                        "model in memory: free memory or use a larger machine") from None
    except OSError as exc:
        if exc.errno is not None:
            raise  # the disk's or the file's: said by the caller with the path
        raise _cannot_read(p, header.architecture, exc) from None  # transformers' own "can't load"
    except Exception as exc:  # noqa: BLE001 - every failure of the library becomes one line
        raise _cannot_read(p, header.architecture, exc) from None
    try:
        with _quiet():
            model.save_pretrained(into)
            tokenizer.save_pretrained(into)
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback
        raise UserError(f"transformers could not save the model converted from {p}: {first_line(exc, 200)}",
                        "use the model's original Hugging Face folder or Hub id instead of the GGUF") from None


def local_model(source: str, log: Callable[[str], Any] | None = None) -> str:
    """The name ``from_pretrained`` should load for ``source``: for a ``.gguf`` file its converted
    folder (converted once, on first use, see :func:`convert_gguf`), anything else unchanged (a Hub
    id, a model folder, the demo model's folder). ``log`` defaults to one line on stderr per step, so
    a command's standard output (``--json``) is never mixed with it; a folder converted before is
    returned without a word. A missing or bad file is a one-line :class:`UserError`."""
    if not is_gguf(source):
        return source
    source = source.strip()
    done = converted_dir(source)
    if is_complete(done):
        return str(done)  # converted before: nothing to say
    return str(convert_gguf(source, log=log or _to_stderr))


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
