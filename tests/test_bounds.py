"""Bounds on what comes in: every number and name of a preset, the sizes of a model's config.json,
and data that would leave nothing to train. Each is refused up front in one line, exit 2, before a
run directory exists or a model object is built."""

from __future__ import annotations

import json
import math
import time
import uuid
from pathlib import Path

import pytest

from conftest import run_cli, write_preset
from engine.config_check import check_config_sizes
from engine.errors import UserError
from engine.preset import MAX_NAME_BYTES, Preset, preset_from_dict

MINIMAL = {"model": {"source": "meta-llama/Llama-3.1-8B"}, "data": {"train": "train.jsonl"}}


def _with(section: str, key: str, value) -> dict:
    d = {k: dict(v) for k, v in MINIMAL.items()}
    d.setdefault(section, {})[key] = value
    return d


def _refused(section: str, key: str, value) -> str:
    with pytest.raises(UserError) as e:
        preset_from_dict(_with(section, key, value), "p.yaml")
    text = str(e.value)
    assert "\n" not in text and text.startswith(f"preset p.yaml: {section}.{key} = "), text
    return text


# --------------------------------------------------------------------------------------------
# Preset numbers


@pytest.mark.parametrize(
    "section,key,value,allowed",
    [
        ("training", "seed", 2**64, "allowed: <= 4,294,967,295"),
        ("training", "seed", -1, "allowed: >= 0"),
        ("training", "max_steps", 10**30, "allowed: < 1,000,000,000"),
        ("training", "max_steps", 10**300, "allowed: < 1,000,000,000"),
        ("training", "eval_steps", 10**9, "allowed: < 1,000,000,000"),
        ("training", "save_steps", 10**9, "allowed: < 1,000,000,000"),
        ("training", "logging_steps", 10**12, "allowed: < 1,000,000,000"),
        ("data", "max_examples", 10**10, "allowed: <= 1,000,000,000"),
        ("model", "pretrained_batch_tokens", 10**13, "allowed: <= 10,000,000,000"),
        ("training", "max_grad_norm", 1e9, "allowed: <= 1,000,000"),
        ("training", "max_grad_norm", float("nan"), "allowed: a finite number"),
        ("training", "max_grad_norm", float("inf"), "allowed: a finite number"),
        ("training", "epochs", float("nan"), "allowed: a finite number"),
        ("training", "learning_rate", float("nan"), "allowed: a finite number"),
        ("training", "warmup_ratio", float("nan"), "allowed: a finite number"),
        ("training", "weight_decay", float("-inf"), "allowed: a finite number"),
        ("model", "base_lr", float("nan"), "allowed: a finite number"),
        ("lora", "alpha", float("inf"), "allowed: a finite number"),
        ("lora", "dropout", float("nan"), "allowed: a finite number"),
        ("data", "validation_split", float("nan"), "allowed: a finite number"),
        ("training", "seq_len", float("nan"), "allowed: a finite number"),
        ("training", "seed", True, "must be a number, not true or false"),
        ("lora", "r", True, "must be a number, not true or false"),
        ("training", "max_grad_norm", False, "must be a number, not true or false"),
    ],
)
def test_numbers_out_of_bounds_are_refused_naming_the_field(section, key, value, allowed):
    text = _refused(section, key, value)
    assert f"is not valid ({allowed}" in text


def test_the_largest_allowed_values_are_accepted():
    p = preset_from_dict({
        **MINIMAL,
        "training": {"seed": 2**32 - 1, "max_steps": 10**9 - 1, "eval_steps": 10**9 - 1, "save_steps": 10**9 - 1,
                     "logging_steps": 10**9 - 1, "max_grad_norm": 1e6},
        "data": {"train": "t.jsonl", "max_examples": 10**9},
        "output": {"name": "é" * (MAX_NAME_BYTES // 2)},
    })
    assert p.training.seed == 2**32 - 1 and p.training.max_steps == 10**9 - 1


def test_every_number_in_the_preset_has_an_upper_bound():
    """A new numeric field without a bound fails here: every number the preset holds is used for something
    (a loop count, an allocation, a seed) that has a largest sensible value."""
    from engine.preset import _is_number_field

    def walk(model, prefix=""):
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                yield from walk(ann, f"{prefix}{name}.")
            elif _is_number_field(ann):
                yield f"{prefix}{name}", field

    unbounded = [path for path, field in walk(Preset)
                 if not any(hasattr(m, "le") or hasattr(m, "lt") for m in field.metadata)]
    assert unbounded == []


# --------------------------------------------------------------------------------------------
# Preset names and paths


@pytest.mark.parametrize(
    "section,key,value,problem",
    [
        ("output", "name", "run\x00one", "without control characters: it has '\\x00'"),
        ("output", "name", "run\none", "without control characters: it has '\\n'"),
        ("output", "name", "a/b", "without '/'"),
        ("output", "name", "..", "without '/'"),
        ("output", "name", ".", "without '/'"),
        ("output", "name", "x" * 256, "at most 255 bytes: this one has 256"),
        ("output", "name", "é" * 128, "at most 255 bytes: this one has 256"),
        ("output", "runs_dir", "runs\x00", "must not contain control characters: it has '\\x00'"),
        ("model", "source", "org/na\x00me", "must not contain control characters"),
        ("model", "revision", "main\x1b[2J", "must not contain control characters: it has '\\x1b'"),
        ("data", "train", "train\x00.jsonl", "must not contain control characters"),
        ("data", "validation", "val\r.jsonl", "must not contain control characters: it has '\\r'"),
        ("data", "split", "train\x00", "must not contain control characters"),
        ("lora", "init_from", "runs/a/adapter\x00", "must not contain control characters"),
        ("lora", "targets", ["q_proj", "v_proj\x00"], "layer name 'v_proj\\x00' has a control character"),
    ],
)
def test_names_and_paths_without_control_characters(section, key, value, problem):
    text = _refused(section, key, value)
    assert problem in text


def test_a_long_value_is_shown_cut_in_the_one_line():
    text = _refused("output", "name", "y" * 5000)
    assert "... (5,000 characters)" in text and len(text) < 300


def test_cli_refuses_a_nul_in_the_run_name_before_any_run_directory(tmp_path):
    runs = tmp_path / "runs"
    p = write_preset(tmp_path, output__name="demo\x00run", output__runs_dir=str(runs))
    r = run_cli("--preset", str(p), timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == (f"error: preset {p}: output.name = 'demo\\x00run' is not valid "
                                "(must be a plain folder name without control characters: it has '\\x00')")
    assert "Traceback" not in r.stderr + r.stdout
    assert not runs.exists()


def test_cli_refuses_huge_numbers_in_one_line(tmp_path):
    p = write_preset(tmp_path, training__seed=2**64)
    r = run_cli("--preset", str(p), timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"error: preset {p}: training.seed = 18446744073709551616 is not valid "
                                "(allowed: <= 4,294,967,295)")
    # A number too long for Python to convert at all (PyYAML hands it to int()) is one line too.
    big = tmp_path / "big.yaml"
    big.write_text(p.read_text().replace("seed: 18446744073709551616", "seed: " + "9" * 5000))
    r = run_cli("--preset", str(big), timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: preset {big} is not valid: a number too long to read; no setting takes a value like that"
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------------------------
# config.json sizes


def test_every_real_config_passes(hf_configs):
    configs = sorted(hf_configs.glob("*/config.json"))
    assert len(configs) >= 15
    for path in configs:
        check_config_sizes(json.loads(path.read_text()), path.parent.name)


def test_the_largest_published_shapes_pass():
    # Llama 3.1 405B, DeepSeek-V3, Gemma 3's vocabulary and Llama 4 Scout's context, as their configs give them.
    check_config_sizes({"model_type": "llama", "hidden_size": 16384, "num_hidden_layers": 126, "num_attention_heads": 128,
                        "num_key_value_heads": 8, "intermediate_size": 53248, "vocab_size": 128256,
                        "max_position_embeddings": 131072}, "meta-llama/Llama-3.1-405B")
    check_config_sizes({"model_type": "deepseek_v3", "hidden_size": 7168, "num_hidden_layers": 61,
                        "num_attention_heads": 128, "num_key_value_heads": 128, "intermediate_size": 18432,
                        "moe_intermediate_size": 2048, "n_routed_experts": 256, "num_experts_per_tok": 8,
                        "vocab_size": 129280, "max_position_embeddings": 163840}, "deepseek-ai/DeepSeek-V3")
    check_config_sizes({"model_type": "llama4", "text_config": {
        "hidden_size": 5120, "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8,
        "intermediate_size": 8192, "num_local_experts": 16, "vocab_size": 202048, "head_dim": 128,
        "max_position_embeddings": 10485760}, "vision_config": {"hidden_size": 1408, "num_hidden_layers": 34,
                                                                 "num_attention_heads": 16}}, "Llama-4-Scout")
    check_config_sizes({"model_type": "gemma3_text", "hidden_size": 5376, "num_hidden_layers": 62,
                        "num_attention_heads": 32, "num_key_value_heads": 16, "head_dim": 128,
                        "intermediate_size": 21504, "vocab_size": 262208}, "google/gemma-3-27b")


HOSTILE = [
    ("num_hidden_layers", 10_000_000, "num_hidden_layers = 10,000,000 is out of range for the number of layers (1 to 1,000)"),
    ("hidden_size", 0, "hidden_size = 0 is out of range"),
    ("hidden_size", -4096, "hidden_size = -4,096 is out of range"),
    ("num_attention_heads", -32, "num_attention_heads = -32 is out of range"),
    ("num_key_value_heads", 0, "num_key_value_heads = 0 is out of range"),
    ("intermediate_size", -1, "intermediate_size = -1 is out of range"),
    ("num_hidden_layers", "32", "num_hidden_layers = '32' (text) is not valid: the number of layers must be a whole number"),
    ("num_hidden_layers", True, "num_hidden_layers = true (true/false) is not valid"),
    ("num_hidden_layers", 32.5, "num_hidden_layers = 32.5 (written with a decimal point) is not valid"),
    ("vocab_size", 10**12, "vocab_size = 1,000,000,000,000 is out of range for the vocabulary"),
    ("max_position_embeddings", 10**15, "max_position_embeddings = 1,000,000,000,000,000 is out of range"),
    ("head_dim", 0, "head_dim = 0 is out of range"),
    ("num_key_value_heads", 7, "num_key_value_heads = 7 does not divide num_attention_heads = 32"),
    ("num_attention_heads", 8192, "num_attention_heads = 8,192 is more attention heads than hidden_size = 4,096"),
]


@pytest.mark.parametrize("key,value,expected", HOSTILE, ids=[f"{k}={v!r}"[:40] for k, v, _ in HOSTILE])
def test_absurd_sizes_are_refused_at_once_naming_the_key(hf_configs, key, value, expected):
    raw = json.loads((hf_configs / "meta-llama__Llama-3.1-8B" / "config.json").read_text())
    raw[key] = value
    start = time.perf_counter()
    with pytest.raises(UserError) as e:
        check_config_sizes(raw, "some/model")
    assert time.perf_counter() - start < 1.0
    assert str(e.value).startswith(f"config.json of some/model: {expected}"), str(e.value)
    assert "\n" not in str(e.value)


def test_nested_and_old_style_names_are_checked_too(hf_configs):
    gpt2 = json.loads((hf_configs / "openai-community__gpt2" / "config.json").read_text())
    with pytest.raises(UserError, match=r"n_layer = 10,000,000 is out of range"):
        check_config_sizes({**gpt2, "n_layer": 10**7}, "gpt2")
    with pytest.raises(UserError, match=r"^/x/c.json: text_config.num_hidden_layers = 10,000,000 is out"):
        check_config_sizes({"model_type": "gemma3", "text_config": {"num_hidden_layers": 10**7}}, "/x/c.json")
    with pytest.raises(UserError, match=r"vision_config.num_hidden_layers = 10,000,000 is out"):
        check_config_sizes({"model_type": "llava", "vision_config": {"num_hidden_layers": 10**7}}, "m")
    with pytest.raises(UserError, match=r"num_hidden_layers = 100 with num_local_experts = 8,192 makes 819,200 "
                                        r"expert blocks \(at most 262,144\)"):
        check_config_sizes({"model_type": "mixtral", "num_hidden_layers": 100, "num_local_experts": 8192}, "m")
    # Per-layer lists (OpenELM's heads) are checked entry by entry.
    check_config_sizes({"model_type": "openelm", "num_kv_heads": [3, 3, 4, 4]}, "m")
    with pytest.raises(UserError, match=r"num_kv_heads = -4 \(in its list\) is out of range"):
        check_config_sizes({"model_type": "openelm", "num_kv_heads": [3, -4]}, "m")


@pytest.mark.parametrize(
    "key,value,named",
    [
        ("num_hidden_layers", 10_000_000, "num_hidden_layers = 10,000,000"),
        ("hidden_size", 0, "hidden_size = 0"),
        ("num_attention_heads", -8, "num_attention_heads = -8"),
        ("num_hidden_layers", "32", "num_hidden_layers = '32'"),
        ("num_hidden_layers", True, "num_hidden_layers = true"),
        ("vocab_size", 10**12, "vocab_size = 1,000,000,000,000"),
    ],
)
def test_inspect_refuses_an_absurd_config_quickly(tmp_path, hf_configs, key, value, named):
    raw = json.loads((hf_configs / "meta-llama__Llama-3.1-8B" / "config.json").read_text())
    raw[key] = value
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(raw))
    start = time.monotonic()
    r = run_cli("inspect", str(model), timeout=20)  # interpreter start included; the check itself is instant
    took = time.monotonic() - start
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: config.json of {model}: {named}"), r.stderr
    assert r.stdout == ""
    assert took < 20


# --------------------------------------------------------------------------------------------
# Data that leaves nothing to train


def _long_prompts(path: Path, n: int = 40) -> Path:
    """Records whose prompts run from about 60 to 150 tokens of the demo tokenizer, answers short."""
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(json.dumps({"instruction": f"Question {i}: " + "tell me " * (5 + i), "output": f"answer {i}"}) + "\n")
    return path


def test_cli_refuses_data_cut_before_every_response_before_the_run_directory(tmp_path, demo_cache):
    p = write_preset(tmp_path, training__seq_len=16)
    run_dir = tmp_path / "the-run"
    r = run_cli("--preset", str(p), "--run-dir", str(run_dir), timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    # The demo set: 1,500 examples, 30 held out (conftest.TEST_VALIDATION_SPLIT); every prompt is longer than
    # 16 tokens.
    assert lines[0].startswith("error: builtin:demo: no example has anything left to train at seq_len 16: "
                               "all 1,470 training examples are cut before their response (prompts are "), lines[0]
    assert "tokens); a training.seq_len of 128 keeps all of them" in lines[0]
    assert not run_dir.exists()
    assert not (tmp_path / "runs").exists()


def test_the_numbers_say_what_seq_len_keeps_them(tmp_path, demo_cache):
    from engine import data as D
    from engine.preset import DataSettings, ModelSettings

    tok = D.load_tokenizer(ModelSettings(source="builtin:tiny-llama"))
    data = _long_prompts(tmp_path / "d.jsonl")
    settings = DataSettings(train=str(data), validation_split=0)
    with pytest.raises(UserError) as e:
        D.prepare_data(settings, tok, 32, 0, cache_dir=tmp_path / "cache")
    text = str(e.value)
    lo, hi = (int(x.replace(",", "")) for x in
              text.split("(prompts are ")[1].split(" tokens)")[0].split(" to "))
    suggested = int(text.split("a training.seq_len of ")[1].split(" keeps")[0].replace(",", ""))
    assert 32 <= lo < hi and "all 40 training examples are cut before their response" in text
    assert suggested & (suggested - 1) == 0  # a power of two
    # What the message promises holds: at the suggested seq_len at least 95 % are kept.
    kept = D.prepare_data(settings, tok, suggested, 0, cache_dir=tmp_path / "cache").stats.examples
    share = text.split(" keeps ")[1]
    assert kept >= math.ceil(0.95 * 40)
    assert share == "all of them" if kept == 40 else share == f"{100 * kept // 40} % of them"
    assert suggested // 2 < 16 or D.prepare_data(settings, tok, suggested // 2, 0,
                                                   cache_dir=tmp_path / "cache").stats.examples < math.ceil(0.95 * 40)


def test_start_run_tokenizes_once_under_the_key_the_training_process_uses(tmp_path, demo_cache, monkeypatch):
    """Only some examples cut away: the run starts, the stats report them as before, and the training
    process (its own preset with absolute paths, its own tokenizer) finds the entry start_run made."""
    import engine.runs
    from engine import data as D
    from engine.plan import with_init_adapter
    from engine.preset import load_preset
    from tui.draft import start_run

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    _long_prompts(work / "d.jsonl", n=40)
    with open(work / "d.jsonl", "a", encoding="utf-8") as fh:  # short ones that fit
        for i in range(20):
            fh.write(json.dumps({"instruction": f"Say {i}.", "output": f"{i}"}) + "\n")
        # Data no earlier session tokenized, so the cache entry is this test's own (a reused cache too).
        fh.write(json.dumps({"instruction": f"Say {uuid.uuid4().hex}.", "output": "ok"}) + "\n")
    preset = preset_from_dict({
        "model": {"source": "builtin:tiny-llama"},
        "data": {"train": "d.jsonl", "validation_split": 0.1},  # relative, as a person types it
        "training": {"seq_len": 64, "seed": 7, "max_steps": 1},
        "output": {"runs_dir": str(tmp_path / "runs")},
    })
    started = []

    def create_only(p, run_dir=None, node_rank=0, master=None):  # the run directory, no training process
        started.append(engine.runs.create_run(p, run_dir))
        return started[-1]

    monkeypatch.setattr(engine.runs, "launch_run", create_only)
    cache = D.default_data_cache_dir()
    before = set(cache.iterdir()) if cache.is_dir() else set()
    run_dir = start_run(preset, tmp_path / "run")
    assert started == [run_dir]
    made = set(cache.iterdir()) - before
    assert len(made) == 1

    # What engine/train.py does, from another folder: load the run's preset, then prepare_data with
    # its seq_len and seed. It must not tokenize again.
    monkeypatch.chdir(tmp_path)
    run_preset = with_init_adapter(load_preset(run_dir / "preset.yaml"))
    assert Path(run_preset.data.train) == (work / "d.jsonl").resolve()

    def no_tokenizing(*a, **k):
        raise AssertionError("the training process tokenized again")

    monkeypatch.setattr(D, "tokenize_examples", no_tokenizing)
    t = run_preset.training
    prepared = D.prepare_data(run_preset.data, D.load_tokenizer(run_preset.model), t.seq_len, t.seed)
    assert prepared.cache_hit and prepared.cache_path in made
    assert prepared.stats.removed_empty > 0 and prepared.stats.examples > 0  # reported, not refused


def test_start_run_refuses_before_any_run_directory(tmp_path, demo_cache, monkeypatch):
    import engine.runs
    from tui.draft import start_run

    monkeypatch.setattr(engine.runs, "launch_run", lambda *a, **k: pytest.fail("launched"))
    preset = preset_from_dict({
        "model": {"source": "builtin:tiny-llama"},
        "data": {"train": str(_long_prompts(tmp_path / "d.jsonl", n=3)), "validation_split": 0},
        "training": {"seq_len": 16},
        "output": {"runs_dir": str(tmp_path / "runs")},
    })
    with pytest.raises(UserError, match=r"no example has anything left to train at seq_len 16: all 3 training "
                                        r"examples are cut before their response \(prompts are \d+ to \d+ tokens\)"):
        start_run(preset, tmp_path / "run")
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()
