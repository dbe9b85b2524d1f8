"""The steps are declared once (``tui.steps``) and both front ends render that declaration.

Each front end is walked over every step of the offline demo (a fixed GPU, the real engine): the
full-screen wizard's form widgets of each step and the plain prompts' questions of each step are
recorded, with the choices each dropdown or menu offers, and both must be exactly the step's
declared fields with the schema's choices. Also: every step has a screen and prompts, and no step
number is written out in ``tui/`` (each "(step N)" comes from the order).
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from conftest import ROOT
from engine.demo import DEMO_PRESET
from engine.gpu import GpuInfo
from tui.draft import Draft, Services, choice_options, load_draft
from tui.steps import STEP_NAMES, STEPS, FormField, get_step, step_ref

GPU_24 = GpuInfo(0, "Test GPU 24GB", 24 * 2**30, 23 * 2**30, (8, 9))
"""The GPU the walks pretend to have."""

ENTER, CLEAR = "\r", "\x15"
"""Keys: Enter, Ctrl-U (clears a text prompt's default)."""

PLAIN_KEYS = [
    ENTER, ENTER,                               # model: keep builtin:tiny-llama; continue
    ENTER, ENTER, ENTER, ENTER, ENTER, ENTER,   # memory: quantization, seq len, checkpointing, optimizer,
                                                #   micro batch; continue
    ENTER, ENTER, ENTER, ENTER, ENTER,          # targets: the layers as they are; r, alpha, dropout; continue
    ENTER, ENTER, ENTER, ENTER, ENTER,          # data: builtin:demo, format, validation share, train on
                                                #   prompts; continue
    CLEAR + ENTER, ENTER, ENTER,                # hyper: no max steps (so epochs is asked), epochs, accumulation
    "y", *[ENTER] * 12,                         #   change more settings: yes, each kept
    ENTER, ENTER,                               #   the learning rate; continue
    ENTER, CLEAR + ENTER, "n", ENTER,           # review: run name; do not export; do not start; finish
]
"""Every step of the plain walk, every field asked (the answers keep the demo's values)."""


@pytest.fixture
def here(tmp_path, monkeypatch, demo_cache) -> Path:
    """A fresh working folder, with the demo model ready."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _declared(field: FormField) -> tuple[str, str, list | None]:
    """What a front end must offer for a declared field: its path, its kind of widget, its choices."""
    if field.is_switch:
        return field.path, "switch", None
    if field.is_choice:
        return field.path, "select", choice_options(field.path)
    return field.path, "input", None


def _plain_offers(draft: Draft) -> dict[str, list[tuple[str, str, list | None]]]:
    """Walk the plain prompts over every step; per step, each preset field asked, how, and the
    choices its menu offered."""
    from tui.plain import PlainWizard

    offers: dict[str, list] = {}
    current: list[str] = []
    with create_pipe_input() as inp:
        inp.send_text("".join(PLAIN_KEYS))
        inp.close()
        wizard = PlainWizard(draft, Services(probe_gpus=lambda: [GPU_24]), input=inp, output=DummyOutput())
        for name, ask_step in list(wizard.steps.items()):
            def entered(step, ask_step=ask_step):
                current.append(step.name)
                offers.setdefault(step.name, [])
                return ask_step(step)

            wizard.steps[name] = entered
        menus: list[list] = []
        select, ask_field = wizard.select, wizard.ask_field
        ask_choice_field, ask_switch_field = wizard.ask_choice_field, wizard.ask_switch_field

        def recording_select(message, choices, default=None):
            menus.append(list(choices))
            return select(message, choices, default)

        def recording_field(label, path, kind, default=None, shortcuts=None):
            offers[current[-1]].append((path, "input", None))
            return ask_field(label, path, kind, default, shortcuts)

        def recording_choice(label, path):
            ask_choice_field(label, path)
            offers[current[-1]].append((path, "select", menus[-1]))

        def recording_switch(question, path):
            offers[current[-1]].append((path, "switch", None))
            return ask_switch_field(question, path)

        wizard.select, wizard.ask_field = recording_select, recording_field
        wizard.ask_choice_field, wizard.ask_switch_field = recording_choice, recording_switch
        assert wizard.walk() is None  # finished without a run
    assert current == list(STEP_NAMES), current  # each step once, in order
    return offers


async def _screen_offers(draft: Draft) -> dict[str, list[tuple[str, str, list | None]]]:
    """Open the full-screen wizard on every step; per step, each preset field's widget in order, its
    kind and the options of its dropdown."""
    from screen import wait_until
    from tui.widgets.fields import PresetInput, PresetSelect, PresetSwitch
    from tui.wizard import WizardApp

    offers = {}
    app = WizardApp(draft, services=Services(probe_gpus=lambda: [GPU_24]))
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.draft.model_ready, timeout=120, what="the model")
        for step in STEPS:
            app.goto(step.name)
            await wait_until(pilot, lambda s=step.name: app.screen.STEP == s and app.screen._shown, timeout=5,
                             what=step.name)  # on screen and mounted
            assert app.screen.step == step
            found = []
            for widget in app.screen.query("PresetInput, PresetSelect, PresetSwitch"):
                if isinstance(widget, PresetSwitch):
                    found.append((widget.path, "switch", None))
                elif isinstance(widget, PresetSelect):
                    found.append((widget.path, "select", [tuple(option) for option in widget._options]))
                else:
                    assert isinstance(widget, PresetInput)
                    found.append((widget.path, "input", None))
            offers[step.name] = found
        # The steps that show the data have started its check: let it end before the app closes.
        await wait_until(pilot, lambda: app.draft.data_ready and not app.data_busy, timeout=120, what="the data")
    return offers


def test_both_front_ends_offer_each_steps_declared_fields_with_the_schemas_choices(here):
    plain = _plain_offers(load_draft(DEMO_PRESET))
    screen = asyncio.run(_screen_offers(load_draft(DEMO_PRESET)))
    for step in STEPS:
        declared = [_declared(f) for f in step.fields]
        assert screen[step.name] == declared, step.name                  # the screen: in the declared order
        assert sorted(plain[step.name], key=repr) == sorted(declared, key=repr), step.name  # each once
        assert sorted(plain[step.name], key=repr) == sorted(screen[step.name], key=repr)
    # The drifts fixed: the plain data step asks the format and whether to train on prompts, and the
    # plain hyperparameters offer the base rate and the pretraining batch.
    assert ("data.format", "select", choice_options("data.format")) in plain["data"]
    assert ("data.train_on_inputs", "switch", None) in plain["data"]
    assert {"model.base_lr", "model.pretrained_batch_tokens"} <= {path for path, _, _ in plain["hyper"]}


def test_every_step_has_a_screen_and_prompts():
    from tui.plain import PlainWizard
    from tui.screens.steps import SCREENS

    assert list(SCREENS) == list(STEP_NAMES)
    for name, cls in SCREENS.items():
        assert cls.STEP == name and cls(get_step(name)).step is get_step(name)
    wizard = PlainWizard(load_draft(DEMO_PRESET), Services())
    assert list(wizard.steps) == list(STEP_NAMES)


def test_each_step_is_declared_with_what_it_needs():
    assert [s.name for s in STEPS] == ["model", "memory", "targets", "data", "hyper", "review"]
    assert {s.name: s.needs for s in STEPS} == {"model": None, "memory": "model", "targets": "model",
                                                "data": "model", "hyper": "data", "review": "data"}
    assert step_ref("model") == "step 1" and step_ref("data") == "step 4"
    with pytest.raises(KeyError, match="no step 'nope'"):
        get_step("nope")
    for step in STEPS:
        assert len(set(step.paths)) == len(step.paths), step.name
        for f in step.fields:
            assert f.kind.rstrip("?") in ("int", "float", "str", "bool"), f
            assert not (f.is_switch and f.is_choice), f


def test_what_is_missing_comes_from_what_a_step_needs():
    draft = load_draft(DEMO_PRESET)
    assert draft.first_missing(None) is None
    assert draft.first_missing("model") == ("model", "read the model's config first (step 1)")
    assert draft.first_missing("data") == ("model", "read the model's config first (step 1)")
    assert draft.first_missing() == draft.first_missing("data")  # a run needs everything


def test_the_memory_steps_budget_and_plan_are_the_first_visible_gpus(monkeypatch, hf_configs):
    """``CUDA_VISIBLE_DEVICES=1``: the run trains on GPU 1, so its free memory is the budget and its
    card the one planned for, not GPU 0's."""
    from engine.modelinfo import inspect_model
    from tui.steps.memory import draft_device, memory_budget

    draft = load_draft(DEMO_PRESET)
    draft.info = inspect_model(str(hf_configs / "meta-llama__Llama-3.1-8B"))
    draft.gpus = [GpuInfo(0, "Busy GPU", 24 * 2**30, 2**30, (8, 9)),
                  GpuInfo(1, "Test GPU 24GB", 24 * 2**30, 23 * 2**30, (8, 9))]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert memory_budget(draft, None) == (2**30, "Busy GPU: 1.00 GiB free of 24.00 GiB")
    assert draft_device(draft).name == "Busy GPU"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert memory_budget(draft, None) == (23 * 2**30, "Test GPU 24GB: 23.00 GiB free of 24.00 GiB")
    assert draft_device(draft).name == "Test GPU 24GB"
    assert memory_budget(draft, 8 * 2**30) == (8 * 2**30, "8.00 GiB (typed)")


def test_no_step_number_is_written_out_in_tui():
    """Every "(step N)" is made from the steps' order (``step_ref``): reordering the steps renumbers them."""
    literal = re.compile(r"\bstep \d", re.IGNORECASE)
    found = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
             for path in sorted((ROOT / "tui").rglob("*")) if path.suffix in (".py", ".tcss")
             for n, line in enumerate(path.read_text().splitlines(), 1) if literal.search(line)]
    assert found == []


def test_the_steps_import_no_textual():
    import subprocess
    import sys

    code = "import sys, tui.steps\nprint('textual' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
