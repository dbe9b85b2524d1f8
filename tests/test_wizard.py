"""The wizard, driven through Pilot on the real engine: the offline demo model and data, real model
configs from tests/fixtures, a real training process. The one thing fixed is the GPU (a 24 GiB card),
so what the memory step says does not depend on the machine the tests run on.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from engine.demo import DEMO_PRESET
from engine.gpu import GpuInfo
from engine.preset import load_preset
from engine.runs import is_running, wait_until_exited
from screen import assert_snapshot, flat, region_text, screen_text, wait_for, wait_until
from tui.draft import Draft, Services, load_draft
from tui.steps.hyper import lr_view
from tui.steps.memory import memory_view
from tui.widgets.fields import PresetInput

GPU = GpuInfo(0, "Test GPU 24GB", 24 * 2**30, 23 * 2**30, (8, 9))
"""The GPU the tests pretend to have."""

SERVICES = Services(probe_gpus=lambda: [GPU])

SMALL, LARGE = (80, 24), (120, 40)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch, demo_cache):
    """Runs and exported presets land in the test's own folder."""
    monkeypatch.chdir(tmp_path)


def _wizard(draft: Draft | None = None, **kwargs):
    from tui.wizard import WizardApp

    return WizardApp(draft or load_draft(DEMO_PRESET), services=SERVICES, **kwargs)


def _config_draft(hf_configs: Path, name: str) -> Draft:
    """A draft for a real model config (no weights) and the demo data."""
    from engine.preset import preset_from_dict

    return Draft(preset_from_dict({"model": {"source": str(hf_configs / name)}, "data": {"train": "builtin:demo"},
                                   "training": {"seq_len": 2048, "micro_batch_size": 1}}))


async def _ready(pilot, data: bool = True) -> None:
    """Wait until the model is read (and the data checked)."""
    app = pilot.app
    await wait_until(pilot, lambda: app.draft.model_ready and (app.draft.data_ready or not data)
                     and not app.data_busy, timeout=120, what="the model and the data")
    await pilot.pause(0.2)


def _field(app, path: str) -> PresetInput:
    return next(f for f in app.screen.query(PresetInput) if f.path == path)


async def _type(pilot, path: str, text: str) -> None:
    """Replace a form field's text, as a person does: focus it, select all, type."""
    field = _field(pilot.app, path)
    field.focus()
    await pilot.pause()
    field.value = ""
    await pilot.press(*text)
    await pilot.pause(0.1)


# ---------------------------------------------------------------------------------------------
# The whole way


async def _stop_from_the_run_screen(pilot) -> None:
    """``s``, confirmed with ``y``: the run screen says STOPPED and how to resume."""
    await pilot.press("s")
    await wait_for(pilot, "Keep training")
    await pilot.press("y")
    text = await wait_for(pilot, "STOPPED", "qlora-wizard resume", timeout=90)
    assert "STOPPED" in text and "qlora-wizard resume" in text


def _end_if_left_running(run_dir: Path) -> None:
    """A run a failed walk left training gets SIGTERM, and is waited for."""
    if is_running(run_dir):
        os.kill(json.loads((run_dir / "process.json").read_text())["pid"], 15)
    wait_until_exited(run_dir, timeout=60)


@pytest.mark.slow
async def test_walks_the_demo_from_model_to_a_live_run_then_stops_it(tmp_path):
    app = _wizard()
    async with app.run_test(size=LARGE) as pilot:
        await _ready(pilot, data=False)
        text = flat(screen_text(app))
        for phrase in ("1 Model", "LlamaForCausalLM", "hidden size 128", "4 query / 2 key-value",
                       "vocabulary 101", "context 1,024 tokens", "q_proj, k_proj, v_proj"):
            assert phrase in text

        await pilot.press("ctrl+n")
        text = await wait_for(pilot, "FITS")
        assert "Test GPU 24GB" in text and "guide's rule, weights x 1.2" in text

        await pilot.press("ctrl+n")
        await wait_for(pilot, "trainable")
        await pilot.click("#only-qv")
        text = await wait_for(pilot, "trainable 16,384 parameters", region="#lora-summary")
        assert app.draft.preset.lora.targets == ["q_proj", "v_proj"]

        await pilot.press("ctrl+n")
        text = await wait_for(pilot, "1,350 training examples", region="#stats-box", timeout=60)
        assert "8,876 of them trained" in text
        assert "### Response:" in await wait_for(pilot, "example 1", region="#examples-box")

        await pilot.press("ctrl+n")
        await wait_for(pilot, "lr = base_lr x sqrt")
        await _type(pilot, "training.max_steps", "30")
        await pilot.press("ctrl+l")
        await wait_for(pilot, "30 steps in all")
        suggested = lr_view(app.draft).suggestion.learning_rate
        assert app.draft.preset.training.learning_rate == pytest.approx(float(f"{suggested:.3g}"))
        assert app.draft.preset.training.max_steps == 30

        await pilot.press("ctrl+n")
        text = await wait_for(pilot, "ready:", "max_steps: 30")
        await pilot.press("ctrl+s")
        exported = tmp_path / "tiny-llama-qlora.yaml"
        await wait_until(pilot, exported.exists, timeout=5, what="the exported preset")
        saved = load_preset(exported)
        assert saved.lora.targets == ["q_proj", "v_proj"] and saved.training.max_steps == 30

        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: app.run_dir is not None, timeout=30, what="the run to start")
        run_dir = app.run_dir
        try:
            text = await wait_for(pilot, "RUNNING", "step 3/30", timeout=120)
            assert "RUNNING" in text and "step 3/30" in text, text
            await _stop_from_the_run_screen(pilot)
        finally:
            _end_if_left_running(run_dir)
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert events[-1]["kind"] == "end" and events[-1]["status"] == "stopped"
    assert any(e["kind"] == "step" for e in events)
    assert load_preset(run_dir / "preset.yaml").lora.targets == ["q_proj", "v_proj"]


@pytest.mark.slow
async def test_walks_the_demo_pairs_to_a_live_dpo_run_with_its_preference_curves_then_stops_it(tmp_path):
    from textual.notifications import Notify

    app = _wizard()
    said: list[str] = []  # the notifications (run_test does not draw them)

    def hear(message) -> None:
        if isinstance(message, Notify):
            said.append(message.notification.message)

    async with app.run_test(size=LARGE, message_hook=hear) as pilot:
        await _ready(pilot, data=False)
        for step in ("memory", "targets", "data"):
            await pilot.press("ctrl+n")
            await wait_until(pilot, lambda s=step: app.screen.STEP == s, timeout=10, what=step)

        # The demo's pairs: the draft's method turns to dpo to suit them, and the wizard says so.
        field = app.screen.query_one("#train")
        field.focus()
        field.value = ""
        await pilot.press(*"builtin:demo-pairs", "enter")
        text = await wait_for(pilot, "training pairs", region="#stats-box", timeout=60)
        assert "format: preference" in text and "validation pairs" in text, text
        assert "pair 1" in region_text(app, "#examples-box")
        assert app.draft.preset.training.method == "dpo"
        assert any("the data holds preference pairs: training.method is now dpo, not sft" in m for m in said), said

        # The hyperparameters step offers dpo with its settings, and its published rate instead of the rule.
        await pilot.press("ctrl+n")
        await wait_for(pilot, "learning rate for dpo")
        method = region_text(app, "#method-form")
        for phrase in ("dpo", "beta", "0.1", "dpo loss", "sigmoid", "reference", "auto"):
            assert phrase in method, method
        await _type(pilot, "training.max_steps", "30")
        await _type(pilot, "training.micro_batch_size", "4")
        await _type(pilot, "training.learning_rate", "0.0005")
        t = app.draft.preset.training
        assert (t.method, t.max_steps, t.micro_batch_size, t.learning_rate) == ("dpo", 30, 4, 0.0005)

        await pilot.press("ctrl+n")
        await wait_for(pilot, "ready:", "method: dpo")
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: app.run_dir is not None, timeout=30, what="the run to start")
        run_dir = app.run_dir
        try:
            # The run screen draws the reward margin and the preference accuracy where sft has the rate.
            text = await wait_for(pilot, "RUNNING", "step 1/30", "pref acc", timeout=120)
            assert "RUNNING" in text and "step 1/30" in text, text
            assert "reward margin" in text and "preference accuracy" in text, text
            metrics = region_text(app, "#metrics")
            assert "margin " in metrics and "pref acc " in metrics, metrics
            assert app.screen.query_one("#margin-box").display and app.screen.query_one("#acc-box").display
            assert not app.screen.query_one("#lr-box").display
            await _stop_from_the_run_screen(pilot)
        finally:
            _end_if_left_running(run_dir)
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert events[0]["kind"] == "start" and events[0]["method"] == "dpo" and events[0]["reference"] == "each_step"
    assert events[-1]["kind"] == "end" and events[-1]["status"] == "stopped"
    steps = [e for e in events if e["kind"] == "step"]
    assert steps and all(e.get("reward_margin") is not None and e.get("reward_accuracy") is not None for e in steps)
    assert load_preset(run_dir / "preset.yaml").data.train == "builtin:demo-pairs"


# ---------------------------------------------------------------------------------------------
# Step by step


async def test_a_wrong_model_path_is_said_in_place_and_next_stays_off(tmp_path):
    app = _wizard(ask_model=True)
    async with app.run_test(size=SMALL) as pilot:
        await pilot.pause(0.2)
        app.screen.query_one("#source").focus()
        await pilot.press(*str(tmp_path / "no-such-model"), "enter")
        await wait_until(pilot, lambda: app.model_error is not None, timeout=30, what="the error")
        await pilot.pause(0.1)
        shown = region_text(app, "#facts-box")
        assert "no such file or directory" in shown and "no-such-model" in shown
        assert "a Hub id such as meta-llama/Llama-3.1-8B" in shown
        assert not app.screen.ready()
        assert app.screen.query_one("#next").disabled
        await pilot.press("ctrl+n")
        assert app.screen.STEP == "model"


async def test_a_model_that_needs_its_own_code_asks_before_running_it(hf_configs):
    app = _wizard(_config_draft(hf_configs, "tiiuae__falcon-7b"))
    async with app.run_test(size=LARGE) as pilot:
        text = await wait_for(pilot, "Allow it only if you trust", timeout=30)
        assert "needs its own Python code" in text and "Run its code (y)" in text
        await pilot.press("n")
        await pilot.pause(0.2)
        assert app.draft.preset.model.trust_remote_code is False
        # Refused: the reason stays on the model step, and Next stays off.
        assert "needs its own Python code" in region_text(app, "#facts-box")
        assert not app.draft.model_ready and not app.screen.ready()
        app.read_model()
        await wait_for(pilot, "Allow it only if you trust", timeout=30)
        await pilot.press("y")
        await wait_until(pilot, lambda: not app.model_busy, timeout=60, what="the second read")
        assert app.draft.preset.model.trust_remote_code is True
        # With consent, the fixture's config reads (the native Falcon class), so the facts show.
        assert app.draft.model_ready, app.model_error
        assert "FalconForCausalLM" in flat(screen_text(app))


async def test_memory_step_says_fit_or_not_and_fills_the_largest_batch(hf_configs):
    draft = _config_draft(hf_configs, "meta-llama__Llama-3.1-8B")
    app = _wizard(draft, start="memory")
    async with app.run_test(size=LARGE) as pilot:
        await _ready(pilot, data=False)
        want = memory_view(app.draft)
        text = await wait_for(pilot, "FITS", region="#estimate-box")
        assert f"FITS {want.estimate.total_bytes / 2**30:,.2f} GiB of 23.00 GiB" in text
        assert f"{23 - want.estimate.total_bytes / 2**30:,.2f} GiB left" in text
        assert "the total counts 0.75 GiB of CUDA context" in text
        assert "kernels: " in text and "(packed rows, no mask)" in text
        for part in ("quantized weights", "activations", "logits and loss", "cuda context", "total"):
            assert part in text
        assert f"weights x 1.2: {want.estimate.inference_rule_bytes / 2**30:,.2f} GiB" in text

        budget = app.screen.query_one("#budget")
        budget.focus()
        await pilot.press("8")
        text = await wait_for(pilot, "DOES NOT FIT", region="#estimate-box")
        assert "8.00 GiB available" in text
        budget.value = ""
        await wait_for(pilot, "FITS")

        await pilot.press("ctrl+g")
        await pilot.pause(0.2)
        assert app.draft.preset.training.micro_batch_size == want.fit.max_micro_batch > 1
        assert _field(app, "training.micro_batch_size").value == str(want.fit.max_micro_batch)
        assert "FITS" in flat(screen_text(app))

        # Changing a setting updates the estimate at once.
        before = memory_view(app.draft).estimate.total_bytes
        await _type(pilot, "training.seq_len", "8192")
        after = memory_view(app.draft).estimate.total_bytes
        assert after > before
        assert f"{after / 2**30:,.2f} GiB" in region_text(app, "#estimate-box")


async def test_ctrl_f_sets_the_fastest_settings_that_fit_and_says_why(hf_configs):
    draft = _config_draft(hf_configs, "meta-llama__Llama-3.1-8B")
    draft.set_many({"training.gradient_accumulation_steps": 8, "training.fused_kernels": "off"})
    app = _wizard(draft, start="memory")
    async with app.run_test(size=LARGE) as pilot:
        await _ready(pilot, data=False)
        await wait_for(pilot, "FITS", region="#estimate-box")
        assert "^f Fastest fit" in screen_text(app) and "^g Largest batch" in screen_text(app)

        # The test GPU has 23 GiB free: without checkpointing even micro batch 1 is too big.
        await pilot.press("ctrl+f")
        t = app.draft.preset.training
        text = await wait_for(pilot, "fastest that fits:", region="#estimate-box")
        assert t.gradient_checkpointing is True and t.micro_batch_size * t.gradient_accumulation_steps == 8
        assert t.micro_batch_size > 1  # bigger micro batches amortise the host's launches
        assert (f"fastest that fits: checkpointing on, micro batch {t.micro_batch_size} x accumulation "
                f"{t.gradient_accumulation_steps}: ") in text
        assert "checkpointing on: without it even micro batch 1 needs" in text
        assert "more than the 20.7 GiB usable" in text
        assert (f"micro batch {t.micro_batch_size} x accumulation {t.gradient_accumulation_steps} keeps your "
                "effective batch of 8") in text
        assert "check the data (step 4) for its real lengths" in text
        assert _field(app, "training.micro_batch_size").value == str(t.micro_batch_size)

        # On an 80 GB card checkpointing goes off and the micro batch stays above 1.
        budget = app.screen.query_one("#budget")
        budget.focus()
        await pilot.press(*"79")
        await wait_for(pilot, "79.00 GiB", region="#estimate-box", absent=("fastest that fits",))
        await pilot.press("ctrl+f")
        text = await wait_for(pilot, "fastest that fits: checkpointing off", region="#estimate-box")
        t = app.draft.preset.training
        assert t.gradient_checkpointing is False and t.micro_batch_size > 1
        assert t.micro_batch_size * t.gradient_accumulation_steps == 8
        assert "checkpointing off: fits with" in text and "saves the recompute" in text
        assert "grad checkpointing" in flat(screen_text(app)) and "off" in flat(screen_text(app))

        # Any change of the settings afterwards takes the explanation away: it no longer describes them.
        await _type(pilot, "training.seq_len", "4096")
        assert "fastest that fits" not in region_text(app, "#estimate-box")


async def test_a_refused_value_is_named_in_place_and_the_draft_keeps_the_last_good_one():
    app = _wizard(start="memory")
    async with app.run_test(size=SMALL) as pilot:
        await _ready(pilot, data=False)
        await _type(pilot, "training.micro_batch_size", "0")
        text = flat(screen_text(app))
        assert "training.micro_batch_size = 0 is not valid" in text
        assert app.draft.preset.training.micro_batch_size == 16
        await _type(pilot, "training.micro_batch_size", "abc")
        assert "'abc' is not a whole number" in flat(screen_text(app))
        await _type(pilot, "training.micro_batch_size", "8")
        assert app.draft.preset.training.micro_batch_size == 8
        assert "not valid" not in flat(screen_text(app))


async def test_targets_shortcuts_set_the_layers_and_show_what_they_cost(hf_configs):
    app = _wizard(_config_draft(hf_configs, "meta-llama__Llama-3.1-8B"), start="targets")
    async with app.run_test(size=LARGE) as pilot:
        await _ready(pilot, data=False)
        info = app.draft.info
        await pilot.click("#only-qv")
        qv = sum(info.target(n).lora_params(16) for n in ("q_proj", "v_proj"))
        text = await wait_for(pilot, f"trainable {qv:,} parameters", region="#lora-summary")
        assert f"trainable {qv:,} parameters" in text and "of the model's 8.03 B" in text
        assert app.draft.preset.lora.targets == ["q_proj", "v_proj"]
        await pilot.click("#only-attention")
        await pilot.pause(0.2)
        assert app.draft.preset.lora.targets == ["q_proj", "k_proj", "v_proj", "o_proj"]
        await pilot.click("#only-all")
        await pilot.pause(0.2)
        assert app.draft.preset.lora.targets == "all-linear"
        every = sum(t.lora_params(16) for t in info.targets)
        assert f"trainable {every:,} parameters" in region_text(app, "#lora-summary")
        await _type(pilot, "lora.r", "8")
        assert f"trainable {every // 2:,} parameters" in region_text(app, "#lora-summary")
        assert "q_proj 4,096>4,096 x32 536.9 M +2.1 M" in region_text(app, "#layers")


async def test_hyperparameters_show_the_rule_with_this_runs_numbers():
    app = _wizard(start="hyper")
    async with app.run_test(size=LARGE) as pilot:
        await _ready(pilot)
        view = lr_view(app.draft)
        text = await wait_for(pilot, view.suggestion.arithmetic)
        assert view.suggestion.arithmetic in text
        assert "8,876 supervised tokens" in text
        assert "effective batch 16 examples" in text
        assert "note: 0.002 is above" in text  # the demo's own rate is far from LoRA's usual range
        await _type(pilot, "training.gradient_accumulation_steps", "2")
        assert "effective batch 32 examples" in flat(screen_text(app))
        await pilot.click("#use")
        await pilot.pause(0.2)
        assert app.draft.preset.training.learning_rate == float(f"{lr_view(app.draft).suggestion.learning_rate:.3g}")


async def test_export_asks_before_overwriting(tmp_path):
    target = tmp_path / "mine.yaml"
    target.write_text("keep me\n")
    app = _wizard(start="review")
    async with app.run_test(size=SMALL) as pilot:
        await _ready(pilot)
        app.screen.query_one("#export-path").value = str(target)
        await pilot.press("ctrl+s")
        await wait_for(pilot, "Overwrite")
        await pilot.press("n")
        await pilot.pause(0.2)
        assert target.read_text() == "keep me\n"
        await pilot.press("ctrl+s")
        await wait_for(pilot, "Overwrite")
        await pilot.press("y")
        await wait_until(pilot, lambda: target.read_text() != "keep me\n", timeout=5, what="the export")
        assert load_preset(target) == app.draft.preset


async def test_every_step_can_be_revisited_and_keeps_its_values():
    app = _wizard()
    async with app.run_test(size=SMALL) as pilot:
        await _ready(pilot, data=False)
        for step in ("memory", "targets", "data", "hyper", "review"):
            await pilot.press("ctrl+n")
            await wait_until(pilot, lambda s=step: app.screen.STEP == s, timeout=5, what=step)
        await pilot.press("ctrl+b", "ctrl+b", "ctrl+b", "ctrl+b")
        await wait_until(pilot, lambda: app.screen.STEP == "memory", timeout=5, what="memory")
        await _type(pilot, "training.seq_len", "96")
        await pilot.press("ctrl+n", "ctrl+n", "ctrl+n")
        await wait_until(pilot, lambda: app.screen.STEP == "hyper", timeout=5, what="hyper")
        assert _field(app, "training.seq_len").value == "96"
        # The data is counted again at the new length before the rule uses it.
        await wait_until(pilot, lambda: app.draft.data_ready, timeout=60, what="the recount")
        assert app.draft.data.stats.seq_len == 96


async def test_command_palette_jumps_to_a_step():
    app = _wizard()
    async with app.run_test(size=LARGE) as pilot:
        await _ready(pilot, data=False)
        await pilot.press("ctrl+p")
        await pilot.pause(0.3)
        await pilot.press(*"Go to step 6", "enter")
        await wait_until(pilot, lambda: app.screen.STEP == "review", timeout=5, what="the review step")


# ---------------------------------------------------------------------------------------------
# Snapshots: every step at 80x24 on the demo


@pytest.mark.parametrize("step", ["model", "memory", "targets", "data", "hyper", "review"])
async def test_snapshot(step):
    app = _wizard(start=step)
    async with app.run_test(size=SMALL) as pilot:
        await _ready(pilot, data=step in ("data", "hyper", "review"))
        app.screen.set_focus(None)
        await pilot.pause(0.3)
        # The footer's keys are drawn after the step's own refresh: under load, a frame or two later.
        await wait_until(pilot, lambda: "palette" in screen_text(app).rstrip().splitlines()[-1], timeout=10,
                         what="the footer's keys")
        assert_snapshot(f"wizard-{step}-80x24", screen_text(app))


# ---------------------------------------------------------------------------------------------
# Start-up


def test_opening_the_wizard_loads_no_torch(tmp_path):
    """The UI thread never waits on torch: opening the wizard (model step, no model yet) imports none."""
    import subprocess
    import sys

    code = (
        "import asyncio, sys\n"
        "from tui.draft import load_draft\n"
        "from tui.wizard import WizardApp\n"
        "async def main():\n"
        "    app = WizardApp(load_draft(None), ask_model=True)\n"
        "    async with app.run_test(size=(80, 24)) as pilot:\n"
        "        await pilot.pause(0.5)\n"
        "        assert app.screen.STEP == 'model'\n"
        "asyncio.run(main())\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'bitsandbytes', 'datasets') if m in sys.modules]\n"
        "print('heavy:', heavy)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "heavy: []" in r.stdout, (r.stdout, time.monotonic() - start)


def test_wizard_and_plain_need_a_terminal():
    from conftest import run_cli

    for command in ("wizard", "plain"):
        r = run_cli(command)
        assert r.returncode == 2
        assert r.stderr.strip().startswith("error:") and "terminal" in r.stderr
        assert "--preset" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("step,path", [("data", "data.format"), ("memory", "quantization.method"),
                                       ("memory", "training.optimizer"), ("hyper", "training.lr_scheduler")])
async def test_each_dropdown_offers_every_value_the_preset_schema_allows(step, path):
    """The dropdowns come from the schema's Literals: a format or optimizer added there is offered here."""
    from engine.preset import choices
    from tui.widgets.fields import PresetSelect

    app = _wizard(start=step)
    async with app.run_test(size=LARGE) as pilot:
        await _ready(pilot, data=step != "memory")
        select = next(s for s in app.screen.query(PresetSelect) if s.path == path)
        select.focus()
        await pilot.press("enter")
        await pilot.pause(0.3)
        text = screen_text(app)
        for value in choices(path):
            assert value in text, (value, text)
