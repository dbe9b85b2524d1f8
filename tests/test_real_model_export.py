"""The real-model tier, taken home: the merged run as a q8_0 GGUF runs in llama.cpp as it ran in
transformers. The run (``conftest.real_run``) is trained once and shared; this file is apart from
tests/test_real_model.py so that the workers run their minutes side by side."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli

pytestmark = [pytest.mark.real, pytest.mark.slow]


def test_export_runs_in_llama_cpp_as_it_ran_in_transformers(real_run, real_merged, tmp_path):
    """The merged real model as a q8_0 GGUF: llama.cpp renders every held-out prompt into training's
    tokens with the GGUF's own template, and answers as transformers does."""
    from engine.after.export import converter_installed, llama_cpp_installed

    if not (converter_installed() and llama_cpp_installed()):
        pytest.skip("export needs llama.cpp's converter and llama-cpp-python: pip install -e '.[export,export-check]'")
    out = tmp_path / "gguf"
    r = run_cli("export", str(real_run), "--out", str(out), "--merged", str(real_merged), "--json", timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(r.stdout)
    check = result["check"]
    assert result["architecture"] == "gemma3" and result["eos"]["matches_training"], result["eos"]
    assert check["prompts"] == 8 and check["prompt_tokens_equal"] == 8, check
    assert check["agree"] >= 7, check
    assert check["ended_by_stop"]["llama_cpp"] >= 7, check  # it stops where training taught it to
    assert 250 * 2**20 < result["gguf_bytes"] < 320 * 2**20
    assert abs(result["gguf_bytes_estimated"] / result["gguf_bytes"] - 1) < 0.1  # the size shown before
    assert (out / "Modelfile").read_text().count("PARAMETER stop") >= 1
