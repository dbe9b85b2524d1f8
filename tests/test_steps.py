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
    ENTER,                                      # hyper: method sft (its dpo and orpo settings are not asked)
    CLEAR + ENTER, ENTER, ENTER,                #   no max steps (so epochs is asked), epochs, accumulation
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
        ask_step_choice = wizard.ask_step_choice

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

        def recording_step_choice(step, field):
            ask_step_choice(step, field)
            offers[current[-1]].append((field.path, "select", menus[-1]))

        wizard.select, wizard.ask_field = recording_select, recording_field
        wizard.ask_choice_field, wizard.ask_switch_field = recording_choice, recording_switch
        wizard.ask_step_choice = recording_step_choice
        assert wizard.walk() is None  # finished without a run
    assert current == list(STEP_NAMES), current  # each step once, in order
    return offers


async def _screen_offers(draft: Draft) -> dict[str, list[tuple[str, str, list | None]]]:
    """Open the full-screen wizard on every step; per step, each preset field's widget shown, in order,
    its kind and the options of its dropdown (a field hidden for the draft's method is not offered)."""
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
                if not widget.display:
                    continue
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
    demo = load_draft(DEMO_PRESET).preset
    for step in STEPS:
        declared = [_declared(f) for f in step.fields if f.offered(demo)]
        assert screen[step.name] == declared, step.name                  # the screen: in the declared order
        assert sorted(plain[step.name], key=repr) == sorted(declared, key=repr), step.name  # each once
        assert sorted(plain[step.name], key=repr) == sorted(screen[step.name], key=repr)
    # The drifts fixed: the plain data step asks the format and whether to train on prompts, and the
    # plain hyperparameters offer the base rate and the pretraining batch.
    assert ("data.format", "select", choice_options("data.format")) in plain["data"]
    assert ("data.train_on_inputs", "switch", None) in plain["data"]
    assert {"model.base_lr", "model.pretrained_batch_tokens"} <= {path for path, _, _ in plain["hyper"]}
    # The method is offered with every value the schema has; its dpo and orpo settings not under sft.
    assert ("training.method", "select", [("sft", "sft"), ("dpo", "dpo"), ("orpo", "orpo")]) in plain["hyper"]
    assert ("training.method", "select", [("sft", "sft"), ("dpo", "dpo"), ("orpo", "orpo")]) in screen["hyper"]
    for offers in (plain["hyper"], screen["hyper"]):
        assert not {"training.beta", "training.dpo_loss", "training.reference"} & {path for path, _, _ in offers}


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


# ---------------------------------------------------------------------------------------------
# The method and its settings (sft, dpo, orpo)

METHOD_SETTINGS = {"sft": [], "dpo": ["training.beta", "training.dpo_loss", "training.reference"],
                   "orpo": ["training.beta"]}
"""The settings of each method the hyperparameters step offers besides the method itself."""


def _method_draft(method: str, **training) -> Draft:
    """The demo draft with another method (and settings of it)."""
    draft = load_draft(DEMO_PRESET)
    draft.set_many({"training.method": method, **{f"training.{k}": v for k, v in training.items()}})
    return draft


def test_a_methods_settings_are_offered_only_under_it():
    step = get_step("hyper")
    for method, settings in METHOD_SETTINGS.items():
        preset = _method_draft(method).preset
        offered = [f.path for f in step.fields if f.offered(preset)]
        assert [p for p in offered if p.startswith(("training.method", "training.beta", "training.dpo_loss",
                                                    "training.reference"))] == ["training.method", *settings]
        # everything else of the step is offered whatever the method
        assert len(offered) == len(step.fields) - 3 + len(settings)


def test_changing_the_method_puts_the_settings_it_does_not_use_back_to_their_defaults():
    step = get_step("hyper")
    draft = _method_draft("dpo", beta=0.5, dpo_loss="ipo", reference="precomputed")
    assert step.changes("training.method", "sft", draft.preset) == {
        "training.beta": 0.1, "training.dpo_loss": "sigmoid", "training.reference": "auto", "training.method": "sft"}
    assert step.changes("training.method", "orpo", draft.preset) == {
        "training.dpo_loss": "sigmoid", "training.reference": "auto", "training.method": "orpo"}  # beta is orpo's too
    assert step.changes("training.method", "dpo", draft.preset) == {"training.method": "dpo"}
    assert step.changes("training.epochs", 2.0, draft.preset) == {"training.epochs": 2.0}
    draft.set_many(step.changes("training.method", "orpo", draft.preset))
    t = draft.preset.training
    assert (t.method, t.beta, t.dpo_loss, t.reference) == ("orpo", 0.5, "sigmoid", "auto")
    draft.set_many(step.changes("training.method", "sft", draft.preset))
    t = draft.preset.training
    assert (t.method, t.beta, t.dpo_loss, t.reference) == ("sft", 0.1, "sigmoid", "auto")


def _plain_method(draft: Draft, keys: str) -> list[str]:
    """The plain prompts' method questions answered with ``keys``; the preset paths asked, in order."""
    from tui.plain import PlainWizard

    asked = []
    with create_pipe_input() as inp:
        inp.send_text(keys)
        inp.close()
        wizard = PlainWizard(draft, Services(), input=inp, output=DummyOutput())
        select, text = wizard.select, wizard.text
        wizard.select = lambda message, choices, default=None: asked.append(message) or select(message, choices,
                                                                                                 default)
        wizard.text = lambda message, default="": asked.append(message) or text(message, default)
        wizard.ask_method(get_step("hyper"))
    prompts = {get_step("hyper").field(p).prompt: p for p in ("training.method", *METHOD_SETTINGS["dpo"])}
    return [prompts[m] for m in asked]


def test_the_plain_prompts_ask_the_settings_of_the_chosen_method():
    down, up = "\x1b[B", "\x1b[A"
    draft = load_draft(DEMO_PRESET)
    assert _plain_method(draft, ENTER) == ["training.method"]  # sft: nothing else
    # dpo: its beta, loss and reference are asked
    asked = _plain_method(draft, down + ENTER + CLEAR + "0.5" + ENTER + down + ENTER + ENTER)
    assert asked == ["training.method", *METHOD_SETTINGS["dpo"]]
    t = draft.preset.training
    assert (t.method, t.beta, t.dpo_loss, t.reference) == ("dpo", 0.5, "ipo", "auto")
    # orpo: beta only (kept); dpo's loss goes back to its default, or the preset would refuse it
    assert _plain_method(draft, down + ENTER + ENTER) == ["training.method", "training.beta"]
    t = draft.preset.training
    assert (t.method, t.beta, t.dpo_loss, t.reference) == ("orpo", 0.5, "sigmoid", "auto")
    # back to sft: beta goes back to its default too
    assert _plain_method(draft, up + up + ENTER) == ["training.method"]
    t = draft.preset.training
    assert (t.method, t.beta, t.dpo_loss, t.reference) == ("sft", 0.1, "sigmoid", "auto")


def test_the_screen_shows_the_settings_of_the_chosen_method_and_its_learning_rate(here):
    from screen import wait_until
    from tui.widgets.fields import PresetInput, PresetSelect
    from tui.wizard import WizardApp

    def shown(app) -> list[str]:
        return [w.path for w in app.screen.query("PresetInput, PresetSelect, PresetSwitch")
                if w.display and w.path in ("training.method", *METHOD_SETTINGS["dpo"])]

    def widget(app, path):
        return next(w for w in app.screen.query("PresetInput, PresetSelect") if w.path == path)

    def rule(app) -> str:
        return app.screen.query_one("#lr-rule").content.plain

    async def walk() -> None:
        app = WizardApp(load_draft(DEMO_PRESET), services=Services(probe_gpus=lambda: [GPU_24]), start="hyper")
        async with app.run_test(size=(120, 60)) as pilot:
            await wait_until(pilot, lambda: app.draft.model_ready and app.draft.data_ready and not app.data_busy,
                             timeout=120, what="the model and the data")
            await wait_until(pilot, lambda: app.screen.STEP == "hyper" and app.screen._shown, timeout=5,
                             what="the step")
            assert shown(app) == ["training.method"]
            assert "lr = base_lr x sqrt(" in rule(app)
            select = widget(app, "training.method")
            assert isinstance(select, PresetSelect)
            select.value = "dpo"
            await wait_until(pilot, lambda: shown(app) == ["training.method", *METHOD_SETTINGS["dpo"]], timeout=5,
                             what="dpo's settings")
            text = rule(app)
            assert "learning rate for dpo" in text and "the guide's rule is for supervised tokens" in text
            assert "suggested 5e-06 for LoRA" in text and "TRL's DPO script" in text
            assert "lr = base_lr" not in text
            assert "note: 0.002 is above the 5e-07 to 5e-06 that published dpo runs used" in text
            beta = widget(app, "training.beta")
            assert isinstance(beta, PresetInput)
            beta.value = "0.5"
            widget(app, "training.dpo_loss").value = "ipo"
            await wait_until(pilot, lambda: app.draft.preset.training.dpo_loss == "ipo"
                             and app.draft.preset.training.beta == 0.5, timeout=5, what="beta and the loss")
            await pilot.click("#use")
            await wait_until(pilot, lambda: app.draft.preset.training.learning_rate == 5e-6, timeout=5,
                             what="the suggested rate")
            select.value = "orpo"
            await wait_until(pilot, lambda: shown(app) == ["training.method", "training.beta"], timeout=5,
                             what="orpo's settings")
            t = app.draft.preset.training
            assert (t.method, t.beta, t.dpo_loss, t.reference) == ("orpo", 0.5, "sigmoid", "auto")
            assert "learning rate for orpo" in rule(app) and "suggested 8e-05 for LoRA" in rule(app)
            select.value = "sft"
            await wait_until(pilot, lambda: shown(app) == ["training.method"], timeout=5, what="sft's fields")
            t = app.draft.preset.training
            assert (t.method, t.beta, t.dpo_loss, t.reference) == ("sft", 0.1, "sigmoid", "auto")
            assert str(app.screen.query_one("#form-error").content) == ""
            # the data is checked again for sft (dpo refuses the demo's records), then the rule is back
            await wait_until(pilot, lambda: "lr = base_lr x sqrt(" in rule(app), timeout=60, what="the rule")

    asyncio.run(walk())
