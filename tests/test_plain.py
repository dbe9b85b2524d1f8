"""``qlora-wizard plain``: the six steps as line-by-line prompts, driven with typed keys.

Each test feeds the keys a person would press into a prompt_toolkit pipe (all at once: an answered
prompt leaves the rest as typeahead for the next one) and runs the real engine on the offline demo
model and data, with a fixed GPU so the figures do not depend on the machine. It asserts on the
printed lines, the exported preset and the run directory.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from conftest import ROOT
from engine.demo import DEMO_PRESET
from engine.gpu import GpuInfo
from engine.preset import load_preset
from tui.draft import Services, load_draft
from tui.plain import run_plain

ENTER, UP, DOWN, SPACE, CLEAR, CTRL_C = "\r", "\x1b[A", "\x1b[B", " ", "\x15", "\x03"
"""Keys: Enter, arrows, space (toggles a checkbox), Ctrl-U (clears the typed default), Ctrl-C."""

GPU_24 = GpuInfo(0, "Test GPU 24GB", 24 * 2**30, 23 * 2**30, (8, 9))


def typed(value: str) -> str:
    """Replace a text prompt's default with ``value`` and press Enter."""
    return CLEAR + value + ENTER


def drive(draft, keys: list[str], **kwargs) -> int:
    """Run the plain wizard on ``draft`` with ``keys`` typed; the input ends after them (EOF)."""
    with create_pipe_input() as inp:
        inp.send_text("".join(keys))
        inp.close()
        return run_plain(draft, input=inp, output=DummyOutput(), **kwargs)


@pytest.fixture
def here(tmp_path, monkeypatch, demo_cache) -> Path:
    """A fresh working folder (runs/ and exported presets land there), with the demo model ready."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def started_runs(here):
    """Stops any run a test left going, so no training process outlives it."""
    yield
    from engine.runs import stop_run, wait_until_exited

    for run_dir in (here / "runs").glob("*"):
        if stop_run(run_dir):
            wait_until_exited(run_dir, timeout=60)


@pytest.mark.slow
def test_demo_walk_exports_the_preset_and_trains(here, started_runs, capsys):
    keys = [
        ENTER, ENTER,                                   # 1 model: keep builtin:tiny-llama; continue
        ENTER, ENTER, ENTER, ENTER, ENTER, ENTER,       # 2 memory: quant, seq, ckpt, optimizer, micro batch; continue
        UP + UP + ENTER, typed("8"), ENTER, ENTER,      # 3 targets: q + v; r 8; alpha, dropout
        ENTER,                                          #   continue
        ENTER, ENTER, ENTER, ENTER, ENTER,              # 4 data: builtin:demo, format, validation share,
                                                        #   train on prompts; continue
        ENTER,                                          # 5 method: sft
        typed("4"), ENTER, ENTER, ENTER, ENTER,         #   max steps 4; grad accum; no more; the rule's lr; continue
        typed("plain-demo"), ENTER, ENTER,              # 6 run name; export to the default file; start
    ]
    code = drive(load_draft(DEMO_PRESET), keys, services=Services(probe_gpus=lambda: [GPU_24]))
    out = capsys.readouterr().out
    assert code == 0, out

    # What the person saw on the way.
    for step in ("step 1 of 6: Model", "step 2 of 6: Memory", "step 3 of 6: LoRA targets", "step 4 of 6: Data",
                 "step 5 of 6: Hyperparameters", "step 6 of 6: Review"):
        assert step in out
    assert "LlamaForCausalLM (llama)" in out and "616,832" in out
    assert "GPU 0: Test GPU 24GB, 23.00 GiB free of 24.00 GiB" in out
    assert re.search(r"FITS: [\d.]+ GiB of 23\.00 GiB \(\d+ %\), [\d.]+ GiB left; Test GPU 24GB", out)
    assert "the total counts 0.75 GiB of CUDA context" in out and "(packed rows, no mask)" in out
    assert "the guide's inference rule (weights on disk x 1.2)" in out
    assert "example 1 of 3 as the model sees it" in out and "«" in out
    supervised = int(re.search(r"([\d,]+) of them trained", out).group(1).replace(",", ""))
    assert "lr = base_lr x sqrt(supervised_tokens / (steps / epochs) / pretrain_batch)" in out
    rule = re.search(r"   = 0\.003 x sqrt\(([\d,]+) / \(4 / ([\d.]+)\) / 2,064\) = ([\d.e-]+)", out)
    assert rule, out
    assert int(rule.group(1).replace(",", "")) == supervised
    steps_per_epoch = 4 / float(rule.group(2))
    assert float(rule.group(3)) == pytest.approx(0.003 * (supervised / steps_per_epoch / 2064) ** 0.5, rel=2e-3)
    assert "source: builtin:tiny-llama" in out and "max_steps: 4" in out

    # The exported preset has the answers.
    exported = here / "plain-demo.yaml"                 # the default follows the run name
    assert f"exported {exported.name}; run it with: qlora-wizard --preset {exported.name}" in out
    preset = load_preset(exported)
    assert preset.lora.targets == ["q_proj", "v_proj"] and preset.lora.r == 8
    assert preset.training.max_steps == 4 and preset.output.name == "plain-demo"
    assert preset.training.learning_rate == float(rule.group(3))

    # The run started from it and was followed to its end.
    run_dir = here / "runs" / "plain-demo"
    assert "training in the background: runs/plain-demo" in out
    assert load_preset(run_dir / "preset.yaml").lora.targets == ["q_proj", "v_proj"]
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["kind"] == "step"] == [1, 2, 3, 4]
    assert events[-1]["kind"] == "end" and events[-1]["status"] == "finished"
    assert "step 4/4" in out and "finished at step 4" in out


def test_bad_model_is_said_and_asked_again_and_ctrl_c_keeps_the_draft(here, capsys):
    from engine.demo import cache_root

    kept = cache_root() / "last-draft.yaml"
    kept.unlink(missing_ok=True)
    keys = [
        DOWN + ENTER, typed(str(here / "no-such-model")),    # type a model that is not there
        ENTER, typed("builtin:tiny-llama"),                  # asked again: type the demo model
        ENTER,                                               # continue to memory
        ENTER, typed("64"), CTRL_C,                          # quantization, seq len 64, then Ctrl-C
    ]
    code = drive(load_draft(DEMO_PRESET), keys, services=Services(probe_gpus=lambda: [GPU_24]))
    out = capsys.readouterr().out
    assert code == 130
    bad = out.index("error: ")
    assert "no-such-model" in out[bad:].splitlines()[0]
    assert out.index("LlamaForCausalLM") > bad          # the second answer was read
    assert "step 2 of 6: Memory" in out
    assert f"interrupted; the draft is kept in {kept} (qlora-wizard plain {kept} continues)" in out
    draft = load_preset(kept)
    assert draft.model.source == "builtin:tiny-llama" and draft.training.seq_len == 64


def test_no_gpu_budget_fit_layers_overwrite_and_finish_without_a_run(here, capsys):
    (here / "tiny-llama-qlora.yaml").write_text("keep me\n")
    keys = [
        ENTER, ENTER,                                        # 1 model; continue
        typed("1"),                                          # 2 no GPU: check against 1 GiB
        ENTER, ENTER, ENTER, ENTER, typed("4000"),           #   quant, seq, ckpt, optimizer; micro batch 4000
        ENTER,                                               #   does not fit: change again? yes
        ENTER, ENTER, ENTER, ENTER, ENTER,                   #   ...; micro batch: the largest that fits
        UP + ENTER,                                          #   back to 1. Model
        ENTER, ENTER,                                        # 1 keep (already read); continue
        ENTER, ENTER, ENTER, ENTER, ENTER, ENTER,            # 2 budget 1 kept; the same settings
        ENTER,                                               #   continue
        DOWN + ENTER,                                        # 3 pick layers by name
        DOWN * 4 + SPACE + DOWN + SPACE + DOWN + SPACE + ENTER,  # untick gate, up and down
        ENTER, ENTER, ENTER, ENTER,                          #   r, alpha, dropout; continue
        ENTER, ENTER, typed("0.2"), ENTER,                   # 4 data; format; validation share 0.2; train on
        ENTER,                                               #   prompts; continue
        ENTER, ENTER, ENTER, "y",                            # 5 method sft, max steps, grad accum; more: yes
        ENTER, ENTER, DOWN + ENTER, ENTER, ENTER, ENTER,     #   micro batch, seq len, linear, warmup, decay, norm
        ENTER, ENTER, ENTER, ENTER,                          #   optimizer, seed, eval, save
        ENTER, ENTER,                                        #   base rate, pretraining batch
        typed("0.002"), ENTER,                               #   learning rate 0.002; continue
        ENTER,                                               # 6 no run name
        ENTER, ENTER,                                        #   export to the default: exists, keep it
        typed("mine"),                                       #   export to mine(.yaml)
        "n", ENTER,                                          #   do not start; finish
    ]
    code = drive(load_draft(DEMO_PRESET), keys, services=Services(probe_gpus=list))
    out = capsys.readouterr().out
    assert code == 0, out
    assert "no NVIDIA GPU found here" in out
    assert re.search(r"DOES NOT FIT: needs [\d,.]+ GiB, 1\.00 GiB available \([\d.]+ GiB short\); "
                     r"1\.00 GiB \(typed\)", out)
    assert "micro batch 4000 does not fit; the default below is the largest that fits" in out
    largest = int(re.search(r"largest micro batch at 128 tokens: (\d+)", out).group(1))
    assert "now FITS: " in out                               # at the largest micro batch
    assert out.count("step 1 of 6: Model") == 2 and out.count("step 2 of 6: Memory") == 2
    assert "adapting q_proj, k_proj, v_proj, o_proj" in out
    assert re.search(r"\d[\d,]* training examples, \d[\d,]* validation examples", out)
    assert "note: 0.002 is above the" in out
    assert "run it later with: qlora-wizard --preset mine.yaml" in out

    assert (here / "tiny-llama-qlora.yaml").read_text() == "keep me\n"
    preset = load_preset(here / "mine.yaml")
    assert preset.training.micro_batch_size == largest
    assert preset.lora.targets == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert preset.data.validation_split == 0.2
    assert preset.training.lr_scheduler == "linear" and preset.training.learning_rate == 0.002
    assert not (here / "runs").exists()


def test_memory_step_takes_f_for_the_fastest_settings_that_fit(here, hf_configs, capsys):
    from engine.demo import cache_root
    from engine.preset import preset_from_dict
    from tui.draft import Draft

    draft = Draft(preset_from_dict({
        "model": {"source": str(hf_configs / "meta-llama__Llama-3.1-8B")}, "data": {"train": "builtin:demo"},
        "training": {"seq_len": 2048, "micro_batch_size": 1, "gradient_accumulation_steps": 8,
                     "fused_kernels": "off"}}))
    keys = [
        ENTER, ENTER,                                        # 1 model: keep the 8B config; continue
        ENTER, ENTER, ENTER, ENTER,                          # 2 memory: quant, seq len, checkpointing, optimizer
        typed("f"),                                          #   micro batch: f, the fastest that fit
    ]                                                        #   (the input ends at the menu after the step)
    code = drive(draft, keys, services=Services(probe_gpus=lambda: [GPU_24]))
    out = capsys.readouterr().out
    assert code == 130
    kept = load_preset(cache_root() / "last-draft.yaml").training
    mb, acc = kept.micro_batch_size, kept.gradient_accumulation_steps
    assert kept.gradient_checkpointing is True and mb * acc == 8 and mb > 1
    assert f"fastest that fits: checkpointing on, micro batch {mb} x accumulation {acc}: " in out
    assert "  - checkpointing on: without it even micro batch 1 needs" in out
    assert f"  - micro batch {mb} x accumulation {acc} keeps your effective batch of 8" in out
    assert "  - check the data (step 4) for its real lengths" in out
    assert "now FITS: " in out


def test_a_model_that_needs_its_own_code_asks_first(here, hf_configs, capsys):
    falcon = str(hf_configs / "tiiuae__falcon-7b")
    keys = [
        DOWN + ENTER, typed(falcon),                         # type the model
        "n",                                                 # do not run its code: asked again
        ENTER, ENTER,                                        # type a model: the same one
        "y",                                                 # now run its code
        CTRL_C,                                              # at the menu after the step
    ]
    code = drive(load_draft(DEMO_PRESET), keys, services=Services(probe_gpus=lambda: [GPU_24]))
    out = capsys.readouterr().out
    assert code == 130
    assert out.count("needs its own Python code") == 2 and "--trust-remote-code" not in out
    assert "FalconForCausalLM" in out
    from engine.demo import cache_root

    kept = load_preset(cache_root() / "last-draft.yaml")
    assert kept.model.source == falcon and kept.model.trust_remote_code is True


def test_field_help_and_a_refused_value_are_said_then_asked_again(here, capsys):
    keys = [
        ENTER, ENTER,                                        # 1 model; continue
        ENTER, typed("?"), typed("8"),                       # 2 quant; seq len: help, then 8 (too short)
    ]
    code = drive(load_draft(DEMO_PRESET), keys, services=Services(probe_gpus=lambda: [GPU_24]))
    out = capsys.readouterr().out
    assert code == 130                                       # the input ran out at a question
    assert "Longest example in tokens; longer ones are truncated." in out
    assert "error: training.seq_len = 8 is not valid (allowed: >= 16)" in out
    assert "interrupted; the draft is kept in" in out


def test_plain_does_not_load_textual():
    code = "import sys, tui.plain\nprint('textual' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_two_machine_run_asks_this_machines_place_and_starts_its_part(here, capsys):
    """distributed.nodes 2: the review says what each machine runs; starting asks this machine's
    number and machine 0's address (a wrong one is said and asked again) and passes them on."""
    started = []

    def fake_start(preset, **place):
        started.append({"nodes": preset.distributed.nodes, **place})
        return here / "runs" / "fake"

    draft = load_draft(DEMO_PRESET)
    draft.set("distributed.nodes", 2)
    keys = [
        ENTER, ENTER,                                   # 1 model
        ENTER, ENTER, ENTER, ENTER, ENTER, ENTER,       # 2 memory
        UP + UP + ENTER, typed("8"), ENTER, ENTER,      # 3 targets: q + v; r 8
        ENTER,
        ENTER, ENTER, ENTER, ENTER, ENTER,              # 4 data
        ENTER, typed("4"), ENTER, ENTER, ENTER, ENTER,  # 5 method sft; max steps 4
        typed("two"), ENTER, ENTER,                     # 6 run name; export; start
        typed("5"), typed("10.0.0.1:29500"),            #   machine 5 of 2: refused
        typed("1"), typed("10.0.0.1:29500"),            #   machine 1
    ]
    code = drive(draft, keys, services=Services(probe_gpus=lambda: [GPU_24], start_run=fake_start), follow=False)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "2 machines: copy the preset (with the data) to each and run there" in out
    assert "qlora-wizard --preset two.yaml --nodes 2 --node-rank 1 --master HOST:29500" in out
    assert "this machine's number must be 0 to 1, not 5" in out
    assert started == [{"nodes": 2, "node_rank": 1, "master": "10.0.0.1:29500"}]


@pytest.mark.slow
def test_an_orpo_walk_on_the_demo_pairs_switches_to_dpo_takes_orpo_and_trains(here, started_runs, capsys):
    """The demo's pairs in the data step turn the draft's method to dpo (said); the person takes orpo in
    the hyperparameters step, which then asks orpo's one setting (beta; no reference, no dpo loss) and
    offers its published rate; the run trains with orpo's figures. (The Textual walk trains dpo.)"""
    keys = [
        ENTER, ENTER,                                   # 1 model: keep builtin:tiny-llama; continue
        ENTER, ENTER, ENTER, ENTER, ENTER, ENTER,       # 2 memory: as it is; continue
        UP + UP + ENTER, typed("8"), ENTER, ENTER,      # 3 targets: q + v; r 8; alpha, dropout
        ENTER,                                          #   continue
        typed("builtin:demo-pairs"), ENTER, ENTER,      # 4 data: the pairs; format, validation share,
        ENTER, ENTER,                                   #   train on prompts; continue
        DOWN + ENTER, ENTER,                            # 5 method: orpo (after dpo, as switched); beta
        typed("4"), ENTER, ENTER, typed("0.0005"),      #   max steps 4; grad accum; no more; lr
        ENTER,                                          #   continue
        typed("plain-orpo"), ENTER, ENTER,              # 6 run name; export to the default file; start
    ]
    code = drive(load_draft(DEMO_PRESET), keys, services=Services(probe_gpus=lambda: [GPU_24]))
    out = capsys.readouterr().out
    assert code == 0, out
    assert "the data holds preference pairs: training.method is now dpo, not sft" in out
    assert "pair 1 of 3 as the model sees it" in out
    assert "learning rate for orpo" in out and "the guide's rule is for supervised tokens" in out
    preset = load_preset(here / "plain-orpo.yaml")
    assert preset.training.method == "orpo" and preset.data.train == "builtin:demo-pairs"
    assert preset.training.learning_rate == 0.0005
    run_dir = here / "runs" / "plain-orpo"
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert events[0]["method"] == "orpo" and events[0].get("reference") is None and events[-1]["status"] == "finished"
    assert [e["step"] for e in events if e["kind"] == "step"] == [1, 2, 3, 4]
    assert all("reward_accuracy" in e and "nll_loss" in e for e in events if e["kind"] == "step")
    assert "ORPO" in out and "finished at step 4" in out
