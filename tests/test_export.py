"""``qlora-wizard export``: a GGUF that runs in llama.cpp as the run's model ran in training.

On the demo run (llama architecture): f16 and q8_0 exports read back with transformers' GGUF loader
(logits close to the merged model's), the GGUF's chat template renders the training prompt byte for
byte, the Modelfile's template and stops, llama.cpp's check (where llama-cpp-python is installed, as
in CI); on tiny random models of qwen2, qwen3, mistral and gemma3 the same export and check; the
refusals, one ``error:`` line each with nothing written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import assert_gguf_config_is_transformers, copied_run, run_cli, trained_in_process, write_preset
from engine.after.export import converter_installed, llama_cpp_installed

needs_converter = pytest.mark.skipif(
    not converter_installed(), reason="llama.cpp's converter is not installed: pip install -e '.[export]'")
needs_llama_cpp = pytest.mark.skipif(
    not llama_cpp_installed(), reason="llama-cpp-python is not installed: pip install -e '.[export-check]'")

PROMPTS = ["Reverse the letters of the word.\n\nfree", "Write the word \"bear\" in capital letters.",
           "Spell \"pair\" with dashes.\n\n", "A first line\nand a second.\n\nan input\n\nwith a blank line"]


def _export(run_dir: Path, out: Path, *args: str) -> dict:
    r = run_cli("export", str(run_dir), "--out", str(out), "--json", *args, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def demo_exports(demo_run, tmp_path_factory) -> dict[str, dict]:
    """The demo run exported as q8_0 (merging itself) and as f16 (from a `merge` folder)."""
    if not converter_installed():
        pytest.skip("llama.cpp's converter is not installed: pip install -e '.[export]'")
    tmp = tmp_path_factory.mktemp("exports")
    merged = tmp / "merged"
    r = run_cli("merge", str(demo_run), "--out", str(merged), timeout=600)
    assert r.returncode == 0, r.stderr
    exports = {"q8_0": _export(demo_run, tmp / "q8"),
               "f16": _export(demo_run, tmp / "f16", "--quant", "f16", "--merged", str(merged)),
               "merged": {"path": str(merged)}}
    if llama_cpp_installed():
        exports["q4_k_m"] = _export(demo_run, tmp / "q4", "--quant", "q4_k_m", "--merged", str(merged))
    return exports


def _readback_logits(gguf: Path, merged: Path, text: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged)
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)(ids).logits
        want = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(ids).logits
    return got, want


@needs_converter
@pytest.mark.parametrize("quant,tolerance", [("f16", 0.01), ("q8_0", 0.15)])
def test_the_gguf_reads_back_in_transformers_with_the_merged_models_logits(demo_exports, quant, tolerance):
    result = demo_exports[quant]
    gguf = Path(result["gguf"])
    out = gguf.parent
    assert sorted(p.name for p in out.iterdir()) == sorted([gguf.name, "Modelfile", "README.md", "export.json"])
    assert gguf.name == f"run-{quant}.gguf" and result["gguf_bytes"] == gguf.stat().st_size
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "a scratch folder was left behind"
    got, want = _readback_logits(gguf, Path(demo_exports["merged"]["path"]), PROMPTS[0])
    assert float((got - want).abs().max()) < tolerance * float(want.abs().max()), float((got - want).abs().max())
    assert json.loads((out / "export.json").read_text())["gguf"] == str(gguf)


@needs_converter
def test_the_ggufs_chat_template_renders_the_training_prompt_byte_for_byte(demo_exports, demo_run):
    from engine.after.session import finished_run, load_tokenizer
    from engine.after.template import render
    from engine.data.formats import get_format
    from engine.gguf import read_header

    gguf = Path(demo_exports["q8_0"]["gguf"])
    meta = read_header(gguf).metadata
    template = meta["tokenizer.chat_template"]
    run = finished_run(demo_run)
    tok = load_tokenizer(run)
    assert run.format == "alpaca"
    for prompt in PROMPTS:
        rendered = get_format("alpaca").render_prompt(prompt, tok, True)
        want = tok.bos_token + rendered.text
        got = render(template, [{"role": "user", "content": prompt}], add_generation_prompt=True,
                     bos_token=tok.bos_token, eos_token=tok.eos_token)
        assert got == want, (got, want)
    # The EOS every trained answer ended with is the GGUF's, and llama.cpp adds no space in front.
    assert meta["tokenizer.ggml.eos_token_id"] == tok.eos_token_id == demo_exports["q8_0"]["eos"]["id"]
    assert meta["tokenizer.ggml.add_space_prefix"] is False


@needs_converter
def test_the_modelfile_renders_the_training_prompt_and_stops_at_the_trained_end(demo_exports):
    from engine.after.template import GoTemplate, ollama_render

    out = Path(demo_exports["q8_0"]["out"])
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./run-q8_0.gguf\n" in modelfile
    assert 'PARAMETER stop "</s>"\n' in modelfile and 'PARAMETER stop "### Instruction:"\n' in modelfile
    template = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert template == ('{{ range .Messages }}{{ if eq .Role "user" }}### Instruction:\n{{ .Content }}\n\n'
                        '### Response:\n{{ else if eq .Role "assistant" }}{{ .Content }}</s>{{ end }}{{ end }}')
    go = GoTemplate(("### Instruction:\n", "\n\n### Response:\n"), ("", "</s>"), "")
    assert go.text() == template
    # What Ollama renders for a user's message is training's prompt (Ollama puts the BOS in front itself).
    assert ollama_render(go, [{"role": "user", "content": "Say hi."}]) == "### Instruction:\nSay hi.\n\n### Response:\n"
    readme = (out / "README.md").read_text()
    for line in ("ollama create run -f Modelfile", "ollama run run", "llama-cli -m run-q8_0.gguf", "lms import",
                 "### Input:"):
        assert line in readme, line


@needs_converter
@needs_llama_cpp
def test_llama_cpp_answers_as_transformers_does(demo_exports):
    f16, q8 = demo_exports["f16"]["check"], demo_exports["q8_0"]["check"]
    for check in (f16, q8):
        assert check["prompts"] == 8 and check["prompt_tokens_equal"] == 8, check
    assert f16["agree"] == 8, f16
    assert q8["agree"] >= 6, q8
    if q8["first_difference"]:  # a quantized weight may tip a near tie, never a clear choice
        assert q8["first_difference"]["transformers_margin"] < 1.0, q8
    readme = (Path(demo_exports["f16"]["out"]) / "README.md").read_text()
    assert "llama.cpp agrees with transformers on 8/8 held-out prompts" in readme


@needs_converter
@needs_llama_cpp
def test_q4_k_m_goes_through_llama_cpps_quantizer_and_keeps_the_prompt_format(demo_exports):
    from engine.gguf import read_header

    result = demo_exports["q4_k_m"]
    header = read_header(result["gguf"])
    assert header.quant_type == "Q4_K_M"
    assert header.metadata["tokenizer.chat_template"] == demo_exports["q8_0"]["chat_template"]
    assert header.metadata["tokenizer.ggml.eos_token_id"] == 2
    assert result["check"]["prompt_tokens_equal"] == 8, result["check"]
    out = Path(result["out"])
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "README.md", "export.json", "run-q4_k_m.gguf"]


# ---------------------------------------------------------------------------------------------
# The prompt format of every data format


def _demo_tokenizer(demo_cache):
    from transformers import AutoTokenizer

    from engine.demo import ensure_demo_model

    return AutoTokenizer.from_pretrained(ensure_demo_model())


@pytest.mark.parametrize("fmt", ["alpaca", "input_output", "prompt_completion", "text", "messages", "sharegpt",
                                 "preference", "preference_messages"])
@pytest.mark.parametrize("chat_template", [True, False])
def test_each_formats_template_renders_what_training_rendered(demo_cache, fmt, chat_template):
    from engine.after.template import format_template, ollama_render, ollama_template, render
    from engine.data.formats import get_format

    tok = _demo_tokenizer(demo_cache)
    if not chat_template:
        tok.chat_template = None
    template = format_template(fmt, tok, True)
    go = ollama_template(template, bos_token=tok.bos_token, eos_token=tok.eos_token)
    for prompt in PROMPTS:
        rendered = get_format(fmt).render_prompt(prompt, tok, True)
        want = (tok.bos_token if rendered.bos else "") + rendered.text
        if fmt in ("messages", "sharegpt", "preference_messages") and chat_template:
            want = rendered.text  # the demo's chat template writes its BOS itself
        got = render(template, [{"role": "user", "content": prompt}], add_generation_prompt=True,
                     bos_token=tok.bos_token, eos_token=tok.eos_token)
        assert got == want, (fmt, got, want)
        if fmt != "alpaca" or "\n\n" not in prompt:  # Ollama cannot split alpaca's instruction from its input
            assert tok.bos_token + ollama_render(go, [{"role": "user", "content": prompt}]) == want


# ---------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize("case", ["no run", "no adapter", "out is a file", "out not empty", "merged missing"])
def test_export_refuses_in_one_line_and_writes_nothing(demo_run, tmp_path, case):
    run_dir, out, extra = demo_run, tmp_path / "out", []
    if case == "no run":
        run_dir = tmp_path / "nothing"
        run_dir.mkdir()
    elif case == "no adapter":
        run_dir = copied_run(demo_run, tmp_path)
        shutil.rmtree(run_dir / "adapter")
    elif case == "out is a file":
        out.write_text("mine\n")
    elif case == "out not empty":
        out.mkdir()
        (out / "notes.txt").write_text("mine\n")
    else:
        extra = ["--merged", str(tmp_path / "no-merge")]
    before = sorted(p.name for p in tmp_path.iterdir())
    r = run_cli("export", str(run_dir), "--out", str(out), *extra, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    expected = {"no run": "is not a run", "no adapter": "adapter is missing", "out is a file": "is a file",
                "out not empty": "not empty", "merged missing": "--merged"}[case]
    assert expected in lines[0], lines[0]


def test_a_missing_converter_or_quantizer_is_named_with_what_to_install(demo_run, tmp_path, monkeypatch):
    from engine.after import export
    from engine.errors import UserError

    monkeypatch.setattr(export, "converter_installed", lambda: False)
    with pytest.raises(UserError) as exc:
        export.plan_export(demo_run, tmp_path / "out")
    assert "llama.cpp's converter" in exc.value.one_line() and "qlora-wizard[export]" in exc.value.one_line()
    monkeypatch.setattr(export, "converter_installed", lambda: True)
    monkeypatch.setattr(export, "llama_cpp_installed", lambda: False)
    with pytest.raises(UserError) as exc:
        export.plan_export(demo_run, tmp_path / "out", "q4_k_m")
    assert "needs llama.cpp's quantizer" in exc.value.one_line() and "pip install llama-cpp-python" in exc.value.one_line()
    with pytest.raises(UserError) as exc:
        export.plan_export(demo_run, tmp_path / "out", check=True)
    assert "--no-check" in exc.value.one_line()
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Other families: tiny random models with the demo's tokenizer, trained two steps, exported f16


FAMILIES = {
    "qwen2": {},
    "qwen3": {},
    "mistral": {"sliding_window": None},
    # Gemma 3's published layer pattern (five sliding layers, then a full one): llama.cpp assumes it, as
    # the converter writes no pattern; its sliding layers take the local RoPE base.
    "gemma3_text": {"num_hidden_layers": 6, "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
                    "sliding_window": 512, "query_pre_attn_scalar": 32},
}


def _family_model(model_type: str, into: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from engine.demo import ensure_demo_model

    demo = ensure_demo_model()
    config = AutoConfig.for_model(
        model_type, **dict(dict(
            vocab_size=101, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
            pad_token_id=3, tie_word_embeddings=False, initializer_range=0.2), **FAMILIES[model_type]))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # decisive logits: a random model's near ties would be tipped by any rounding
        model.lm_head.weight.mul_(5)
    model.save_pretrained(into)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "tokenizer.model"):
        shutil.copyfile(demo / name, into / name)
    if model_type == "qwen2":
        # transformers loads a qwen2 folder's tokenizer as Qwen2's byte-level BPE: the same vocabulary
        # spelled byte-level (space Ġ, newline Ċ, tab ĉ) tokenizes as the SentencePiece twin does.
        data = json.loads((into / "tokenizer.json").read_text())
        byte_level = {"\u2581": "\u0120", "\n": "\u010a", "\t": "\u0109"}
        data["model"]["vocab"] = {byte_level.get(k, k): i for k, i in data["model"]["vocab"].items()}
        (into / "tokenizer.json").write_text(json.dumps(data))
    return into


@needs_converter
@needs_llama_cpp
@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_export_of_each_family_runs_in_llama_cpp_as_in_transformers(model_type, tmp_path, demo_cache):
    model = _family_model(model_type, tmp_path / model_type)
    data = {}
    if model_type == "qwen3":  # a chat-format run: the tokenizer's own template travels, ending turns with </s>
        from engine.demo import DEMO_DATA_FILE

        records = [json.loads(line) for line in DEMO_DATA_FILE.read_text().splitlines()[:200]]
        chats = tmp_path / "chats.jsonl"
        chats.write_text("".join(json.dumps({"messages": [
            {"role": "user", "content": r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")},
            {"role": "assistant", "content": r["output"]}]}) + "\n" for r in records))
        data = {"data__train": str(chats)}
    preset = write_preset(tmp_path, model__source=str(model), training__max_steps=2, training__eval_steps=2,
                          training__save_steps=2, training__micro_batch_size=4, training__seq_len=96, **data)
    run_dir = trained_in_process(preset, tmp_path / "run")
    result = _export(run_dir, tmp_path / "gguf", "--quant", "f16", "--prompts", "4", "--max-new-tokens", "16")
    check = result["check"]
    assert result["architecture"] == {"gemma3_text": "gemma3", "mistral": "llama"}.get(model_type, model_type)
    assert result["eos"]["matches_training"], result["eos"]
    assert check["prompt_tokens_equal"] == 4, check
    assert check["agree"] >= 3, check
    if check["first_difference"]:
        assert check["first_difference"]["transformers_margin"] < 1.0, check
    assert_gguf_config_is_transformers(Path(result["gguf"]))  # llama.cpp's own file, read from its header
    if model_type == "qwen3":
        from engine.demo import CHAT_TEMPLATE

        assert result["format"] == "messages" and result["chat_template"] == CHAT_TEMPLATE
        assert result["stops"] == ["</s>"]
        modelfile = (tmp_path / "gguf" / "Modelfile").read_text()
        assert '{{ else if eq .Role "user" }}### User:\n{{ .Content }}\n\n' in modelfile
        assert modelfile.endswith('{{ end }}{{ end }}### Assistant:\n"""\nPARAMETER stop "</s>"\n')


def test_a_gemma3_without_the_published_layer_pattern_is_warned(tmp_path):
    from engine.after.export import llama_cpp_warnings

    published = ["sliding_attention"] * 5 + ["full_attention"]
    for layer_types, warned in ((published * 3, False), (["sliding_attention", "full_attention"], True)):
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3_text", "layer_types": layer_types}))
        assert bool(llama_cpp_warnings(tmp_path)) == warned
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert llama_cpp_warnings(tmp_path) == []
