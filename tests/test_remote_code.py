"""A model's own code (``trust_remote_code``) runs only when the person agrees now.

The model here ships code that, when imported, writes a marker file: the tests assert where that
file appears and where it must not. Looking at a model (the wizards, ``inspect``, ``estimate``,
``lr``) never runs it on a preset file's word; a headless training start does, says so, and pins a
Hub model's code to the commit it ran from. The code embeds its own marker path, so its module is new
to transformers in every test and really imported, in this interpreter (the looking commands, as
``run_cli`` runs them) and in a fresh one (a training start, with ``HF_MODULES_CACHE`` in the test's own
folder).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run_cli
from engine.gpu import GpuInfo
from screen import region_text, wait_for, wait_until
from tui.draft import Services, load_draft

GPU = GpuInfo(0, "Test GPU 24GB", 24 * 2**30, 23 * 2**30, (8, 9))

def _commit(tmp_path: Path) -> str:
    """The commit of the model in a test's local Hub cache: one per test, since transformers keeps a Hub
    model's code by repository and commit, and this interpreter's modules cache outlives the test."""
    import hashlib

    return hashlib.sha1(str(tmp_path).encode()).hexdigest()

CONFIG = {
    "model_type": "marker_llama",
    "architectures": ["MarkerForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_marker.MarkerConfig",
                 "AutoModelForCausalLM": "modeling_marker.MarkerForCausalLM"},
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 256, "torch_dtype": "float32",
}

MODELING = """\
from transformers import LlamaForCausalLM

from .configuration_marker import MarkerConfig


class MarkerForCausalLM(LlamaForCausalLM):
    config_class = MarkerConfig
"""


def _write_code(folder: Path, marker: Path) -> None:
    """The model's own code: importing its config module writes ``marker`` (one line per import)."""
    (folder / "configuration_marker.py").write_text(
        "from pathlib import Path\n"
        f"with open({str(marker)!r}, 'a') as f:\n"
        "    f.write('imported\\n')\n"
        "from transformers import LlamaConfig\n\n\n"
        "class MarkerConfig(LlamaConfig):\n"
        "    model_type = 'marker_llama'\n")
    (folder / "modeling_marker.py").write_text(MODELING)


@pytest.fixture
def code_env(tmp_path):
    """The environment of the CLI's fresh interpreters: HF_MODULES_CACHE in this test's folder.

    In this interpreter transformers keeps the modules cache it started with (moving it under a
    package already imported from another breaks the relative imports of the model's code); each
    test's code embeds its own marker path, so its module name (a hash of the source) is new and
    transformers imports it afresh all the same."""
    return {"HF_MODULES_CACHE": str(tmp_path / "hf-modules")}


@pytest.fixture
def marker_model(tmp_path, code_env) -> tuple[Path, Path]:
    """(a local model folder whose config needs its own code, the marker file that code writes)."""
    folder = tmp_path / "marker-model"
    folder.mkdir()
    marker = tmp_path / "code-ran"
    (folder / "config.json").write_text(json.dumps(CONFIG))
    _write_code(folder, marker)
    return folder, marker


def _preset(tmp_path: Path, source: str, trust: bool = True, **training) -> Path:
    data = yaml.safe_load((ROOT / "presets" / "tiny-demo.yaml").read_text())
    data["model"] = {"source": source, "trust_remote_code": trust}
    data["training"].update(training)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_marker_model_really_runs_its_code_when_trusted(marker_model):
    """The premise of every test here: with consent, transformers imports the model's code."""
    folder, marker = marker_model
    from engine.errors import NeedsRemoteCode
    from engine.modelinfo import inspect_model

    with pytest.raises(NeedsRemoteCode):
        inspect_model(str(folder))
    assert not marker.exists()
    info = inspect_model(str(folder), trust_remote_code=True)
    assert info.architecture == "MarkerForCausalLM"
    assert marker.exists()


# ---------------------------------------------------------------------------------------------
# The command line


def _refused(r, folder: Path) -> None:
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert str(folder) in lines[0] and "--trust-remote-code if you trust its authors" in lines[0]


def test_inspect_without_the_flag_refuses_and_runs_nothing(marker_model):
    folder, marker = marker_model
    _refused(run_cli("inspect", str(folder), timeout=120), folder)
    assert not marker.exists()
    r = run_cli("inspect", str(folder), "--trust-remote-code", "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["architecture"] == "MarkerForCausalLM" and marker.exists()


def test_estimate_of_a_preset_saying_trust_needs_the_flag(tmp_path, marker_model):
    folder, marker = marker_model
    preset = _preset(tmp_path, str(folder))
    r = run_cli("estimate", "--preset", str(preset), "--gpu-mem", "24", timeout=120)
    _refused(r, folder)
    assert "the preset's trust_remote_code: true does not count" in r.stderr
    assert not marker.exists()
    r = run_cli("estimate", "--preset", str(preset), "--gpu-mem", "24", "--trust-remote-code", "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["total_bytes"] > 0
    assert marker.exists()


def test_estimate_of_a_model_without_code_ignores_the_files_trust(tmp_path, hf_configs):
    """A model that needs no code is looked at with trust_remote_code false, whatever the file says."""
    preset = _preset(tmp_path, str(hf_configs / "meta-llama__Llama-3.1-8B"))
    r = run_cli("estimate", "--preset", str(preset), "--gpu-mem", "24", "--json", timeout=120)
    assert r.returncode == 0, r.stderr


def test_lr_of_a_preset_saying_trust_needs_the_flag(tmp_path, marker_model):
    folder, marker = marker_model
    preset = _preset(tmp_path, str(folder))  # no base_lr: the model is read for its family's
    r = run_cli("lr", "--preset", str(preset), timeout=120)
    _refused(r, folder)
    assert not marker.exists()
    # With the flag the code runs (this model has no tokenizer, so lr then fails in one line).
    r = run_cli("lr", "--preset", str(preset), "--trust-remote-code", timeout=120)
    assert marker.exists()
    assert r.returncode in (0, 2) and len(r.stderr.strip().splitlines()) <= 1, r.stderr


# ---------------------------------------------------------------------------------------------
# The full-screen wizard


def _wizard(preset: Path):
    from tui.wizard import WizardApp

    return WizardApp(load_draft(preset), services=Services(probe_gpus=lambda: [GPU]))


async def _read(pilot) -> None:
    """Wait until the model is read; fail with the reason on screen when it could not be."""
    app = pilot.app
    await wait_until(pilot, lambda: app.draft.model_ready or (app.model_error and not app.model_busy
                                                             and not app.asking_code),
                     timeout=120, what="the model read")
    assert app.draft.model_ready, app.model_error


@pytest.fixture
def _in_tmp(tmp_path, monkeypatch, demo_cache):
    monkeypatch.chdir(tmp_path)


async def test_wizard_asks_before_running_the_code_a_preset_trusts(tmp_path, marker_model, _in_tmp):
    folder, marker = marker_model
    app = _wizard(_preset(tmp_path, str(folder)))
    assert app.draft.preset.model.trust_remote_code is False  # the file's word is not consent
    async with app.run_test(size=(120, 40)) as pilot:
        text = await wait_for(pilot, "Allow it only if you trust", timeout=30)
        assert "The preset says to run the own Python code of" in text and "Run its code (y)" in text
        await pilot.pause(0.5)
        assert not marker.exists() and not app.model_busy
        await pilot.press("y")
        await _read(pilot)
        assert marker.exists()
        m = app.draft.preset.model
        assert m.trust_remote_code is True and m.revision is None  # a local folder: nothing to pin
        assert app.draft.info.architecture == "MarkerForCausalLM"


async def test_wizard_declined_reads_nothing_of_the_code_and_asks_once(tmp_path, marker_model, _in_tmp):
    folder, marker = marker_model
    app = _wizard(_preset(tmp_path, str(folder)))
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, "Allow it only if you trust", timeout=30)
        await pilot.press("n")
        await wait_until(pilot, lambda: app.model_error is not None and not app.model_busy
                         and "needs its own Python code" in app.model_error, timeout=60, what="the refusal")
        await pilot.pause(0.3)
        assert "needs its own Python code" in region_text(app, "#facts-box")
        assert not app.draft.model_ready and app.draft.preset.model.trust_remote_code is False
        assert app.screen.STEP == "model"  # the no stands: no second question on top
        assert not marker.exists()
        # Asked again on purpose (read the model again), the usual question comes, and a yes runs it.
        app.read_model()
        await wait_for(pilot, "Allow it only if you trust", timeout=30)
        assert not marker.exists()
        await pilot.press("y")
        await _read(pilot)
        assert marker.exists()


async def test_wizard_on_a_preset_whose_model_needs_no_code(tmp_path, hf_configs, _in_tmp, code_env):
    """Declined, a model that needs no code is read anyway, and the draft keeps trust_remote_code false."""
    app = _wizard(_preset(tmp_path, str(hf_configs / "meta-llama__Llama-3.1-8B")))
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, "Allow it only if you trust", timeout=30)
        await pilot.press("n")
        await _read(pilot)
        assert app.draft.preset.model.trust_remote_code is False


# ---------------------------------------------------------------------------------------------
# The plain wizard


def _drive(draft, keys: list[str]) -> int:
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    from tui.plain import run_plain

    with create_pipe_input() as inp:
        inp.send_text("".join(keys))
        inp.close()
        return run_plain(draft, input=inp, output=DummyOutput(), services=Services(probe_gpus=lambda: [GPU]))


ENTER, CTRL_C = "\r", "\x03"


def test_plain_wizard_asks_before_running_the_code_a_preset_trusts(tmp_path, marker_model, _in_tmp, capsys):
    folder, marker = marker_model
    preset = _preset(tmp_path, str(folder))
    code = _drive(load_draft(preset), [ENTER, "n", CTRL_C])  # keep the model; do not run its code
    out = capsys.readouterr().out
    assert code == 130
    assert "the preset says: run the own Python code of" in out
    assert "needs its own Python code" in out and "it is not read without your consent" in out
    assert not marker.exists()
    code = _drive(load_draft(preset), [ENTER, "y", CTRL_C])  # keep the model; run its code
    out = capsys.readouterr().out
    assert code == 130 and "MarkerForCausalLM" in out and marker.exists()


# ---------------------------------------------------------------------------------------------
# Pinning a Hub model's code, and the headless start that runs it


def _hub_cache(tmp_path: Path, marker: Path, with_weights: bool) -> Path:
    """A Hugging Face cache (``models--org--marker/refs/main`` -> ``snapshots/<commit>``) holding the
    marker model; with the demo model's weights and tokenizer when ``with_weights``."""
    sha = _commit(tmp_path)
    cache = tmp_path / "hf-hub"
    repo = cache / "models--org--marker"
    snap = repo / "snapshots" / sha
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    if with_weights:
        from engine.demo import ensure_demo_model

        for f in Path(ensure_demo_model()).iterdir():
            if f.is_file() and f.name != "config.json":
                shutil.copy(f, snap / f.name)
        config = json.loads((Path(ensure_demo_model()) / "config.json").read_text())
        config.update(model_type="marker_llama", architectures=["MarkerForCausalLM"], auto_map=CONFIG["auto_map"])
    else:
        config = CONFIG
    (snap / "config.json").write_text(json.dumps(config))
    _write_code(snap, marker)
    return cache


def test_pinning_offline_takes_the_cached_snapshots_commit(tmp_path, monkeypatch, code_env):
    from huggingface_hub import constants

    from engine.errors import UserError
    from engine.modelinfo import code_revision

    cache = _hub_cache(tmp_path, tmp_path / "code-ran", with_weights=False)
    sha = _commit(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert code_revision("org/marker") == sha
    assert code_revision("org/marker", "main") == sha
    assert code_revision("org/marker", "f" * 40) == "f" * 40  # already a commit: kept
    assert code_revision(str(tmp_path)) is None  # a local folder: its files are the code
    with pytest.raises(UserError, match="offline mode is on .* not in the local cache"):
        code_revision("org/not-cached")
    with pytest.raises(UserError, match="at 'v2'"):
        code_revision("org/marker", "v2")


async def test_wizard_pins_a_hub_models_code_when_the_person_agrees(tmp_path, monkeypatch, _in_tmp, code_env):
    from huggingface_hub import constants

    marker = tmp_path / "code-ran"
    cache = _hub_cache(tmp_path, marker, with_weights=False)
    sha = _commit(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    app = _wizard(_preset(tmp_path, "org/marker"))
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, "Allow it only if you trust", timeout=30)
        assert not marker.exists()
        await pilot.press("y")
        await _read(pilot)
        assert app.draft.preset.model.revision == sha and app.draft.preset.model.trust_remote_code is True
        assert marker.exists()


@pytest.mark.slow
def test_headless_start_runs_the_code_says_so_and_pins_the_commit(tmp_path, demo_cache, code_env):
    marker = tmp_path / "code-ran"
    cache = _hub_cache(tmp_path, marker, with_weights=True)
    sha = _commit(tmp_path)
    preset = _preset(tmp_path, "org/marker", max_steps=2)
    run_dir = tmp_path / "run"
    r = run_cli("--preset", str(preset), "--run-dir", str(run_dir), timeout=600,
                env={**code_env, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    said = f"runs the model's own code (trust_remote_code: true in the preset) from org/marker at revision {sha}"
    assert f"training {said}" in r.stdout
    assert marker.exists()
    from engine.preset import load_preset

    ran = load_preset(run_dir / "preset.yaml").model
    assert ran.trust_remote_code is True and ran.revision == sha
    start = next(json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()
                 if '"kind":"start"' in line)
    assert start["model"]["remote_code"] == said
    start_line = next(line for line in r.stdout.splitlines() if line.startswith("start: "))
    assert start_line.endswith(f"; {said}")  # the headless start line says it too
    assert start["preset"]["model"]["revision"] == sha
