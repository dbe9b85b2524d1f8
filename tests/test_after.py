"""After the run (issue 13): try it, compare it with the base, merge it, share it, plot it.

One short real demo run (QLoRA on the CPU, with validation) is trained once and read by every test;
one loaded model (``TrySession``) serves the in-process tests. The commands run as a person runs
them (``run_cli``) and the tests assert on what they print, write and exit with.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import ROOT, copied_run, run_cli, write_preset

pytestmark = pytest.mark.slow

REVERSE = "Reverse the letters of the word.\n\nfree"
"""A prompt of the demo's task (alpaca: a blank line between the instruction and its input)."""


@pytest.fixture(scope="module")
def after_run(demo_run, tmp_path_factory) -> Path:
    """The session's short demo run with validation (it also logged to TensorBoard when that is
    installed), copied: this module writes into it (eval, card, curves)."""
    return copied_run(demo_run, tmp_path_factory.mktemp("after"))


@pytest.fixture(scope="module")
def session(after_run):
    """The run's model loaded once; ``session.loads`` lists every model load while the module runs."""
    from transformers import AutoModelForCausalLM

    from engine.after import TrySession

    loads: list = []
    real = AutoModelForCausalLM.from_pretrained

    def counting(*args, **kwargs):
        loads.append(args[:1])
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AutoModelForCausalLM, "from_pretrained", counting)
        s = TrySession.open(after_run)
        s.loads = loads
        s.loads_at_open = len(loads)
        yield s
        s.close()


GREEDY = dict(temperature=0, max_new_tokens=24)


# ---------------------------------------------------------------------------------------------
# try


def test_try_prints_the_fine_tuned_and_the_base_answer(after_run):
    r = run_cli("try", str(after_run), "--prompt", REVERSE, "--temperature", "0", "--max-new-tokens", "24")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    tuned = next(i for i, line in enumerate(lines) if line.startswith("── fine-tuned"))
    base = next(i for i, line in enumerate(lines) if line.startswith("── base"))
    assert tuned < base
    assert "adapter on" in lines[tuned] and "adapter off" in lines[base]
    assert lines[tuned + 1].strip() and lines[base + 1].strip()
    assert lines[tuned + 1] != lines[base + 1]
    assert "Traceback" not in r.stderr


def test_try_json_has_both_answers_and_the_rendered_prompt(after_run):
    r = run_cli("try", str(after_run), "--prompt", REVERSE, "--json", "--temperature", "0", "--max-new-tokens", "24")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["fine_tuned"] and out["base"] and out["fine_tuned"] != out["base"]
    # rendered as training rendered the demo's alpaca examples: BOS, instruction, input, response header
    assert out["rendered"] == "<s>### Instruction:\nReverse the letters of the word.\n\n### Input:\nfree\n\n### Response:\n"
    assert out["decoding"] == {"max_new_tokens": 24, "temperature": 0.0, "top_p": 0.9}


def test_base_answer_comes_from_the_same_model_with_the_adapter_off(session, monkeypatch):
    from engine.after import Decoding

    assert session.loads_at_open == 1 and session.device == "cpu"
    switched = []
    real = session.model.disable_adapter

    def counting():
        switched.append(1)
        return real()

    monkeypatch.setattr(session.model, "disable_adapter", counting)
    params = sum(p.numel() for p in session.model.parameters())
    loads = len(session.loads)
    d = Decoding(**GREEDY)
    tuned = session.answer(REVERSE, adapter=True, decoding=d)
    base = session.answer(REVERSE, adapter=False, decoding=d)
    assert tuned != base
    assert switched == [1]  # the base answer, and only it, had the adapter switched off
    assert len(session.loads) == loads  # no second model
    assert sum(p.numel() for p in session.model.parameters()) == params
    # the switch is undone: the fine-tuned answer is the same again
    assert session.answer(REVERSE, adapter=True, decoding=d) == tuned


def test_stream_yields_pieces_and_stops_when_asked(session):
    import threading

    from engine.after import Decoding

    pieces = list(session.stream(REVERSE, adapter=False, decoding=Decoding(temperature=0, max_new_tokens=40)))
    assert len(pieces) > 1
    stop = threading.Event()
    stop.set()
    early = "".join(session.stream(REVERSE, adapter=False, decoding=Decoding(temperature=0, max_new_tokens=40),
                                   stop=stop))
    assert len(early) < len("".join(pieces))


def test_examples_are_the_runs_validation_split(session, after_run):
    examples = session.examples(4)
    assert len(examples) == 4
    assert all(e.prompt and e.reference for e in examples)
    start = json.loads((after_run / "events.jsonl").read_text().splitlines()[0])
    assert start["data"]["validation_examples"] == 150
    # the same split the run held out: none of them is among the training examples
    from engine.data import held_out_examples
    from engine.preset import load_preset

    preset = load_preset(after_run / "preset.yaml")
    _, records, held = held_out_examples(preset.data, preset.training.seed, 150)
    assert held and [e.prompt for e in examples] == [
        (r["instruction"] + (f"\n\n{r['input']}" if r["input"].strip() else "")) for r in records[:4]]


@pytest.mark.parametrize("fmt,example", [
    ("alpaca", {"instruction": "Say it.", "input": "now", "output": "NOW"}),
    ("alpaca", {"instruction": "Say hi.", "input": "", "output": "hi"}),
    ("input_output", {"input": "two", "output": "2"}),
    ("prompt_completion", {"prompt": "Q: one?\nA:", "completion": " 1"}),
    ("messages", {"messages": [["system", "Be short."], ["user", "Hi there"], ["assistant", "Hello."]]}),
    ("text", {"text": "the quick brown fox jumps over the lazy dog"}),
])
def test_a_typed_prompt_renders_as_training_rendered_the_prompt(demo_cache, fmt, example):
    """What a person types becomes exactly the prompt part training rendered, so the response follows it."""
    from engine.data.formats import get_format
    from engine.data.tokenize import adds_bos
    from engine.demo import DEMO_MODEL
    from engine.preset import ModelSettings
    from engine.data import load_tokenizer

    tok = load_tokenizer(ModelSettings(source=DEMO_MODEL))
    form = get_format(fmt)
    typed, reference = form.typed_prompt(example)
    if fmt == "messages":  # a one-turn prompt drops the system turn: compare with the conversation without it
        example = {"messages": example["messages"][1:]}
    full = form.render(example, tok, adds_bos(tok))
    prompt = form.render_prompt(typed, tok, adds_bos(tok))
    assert full.text.startswith(prompt.text) and prompt.bos == full.bos
    assert full.text[len(prompt.text):].startswith(reference)


def test_try_refuses_a_missing_or_unfinished_run_in_one_line(tmp_path):
    r = run_cli("try", str(tmp_path / "nope"), "--prompt", "x")
    assert r.returncode == 2 and r.stderr.strip() == (
        f"error: there is no run at {tmp_path / 'nope'}; list runs with `qlora-wizard runs`")
    from engine.preset import load_preset
    from engine.runs import create_run

    run_dir = create_run(load_preset(write_preset(tmp_path)), tmp_path / "new")
    for command in (["try", str(run_dir), "--prompt", "x"], ["eval", str(run_dir)],
                    ["merge", str(run_dir), "--out", str(tmp_path / "m")], ["push", str(run_dir), "me/x"]):
        r = run_cli(*command)
        assert r.returncode == 2, command
        assert len(r.stderr.strip().splitlines()) == 1 and "has not finished" in r.stderr, r.stderr


# ---------------------------------------------------------------------------------------------
# eval


def test_eval_compares_base_and_fine_tuned_and_writes_eval_json(session, after_run, monkeypatch):
    from engine import data as data_mod
    from engine.after import Decoding, evaluate_run

    def no_second_tokenizer(model):
        raise AssertionError("eval loaded the tokenizer again: the run's prepared data is in the cache")

    monkeypatch.setattr(data_mod, "load_tokenizer", no_second_tokenizer)
    result = evaluate_run(after_run, generations=2, decoding=Decoding(temperature=0, max_new_tokens=16),
                          session=session)
    saved = json.loads((after_run / "eval.json").read_text())
    assert saved == json.loads(json.dumps(result.as_dict()))
    base, tuned = saved["base"], saved["fine_tuned"]
    assert tuned["loss"] < base["loss"]  # the demo learned its task
    assert tuned["perplexity"] == pytest.approx(2.718281828 ** tuned["loss"], rel=1e-6)
    assert saved["validation"]["examples"] == 150 and saved["validation"]["scored_tokens"] > 0
    # token-weighted over the same split the run validated on: close to the run's own last value
    assert tuned["loss"] == pytest.approx(saved["run_eval_loss"], rel=0.05)
    assert len(saved["generations"]) == 2
    assert {"prompt", "reference", "base", "fine_tuned"} <= set(saved["generations"][0])


def test_answers_generated_in_a_batch_are_the_answers_generated_one_at_a_time(session):
    """eval generates its answers several prompts at a time (left-padded): greedy, each is the answer
    ``try`` gives that prompt alone, and it ends as that one ends."""
    from engine.after import Decoding

    prompts = [ex.prompt for ex in session.examples(6)]
    prompts[1] = prompts[1] + " Answer in one word."  # prompts of other lengths: padding in the batch
    assert len({len(p) for p in prompts}) > 1
    decoding = Decoding(temperature=0, max_new_tokens=24)
    for adapter in (False, True):
        batched = session.answers(prompts, adapter=adapter, decoding=decoding, batch_size=4)
        alone = [session.answer_with_ending(p, adapter=adapter, decoding=decoding) for p in prompts]
        assert [text for text, _ in batched] == [text for text, _ in alone]
        assert [ending for _, ending in batched] == [ending for _, ending in alone]
    assert {ending.reason for _, ending in alone} <= {"eos", "length"}


# ---------------------------------------------------------------------------------------------
# merge


def test_merged_model_loads_with_transformers_and_matches_the_adapter_model(after_run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from engine.after.session import finished_run, load_adapter_model, model_source

    out = tmp_path / "merged"
    r = run_cli("merge", str(after_run), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "float32 on the CPU needs" in r.stdout and "of disk at" in r.stdout
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.float32 and not hasattr(merged, "peft_config")
    run = finished_run(after_run)
    adapter_model = load_adapter_model(run, AutoModelForCausalLM.from_pretrained(model_source(run),
                                                                                 dtype=torch.float32))
    ids = torch.tensor([[1, *range(40, 90)]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapter_model(ids).logits, atol=1e-4, rtol=0)
        # and the adapter does something: the plain base differs
        with adapter_model.disable_adapter():
            assert (adapter_model(ids).logits - merged(ids).logits).abs().max() > 1e-2


def test_merge_refuses_a_non_empty_out_in_one_line(after_run, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = run_cli("merge", str(after_run), "--out", str(out))
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: --out {out} already exists and is not empty; name a new or empty folder"
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("case", ["read-only", "under a file", "a link"])
def test_merge_refuses_an_unusable_out_before_loading_anything(after_run, tmp_path, bind_readonly, case):
    """Every refusal comes before the slow part: an --out that cannot be written is named before the
    base model is read (the engine's own plan, called in-process, never imports transformers)."""
    import subprocess
    import sys

    if case == "read-only":
        (tmp_path / "ro").mkdir()
        place = bind_readonly(tmp_path / "ro")
        out, said = place / "merged", f"error: cannot write --out {place / 'merged'}: Read-only file system"
    elif case == "under a file":
        (tmp_path / "file").write_text("x")
        out, said = tmp_path / "file" / "merged", f"error: --out {tmp_path / 'file' / 'merged'} cannot be made: " \
                                                  f"{tmp_path / 'file'} is a file, not a folder"
    else:
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
        out, said = tmp_path / "link", f"error: --out {tmp_path / 'link'} is a symbolic link"
    r = run_cli("merge", str(after_run), "--out", str(out))
    assert r.returncode == 2 and r.stderr.startswith(said) and r.stderr.count("\n") == 1, r.stderr
    probe = ("import sys\nfrom engine.after.merge import plan_merge\nfrom engine.errors import UserError\n"
             f"try:\n    plan_merge({str(after_run)!r}, {str(out)!r})\nexcept UserError:\n    pass\n"
             "print('transformers' in sys.modules)")
    checked = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert checked.stdout.strip() == "False", checked.stdout + checked.stderr


def test_merge_refuses_when_the_disk_is_too_small(after_run, tmp_path, mount_tmpfs):
    disk = mount_tmpfs(tmp_path / "small", size="2m")
    r = run_cli("merge", str(after_run), "--out", str(disk / "merged"))
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: not enough disk to merge:")
    assert f"of disk at {disk}" in lines[0]
    assert list(disk.iterdir()) == []


def test_merge_refuses_when_memory_is_short(after_run, tmp_path, monkeypatch):
    import engine.after.merge as merge
    from engine.errors import UserError

    monkeypatch.setattr(merge, "meminfo_available", lambda: 100 * 2**20)
    with pytest.raises(UserError, match=r"^not enough memory to merge: .*\(0\.10 GiB available\)"):
        merge.plan_merge(after_run, tmp_path / "m", "bf16")
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------------------------
# card and push


def test_card_describes_the_run(after_run):
    r = run_cli("card", str(after_run))
    assert r.returncode == 0, r.stderr
    card = (after_run / "README.md").read_text()
    start = json.loads((after_run / "events.jsonl").read_text().splitlines()[0])
    events = [json.loads(line) for line in (after_run / "events.jsonl").read_text().splitlines()]
    last_step = [e for e in events if e["kind"] == "step"][-1]
    last_eval = [e for e in events if e["kind"] == "eval"][-1]
    assert card.startswith("---\nlibrary_name: peft\n")
    assert "`builtin:tiny-llama`" in card
    assert f"| training examples | {start['data']['examples']:,} |" in card
    assert f"| supervised tokens (trained) | {start['data']['supervised_tokens']:,} |" in card
    assert f"final training loss: {last_step['loss']:.4f} (step 30)" in card
    assert f"final validation loss: {last_eval['eval_loss']:.4f} (step 30)" in card
    assert "![training and validation loss](curves.svg)" in card and (after_run / "curves.svg").is_file()
    assert 'PeftModel.from_pretrained(base, "adapter")' in card and str(after_run) not in card
    from engine.after.card import shareable_preset
    from engine.preset import load_preset

    # The preset, whole, as it can be shared: local paths reduced to names.
    assert shareable_preset(load_preset(after_run / "preset.yaml")).to_yaml().strip() in card
    assert "### Instruction:\n{your prompt}\n\n### Response:" in card


def test_card_for_a_merged_model_on_the_hub_names_both(after_run, tmp_path):
    from engine.after.card import card_text
    from engine.after.session import finished_run

    card = card_text(finished_run(after_run), repo_id="me/tiny-merged", merged=tmp_path)
    assert "library_name: transformers" in card and "AutoModelForCausalLM.from_pretrained(\"me/tiny-merged\")" in card
    assert "PeftModel" not in card and "# tiny-merged" in card


def test_push_without_a_token_is_one_line_and_writes_the_card(after_run, tmp_path):
    (after_run / "README.md").unlink(missing_ok=True)
    r = run_cli("push", str(after_run), "me/tiny", env={"HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: no Hugging Face token") and "HF_TOKEN" in lines[-1]
    assert not any(line.startswith(("Traceback", "error:")) for line in lines[:-1])
    assert (after_run / "README.md").is_file()


def test_push_that_cannot_reach_the_hub_is_one_line(after_run, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"HF_TOKEN": "hf_not_a_real_token", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0",
           "HF_ENDPOINT": f"http://127.0.0.1:{port}"}
    r = run_cli("push", str(after_run), "me/tiny", "--yes", env=env, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot push to me/tiny on http://127.0.0.1:{port}")
    assert "Traceback" not in r.stderr
    assert not list(after_run.glob(".push-*"))  # the staging folder is gone


# ---------------------------------------------------------------------------------------------
# curves: plot and TensorBoard


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_an_svg_and_a_png(after_run, tmp_path):
    r = run_cli("plot", str(after_run))
    assert r.returncode == 0, r.stderr
    svg = ET.parse(after_run / "curves.svg").getroot()
    assert svg.tag == "{http://www.w3.org/2000/svg}svg"
    lines = {p.get("class"): p.get("points").split() for p in svg.iter("{http://www.w3.org/2000/svg}polyline")
             if p.get("class")}
    assert len(lines["train"]) == 30 and len(lines["validation"]) == 3
    assert _png_size((after_run / "curves.png").read_bytes()) == (720, 360)
    r = run_cli("plot", str(after_run), "--out", str(tmp_path / "pics" / "loss.svg"))
    assert r.returncode == 0 and (tmp_path / "pics" / "loss.png").is_file()


def test_png_without_matplotlib_is_a_valid_raster():
    import zlib

    from engine.after.plot import HEIGHT, TRAIN_COLOR, VALIDATION_COLOR, WIDTH, raster_png

    data = raster_png([(1, 5.0), (2, 4.0), (3, 3.5)], [(2, 4.2), (3, 3.8)])
    assert _png_size(data) == (WIDTH, HEIGHT)
    chunks, pos = {}, 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(kind + body)
        chunks[kind] = body
        pos += 12 + length
    raw = zlib.decompress(chunks[b"IDAT"])
    assert len(raw) == HEIGHT * (1 + 3 * WIDTH)
    assert bytes(TRAIN_COLOR) in raw and bytes(VALIDATION_COLOR) in raw


def test_the_run_logged_to_tensorboard(after_run):
    pytest.importorskip("tensorboard")
    files = list((after_run / "tensorboard").glob("events.out.tfevents.*"))
    assert files and sum(f.stat().st_size for f in files) > 0
    assert not (after_run / "checkpoints" / "runs").exists()


def test_report_to_names_a_missing_package_in_one_line(tmp_path, monkeypatch):
    import importlib.util

    from engine.errors import UserError
    from engine.plan import report_to
    from engine.preset import load_preset

    preset = load_preset(write_preset(tmp_path, training__report_to="wandb"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match="training.report_to: wandb needs the wandb package"):
        report_to(preset)
    assert report_to(load_preset(write_preset(tmp_path, training__report_to="none"))) == []


def test_help_lists_the_after_run_commands():
    r = run_cli("--help")
    for command in ("try", "eval", "merge", "card", "push", "plot"):
        assert f"\n    {command} " in r.stdout, command


def test_runs_names_the_command_that_tries_a_finished_run(after_run):
    r = run_cli("runs", "--runs-dir", str(after_run.parent))
    assert r.returncode == 0
    assert f"qlora-wizard try {after_run}" in " ".join(r.stdout.split())
