"""engine.demo: the offline demo model and the bundled data, created without any network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine import demo
from engine.data import check_records, resolve_data_path
from engine.preset import DataSettings


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_demo_model_created_and_loads(demo_cache, offline):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(demo.resolve_model_source(demo.DEMO_MODEL))
    assert path == demo_cache / demo.DEMO_MODEL_DIRNAME
    assert (path / "model.safetensors").is_file()
    assert not list(demo_cache.glob(".tiny-llama-v1.tmp-*"))
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == "LlamaForCausalLM"
    cfg = model.config
    assert cfg.vocab_size == len(tok)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    for name, module in model.named_modules():
        if type(module).__name__ == "Linear" and ".layers." in name:
            assert module.in_features % 64 == 0 and module.out_features % 64 == 0, name
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    ids = tok("Hello, world!\n")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 1 + len("Hello, world!\n")
    assert tok.decode(ids, skip_special_tokens=True) == "Hello, world!\n"
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], tokenize=False
    )
    assert chat == "<s>### User:\nHi\n\n### Assistant:\nYo</s>\n\n"
    info = json.loads((path / "demo_info.json").read_text())
    assert info["pretrain_steps"] == demo.PRETRAIN_STEPS
    assert info["pretrain_loss_last"] < info["pretrain_loss_first"]


def test_second_call_is_cache_hit(demo_cache, monkeypatch):
    def no_build(*a, **k):
        raise AssertionError("built again")

    monkeypatch.setattr(demo, "build_demo_model", no_build)
    assert demo.ensure_demo_model() == demo_cache / demo.DEMO_MODEL_DIRNAME
    assert demo.ensure_demo_model(demo_cache) == demo_cache / demo.DEMO_MODEL_DIRNAME


def test_other_sources_unchanged():
    assert demo.resolve_model_source("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
    assert demo.resolve_model_source("./models/x") == "./models/x"


def test_cache_root_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("QLORA_WIZARD_CACHE", str(tmp_path / "a"))
    assert demo.cache_root() == tmp_path / "a"
    monkeypatch.delenv("QLORA_WIZARD_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.cache_root() == tmp_path / "xdg" / "qlora-wizard"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert demo.cache_root() == Path.home() / ".cache" / "qlora-wizard"


def _fake_build(out_dir, pretrain_steps=0):
    (Path(out_dir) / "config.json").write_text("{}")


def test_creation_is_atomic_when_another_process_wins(tmp_path, monkeypatch):
    target = tmp_path / demo.DEMO_MODEL_DIRNAME

    def build_while_other_finishes(out_dir, pretrain_steps=0):
        _fake_build(out_dir)
        target.mkdir()
        (target / "config.json").write_text('{"winner": true}')
        (target / ".complete").write_text("")

    monkeypatch.setattr(demo, "build_demo_model", build_while_other_finishes)
    assert demo.ensure_demo_model(tmp_path) == target
    assert json.loads((target / "config.json").read_text()) == {"winner": True}
    assert [p.name for p in tmp_path.iterdir()] == [demo.DEMO_MODEL_DIRNAME]


def test_killed_creation_leaves_nothing_usable(tmp_path, monkeypatch):
    def killed(out_dir, pretrain_steps=0):
        (Path(out_dir) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "build_demo_model", killed)
    with pytest.raises(KeyboardInterrupt):
        demo.ensure_demo_model(tmp_path)
    assert list(tmp_path.iterdir()) == []
    # A leftover folder without the completion marker (a hard kill) is not taken for the model.
    (tmp_path / demo.DEMO_MODEL_DIRNAME).mkdir()
    (tmp_path / demo.DEMO_MODEL_DIRNAME / "config.json").write_text("{}")
    monkeypatch.setattr(demo, "build_demo_model", _fake_build)
    path = demo.ensure_demo_model(tmp_path)
    assert (path / ".complete").is_file()


def test_demo_tokenizer_is_deterministic():
    a, b = demo.build_demo_tokenizer(), demo.build_demo_tokenizer()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert a.chat_template == b.chat_template == demo.CHAT_TEMPLATE


def test_bundled_data_parses():
    assert resolve_data_path(demo.DEMO_DATA) == str(demo.DEMO_DATA_FILE)
    assert demo.DEMO_DATA_FILE.stat().st_size < 300_000
    fmt, count, bad = check_records(DataSettings(train=demo.DEMO_DATA))
    assert fmt == "alpaca" and count > 100 and bad == []


def test_bundled_data_matches_its_generator():
    from engine.demo_data import make_demo_data

    expected = "\n".join(json.dumps(r, ensure_ascii=False) for r in make_demo_data.records()) + "\n"
    assert demo.DEMO_DATA_FILE.read_text(encoding="utf-8") == expected
