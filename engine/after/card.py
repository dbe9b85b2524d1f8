"""Sharing a run: its model card (``qlora-wizard card``) and the upload (``qlora-wizard push``).

The card is written from what the run recorded, never typed by hand: the base model, the data
statistics (the start event's), the final training and validation losses, the loss curves as a
picture (``curves.svg`` beside it), how to load the result, and the whole preset as YAML. It goes to
``RUN_DIR/README.md`` whether or not anything is pushed.

``push`` uploads the adapter (``RUN_DIR/adapter``) or a merged folder with that card and picture,
through huggingface_hub (``HfApi.create_repo`` and ``upload_folder``) with the standard login: the
``HF_TOKEN`` variable or the token ``hf auth login`` stored. No token, no network, a refused token
or repo: one line, exit status 2.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from engine.after.session import FinishedRun, finished_run
from engine.errors import UserError, first_line, os_error
from engine.events import finite

CARD_FILE = "README.md"
CURVES_FILE = "curves.svg"


def _is_hub_id(source: str) -> bool:
    """Whether a model source names a Hub repository (``org/name``) rather than a folder or the demo."""
    return (not source.startswith("builtin:") and source.count("/") == 1 and not Path(source).exists()
            and not source.startswith((".", "/", "~")))


def _load_snippet(run: FinishedRun, where: str, merged: bool) -> str:
    """Python that loads the result: the merged folder with transformers, or base plus adapter with peft."""
    quoted = json.dumps(where)
    if merged:
        return ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f"model = AutoModelForCausalLM.from_pretrained({quoted})\n"
                f"tokenizer = AutoTokenizer.from_pretrained({quoted})\n")
    source = run.preset.model.source
    if source.startswith("builtin:"):
        head = "from engine.demo import ensure_demo_model  # the qlora-wizard demo model, created locally\n"
        base = "ensure_demo_model()"
    else:
        head, base = "", json.dumps(source)
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


def card_text(run: FinishedRun, *, repo_id: str | None = None, merged: str | Path | None = None) -> str:
    """The model card (Markdown with the Hub's YAML header) for the run's adapter or a merged folder."""
    import yaml

    preset, history = run.preset, run.history
    source = preset.model.source
    start, end = history.start, history.end
    data = dict(start.data) if start else {}
    where = repo_id or str(Path(merged) if merged else run.adapter)
    meta: dict = {}
    if _is_hub_id(source):
        meta["base_model"] = source
    meta["library_name"] = "transformers" if merged else "peft"
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = ["qlora-wizard", "qlora", "lora"] + ([] if merged else ["peft"])
    kind = ("The model {base} with a LoRA adapter, trained with QLoRA, merged into it" if merged
            else "A LoRA adapter (PEFT format) for {base}, trained with QLoRA")
    q, lora, t = preset.quantization, preset.lora, preset.training
    base_line = f"[{source}](https://huggingface.co/{source})" if _is_hub_id(source) else f"`{source}`"
    if source.startswith("builtin:"):
        base_line += " (the qlora-wizard offline demo model)"
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
    rows = [("format", data.get("format")), ("training examples", data.get("examples")),
            ("validation examples", data.get("validation_examples")), ("training tokens", data.get("tokens")),
            ("supervised tokens (trained)", data.get("supervised_tokens")),
            ("validation tokens scored", data.get("validation_supervised_tokens")),
            ("mean / longest example (tokens)",
             f"{data.get('mean_len', 0):,.0f} / {data.get('max_len', 0):,}" if data else None),
            ("sequence length", data.get("seq_len")), ("truncated examples", data.get("truncated")),
            ("removed duplicates", data.get("removed_duplicates"))]
    lines += [f"| {name} | {value:,} |" if isinstance(value, int) else f"| {name} | {value} |"
              for name, value in rows if value is not None]
    last = history.last_step
    val = history.evals[-1] if history.evals else None
    lines += ["", "## Training", ""]
    lines.append(f"- {history.step:,} optimizer steps, learning rate {t.learning_rate:g} ({t.lr_scheduler}), "
                 f"effective batch {t.micro_batch_size * t.gradient_accumulation_steps}"
                 + (f", on {start.device_name}" if start and start.device_name else "")
                 + (f", in {end.elapsed_s / 60:.1f} minutes" if end and end.elapsed_s else ""))
    if last is not None and finite(last.loss) is not None:
        lines.append(f"- final training loss: {last.loss:.4f} (step {last.step})")
    if val is not None and finite(val.eval_loss) is not None:
        lines.append(f"- final validation loss: {val.eval_loss:.4f} (step {val.step})")
    lines += ["", f"![training and validation loss]({CURVES_FILE})", "",
              "## How to use it", "", "```python", _load_snippet(run, where, bool(merged)).rstrip(), "```", "",
              _prompt_layout(run), "",
              "## The preset", "", "The whole setup, as run (`qlora-wizard --preset FILE` runs it again):", "",
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


def _check_merged(folder: Path) -> None:
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise UserError(f"--merged {folder} is not a merged model folder (no config.json and *.safetensors)",
                        "make one with `qlora-wizard merge RUN_DIR --out DIR`")


def push_run(run_dir, repo_id: str, *, merged: str | Path | None = None, private: bool = False,
             progress: Callable[[str], None] | None = None) -> str:
    """Upload the run's adapter (or the ``merged`` folder) with its card and curves to the Hub repo
    ``repo_id`` (created if it is not there); returns the repo's address. The card is written to
    ``RUN_DIR/README.md`` first, whatever happens after."""
    say = progress or (lambda line: None)
    run = finished_run(run_dir)
    folder = Path(merged) if merged else run.adapter
    if merged:
        _check_merged(folder)
    card = write_card(run.run_dir, repo_id=repo_id, merged=merged)
    say(f"model card written to {card}")
    from huggingface_hub import HfApi, constants, get_token

    token = get_token()
    if not token:
        raise UserError(f"no Hugging Face token to push with (the card is in {card})",
                        "log in with `hf auth login`, or set HF_TOKEN to a token with write access")
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"HF_HUB_OFFLINE is set, so nothing can be pushed (the card is in {card})",
                        "unset HF_HUB_OFFLINE")
    staging = Path(tempfile.mkdtemp(prefix=".push-", dir=run.run_dir))
    try:
        for f in folder.iterdir():
            if f.is_file() and f.name != CARD_FILE:
                os.symlink(f.resolve(), staging / f.name)
        shutil.copyfile(card, staging / CARD_FILE)
        shutil.copyfile(run.run_dir / CURVES_FILE, staging / CURVES_FILE)
        api = HfApi(token=token)
        say(f"creating {repo_id} on {constants.ENDPOINT}" + (" (private)" if private else ""))
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        say(f"uploading {folder}")
        api.upload_folder(repo_id=repo_id, folder_path=staging, repo_type="model",
                          commit_message=f"{'merged model' if merged else 'adapter'} from qlora-wizard run "
                                         f"{run.run_dir.name}")
    except _hub_errors() as exc:
        raise UserError(f"cannot push to {repo_id} on {constants.ENDPOINT}: {first_line(exc)} "
                        f"(the card is in {card})",
                        "check the network, the repo id and that the token may write to it") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(url)
