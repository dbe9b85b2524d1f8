"""Exporting a finished run from the wizard: the run screen offers Export (``x`` and the command palette)
once the run has finished, its dialog lists each quant with the size its GGUF would have, refuses in one
line before anything runs, and runs ``qlora-wizard export`` to the end; ``qlora-wizard runs`` prints the
export command. The run is the session's real demo run; the end-to-end export needs llama.cpp's
converter (the ``export`` extra) and skips, saying so, where it is not installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import copied_run, run_cli
from screen import region_text, wait_for, wait_until
from engine.after.export import DEFAULT_QUANT, QUANT_WORDS, QUANTS, converter_installed
from tui.app import RunApp
from tui.dialogs.export import ExportDialog
from tui.format import size
from tui.screens.run import FinishedRunCommands, RunScreen

SIZE = (110, 44)

NO_CONVERTER = ("llama.cpp's converter is not installed (pip install 'qlora-wizard[export]'): the end-to-end "
                "export cannot run here")


@pytest.fixture(scope="module")
def finished_run(demo_run, tmp_path_factory) -> Path:
    """The session's short real demo run, copied into a runs folder of its own."""
    return copied_run(demo_run, tmp_path_factory.mktemp("export-runs"))


def _demo_sizes(run_dir: Path) -> dict[str, int]:
    from engine.after.export import model_sizes
    from engine.after.session import finished_run, model_source
    from engine.modelinfo import inspect_model

    return model_sizes(inspect_model(model_source(finished_run(run_dir))))


async def _palette_names(screen) -> list[str]:
    """What the run screen's own command palette entries are (before anything is typed)."""
    return [hit.text async for hit in FinishedRunCommands(screen).discover()]


async def _dialog(pilot) -> ExportDialog:
    await wait_until(pilot, lambda: isinstance(pilot.app.screen, ExportDialog), timeout=10, what="the export dialog")
    return pilot.app.screen


async def _export_into(pilot, out: Path) -> ExportDialog:
    """Open the dialog with ``x``, wait for its plan, name ``out`` and press Enter there (Export)."""
    await wait_for(pilot, "FINISHED", "x Export")
    await pilot.press("x")
    dialog = await _dialog(pilot)
    await wait_until(pilot, lambda: dialog.sizes is not None, timeout=60, what="the model's size")
    field = dialog.query_one("#export-out")
    field.value = str(out)
    field.focus()
    await pilot.press("enter")
    return dialog


@pytest.mark.slow
async def test_a_finished_run_offers_export_and_its_dialog_lists_each_quant_with_its_size(finished_run):
    app = RunApp(finished_run, poll_interval=0.05)
    async with app.run_test(size=SIZE) as pilot:
        text = await wait_for(pilot, "FINISHED", "x Export")
        assert "x Export" in text and "t Try it" in text
        assert await _palette_names(app.screen) == ["Export to GGUF", "Try it"]

        # The command palette opens it.
        await pilot.press("ctrl+p")
        await pilot.press(*"export")
        await wait_for(pilot, "Export to GGUF")
        await pilot.press("enter")
        dialog = await _dialog(pilot)
        await pilot.press("escape")
        await wait_until(pilot, lambda: isinstance(app.screen, RunScreen), timeout=5, what="the run screen")

        # So does x: the four quants, each with what it means and the size its GGUF would have.
        await pilot.press("x")
        dialog = await _dialog(pilot)
        await wait_until(pilot, lambda: dialog.sizes is not None and (dialog.error or "exporting" in
                                                                      region_text(app, "#export-status")),
                         timeout=60, what="the model's size and the plan")
        sizes = _demo_sizes(finished_run)
        assert dialog.sizes == sizes
        text = region_text(app, "#export-quant")
        for q in QUANTS:
            assert f"{q} about {size(sizes[q])} {QUANT_WORDS[q]}" in text, text
        assert "MiB" in text
        assert dialog.quant == DEFAULT_QUANT
        out = dialog.query_one("#export-out").value
        assert out == str(finished_run.parent / f"{finished_run.name}-gguf")
        whole = await wait_for(pilot, "llama.cpp's check:")
        assert "llama.cpp's check: on" in whole or "llama.cpp's check: off" in whole
        if converter_installed():
            assert dialog.error is None and f"exporting {finished_run.name} as q8_0 GGUF" in whole
        else:  # refused before anything runs, in one line that says what to install
            assert dialog.error.startswith("export needs llama.cpp's converter, which is not installed")
            assert whole.count("error: ") == 1 and "pip install" in whole
        await pilot.press("escape")
        await wait_until(pilot, lambda: isinstance(app.screen, RunScreen), timeout=5, what="the run screen")
        assert not Path(out).exists()  # nothing written until the person presses Export


async def test_an_unfinished_run_does_not_offer_export(tmp_path):
    run_dir = tmp_path / "runs" / "cut"
    run_dir.mkdir(parents=True)
    events = [{"kind": "start", "time": 1000.0, "preset": {"model": {"source": "builtin:tiny-llama"}},
               "model": {"source": "/cache/tiny-llama"}, "device": "cpu", "device_name": "CPU",
               "total_steps": 20, "resumed_from_step": None}]
    events += [{"kind": "step", "time": 1000.0 + s, "step": s, "total_steps": 20, "loss": 2.0,
                "learning_rate": 1e-4, "tokens": 100, "tokens_per_s": 100.0} for s in range(1, 6)]
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (run_dir / "process.json").write_text(json.dumps({"pid": 2**30, "start_time": None}))  # gone: crashed
    app = RunApp(run_dir, poll_interval=0.05)
    async with app.run_test(size=SIZE) as pilot:
        text = await wait_for(pilot, "CRASHED")
        assert "CRASHED" in text and "Export" not in text
        assert app.screen.check_action("export", ()) is False
        assert await _palette_names(app.screen) == []
        await pilot.press("x")
        await pilot.pause(0.2)
        assert isinstance(app.screen, RunScreen)


@pytest.mark.slow
async def test_the_dialog_refuses_a_folder_that_is_not_empty_in_one_line_before_running(finished_run, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine\n")
    app = RunApp(finished_run, poll_interval=0.05)
    async with app.run_test(size=SIZE) as pilot:
        dialog = await _export_into(pilot, taken)
        await wait_until(pilot, lambda: dialog.error is not None and not dialog.running
                         and "error:" in region_text(app, "#export-status"), timeout=60, what="the refusal")
        text = region_text(app, "#export-status")
        assert text.startswith("error: ") and "not empty" in text and str(taken) in text, text
        assert not dialog.query_one("#export-log").has_class("-shown")  # nothing ran
    assert sorted(p.name for p in taken.iterdir()) == ["keep.txt"]


@pytest.mark.slow
def test_runs_prints_the_export_command_of_the_newest_finished_run(finished_run):
    r = run_cli("runs", "--runs-dir", str(finished_run.parent))
    assert r.returncode == 0, r.stdout + r.stderr
    want = (f"take it home as a GGUF for llama.cpp/Ollama: qlora-wizard export {finished_run} "
            f"--out {finished_run.parent / (finished_run.name + '-gguf')}")
    assert want in r.stdout.splitlines(), r.stdout


@pytest.mark.slow
@pytest.mark.skipif(not converter_installed(), reason=NO_CONVERTER)
async def test_the_dialog_exports_q8_0_and_shows_the_gguf_the_verdict_and_how_to_run_it(finished_run, tmp_path):
    out = tmp_path / "home"
    app = RunApp(finished_run, poll_interval=0.05)
    async with app.run_test(size=SIZE) as pilot:
        dialog = await _export_into(pilot, out)
        assert dialog.quant == "q8_0"
        await wait_until(pilot, lambda: dialog.result is not None or (dialog.error and not dialog.running),
                         timeout=400, what="the export to end")
        assert dialog.error is None, dialog.error
        gguf = out / f"{finished_run.name}-q8_0.gguf"
        assert gguf.is_file() and (out / "Modelfile").is_file() and (out / "export.json").is_file()
        await wait_until(pilot, lambda: "written:" in region_text(app, "#export-result"), timeout=10,
                         what="the result to show")
        text = region_text(app, "#export-result")
        # A long path wraps inside the result's box: the paths are compared without the wrap's spaces.
        squashed = "".join(text.split())
        assert "".join(f"written: {gguf}".split()) in squashed and size(gguf.stat().st_size) in text, text
        name = finished_run.name.lower()
        assert "".join(f"cd {out} && ollama create {name} -f Modelfile && ollama run {name}".split()) in squashed
        check = json.loads((out / "export.json").read_text())["check"]
        if check:
            assert f"check: {check['verdict']}" in text
        else:
            assert "check: not run" in text
        assert any(line.startswith("converting to a q8_0 GGUF") for line in dialog.progress), dialog.progress
        await pilot.press("escape")
        await wait_until(pilot, lambda: isinstance(app.screen, RunScreen), timeout=5, what="the run screen")
    assert not list(tmp_path.glob(".home.*"))  # the scratch folder is gone


@pytest.mark.slow
@pytest.mark.skipif(not converter_installed(), reason=NO_CONVERTER)
async def test_escape_interrupts_an_export_under_way_and_leaves_nothing(finished_run, tmp_path):
    out = tmp_path / "home"
    app = RunApp(finished_run, poll_interval=0.05)
    async with app.run_test(size=SIZE) as pilot:
        dialog = await _export_into(pilot, out)
        # Interrupted in the middle: while llama.cpp's converter (a process of its own) writes the GGUF.
        await wait_until(pilot, lambda: any(ln.startswith("converting") for ln in dialog.progress), timeout=120,
                         what="the conversion to start")
        proc = dialog._proc
        assert proc is not None and proc.poll() is None
        await pilot.press("escape")
        await wait_until(pilot, lambda: isinstance(app.screen, RunScreen), timeout=5, what="the run screen")
        await wait_until(pilot, lambda: proc.poll() is not None, timeout=30, what="the export process to end")
    assert not out.exists()
    assert not list(tmp_path.glob(".home.*"))


def _recorded_finished_run(run_dir: Path) -> Path:
    """A finished run as its events say (no model: for what the dialog does with the export process)."""
    run_dir.mkdir(parents=True)
    events = [{"kind": "start", "time": 1000.0, "preset": {"model": {"source": "builtin:tiny-llama"}},
               "model": {"source": "/cache/tiny-llama"}, "device": "cpu", "device_name": "CPU",
               "total_steps": 5, "resumed_from_step": None}]
    events += [{"kind": "step", "time": 1000.0 + s, "step": s, "total_steps": 5, "loss": 2.0,
                "learning_rate": 1e-4, "tokens": 100, "tokens_per_s": 100.0} for s in range(1, 6)]
    events.append({"kind": "end", "time": 1006.0, "status": "finished", "step": 5,
                   "adapter": str(run_dir / "adapter"), "elapsed_s": 6.0})
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return run_dir


async def test_an_export_that_fails_shows_its_error_line_and_the_choices_again(tmp_path, monkeypatch):
    import sys
    from types import SimpleNamespace

    import tui.dialogs.export as dialog_module

    run_dir = _recorded_finished_run(tmp_path / "runs" / "done")
    from engine.after.export import quant_sizes

    plan = SimpleNamespace(params=10_000_000, sizes=quant_sizes(10_000_000),
                           summary=lambda: "exporting done as q8_0 GGUF (a plan)")
    monkeypatch.setattr(dialog_module, "plan_export", lambda *a, **k: plan)
    script = ("import sys; print('converting to a q8_0 GGUF with llama.cpp\\'s converter', file=sys.stderr); "
              "print('error: llama.cpp\\'s converter failed: boom', file=sys.stderr); sys.exit(2)")
    monkeypatch.setattr(dialog_module, "export_argv", lambda *a: [sys.executable, "-c", script])
    app = RunApp(run_dir, poll_interval=0.05)
    async with app.run_test(size=SIZE) as pilot:
        dialog = await _export_into(pilot, tmp_path / "out")
        await wait_until(pilot, lambda: dialog.error is not None and not dialog.running
                         and "error:" in region_text(app, "#export-status")
                         and "MiB" in region_text(app, "#export-quant"), timeout=30, what="the export to fail")
        assert dialog.error == "error: llama.cpp's converter failed: boom"
        assert region_text(app, "#export-status") == "error: llama.cpp's converter failed: boom"
        assert dialog.progress[0].startswith("converting to a q8_0 GGUF")  # the log stays, to read
        assert dialog.query_one("#export-form").display and dialog.result is None  # choose again
        assert "q8_0 about 10.1 MiB" in region_text(app, "#export-quant")  # 10 M weights in 34/32 bytes each
