"""Sharing a run: its model card (``qlora-wizard card``) and the upload (``qlora-wizard push``).

The card is written from what the run recorded, never typed by hand: the base model, the data
statistics (the start event's), the final training and validation losses, the loss curves as a
picture (``curves.svg`` beside it), how to load the result, and the preset as YAML. It goes to
``RUN_DIR/README.md`` whether or not anything is pushed, and it is the card that gets uploaded.

What is shared never names this machine: the card shows :func:`shareable_preset` (local paths
reduced to names: a local base model by its ``config.json``'s Hub id or its folder's name, a data
file by its file name, ``output.runs_dir`` by its last component), and the uploaded
``adapter_config.json`` names the base the same way (the run's own adapter folder is never changed:
a rewritten copy is staged).

``push`` is two steps, both here as data and actions, no questions (the front end asks):
:func:`plan_push` works out what would go where (the repo, private unless ``public``, the files on an
allow-list with their sizes, the files left out, the card) and writes the card; :func:`push_run`
uploads exactly that plan through huggingface_hub (``HfApi.create_repo`` and ``upload_folder``) with
the standard login: the ``HF_TOKEN`` variable or the token ``hf auth login`` stored. No token, no
network, a refused token or repo: one line, exit status 2.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import socket
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from engine.after.session import FinishedRun, finished_run
from engine.errors import UserError, first_line, os_error
from engine.events import StartData, finite
from engine.gguf import is_gguf
from engine.preset import Preset

CARD_FILE = "README.md"
CURVES_FILE = "curves.svg"
CURVES_PNG = "curves.png"

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9_][\w.-]*")
"""What a Hub repository id looks like: ``org/name``."""
_REPO_ID = re.compile(r"([A-Za-z0-9][\w.-]*/)?[A-Za-z0-9_][\w.-]*")
"""A repo id ``push`` accepts: ``org/name``, or ``name`` in the token's own namespace."""
_DATA_SUFFIXES = {".jsonl", ".ndjson", ".json", ".csv", ".parquet", ".pq", ".txt", ".arrow"}


# ---------------------------------------------------------------------------------------------
# Names that can be shared


def _looks_like_hub_id(value: str) -> bool:
    return bool(_HUB_ID.fullmatch(value)) and ".." not in value and not value.startswith(".")


def _is_hub_id(source: str) -> bool:
    """Whether a model source names a Hub repository (``org/name``) rather than a folder or the demo."""
    return (not source.startswith("builtin:") and _looks_like_hub_id(source)
            and not Path(source).expanduser().exists())


def _folder_name(value: str) -> str:
    """The last component of a path (``.`` and ``~`` resolved), never empty."""
    path = Path(value).expanduser()
    name = path.name or path.resolve().name
    if name in ("", ".", ".."):
        name = path.resolve().name
    return name or "model"


def shareable_model_name(source: str) -> str:
    """How a model source is named where others read it: a Hub id or ``builtin:`` name as it is; a
    local folder by its ``config.json``'s ``_name_or_path`` when that is a Hub id, else the folder's name."""
    source = source.strip()
    if source.startswith("builtin:") or _is_hub_id(source):
        return source
    try:
        named = json.loads((Path(source).expanduser() / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        named = None
    if isinstance(named, str) and _looks_like_hub_id(named.strip()):
        return named.strip()
    return _folder_name(source)


def _data_is_local(value: str) -> bool:
    path = Path(value).expanduser()
    return (os.path.isabs(value) or value.startswith((".", "~")) or path.suffix.lower() in _DATA_SUFFIXES
            or path.exists() or not _looks_like_hub_id(value) and os.sep in value)


def shareable_data_name(value: str | None) -> str | None:
    """A data source as others may read it: ``builtin:demo``, a Hub dataset id or a split name as it is;
    a local file by its file name."""
    if value is None:
        return None
    value = value.strip()
    if value.startswith("builtin:") or not _data_is_local(value):
        return value
    return Path(value).expanduser().name or value


def shareable_preset(preset: Preset) -> Preset:
    """The preset with every local path reduced to a name, for a card others read: ``model.source`` (see
    :func:`shareable_model_name`), ``lora.init_from`` (a folder's name), ``data.train`` and
    ``data.validation`` (file names), ``output.runs_dir`` (its last component). Hub ids and
    ``builtin:`` sources stay as they are; every other setting is unchanged."""
    shared = preset.model_copy(deep=True)
    shared.model.source = shareable_model_name(preset.model.source)
    init_from = preset.lora.init_from
    if init_from and not (init_from.startswith("builtin:") or _is_hub_id(init_from)):
        shared.lora.init_from = _folder_name(init_from)
    shared.data.train = shareable_data_name(preset.data.train)
    shared.data.validation = shareable_data_name(preset.data.validation)
    runs = Path(preset.output.runs_dir).expanduser().name
    shared.output.runs_dir = runs if runs not in ("", ".", "..") else "runs"
    return shared


# ---------------------------------------------------------------------------------------------
# The card


def _where_name(repo_id: str | None, merged: str | Path | None) -> str:
    """What the card's load snippet loads from: the Hub repo, else a name relative to the run folder."""
    if repo_id:
        return repo_id
    return _folder_name(str(merged)) if merged else "adapter"


def _load_snippet(run: FinishedRun, base_name: str, where: str, merged: bool) -> str:
    """Python that loads the result: the merged folder with transformers, or base plus adapter with peft."""
    quoted = json.dumps(where)
    if merged:
        return ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f"model = AutoModelForCausalLM.from_pretrained({quoted})\n"
                f"tokenizer = AutoTokenizer.from_pretrained({quoted})\n")
    if base_name.startswith("builtin:"):
        head = "from engine.demo import ensure_demo_model  # the qlora-wizard demo model, created locally\n"
        base = "ensure_demo_model()"
    elif is_gguf(run.preset.model.source):
        name = Path(run.preset.model.source).name
        head = (f"# {name}: your copy of the base GGUF, in the working folder (pip install gguf); transformers\n"
                "# dequantizes it as it was for training\n")
        base = f'".", gguf_file={json.dumps(name)}'
    else:
        head, base = "", json.dumps(base_name)
        if not _is_hub_id(run.preset.model.source):
            head = f"# {base}: your copy of the base model (it was a local folder when trained)\n"
    return (f"{head}from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"base = AutoModelForCausalLM.from_pretrained({base})\n"
            f"model = PeftModel.from_pretrained(base, {quoted})\n"
            f"tokenizer = AutoTokenizer.from_pretrained({quoted})\n")


def _prompt_layout(run: FinishedRun) -> str:
    """How prompts are laid out, as in training."""
    from engine.data.formats import get_format

    if run.format == "auto":
        return "The prompt layout is the run's data format's (see the preset below)."
    form = get_format(run.format)
    try:
        text = form.render_prompt("{your prompt}", None, False).text
    except AttributeError:  # a conversation format: the tokenizer's chat template
        return ("Prompts go through the tokenizer's chat template "
                "(`tokenizer.apply_chat_template(messages, add_generation_prompt=True)`), as in training.")
    return (f"It was trained on `{run.format}` examples; give it a prompt laid out as in training, "
            f"and it writes the response:\n\n```text\n{text}\n```")


METHOD_WORDS = {"dpo": "Direct Preference Optimization (DPO)", "orpo": "Odds Ratio Preference Optimization (ORPO)"}
"""The preference methods as a model card names them (sft is the card's default, unnamed)."""


def card_text(run: FinishedRun, *, repo_id: str | None = None, merged: str | Path | None = None) -> str:
    """The model card (Markdown with the Hub's YAML header) for the run's adapter or a merged folder.
    It names no local path: the preset in it is :func:`shareable_preset`'s."""
    import yaml

    preset, history = shareable_preset(run.preset), run.history
    source = preset.model.source
    hub_base = _is_hub_id(run.preset.model.source)
    start, end = history.start, history.end
    data = start.data if start else StartData()
    where = _where_name(repo_id, merged)
    meta: dict = {}
    if hub_base:
        meta["base_model"] = source
    meta["library_name"] = "transformers" if merged else "peft"
    meta["pipeline_tag"] = "text-generation"
    q, lora, t = preset.quantization, preset.lora, preset.training
    method = METHOD_WORDS.get(t.method)
    meta["tags"] = (["qlora-wizard", "qlora", "lora"] + ([] if merged else ["peft"])
                    + ([t.method, "trl"] if method else []))
    trained = "trained with QLoRA" + (f" by {method}" if method else "")
    kind = ("The model {base} with a LoRA adapter, " + trained + ", merged into it" if merged
            else "A LoRA adapter (PEFT format) for {base}, " + trained)
    base_line = f"[{source}](https://huggingface.co/{source})" if hub_base else f"`{source}`"
    if source.startswith("builtin:"):
        base_line += " (the qlora-wizard offline demo model)"
    elif is_gguf(run.preset.model.source):
        base_line += " (a local GGUF file, dequantized to bf16 for training)"
    elif not hub_base:
        base_line += " (a local copy)"
    quant = ("the base loaded in 4 bits (" + q.method.upper() + (", double quantization" if q.double_quant else "")
             + ")" if q.method != "none" else "the base in 16 bits (plain LoRA)")
    targets = start.targets if start and start.targets else lora.targets
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
        f"# {repo_id.split('/')[-1] if repo_id else run.run_dir.name}", "",
        kind.format(base=base_line) + " by qlora-wizard. This card is written from the run's own records.", "",
        "## Base model", "",
        f"- model: {base_line}" + (f" at revision `{preset.model.revision}`" if preset.model.revision else ""),
        f"- training: {quant}; LoRA rank {lora.r}, alpha {lora.alpha:g}, dropout {lora.dropout:g} on "
        f"{', '.join(targets) if isinstance(targets, list) else targets}",
    ]
    if merged:
        lines.append("- merged: the adapter added into the base reloaded in 16 bits or more (not into 4-bit "
                     "weights), with peft's `merge_and_unload`")
    lines += ["", "## Data", "", "| | |", "|---|---|", f"| source | `{preset.data.train}` |"]
    rows = [("format", data.format), ("training examples", data.examples),
            ("validation examples", data.validation_examples), ("training tokens", data.tokens),
            ("supervised tokens (trained)", data.supervised_tokens),
            ("validation tokens scored", data.validation_supervised_tokens),
            ("mean / longest example (tokens)",
             None if data.empty else f"{data.mean_len or 0:,.0f} / {data.max_len or 0:,}"),
            ("sequence length", data.seq_len), ("truncated examples", data.truncated),
            ("removed duplicates", data.removed_duplicates)]
    lines += [f"| {name} | {value:,} |" if isinstance(value, int) else f"| {name} | {value} |"
              for name, value in rows if value is not None]
    last = history.last_step
    val = history.evals[-1] if history.evals else None
    lines += ["", "## Training", ""]
    if method:
        lines.append(f"- method: {method} on TRL's trainer, beta {t.beta:g}"
                     + (f", loss {t.dpo_loss}" if t.method == "dpo" else "")
                     + (f", reference log-probabilities {start.reference.replace('_', ' ')}"
                        if start and start.reference else ""))
    lines.append(f"- {history.step:,} optimizer steps, learning rate {t.learning_rate:g} ({t.lr_scheduler}), "
                 f"effective batch {t.micro_batch_size * t.gradient_accumulation_steps}"
                 + (f", on {start.device_name}" if start and start.device_name else "")
                 + (f", in {end.elapsed_s / 60:.1f} minutes" if end and end.elapsed_s else ""))
    if last is not None and finite(last.loss) is not None:
        lines.append(f"- final training loss: {last.loss:.4f} (step {last.step})")
    if val is not None and finite(val.eval_loss) is not None:
        lines.append(f"- final validation loss: {val.eval_loss:.4f} (step {val.step})")
    if val is not None and val.eval_reward_accuracy is not None:
        lines.append(f"- final preference accuracy on the validation pairs: {val.eval_reward_accuracy:.0%}, "
                     f"reward margin {val.eval_reward_margin:+.3f} (step {val.step})")
    loads_from = ("" if repo_id else
                  f"\n`{where}` is {'the merged folder' if merged else 'the run folder' + chr(39) + 's `adapter/`'}, "
                  "or the Hub repo it is pushed to.\n")
    pictured = "training and validation loss" + (", reward margin and preference accuracy" if method else "")
    lines += ["", f"![{pictured}]({CURVES_FILE})", "",
              "## How to use it", "", "```python",
              _load_snippet(run, source, where, bool(merged)).rstrip(), "```", loads_from,
              _prompt_layout(run), "",
              "## The preset", "",
              "The setup as run, with local paths reduced to names (`qlora-wizard --preset FILE` runs it "
              "again once they point at your copies):", "",
              "```yaml", preset.to_yaml().rstrip(), "```", ""]
    return "\n".join(lines)


def write_card(run_dir, *, repo_id: str | None = None, merged: str | Path | None = None) -> Path:
    """Write ``RUN_DIR/README.md`` (the card) and the curves it shows (``curves.svg``, ``curves.png``)."""
    from engine.after.plot import write_curves
    from engine.preset import atomic_write_text

    run = finished_run(run_dir)
    write_curves(run.run_dir, run.run_dir / CURVES_FILE)
    path = run.run_dir / CARD_FILE
    try:
        atomic_write_text(path, card_text(run, repo_id=repo_id, merged=merged))
    except OSError as exc:
        raise os_error(exc, "write", path) from None
    return path


# ---------------------------------------------------------------------------------------------
# What a push uploads

ADAPTER_FILES = frozenset({"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"})
TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
    "chat_template.json", "generation_config.json", "config.json"})
"""Files beside the weights that belong in a model repo (tokenizer, chat template, generation settings)."""
MERGED_INDEX = "model.safetensors.index.json"
_SCRUBBED_JSON = frozenset({"adapter_config.json", "config.json", "generation_config.json", "tokenizer_config.json",
                            "special_tokens_map.json", "chat_template.json", MERGED_INDEX})
"""The small JSON files whose local paths are rewritten in the staged copy (never in the run's folder)."""
_BASE_KEYS = ("base_model_name_or_path", "_name_or_path", "name_or_path")
_VOCAB_FILES = frozenset({"tokenizer.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
                          "sentencepiece.bpe.model", "added_tokens.json"})
_COMMON_NAMES = frozenset({"root", "user", "admin", "ubuntu", "runner", "jovyan", "localhost", "vm", "host"})


def allowed_in_repo(name: str, merged: bool) -> bool:
    """Whether a file of the adapter (or merged) folder belongs in the model repo."""
    if name in TOKENIZER_FILES:
        return True
    if merged:
        return name == MERGED_INDEX or name.endswith(".safetensors")
    return name in ADAPTER_FILES


@dataclass(frozen=True)
class PushFile:
    """One file of the upload."""

    name: str
    """Its name in the repo."""
    size: int
    """Bytes uploaded."""
    source: Path | None = None
    """The file on disk it is (staged as a link), or None when ``content`` is staged instead."""
    content: bytes | None = None
    """What is staged instead of the file on disk: the card, or a JSON file with local paths rewritten."""
    note: str = ""
    """What was changed for sharing, in words (empty for a file uploaded as it is)."""


@dataclass(frozen=True)
class PushPlan:
    """What ``push`` would upload where, worked out before anything leaves the machine."""

    run: FinishedRun
    repo_id: str
    private: bool
    """True unless asked for a public repo (``public=True``)."""
    folder: Path
    """The adapter folder, or the merged folder."""
    merged: Path | None
    files: tuple[PushFile, ...]
    """What is uploaded, in order, with sizes (the card and the curves included)."""
    left_out: tuple[str, ...]
    """Names in ``folder`` that are not uploaded (not on the allow-list of a model repo)."""
    card: str
    """The card's text (as in ``card_path``)."""
    card_path: Path
    """``RUN_DIR/README.md``, the card written locally."""
    renamed: tuple[tuple[str, str], ...] = ()
    """(local path, name shown) for every local path the upload names by a name instead."""
    warnings: tuple[str, ...] = field(default=())
    """Things a person should look at before consenting (e.g. a file mentions the user or host name)."""

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def visibility(self) -> str:
        return "private" if self.private else "PUBLIC"

    @property
    def what(self) -> str:
        return "the merged model" if self.merged else "the adapter"

    def summary(self, card_lines: int = 30) -> str:
        """The plan in words: repo and visibility, the files with sizes, what is left out, the card's start."""
        head = (f"push {self.what} of {self.run.run_dir} to the Hugging Face Hub repo {self.repo_id}, "
                + ("private (only you and those you share it with can see it; --public publishes it)" if self.private
                   else "PUBLIC (anyone can see and download it)"))
        out = [head, f"files to upload ({len(self.files)}, {_size(self.total_size)}):"]
        width = max(len(f.name) for f in self.files)
        for f in self.files:
            out.append(f"  {f.name:<{width}}  {_size(f.size):>10}" + (f"  ({f.note})" if f.note else ""))
        if self.left_out:
            out.append(f"left out (not part of a model repo): {', '.join(self.left_out)}")
        for local, name in self.renamed:
            out.append(f"named without its local path: {local} -> {name}")
        out += [f"warning: {w}" for w in self.warnings]
        lines = self.card.rstrip("\n").splitlines()
        shown = lines[:card_lines]
        out.append(f"the model card ({CARD_FILE}), "
                   + (f"its first {len(shown)} of {len(lines)} lines; all of it in {self.card_path}:"
                      if len(shown) < len(lines) else f"all of it (also in {self.card_path}):"))
        out += [f"  | {line}".rstrip() for line in shown]
        return "\n".join(out)

    def stage(self, into: Path) -> Path:
        """Lay the upload out in the (new or empty) folder ``into``: links to the files uploaded as they are, copies
        of the rewritten ones and the card. The run's own folders are not touched."""
        into.mkdir(parents=True, exist_ok=True)
        for f in self.files:
            target = into / f.name
            if f.content is not None:
                target.write_bytes(f.content)
            else:
                os.symlink(f.source.resolve(), target)
        return into


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} B"


def _local_path_value(value: str) -> bool:
    """Whether a string in a config is an absolute or home-relative local path."""
    return (len(value) > 2 and "\n" not in value and not value.startswith("//")
            and (os.path.isabs(value) or value.startswith("~/") or re.match(r"[A-Za-z]:[\\/]", value) is not None)
            and any(ch.isalnum() for ch in value))


def _scrub(value, base_name: str, changed: list[str], key: str | None = None):
    """A JSON value with the base model named ``base_name`` and every other local path by its last component."""
    if isinstance(value, dict):
        return {k: _scrub(v, base_name, changed, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, base_name, changed) for v in value]
    if isinstance(value, str):
        if key in _BASE_KEYS and value and value != base_name:
            changed.append(f"{key}: {base_name}")
            return base_name
        if _local_path_value(value):
            name = Path(value.replace("\\", "/")).name or "path"
            changed.append(f"{key or 'a path'}: {name}")
            return name
    return value


def _scrubbed_json(path: Path, base_name: str) -> tuple[bytes | None, str]:
    """The staged content of a small JSON file with local paths rewritten, or None when it needs none."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, ""
    changed: list[str] = []
    scrubbed = _scrub(data, base_name, changed)
    if not changed:
        return None, ""
    text = json.dumps(scrubbed, indent=2, ensure_ascii=False) + "\n"
    return text.encode("utf-8"), "rewritten: " + "; ".join(dict.fromkeys(changed))


def _private_paths(run: FinishedRun, merged: Path | None) -> tuple[list[str], list[str]]:
    """Local paths that must not appear in anything uploaded: the run's, the model's, the data's (first
    list), and the home folder's (second list)."""
    from engine.data.sources import resolve_data_path
    from engine.demo import DEMO_MODEL, demo_model_dir

    paths: set[str] = set()

    def add(value: str | os.PathLike | None) -> None:
        if not value:
            return
        p = Path(value).expanduser()
        for form in (p.absolute(), p.resolve()):
            text = str(form)
            if len(text) > 1 and text != os.sep:
                paths.add(text)

    add(run.run_dir)
    add(merged)
    preset = run.preset
    source = preset.model.source
    if not _is_hub_id(source):
        add(demo_model_dir() if source.strip() == DEMO_MODEL else None if source.startswith("builtin:") else source)
    for value in (preset.data.train, preset.data.validation):
        if value and (value.startswith("builtin:") or _data_is_local(value)):
            add(resolve_data_path(value))
    if preset.lora.init_from and not _is_hub_id(preset.lora.init_from):
        add(preset.lora.init_from)
    if os.path.isabs(preset.output.runs_dir) or preset.output.runs_dir.startswith("~"):
        add(preset.output.runs_dir)
    user = _user_name()
    homes = set()
    for home in {os.path.expanduser("~"), os.environ.get("HOME", "")} | (
            {f"/home/{user}", f"/Users/{user}"} if user else set()):
        home = home.rstrip("/\\")
        if len(home) > 1:
            homes.add(home + "/")
    return sorted(paths, key=len, reverse=True), sorted(homes)


def _user_name() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name known (a container without passwd entry)
        return ""


def _scanned_bytes(f: PushFile, limit: int = 256 * 2**20) -> bytes:
    """What of a file is searched for private strings: all of it, or a safetensors file's JSON header."""
    if f.content is not None:
        return f.content
    assert f.source is not None
    with open(f.source, "rb") as fh:
        if f.name.endswith(".safetensors"):
            head = fh.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            return fh.read(min(n, limit))
        return fh.read(limit)


def _check_private(files: tuple[PushFile, ...], paths: list[str], homes: list[str]) -> list[str]:
    """Refuse an upload that would carry a local path (the home folder's too, except in a vocabulary,
    whose tokens may spell one); the words of warnings for bare user and host names."""
    names = {n for n in (_user_name(), socket.gethostname(), socket.gethostname().split(".")[0])
             if len(n) >= 4 and n.lower() not in _COMMON_NAMES}
    warnings = []
    for f in files:
        blob = _scanned_bytes(f)
        for p in paths + ([] if f.name in _VOCAB_FILES else homes):
            if p.encode() in blob or p.replace("/", "\\").encode() in blob:
                raise UserError(f"nothing uploaded: {f.name} would carry the local path {p}",
                                "remove it from that file (qlora-wizard names models and data by their "
                                "names; this is a file it did not write)")
        text = blob.decode("utf-8", "replace")
        for n in names:
            if re.search(rf"(?<![\w.-]){re.escape(n)}(?![\w-])", text, re.IGNORECASE):
                warnings.append(f"{f.name} mentions {n!r}, this machine's user or host name")
    return warnings


def _check_merged(folder: Path) -> None:
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise UserError(f"--merged {folder} is not a merged model folder (no config.json and *.safetensors)",
                        "make one with `qlora-wizard merge RUN_DIR --out DIR`")


def plan_push(run_dir, repo_id: str, *, merged: str | Path | None = None, public: bool = False) -> PushPlan:
    """What ``push`` would upload: the run's adapter (or the ``merged`` folder) files that belong in a
    model repo, ``adapter_config.json`` and other small configs with local paths rewritten, the card and
    the curves; private unless ``public``. Writes the card (``RUN_DIR/README.md``) and the curves;
    uploads nothing. Raises :class:`UserError` (one line) for a run or folder that cannot be pushed, or
    for a file that would carry a local path."""
    run = finished_run(run_dir)
    repo_id = repo_id.strip()
    if not _REPO_ID.fullmatch(repo_id) or ".." in repo_id:
        raise UserError(f"{repo_id!r} is not a Hub repo id", "name it as you/name or org/name")
    folder = Path(merged) if merged else run.adapter
    if merged:
        _check_merged(folder)
    card_path = write_card(run.run_dir, repo_id=repo_id, merged=merged)
    card = card_path.read_text(encoding="utf-8")
    base_name = (run.preset.model.source if _is_hub_id(run.preset.model.source)
                 else shareable_model_name(run.preset.model.source))
    files: list[PushFile] = []
    left_out: list[str] = []
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        name = path.name
        if name == CARD_FILE and path.is_file():
            left_out.append(f"{name} (the folder's own; the model card replaces it)")
            continue
        if not path.is_file() or not allowed_in_repo(name, bool(merged)):
            left_out.append(name + ("/" if path.is_dir() else ""))
            continue
        content, note = _scrubbed_json(path, base_name) if name in _SCRUBBED_JSON else (None, "")
        files.append(PushFile(name, len(content) if content is not None else path.stat().st_size,
                              None if content is not None else path, content, note))
    if not any(f.name in ("adapter_model.safetensors", "adapter_model.bin") or f.name.endswith(".safetensors")
               for f in files):
        raise UserError(f"{folder} has no weights to push (no adapter_model.safetensors or *.safetensors)")
    data = card.encode("utf-8")
    files.append(PushFile(CARD_FILE, len(data), content=data, note="the model card"))
    for name in (CURVES_FILE, CURVES_PNG):
        path = run.run_dir / name
        if path.is_file():
            files.append(PushFile(name, path.stat().st_size, source=path))
    renamed = []
    shared = shareable_preset(run.preset)
    for local, name in ((run.preset.model.source, shared.model.source), (run.preset.data.train, shared.data.train),
                        (run.preset.data.validation, shared.data.validation),
                        (run.preset.lora.init_from, shared.lora.init_from)):
        if local and local != name:
            renamed.append((local, name))
    files_t = tuple(files)
    warnings = _check_private(files_t, *_private_paths(run, Path(merged) if merged else None))
    return PushPlan(run, repo_id, not public, folder, Path(merged) if merged else None, files_t, tuple(left_out),
                    card, card_path, tuple(renamed), tuple(warnings))


# ---------------------------------------------------------------------------------------------
# The upload


def _hub_errors() -> tuple[type[BaseException], ...]:
    """The exceptions an upload can end with that are the network's or the Hub's, not a bug:
    huggingface_hub's (HTTP errors are OSErrors; a bad repo id a ValueError) and its HTTP client's."""
    errors: list[type[BaseException]] = [OSError, ValueError]
    for module, name in (("httpx", "HTTPError"), ("httpx2", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def hub_token(plan: PushPlan) -> str:
    """The token to push with; one line when there is none or the Hub is switched off (``HF_HUB_OFFLINE``)."""
    from huggingface_hub import constants, get_token

    token = get_token()
    if not token:
        raise UserError(f"no Hugging Face token to push with (the card is in {plan.card_path})",
                        "log in with `hf auth login`, or set HF_TOKEN to a token with write access")
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"HF_HUB_OFFLINE is set, so nothing can be pushed (the card is in {plan.card_path})",
                        "unset HF_HUB_OFFLINE")
    return token


def push_run(plan: PushPlan, progress: Callable[[str], None] | None = None) -> str:
    """Upload exactly the plan's files to its repo (created, private unless the plan is public, when it is
    not there); returns the repo's address. A repo that exists and is public is refused for a private plan.
    The staging folder (in the run folder) is removed whatever happens."""
    from huggingface_hub import HfApi, constants

    say = progress or (lambda line: None)
    token = hub_token(plan)
    repo_id = plan.repo_id
    staging = Path(tempfile.mkdtemp(prefix=".push-", dir=plan.run.run_dir))
    try:
        plan.stage(staging)
        api = HfApi(token=token)
        say(f"creating {repo_id} on {constants.ENDPOINT} ({plan.visibility})")
        url = api.create_repo(repo_id, private=plan.private, exist_ok=True, repo_type="model")
        info = api.repo_info(repo_id, repo_type="model")
        if plan.private and getattr(info, "private", None) is False:
            raise UserError(f"{repo_id} already exists on {constants.ENDPOINT} and is public; nothing uploaded",
                            "make it private on the Hub first, or pass --public to publish there")
        say(f"uploading {len(plan.files)} files ({_size(plan.total_size)}) from {plan.folder}")
        api.upload_folder(repo_id=repo_id, folder_path=staging, repo_type="model",
                          allow_patterns=[f.name for f in plan.files],
                          commit_message=f"{'merged model' if plan.merged else 'adapter'} from qlora-wizard run "
                                         f"{plan.run.run_dir.name}")
    except UserError:
        raise
    except _hub_errors() as exc:
        raise UserError(f"cannot push to {repo_id} on {constants.ENDPOINT}: {first_line(exc)} "
                        f"(the card is in {plan.card_path})",
                        "check the network, the repo id and that the token may write to it") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(url)
