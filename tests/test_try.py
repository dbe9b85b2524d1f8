"""After the run: trying its model. One real demo run (real QLoRA on the CPU) is trained once for the
module; the try screen is driven through Pilot on it, the run screen offers it, and the plain loop of
``qlora-wizard try --plain`` answers piped prompts. Everything is the real engine and the real model.
"""

from __future__ import annotations

import json
import shutil
from itertools import pairwise
from pathlib import Path

import pytest

from conftest import copied_run, fake_training_process, run_cli
from screen import flat, region_text, screen_text, wait_for, wait_until
from tui.app import RunApp, TryApp
from tui.screens.try_model import PromptArea, TryScreen

pytestmark = pytest.mark.slow

PROMPT = "Reverse the letters of the word.\n\nfree"
"""An alpaca instruction and its input (a blank line between them), as in the demo data."""


@pytest.fixture(scope="module")
def finished_run(demo_run, tmp_path_factory) -> Path:
    """The session's short real demo run, finished with its adapter, copied (the try screen's eval writes
    into it)."""
    return copied_run(demo_run, tmp_path_factory.mktemp("try"))


async def _loaded(pilot) -> TryScreen:
    """The try screen on top, once its model is loaded."""
    app = pilot.app
    await wait_until(pilot, lambda: isinstance(app.screen, TryScreen) and (app.screen.ready or app.screen.load_error),
                     timeout=120, what="the model to load")
    assert app.screen.load_error is None, app.screen.load_error
    return app.screen


async def _answered(pilot, screen: TryScreen) -> None:
    """Wait until both panes say their answer is done."""
    await wait_until(pilot, lambda: all(str(screen.query_one(f"#{p}-pane").border_subtitle).startswith("done")
                                        for p in ("tuned", "base")) and not screen.generating,
                     timeout=120, what="both answers")


async def test_both_answers_stream_side_by_side_in_the_runs_template(finished_run):
    messages = []
    app = TryApp(finished_run)
    async with app.run_test(size=(100, 30), message_hook=messages.append) as pilot:
        screen = await _loaded(pilot)
        text = flat(screen_text(app))
        assert "builtin:tiny-llama with the run's adapter, on cpu" in text
        # Greedy decoding: the same answers every time.
        field = screen.query_one("#temperature")
        field.focus()
        field.value = ""
        await pilot.press("0")
        assert screen.decoding.temperature == 0
        prompt = screen.query_one("#prompt", PromptArea)
        prompt.focus()
        await pilot.press(*"Reverse the letters of the word.", "ctrl+j", "ctrl+j", *"free")
        assert prompt.text == PROMPT
        # The prompt as the model sees it: the alpaca template the run trained with, one dim line.
        text = await wait_for(pilot, "### Input:")
        assert "as the model sees it: <s>### Instruction:⏎Reverse the letters of the word.⏎⏎### Input:⏎free" in text
        await pilot.press("enter")
        await _answered(pilot, screen)
        tuned, base = (screen.query_one(f"#{p}-pane").text for p in ("tuned", "base"))
        assert tuned.strip() and base.strip()
        assert tuned != base, "the adapter changed nothing"
        # Under each answer, a dim line: ended by the stop token (the fine-tuned model learned to stop), or
        # cut at the length limit.
        notes = [screen.query_one(f"#{p}-pane").note for p in ("tuned", "base")]
        assert notes[0] == "ended by the stop token </s>"
        assert notes[1] in ("ended by the stop token </s>", "cut at the length limit of 128 tokens: the model did not stop")
        # Each pane keeps the end of its answer in view (a long one scrolls there a frame after it is shown):
        # the answer's last words, the note under it, and the time in the pane's border.
        await wait_until(pilot, lambda: "(ended by the stop token </s>)" in region_text(app, "#tuned-pane")
                         and notes[1].split(":")[0].split()[-1] in region_text(app, "#base-pane"),
                         timeout=10, what="the notes under both answers")
        left, right = region_text(app, "#tuned-pane"), region_text(app, "#base-pane")
        assert left.startswith("fine-tuned") and "done in" in left and tuned.split()[-1] in left
        assert right.startswith("base (adapter off)") and "done in" in right and base.split()[-1] in right
        # Streamed as generated: the base answer (a long one) arrived in growing pieces.
        request = screen.request
        pieces = [m.text for m in messages if isinstance(m, TryScreen.Streamed) and m.request == request
                  and m.pane == "base"]
        assert len(pieces) > 1 and all(b.startswith(a) for a, b in pairwise(pieces)) and pieces[-1] == base

        # A second request stops the first: the base answer being streamed stops, the new answers show.
        # (Actions, not keys: a pressed key waits for the screen to be idle, which it is not while an
        # answer streams in.)
        screen.action_generate()
        first = screen.request

        def streaming_base() -> bool:
            return any(isinstance(m, TryScreen.Streamed) and m.request == first and m.pane == "base"
                       for m in messages)

        await wait_until(pilot, streaming_base, timeout=60, what="the base answer to stream")
        screen.action_generate()
        await _answered(pilot, screen)
        outcomes = [(m.pane, m.outcome) for m in messages if isinstance(m, TryScreen.Answered) and m.request == first]
        assert outcomes == [("tuned", "done"), ("base", "stopped")]
        assert screen.request == first + 1
        assert screen.query_one("#tuned-pane").text == tuned  # greedy: the same answer again

        # Leaving while it generates stops it and frees the model.
        session = screen.session
        screen.action_generate()
        await pilot.press("escape")
    assert screen.closed.wait(10)
    assert screen.session is None and session.model is None


async def test_ctrl_e_fills_a_validation_example_and_shows_its_reference(finished_run):
    app = TryApp(finished_run)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await _loaded(pilot)
        examples = screen.examples.examples
        assert len(examples) >= 2
        await pilot.press("ctrl+e")
        prompt = screen.query_one("#prompt", PromptArea)
        assert prompt.text == examples[0].prompt
        await wait_for(pilot, "reference answer: example 1 of")
        assert flat(examples[0].reference) in region_text(app, "#reference")
        await pilot.press("ctrl+e")
        assert prompt.text == examples[1].prompt
        text = await wait_for(pilot, "reference answer: example 2 of")
        assert flat(examples[1].reference) in region_text(app, "#reference")
        # 80x24 holds it all: the prompt, the settings, both panes, the reference and the keys.
        lines = screen_text(app).splitlines()
        assert len(lines) == 24
        for phrase in ("prompt", "max new tokens", "temperature", "top-p", "as the model sees it", "fine-tuned",
                       "base (adapter off)", "reference answer", "Example", "Evaluate", "Back"):
            assert phrase in text, f"{phrase!r} is not on an 80x24 screen"
        assert app.screen.max_scroll_y == 0
        # ctrl+v: validation loss and perplexity, base against fine-tuned, on the loaded model.
        await pilot.press("ctrl+v")
        await wait_until(pilot, lambda: screen.eval_result is not None, timeout=120, what="the evaluation")
        text = await wait_for(pilot, "perplexity", region="#eval-box")
        result = screen.eval_result
        assert result.fine_tuned.loss < result.base.loss
        for label, scores in (("base", result.base), ("fine-tuned", result.fine_tuned)):
            assert f"{label} {scores.loss:.4f} {scores.perplexity:,.2f}" in text
        assert "val loss" in text and "loss -" in text and "exact: base" in text
        assert (finished_run / "eval.json").is_file()


async def test_the_run_screen_of_a_finished_run_offers_try_and_opens_it(finished_run):
    from tui.screens.run import RunScreen

    app = RunApp(finished_run, poll_interval=0.05)
    async with app.run_test(size=(100, 30)) as pilot:
        text = await wait_for(pilot, "FINISHED", "Try it")
        assert "t Try it" in text
        await pilot.press("t")
        screen = await _loaded(pilot)
        assert screen.run_dir == finished_run
        await pilot.press("escape")
        text = await wait_for(pilot, "FINISHED")
        assert isinstance(app.screen, RunScreen) and "FINISHED" in text
        assert screen.closed.wait(10)


def test_try_says_whether_an_answer_ended_by_the_stop_token_or_the_length_limit(finished_run):
    r = run_cli("try", str(finished_run), "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    cut = "(cut at the length limit of 2 tokens: the model did not stop)"
    assert lines.count(cut) == 2, r.stdout  # both answers, each under its own
    assert lines.index(cut) > next(i for i, ln in enumerate(lines) if ln.startswith("── fine-tuned"))
    # Room to finish: the fine-tuned model learned to end its answer with </s>.
    r = run_cli("try", str(finished_run), "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "64",
                "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["fine_tuned_stop"] == "eos", out
    assert out["base_stop"] in ("eos", "length")


def test_plain_try_prints_both_answers(finished_run):
    typed = f":set temperature 0\n{PROMPT.replace(chr(10), chr(92) + 'n')}\n:example\n:quit\n"
    r = run_cli("try", str(finished_run), "--plain", input=typed, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "temperature 0" in out
    tuned = [ln for ln in out.splitlines() if "fine-tuned: " in ln]
    base = [ln for ln in out.splitlines() if ln.startswith("base: ") or "prompt> base: " in ln]
    assert len(tuned) == 2 and len(base) == 2, out  # the typed prompt, then the example
    assert all(ln.split("fine-tuned: ", 1)[1].strip() for ln in tuned)
    # Under each answer, how it ended: by the stop token or at the length limit of 128 tokens.
    endings = [ln.strip() for ln in out.splitlines() if ln.startswith("  (")]
    assert len(endings) == 4, out
    assert all(e in ("(ended by the stop token </s>)", "(cut at the length limit of 128 tokens: the model did not stop)")
               for e in endings), endings
    assert "example 1 of" in out and "reference: " in out
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("case", ["no adapter", "still training"])
async def test_a_run_that_cannot_be_tried_says_why_in_one_line(finished_run, tmp_path, case):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir, ignore=shutil.ignore_patterns("adapter", "checkpoints", "eval.json"))
    proc = None
    if case == "still training":
        events = [json.loads(ln) for ln in (run_dir / "events.jsonl").read_text().splitlines()]
        (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events if e["kind"] != "end"))
        proc = fake_training_process(run_dir)
    want = "its adapter is missing" if case == "no adapter" else "is still training"
    try:
        app = TryApp(run_dir)
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_until(pilot, lambda: app.screen.load_error, timeout=60, what="the error")
            text = await wait_for(pilot, want)
            assert want in text
            assert text.count("error:") == 1 and "Traceback" not in text
            assert app.screen.check_action("generate", ()) is None
        r = run_cli("try", str(run_dir), "--plain", input=":quit\n")
        assert r.returncode == 2
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and want in r.stderr
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
