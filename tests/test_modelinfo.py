"""inspect_model: counts, targets and errors, from real config.json files, with no network.

The fixtures are real ``config.json`` files of published models (tests/fixtures/hf-configs);
their README lists the official parameter counts, which these tests parse and check against.
"""

from __future__ import annotations

import builtins
import functools
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.errors import NeedsRemoteCode, UserError
from engine.modelinfo import ModelInfo, TargetLayer, inspect_model

from conftest import FIXTURES, ROOT

FALCON = "tiiuae__falcon-7b"
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _official_counts() -> dict[str, int]:
    """``folder -> official parameters`` from the fixture README's table."""
    readme = FIXTURES / "README.md"
    if not readme.is_file():
        return {}
    counts = {}
    for m in re.finditer(r"^\|\s*(\S+__\S+?)\s*\|\s*([\d,]{5,})", readme.read_text(encoding="utf-8"), re.M):
        counts[m.group(1)] = int(m.group(2).replace(",", ""))
    return counts


OFFICIAL = _official_counts()


@functools.lru_cache(maxsize=None)
def info_for(folder: str) -> ModelInfo:
    return inspect_model(str(FIXTURES / folder))


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    text = str(excinfo.value)
    assert text and "\n" not in text, f"not one line: {text!r}"
    assert "Traceback" not in text
    return text


# ----------------------------------------------------------------------------- counts


def test_readme_table_was_parsed():
    assert len(OFFICIAL) >= 14, OFFICIAL
    assert FALCON not in OFFICIAL  # "about 7.2 B": checked separately


def test_every_fixture_folder_is_covered():
    folders = {p.name for p in FIXTURES.iterdir() if p.is_dir()}
    assert folders - set(OFFICIAL) <= {FALCON}, "a fixture without an official count in the README"


@pytest.mark.parametrize("folder", sorted(OFFICIAL))
def test_params_match_official_counts(folder):
    info = info_for(folder)
    official = OFFICIAL[folder]
    assert abs(info.params_total - official) <= official * 1e-4, (info.params_total, official)
    # the two partitions documented on ModelInfo
    base = info.params_embedding + info.params_head
    assert base + info.params_blocks + info.params_outside_blocks == info.params_total
    assert base + info.params_quantizable + info.params_other == info.params_total
    assert 0 <= info.params_outside_blocks < info.hidden_size * 4  # final norm (+ bias) only
    assert 0 < info.params_quantizable <= info.params_blocks
    if not info.is_moe:
        # every 4-bit weight is a LoRA-targetable layer and vice versa
        assert sum(t.weight_params for t in info.targets) == info.params_quantizable
    if info.tie_word_embeddings:
        assert info.params_head == 0
    else:
        assert info.params_head >= info.vocab_size * info.hidden_size
    assert "lm_head" not in info.lora_target_candidates
    assert info.default_targets and set(info.default_targets) <= set(info.lora_target_candidates)
    assert info.weight_bytes_source == "estimate"  # the fixture folders hold no weights
    json.dumps(info.to_json())


def test_gptj_counted_from_config():
    info = info_for("EleutherAI__gpt-j-6b")
    assert info.params_total == 6_050_882_784
    assert (info.hidden_size, info.num_hidden_layers, info.num_attention_heads) == (4096, 28, 16)
    assert info.intermediate_size == 4 * 4096  # n_inner is null
    assert info.context_length == 2048  # n_positions
    assert info.dtype == "float32"  # no torch_dtype in the config
    assert info.params_head == 50400 * 4096 + 50400  # lm_head has a bias
    assert info.family == "gptj"


# ----------------------------------------------------------------------------- tied embeddings


@pytest.mark.parametrize(
    "folder",
    [
        "meta-llama__Llama-3.2-1B",
        "Qwen__Qwen2.5-0.5B",
        "google__gemma-2b",
        "google__gemma-2-9b",
        "openai-community__gpt2",
    ],
)
def test_tied_embeddings_count_once(folder):
    info = info_for(folder)
    assert info.tie_word_embeddings is True
    assert info.params_head == 0


def test_llama_3_2_1b_is_1_24_b_not_1_50_b():
    info = info_for("meta-llama__Llama-3.2-1B")
    assert info.params_total == 1_235_814_400
    assert info.params_embedding == 128256 * 2048


def test_untied_head_is_counted():
    info = info_for("meta-llama__Llama-2-7b-hf")
    assert info.tie_word_embeddings is False
    assert info.params_head == info.params_embedding == 32000 * 4096


# ----------------------------------------------------------------------------- targets


def test_llama2_fields_and_targets():
    info = info_for("meta-llama__Llama-2-7b-hf")
    assert info.model_type == "llama" and info.family == "llama"
    assert info.architecture == "LlamaForCausalLM"
    assert (info.hidden_size, info.num_hidden_layers) == (4096, 32)
    assert (info.num_attention_heads, info.num_key_value_heads) == (32, 32)
    assert (info.intermediate_size, info.vocab_size, info.context_length) == (11008, 32000, 4096)
    assert info.dtype == "float16"
    assert info.is_moe is False and info.num_experts == 0
    q = info.target("q_proj")
    assert (q.in_features, q.out_features, q.count, q.bias, q.kind) == (4096, 4096, 32, False, "linear")
    assert q.lora_params(8) + info.target("v_proj").lora_params(8) == 4_194_304
    assert info.lora_target_candidates == LLAMA_TARGETS
    assert info.default_targets == tuple(info.lora_target_candidates)
    d = info.target("down_proj")
    assert (d.in_features, d.out_features) == (11008, 4096)
    with pytest.raises(KeyError):
        info.target("lm_head")


def test_gqa_and_biases():
    llama3 = info_for("meta-llama__Llama-3.1-8B")
    assert llama3.num_key_value_heads == 8
    assert (llama3.target("k_proj").in_features, llama3.target("k_proj").out_features) == (4096, 1024)
    qwen = info_for("Qwen__Qwen2.5-7B")
    assert qwen.target("q_proj").bias and not qwen.target("o_proj").bias
    gemma2 = info_for("google__gemma-2-9b")
    assert gemma2.dtype == "float32"  # torch_dtype in the config
    assert gemma2.family == "gemma2"


def test_phi2_layer_names():
    info = info_for("microsoft__phi-2")
    assert {"dense", "fc1", "fc2"} <= set(info.lora_target_candidates)
    assert info.target("fc1").bias


def test_gpt2_conv1d_targets():
    info = info_for("openai-community__gpt2")
    assert info.lora_target_candidates == ["c_attn", "c_proj", "c_fc"]
    assert all(t.kind == "conv1d" and t.bias for t in info.targets)
    c_attn = info.target("c_attn")
    assert (c_attn.in_features, c_attn.out_features, c_attn.count) == (768, 2304, 12)  # Conv1D weight is (in, out)
    c_fc = info.target("c_fc")
    assert (c_fc.in_features, c_fc.out_features, c_fc.count) == (768, 3072, 12)
    # c_proj is 768->768 in attention and 3072->768 in the MLP: one entry, both shapes
    c_proj = info.target("c_proj")
    assert c_proj.count == 24
    assert c_proj.shapes == ((768, 768, 12), (3072, 768, 12))
    assert c_proj.weight_params == 12 * (768 * 768 + 3072 * 768)
    assert c_proj.lora_params(8) == 8 * 12 * ((768 + 768) + (3072 + 768))
    assert info.params_embedding == 50257 * 768 + 1024 * 768  # wte + learned positions wpe
    assert info.context_length == 1024 and info.intermediate_size == 3072
    assert info.dtype == "float32"


def test_target_layer_without_shapes_is_unchanged():
    t = TargetLayer("q_proj", 4096, 4096, 32, False)
    assert t.weight_params == 4096 * 4096 * 32
    assert t.lora_params(8) == 8 * 8192 * 32


def test_mixtral_is_moe_with_fused_experts():
    info = info_for("mistralai__Mixtral-8x7B-v0.1")
    assert info.is_moe and info.num_experts == 8
    assert info.lora_target_candidates == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert info.default_targets == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert "gate" not in info.lora_target_candidates  # the router is not a Linear in transformers 5
    assert info.params_quantizable == 32 * (4096 * 4096 * 2 + 4096 * 1024 * 2)
    experts = 32 * 8 * 3 * 4096 * 14336
    assert info.params_other >= experts  # fused experts stay in bf16
    note = " ".join(info.notes)
    assert "fused" in note and "experts" in note and "not Linear" in note
    assert "router" in note
    assert "q_proj" in note


# ----------------------------------------------------------------------------- weight bytes


def _copy_config(tmp_path: Path, folder: str = "meta-llama__Llama-3.2-1B") -> Path:
    dest = tmp_path / "model"
    dest.mkdir()
    shutil.copyfile(FIXTURES / folder / "config.json", dest / "config.json")
    return dest


def test_weight_bytes_from_index(tmp_path):
    d = _copy_config(tmp_path)
    index = {"metadata": {"total_size": 2_471_628_800}, "weight_map": {"lm_head.weight": "model.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    info = inspect_model(str(d))
    assert (info.weight_bytes, info.weight_bytes_source) == (2_471_628_800, "index")
    # a path to the config.json itself finds the same index next to it
    assert inspect_model(str(d / "config.json")).weight_bytes_source == "index"


def test_weight_bytes_from_files(tmp_path):
    d = _copy_config(tmp_path)
    files = [
        ("model-00001-of-00002.safetensors", 1000),
        ("model-00002-of-00002.safetensors", 500),
        ("training_args.bin", 7),
    ]
    for name, size in files:
        with open(d / name, "wb") as f:
            f.truncate(size)
    (d / "pytorch_model.bin.index.json").write_text("{not json")  # a broken index is ignored
    info = inspect_model(str(d))
    assert (info.weight_bytes, info.weight_bytes_source) == (1500, "files")


def test_weight_bytes_estimate():
    info = info_for("meta-llama__Llama-3.2-1B")
    assert (info.weight_bytes, info.weight_bytes_source) == (1_235_814_400 * 2, "estimate")
    assert info_for("openai-community__gpt2").weight_bytes == 124_439_808 * 4


# ----------------------------------------------------------------------------- remote code


@pytest.fixture
def no_stdin(monkeypatch):
    """Any attempt to ask on standard input fails the test instead of hanging."""

    class Refuse(io.StringIO):
        def read(self, *a):
            raise AssertionError("tried to read standard input")

        readline = read

    def refuse_input(*a, **k):
        raise AssertionError(f"tried to prompt: {a!r}")

    monkeypatch.setattr(sys, "stdin", Refuse())
    monkeypatch.setattr(builtins, "input", refuse_input)


def test_falcon_needs_remote_code_and_never_prompts(no_stdin):
    with pytest.raises(NeedsRemoteCode) as excinfo:
        inspect_model(str(FIXTURES / FALCON))
    assert isinstance(excinfo.value, UserError)
    text = one_line_error(excinfo)
    assert "needs its own Python code (trust_remote_code)" in text
    assert "--trust-remote-code" in text


def test_falcon_with_consent_is_built_with_the_native_class(no_stdin):
    # the fixture folder has no configuration_RW.py: the built-in Falcon port is used, said in a note
    info = inspect_model(str(FIXTURES / FALCON), trust_remote_code=True)
    assert info.architecture == "FalconForCausalLM" and info.family == "falcon"
    assert 6.9e9 < info.params_total < 7.3e9  # "about 7.2 B" in the README counts lm_head twice
    assert info.tie_word_embeddings
    assert info.num_key_value_heads == 1  # multi-query
    assert "dense_h_to_4h" in info.lora_target_candidates
    assert any("Falcon" in n for n in info.notes)
    assert info.params_quantizable == 0 and any("FalconLinear" in n for n in info.notes)


def test_unknown_type_with_auto_map_needs_remote_code(tmp_path, no_stdin):
    d = tmp_path / "custom"
    d.mkdir()
    (d / "config.json").write_text(
        json.dumps(
            {"model_type": "my_custom_lm", "architectures": ["MyLM"], "auto_map": {"AutoConfig": "cfg.MyConfig"}}
        )
    )
    with pytest.raises(NeedsRemoteCode) as excinfo:
        inspect_model(str(d))
    one_line_error(excinfo)
    with pytest.raises(UserError) as excinfo:  # consent, but the code is not there
        inspect_model(str(d), trust_remote_code=True)
    assert "own code" in one_line_error(excinfo)


def test_falcon_never_reads_stdin_in_a_subprocess():
    """With a stdin that never answers, a prompt would hang until the timeout."""
    code = textwrap.dedent(
        f"""
        import sys
        from engine.modelinfo import inspect_model
        from engine.errors import NeedsRemoteCode
        assert "torch" not in sys.modules and "transformers" not in sys.modules
        try:
            inspect_model({str(FIXTURES / FALCON)!r})
        except NeedsRemoteCode as e:
            print("NEEDS:", e)
        inspect_model({str(FIXTURES / "google__gemma-2b")!r})  # legacy hidden_act: would warn
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        stdin=subprocess.PIPE,  # open, never written to
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("NEEDS:")
    assert "[y/N]" not in proc.stdout + proc.stderr
    assert proc.stderr.strip() == "", proc.stderr  # no transformers noise


# ----------------------------------------------------------------------------- bad input


def test_missing_path(tmp_path):
    sources = [str(tmp_path / "nope"), "./models/nope", "a/b/c", "~/no-such-model-dir", "config-not-here.json"]
    for source in sources:
        with pytest.raises(UserError) as excinfo:
            inspect_model(source)
        text = one_line_error(excinfo)
        assert "no such file or directory" in text and source in text


def test_empty_source():
    with pytest.raises(UserError):
        inspect_model("  ")


def test_directory_without_config(tmp_path):
    with pytest.raises(UserError) as excinfo:
        inspect_model(str(tmp_path))
    assert "has no config.json" in one_line_error(excinfo)


def test_file_that_is_not_json(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0\1")
    with pytest.raises(UserError) as excinfo:
        inspect_model(str(f))
    assert "not a model config" in one_line_error(excinfo)


def test_broken_json_names_file_and_position(tmp_path):
    f = tmp_path / "config.json"
    f.write_text('{\n  "model_type": "llama",\n  "hidden_size": 4096,,\n}\n')
    with pytest.raises(UserError) as excinfo:
        inspect_model(str(tmp_path))
    text = one_line_error(excinfo)
    assert str(f) in text and "not valid JSON" in text and "line 3 column" in text


def test_unreadable_config(tmp_path):
    f = tmp_path / "config.json"
    f.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserError) as excinfo:
        inspect_model(str(f))
    assert str(f) in one_line_error(excinfo)


def test_json_that_is_not_an_object(tmp_path):
    f = tmp_path / "config.json"
    f.write_text("[1, 2]")
    with pytest.raises(UserError) as excinfo:
        inspect_model(str(f))
    assert "not a model config" in one_line_error(excinfo)


def test_config_without_model_type(tmp_path):
    f = tmp_path / "config.json"
    f.write_text(json.dumps({"hidden_size": 4096}))
    with pytest.raises(UserError) as excinfo:
        inspect_model(str(f))
    assert "has no model_type" in one_line_error(excinfo)


def test_unknown_model_type(tmp_path):
    f = tmp_path / "config.json"
    f.write_text(json.dumps({"model_type": "surely_not_a_model_type"}))
    with pytest.raises(UserError) as excinfo:
        inspect_model(str(f))
    text = one_line_error(excinfo)
    assert "does not know the model type" in text and "upgrade transformers" in text


@pytest.mark.parametrize(
    "config",
    [
        {"model_type": "bert", "architectures": ["BertForMaskedLM"]},
        {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]},
        {"model_type": "vit", "architectures": ["ViTForImageClassification"]},
    ],
    ids=["bert", "t5", "vit"],
)
def test_not_a_causal_lm(tmp_path, config):
    f = tmp_path / "config.json"
    f.write_text(json.dumps(config))
    with pytest.raises(UserError) as excinfo:
        inspect_model(str(tmp_path))
    assert "is not a causal language model" in one_line_error(excinfo)


# ----------------------------------------------------------------------------- the Hub, offline


def _hub_error(cls, status: int, message: str = "hub says no"):
    """A real huggingface_hub exception with a real HTTP response object."""
    import importlib

    from huggingface_hub.errors import HfHubHTTPError

    http = importlib.import_module(HfHubHTTPError.__mro__[1].__module__.split(".")[0])  # httpx or its fork
    request = http.Request("GET", "https://huggingface.co/api/models/org/name")
    return cls(message, response=http.Response(status, request=request))


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """Replace the two huggingface_hub calls inspect_model makes; record the downloads."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest turns offline mode on
    state = SimpleNamespace(info=None, info_error=None, download_error=None, files={}, downloads=[], info_calls=0)

    def model_info(self, repo_id, revision=None, files_metadata=False, **kw):
        state.info_calls += 1
        if state.info_error is not None:
            raise state.info_error
        return state.info

    def hf_hub_download(repo_id, filename, revision=None, local_files_only=False, **kw):
        state.downloads.append((filename, local_files_only))
        if state.download_error is not None:
            raise state.download_error
        return str(state.files[filename])

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return state


def test_hub_id_downloads_only_config_and_index(fake_hub, tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 16_060_522_496}}))
    fake_hub.files = {"config.json": FIXTURES / "meta-llama__Llama-3.1-8B" / "config.json", index.name: index}
    names = ["config.json", index.name, "model-00001-of-00004.safetensors", "original/consolidated.00.pth"]
    fake_hub.info = SimpleNamespace(siblings=[SimpleNamespace(rfilename=n, size=5_000_000_000) for n in names])
    info = inspect_model("meta-llama/Llama-3.1-8B")
    assert info.source == "meta-llama/Llama-3.1-8B"
    assert info.params_total == 8_030_261_248
    assert (info.weight_bytes, info.weight_bytes_source) == (16_060_522_496, "index")
    assert [f for f, _ in fake_hub.downloads] == ["config.json", index.name]


def test_hub_id_without_index_uses_file_sizes(fake_hub):
    fake_hub.files = {"config.json": FIXTURES / "openai-community__gpt2" / "config.json"}
    sizes = {"config.json": 665, "model.safetensors": 548_105_171, "pytorch_model.bin": 548_118_077}
    fake_hub.info = SimpleNamespace(siblings=[SimpleNamespace(rfilename=n, size=s) for n, s in sizes.items()])
    info = inspect_model("openai-community/gpt2")
    assert (info.weight_bytes, info.weight_bytes_source) == (548_105_171, "files")
    assert fake_hub.downloads == [("config.json", False)]


def test_hub_unknown_or_private_repo(fake_hub):
    from huggingface_hub.errors import RepositoryNotFoundError

    fake_hub.info_error = _hub_error(RepositoryNotFoundError, 401)
    with pytest.raises(UserError) as excinfo:
        inspect_model("some-org/no-such-model")
    text = one_line_error(excinfo)
    assert "no model some-org/no-such-model on the Hugging Face Hub" in text and "HF_TOKEN" in text


def test_hub_gated_repo(fake_hub):
    from huggingface_hub.errors import GatedRepoError

    fake_hub.info = SimpleNamespace(siblings=[])
    fake_hub.download_error = _hub_error(GatedRepoError, 403)
    with pytest.raises(UserError) as excinfo:
        inspect_model("meta-llama/Llama-3.1-8B")
    text = one_line_error(excinfo)
    assert "gated" in text and "HF_TOKEN" in text


def test_hub_unknown_revision(fake_hub):
    from huggingface_hub.errors import RevisionNotFoundError

    fake_hub.info_error = _hub_error(RevisionNotFoundError, 404)
    with pytest.raises(UserError) as excinfo:
        inspect_model("org/name", revision="no-such-branch")
    assert "no revision 'no-such-branch'" in one_line_error(excinfo)


def test_hub_refuses_token(fake_hub):
    from huggingface_hub.errors import HfHubHTTPError

    fake_hub.info_error = _hub_error(HfHubHTTPError, 401)
    with pytest.raises(UserError) as excinfo:
        inspect_model("org/name")
    assert "HF_TOKEN" in one_line_error(excinfo)


def test_hub_unreachable_tries_only_the_cache(fake_hub):
    from huggingface_hub.errors import LocalEntryNotFoundError

    fake_hub.info_error = ConnectionError("connection refused")
    fake_hub.download_error = LocalEntryNotFoundError("not in cache")
    with pytest.raises(UserError) as excinfo:
        inspect_model("org/name")
    text = one_line_error(excinfo)
    assert "cannot reach the Hugging Face Hub" in text and "local model directory" in text
    assert fake_hub.downloads == [("config.json", True)]  # straight to the cache, no retries


def test_hub_unreachable_but_cached(fake_hub):
    fake_hub.info_error = ConnectionError("connection refused")
    fake_hub.files = {"config.json": FIXTURES / "meta-llama__Llama-3.2-1B" / "config.json"}
    info = inspect_model("meta-llama/Llama-3.2-1B")
    assert info.params_total == 1_235_814_400 and info.weight_bytes_source == "estimate"


def test_hub_offline_mode_uses_only_the_cache(fake_hub, monkeypatch):
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    fake_hub.download_error = LocalEntryNotFoundError("not in cache")
    with pytest.raises(UserError) as excinfo:
        inspect_model("org/name")
    text = one_line_error(excinfo)
    assert "offline mode is on (HF_HUB_OFFLINE)" in text and "local model directory" in text
    assert fake_hub.info_calls == 0 and fake_hub.downloads == [("config.json", True)]


def test_hub_repo_without_config(fake_hub):
    from huggingface_hub.errors import RemoteEntryNotFoundError

    fake_hub.info = SimpleNamespace(siblings=[])
    fake_hub.download_error = _hub_error(RemoteEntryNotFoundError, 404)
    with pytest.raises(UserError) as excinfo:
        inspect_model("org/name")
    assert "has no config.json" in one_line_error(excinfo)


@pytest.mark.parametrize(
    "env",
    [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}],  # port 9 (discard): closed
    ids=["offline-mode", "closed-port"],
)
def test_hub_without_network_for_real(tmp_path, env):
    """The real huggingface_hub, an empty cache, and no way out: one line, quickly."""
    code = textwrap.dedent(
        """
        import sys
        from engine.modelinfo import inspect_model
        from engine.errors import UserError
        try:
            inspect_model("some-org/some-model")
        except UserError as e:
            print(e)
        else:
            sys.exit("no error")
        """
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **env, "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.strip()
    assert "\n" not in out and "some-org/some-model" in out
    assert ("offline mode" in out) if "HF_HUB_OFFLINE" in env else ("cannot reach the Hugging Face Hub" in out)
    assert proc.stderr.strip() == "", proc.stderr  # no retry warnings


def test_own_code_runs_only_with_consent(tmp_path):
    """A local model with its own configuration/modeling code: refused without consent, built with it."""
    model = tmp_path / "tiny-custom"
    model.mkdir()
    (model / "configuration_tiny.py").write_text(
        "from transformers import LlamaConfig\n\nclass TinyConfig(LlamaConfig):\n    model_type = 'tiny_custom'\n"
    )
    (model / "modeling_tiny.py").write_text(
        "from transformers import LlamaForCausalLM\nfrom .configuration_tiny import TinyConfig\n\n"
        "class TinyForCausalLM(LlamaForCausalLM):\n    config_class = TinyConfig\n"
    )
    config = {
        "model_type": "tiny_custom",
        "architectures": ["TinyForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_tiny.TinyConfig",
            "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM",
        },
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 100,
    }
    (model / "config.json").write_text(json.dumps(config))
    code = textwrap.dedent(
        f"""
        from engine.modelinfo import inspect_model
        from engine.errors import NeedsRemoteCode
        try:
            inspect_model({str(model)!r})
        except NeedsRemoteCode:
            print("refused")
        info = inspect_model({str(model)!r}, trust_remote_code=True)
        print(info.architecture, info.params_total, ",".join(info.default_targets))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        capture_output=True,
        text=True,
        timeout=120,
        # the copied code goes to HF_HOME/modules: keep it in tmp
        env={**os.environ, "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    refused, built = proc.stdout.split("\n")[:2]
    assert refused == "refused"
    arch, total, targets = built.split()
    embed, layer = 100 * 64, 64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3 + 2 * 64
    assert arch == "TinyForCausalLM" and int(total) == 2 * embed + 2 * layer + 64
    assert targets == ",".join(LLAMA_TARGETS)


@pytest.mark.parametrize("folder,key,named", [
    ("meta-llama__Llama-3.2-1B", "hidden_size", "'hidden_size' (the width of every layer)"),
    ("meta-llama__Llama-3.2-1B", "intermediate_size", "'intermediate_size' (the width of the MLP)"),
    ("Qwen__Qwen2.5-0.5B", "num_hidden_layers", "'num_hidden_layers' (the number of layers)"),
    ("mistralai__Mistral-7B-v0.1", "num_attention_heads", "'num_attention_heads'"),
    ("google__gemma-2b", "vocab_size", "'vocab_size' (the vocabulary)"),
    ("openai-community__gpt2", "n_embd", "'n_embd' or 'hidden_size'"),
    (FALCON, "n_layer", "'n_layer' or 'num_hidden_layers'"),
])
def test_a_config_without_an_essential_size_is_refused_naming_the_key(tmp_path, folder, key, named):
    """A missing size would be filled with the architecture's default: a model of another size."""
    raw = json.loads((FIXTURES / folder / "config.json").read_text())
    del raw[key]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UserError) as excinfo:
        inspect_model(str(tmp_path), trust_remote_code=True)
    text = one_line_error(excinfo)
    assert text.startswith(f"{tmp_path / 'config.json'} has no {named}")
    assert "fix or re-download the model's config.json" in text


def test_a_2023_falcon_config_is_read_with_its_own_key_names(tmp_path):
    """The RW format's n_layer / n_head / n_head_kv reach transformers' Falcon class (which reads none of
    them itself): a 60-layer falcon-40b-shaped config is 60 layers, not the class default 32."""
    raw = json.loads((FIXTURES / FALCON / "config.json").read_text())
    raw.update(n_layer=60, n_head=128, hidden_size=8192, n_head_kv=8, new_decoder_architecture=True)
    raw.pop("multi_query", None)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    info = inspect_model(str(tmp_path), trust_remote_code=True)  # the code is not here: built-in class
    assert (info.num_hidden_layers, info.num_attention_heads, info.num_key_value_heads) == (60, 128, 8)
