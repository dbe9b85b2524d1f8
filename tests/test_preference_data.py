"""Preference pairs (training.method dpo and orpo): the two pair formats, their tokenized columns,
the split at the prompt boundary, truncation and removals, the refusals of the wrong kind of data,
the preview, the statistics and the bundled demo pairs.

Uses the demo tokenizer (character level, adds <s>): one token per character makes the expected
counts exact. Nothing here touches the network.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from conftest import data_settings as settings
from conftest import write_jsonl
from engine import data as D
from engine.errors import UserError
from engine.preset import DataSettings, ModelSettings, preset_from_dict


def prep(s: DataSettings, tok, tmp_path: Path, seq_len: int = 512, method: str = "dpo"):
    return D.prepare_data(s, tok, seq_len, 0, cache_dir=tmp_path / "cache", method=method)


def decoded(tok, row) -> tuple[str, str, str]:
    """A tokenized pair's prompt, chosen and rejected answer as text."""
    return tuple(tok.decode(row[k], skip_special_tokens=False) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))


def turns(*pairs) -> list[dict]:
    return [{"role": role, "content": content} for role, content in pairs]


PAIR = {"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " 5"}
CONVERSATION = {"chosen": turns(("user", "hi"), ("assistant", "hello")),
                "rejected": turns(("user", "hi"), ("assistant", "go away"))}


# --------------------------------------------------------------------------------------------
# Formats and their detection


def test_pair_formats_detected_by_their_keys_and_values(tmp_path):
    assert D.detect_format(["prompt", "chosen", "rejected"]) == "preference"
    assert D.detect_format(["chosen", "rejected"]) == "preference_messages"
    assert D.detect_format(["prompt", "completion"]) == "prompt_completion"
    cases = [
        (PAIR, "preference"),
        (CONVERSATION, "preference_messages"),
        # TRL's conversational layout: the same keys as the texts, told apart by the values.
        ({"prompt": turns(("user", "hi")), "chosen": turns(("assistant", "hello")),
          "rejected": turns(("assistant", "go away"))}, "preference_messages"),
    ]
    for i, (record, fmt) in enumerate(cases):
        path = write_jsonl(tmp_path / f"d{i}.jsonl", [record])
        assert D.check_records(settings(path), method="dpo") == (fmt, 1, [])
    completion = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Q:", "completion": " A"}])
    assert D.check_records(settings(completion)) == ("prompt_completion", 1, [])


BAD_PAIRS = [
    ("preference", {"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
    ("preference", {"prompt": "p", "chosen": {"text": "a"}, "rejected": "b"},
     "field 'chosen' is an object, expected text"),
    ("preference", {"prompt": "p", "chosen": ["a"], "rejected": "b"},
     "field 'chosen' is a list, expected text (pairs of conversations: data.format preference_messages)"),
    ("preference", {"prompt": "  ", "chosen": "a", "rejected": "b"}, "empty prompt ('prompt' is empty)"),
    ("preference_messages", {"chosen": CONVERSATION["chosen"]}, "missing field 'rejected'"),
    ("preference_messages", {"chosen": "hello", "rejected": CONVERSATION["rejected"]},
     "field 'chosen' is text, expected a list of turns (pairs of texts: data.format preference)"),
    ("preference_messages", {"chosen": CONVERSATION["chosen"], "rejected": []}, "field 'rejected' is an empty list"),
    ("preference_messages", {"chosen": [{"role": "user", "content": "hi"}, {"content": "x"}],
                             "rejected": CONVERSATION["rejected"]}, "chosen turn 2 has no role ('role' or 'from')"),
    ("preference_messages", {"chosen": turns(("user", "hi"), ("assistant", "a")),
                             "rejected": turns(("user", "ho"), ("assistant", "b"))},
     "chosen and rejected share no prompt: they differ from their first turn"),
    ("preference_messages", {"chosen": turns(("assistant", "a")), "rejected": turns(("assistant", "b"))},
     "chosen and rejected share no prompt: each is only an answer (give the prompt turns)"),
    ("preference_messages",
     {"chosen": turns(("user", "hi"), ("assistant", "a"), ("user", "more"), ("assistant", "c")),
      "rejected": turns(("user", "hi"), ("assistant", "b"), ("user", "more"), ("assistant", "d"))},
     "chosen and rejected differ from turn 2 on: they must differ only in one final assistant turn each"),
    ("preference_messages", {"chosen": turns(("user", "hi"), ("assistant", "a"), ("user", "x")),
                             "rejected": turns(("user", "hi"), ("assistant", "a"), ("user", "y"))},
     "chosen ends with a user turn, expected the assistant's answer"),
    ("preference_messages",
     {"prompt": "hi", "chosen": turns(("assistant", "a")), "rejected": turns(("assistant", "b"))},
     "field 'prompt' is text, expected a list of turns (pairs of texts: data.format preference)"),
]


@pytest.mark.parametrize("fmt,record,problem", BAD_PAIRS, ids=[p for _, _, p in BAD_PAIRS])
def test_a_bad_pair_record_is_one_clear_problem(tmp_path, fmt, record, problem):
    path = write_jsonl(tmp_path / "d.jsonl", [PAIR if fmt == "preference" else CONVERSATION, record])
    with pytest.raises(UserError) as err:
        D.check_records(settings(path, format=fmt), method="dpo")
    assert err.value.message == f"{path} line 2: {problem}"
    assert err.value.hint == "fix the line or set data.skip_bad_records: true"
    # Skipped and counted when asked.
    assert D.check_records(settings(path, format=fmt, skip_bad_records=True), method="orpo")[1:] == \
        (1, [D.BadRecord(path, "line", 2, problem)])


# --------------------------------------------------------------------------------------------
# Tokenized columns


def test_preference_pair_columns(tmp_path, tok):
    out = prep(settings(write_jsonl(tmp_path / "d.jsonl", [PAIR])), tok, tmp_path)
    assert out.format == "preference" and out.validation is None
    assert list(out.train.features) == ["prompt_ids", "chosen_ids", "rejected_ids"]
    assert all(f.feature.dtype == "int32" for f in out.train.features.values())
    row = out.train[0]
    assert row["prompt_ids"][0] == tok.bos_token_id
    assert row["chosen_ids"][-1] == row["rejected_ids"][-1] == tok.eos_token_id
    assert decoded(tok, row) == ("<s>Q: 2+2?\nA:", " 4</s>", " 5</s>")


def test_conversation_pairs_with_the_chat_template_and_without(tmp_path, tok, tok_plain):
    implicit = write_jsonl(tmp_path / "implicit.jsonl", [CONVERSATION])
    trl = write_jsonl(tmp_path / "trl.jsonl", [{"prompt": turns(("user", "hi")),
                                                  "chosen": turns(("assistant", "hello")),
                                                  "rejected": turns(("assistant", "go away"))}])
    # The demo template ends the turn with </s> (the line break after it is layout, not an answer's).
    expected = ("<s>### User:\nhi\n\n### Assistant:\n", "hello</s>", "go away</s>")
    for path in (implicit, trl):
        assert decoded(tok, prep(settings(path), tok, tmp_path).train[0]) == expected
        # No chat template: the plain layout of the messages format, the EOS after each answer.
        assert decoded(tok_plain, prep(settings(path), tok_plain, tmp_path).train[0]) == expected
    # A template that ends a turn without a special token: the answer as rendered, then the EOS.
    bare = copy.deepcopy(tok)
    bare.chat_template = tok.chat_template.replace("{{ eos_token }}", "")
    assert decoded(bare, prep(settings(implicit), bare, tmp_path).train[0]) == (
        "<s>### User:\nhi\n\n### Assistant:\n", "hello\n\n</s>", "go away\n\n</s>")
    # Earlier turns (a system turn, an exchange) are all prompt.
    longer = write_jsonl(tmp_path / "longer.jsonl", [{
        "chosen": turns(("system", "Be kind."), ("user", "hi"), ("assistant", "hey"), ("user", "bye?"),
                        ("assistant", "Goodbye!")),
        "rejected": turns(("system", "Be kind."), ("user", "hi"), ("assistant", "hey"), ("user", "bye?"),
                          ("assistant", "Go."))}])
    assert decoded(tok, prep(settings(longer), tok, tmp_path).train[0]) == (
        "<s>### System:\nBe kind.\n\n### User:\nhi\n\n### Assistant:\nhey</s>\n\n### User:\nbye?\n\n### Assistant:\n",
        "Goodbye!</s>", "Go.</s>")


@pytest.fixture
def merging_tok():
    """A real byte-pair tokenizer whose merges cross a prompt/answer boundary: "a" then "b" is one
    token "ab"; it adds <s> in front."""
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "x": 2, "a": 3, "b": 4, "c": 5, "ab": 6}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def test_prompt_and_answer_split_where_their_tokens_part(tmp_path, merging_tok):
    """The prompt ends in "a", the chosen answer starts with "b": prompt + chosen tokenizes "ab" as one
    token, so that token goes to the answers and prompt + answer is the whole text's tokenization."""
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "xa", "chosen": "b", "rejected": "c"}])
    row = prep(settings(path), merging_tok, tmp_path).train[0]
    assert row == {"prompt_ids": [0, 2], "chosen_ids": [6, 1], "rejected_ids": [3, 5, 1]}
    for side in ("chosen", "rejected"):
        whole = merging_tok("xa" + {"chosen": "b", "rejected": "c"}[side])["input_ids"]
        assert row["prompt_ids"] + row[f"{side}_ids"] == whole + [merging_tok.eos_token_id]


# --------------------------------------------------------------------------------------------
# Truncation, removals, statistics


def test_truncation_and_each_removal_counted(tmp_path, tok):
    recs = [
        {"prompt": "P1:", "chosen": "ok", "rejected": "no"},              # <s>P1: = 4, answers 3 each
        {"prompt": "P2:", "chosen": "a much longer answer", "rejected": "no"},  # chosen cut to 6
        {"prompt": "P" * 12, "chosen": "ok", "rejected": "no"},           # the prompt fills seq_len
        {"prompt": "P3:", "chosen": "same", "rejected": "same"},          # identical answers
        {"prompt": "P4:", "chosen": "  ", "rejected": "no"},               # an empty answer
        {"prompt": "P5:", "chosen": "", "rejected": "no"},                 # another
        {"prompt": "P6:", "chosen": "abcdefXY", "rejected": "abcdefZW"},  # identical once cut at 6
    ]
    out = prep(settings(write_jsonl(tmp_path / "d.jsonl", recs)), tok, tmp_path, seq_len=10)
    st = out.stats
    assert [decoded(tok, r) for r in out.train] == [("<s>P1:", "ok</s>", "no</s>"), ("<s>P2:", "a much", "no</s>")]
    assert (st.pairs, st.examples, st.truncated) == (2, 2, 1)
    assert (st.removed_identical, st.removed_empty_side, st.removed_prompt_too_long) == (2, 2, 1)
    assert (st.prompt_tokens, st.chosen_tokens, st.rejected_tokens) == (8, 9, 6)
    assert st.tokens == 2 * 8 + 9 + 6 and st.supervised_tokens == 9 + 6
    assert (st.max_len, st.mean_len, st.seq_len) == (10, 7.75, 10)  # prompt + answer: 7, 7, 10, 7
    assert (st.unstopped, st.unstopped_cut, st.stop_token) == (1, 1, "</s>")
    assert st.summary_lines() == [
        "format: preference",
        "2 training pairs, 0 validation pairs",
        "tokens of the training pairs: prompts 8, chosen answers 9, rejected answers 6",
        "prompt + answer: mean 8, longest 10 tokens",
        "1 pair longer than 10 tokens: answers cut to fit",
        "removed: 2 with identical answers, 2 with an empty answer, 1 whose prompt fills seq_len 10",
        "warning: 1 of 2 chosen answer does not end with the end-of-sequence token </s> (1 cut at seq_len 10): "
        "the model will not learn to stop on them; raise training.seq_len or shorten them",
    ]


def test_no_pair_left_says_why_and_the_seq_len_that_keeps_them(tmp_path, tok):
    recs = [{"prompt": "x" * 40, "chosen": "ok", "rejected": "no"}, {"prompt": "P:", "chosen": "a", "rejected": "a"}]
    with pytest.raises(UserError) as err:
        prep(settings(write_jsonl(tmp_path / "d.jsonl", recs)), tok, tmp_path, seq_len=32)
    assert err.value.message == (f"{tmp_path / 'd.jsonl'}: no pair has anything left to train at seq_len 32: 1 "
                                 "training pair is cut before the answer (prompts are 41 tokens), and 1 with "
                                 "identical answers")
    assert err.value.hint == "a training.seq_len of 64 keeps all of them"


def test_cleaning_split_and_cap_apply_to_pairs(tmp_path, tok):
    recs = [{"prompt": f"Q{i}:", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(20)]
    recs += [recs[0],                                                    # a duplicate
             {"prompt": "Q:", "chosen": "As an AI, no", "rejected": "sure"},  # drop phrase in the chosen answer
             {"prompt": "Q:", "chosen": "sure", "rejected": "As an AI, no"}]  # ... only the chosen one counts
    path = write_jsonl(tmp_path / "d.jsonl", recs)
    st = prep(settings(path, drop_phrases=["as an ai"], validation_split=0.25, max_examples=10), tok, tmp_path).stats
    assert (st.removed_duplicates, st.removed_phrases) == (1, 1)
    assert (st.pairs, st.validation_examples) == (10, 5)
    assert "removed: 1 duplicates, 1 with a drop phrase in the chosen answer" in st.summary_lines()


# --------------------------------------------------------------------------------------------
# The training method and the kind of data


def test_each_method_refuses_the_other_kind_of_data(tmp_path, tok):
    alpaca = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "Say hi.", "input": "", "output": "hi"}])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [PAIR])
    with pytest.raises(UserError) as err:
        D.check_records(settings(alpaca), method="dpo")
    assert (err.value.message, err.value.hint) == (
        f"training.method dpo trains on pairs, but data.train ({alpaca}) holds alpaca records (instruction, "
        "input, output)",
        "give records with prompt, chosen and rejected (or chosen and rejected conversations), or set "
        "training.method: sft")
    with pytest.raises(UserError) as err:
        D.check_records(settings(pairs))
    assert (err.value.message, err.value.hint) == (
        f"data.train ({pairs}) holds preference pairs (prompt, chosen, rejected); training.method sft trains on "
        "single responses", "set training.method: dpo or orpo")
    # prepare_data refuses too, also from its cache.
    with pytest.raises(UserError, match="training.method orpo trains on pairs, but data.train"):
        prep(settings(alpaca), tok, tmp_path, method="orpo")
    assert prep(settings(pairs), tok, tmp_path, method="dpo").stats.pairs == 1
    with pytest.raises(UserError, match="holds preference pairs"):
        prep(settings(pairs), tok, tmp_path, method="sft")
    # A format set by hand is named as such.
    with pytest.raises(UserError) as err:
        D.check_records(settings(pairs, format="preference"), method="sft")
    assert err.value.message == ("data.format is preference, preference pairs (prompt, chosen, rejected); "
                                 "training.method sft trains on single responses")


def test_the_wizard_takes_the_method_the_data_calls_for_and_a_start_refuses_the_other(tmp_path, demo_cache):
    from tui.draft import Draft, check_data, start_run

    preset = preset_from_dict({"model": {"source": "builtin:tiny-llama"}, "data": {"train": "builtin:demo"},
                               "training": {"method": "dpo", "reference": "precomputed", "beta": 0.3}})
    # The wizard's data step: single responses under dpo are checked as sft, and the draft takes sft on,
    # its dpo settings back to their defaults, saying so.
    draft = Draft(preset)
    report = check_data(draft.preset)
    assert report.method == "sft" and not report.stats.paired
    note = draft.accept_data(report)
    assert note.startswith("the data holds single responses: training.method is now sft, not dpo")
    t = draft.preset.training
    assert (t.method, t.reference, t.beta) == ("sft", "auto", 0.1) and draft.data_ready
    # Pairs under sft: dpo.
    draft.set("data.train", "builtin:demo-pairs")
    note = draft.accept_data(check_data(draft.preset))
    assert draft.preset.training.method == "dpo" and note.startswith("the data holds preference pairs")
    assert draft.data_ready and draft.data.stats.paired
    # A method the person chose stands: single responses under it are refused in one line, not switched.
    draft.set("training.method", "orpo")
    draft.set("data.train", "builtin:demo")
    with pytest.raises(UserError, match=r"^training\.method orpo trains on pairs, but data\.train \(builtin:demo\)"):
        draft.accept_data(check_data(draft.preset))
    assert draft.preset.training.method == "orpo" and not draft.data_ready
    # A preset started as it is (headless) is refused in one line instead, before any run directory.
    with pytest.raises(UserError, match=r"^training\.method dpo trains on pairs, but data\.train \(builtin:demo\) "
                                        r"holds alpaca records"):
        start_run(preset, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_cached_stats_refuse_the_other_method(tmp_path, demo_cache):
    """The fast path a start takes (no tokenizer loaded) refuses as prepare_data does."""
    import shutil

    from engine.demo import ensure_demo_model

    model = tmp_path / "model"
    shutil.copytree(ensure_demo_model(), model)
    m = ModelSettings(source=str(model))
    s = settings(write_jsonl(tmp_path / "d.jsonl", [PAIR, {**PAIR, "chosen": " four"}]))
    cache = tmp_path / "cache"
    prepared = D.prepare_data(s, D.load_tokenizer(m), 128, 3, cache_dir=cache, method="dpo")
    assert D.cached_stats(s, m, 128, 3, cache_dir=cache, method="orpo") == prepared.stats
    with pytest.raises(UserError, match=r"holds preference pairs \(prompt, chosen, rejected\); training\.method sft"):
        D.cached_stats(s, m, 128, 3, cache_dir=cache)


# --------------------------------------------------------------------------------------------
# What a person sees


def test_preview_of_a_pair(tmp_path, tok):
    from tui.steps.data import render_example

    path = write_jsonl(tmp_path / "d.jsonl", [PAIR])
    (pair,) = D.preview(settings(path), tok, 256)
    assert pair == [("prompt (not trained):\n", None), ("<s>Q: 2+2?\nA:", False),
                    ("\nchosen answer (preferred):\n", None), (" 4</s>", True),
                    ("\nrejected answer:\n", None), (" 5</s>", True)]
    shown = render_example(pair, "bold", ("«", "»"))
    assert shown.plain == ("prompt (not trained):\n<s>Q: 2+2?\nA:\nchosen answer (preferred):\n« 4</s>»\n"
                           "rejected answer:\n« 5</s>»")
    # A long prompt is cut in its own part: the labels and answers still show.
    long = write_jsonl(tmp_path / "long.jsonl", [{**PAIR, "prompt": "word " * 300}])
    text = render_example(D.preview(settings(long), tok, 4096)[0], "bold", ("«", "»")).plain
    assert "  ...\n" in text and text.endswith("chosen answer (preferred):\n« 4</s>»\nrejected answer:\n« 5</s>»")


def test_the_plain_wizard_shows_the_pairs(tmp_path, demo_cache, capsys):
    from tui.draft import Draft, Services, check_data
    from tui.plain import PlainWizard

    preset = preset_from_dict({"model": {"source": "builtin:tiny-llama"}, "data": {"train": "builtin:demo-pairs"},
                               "training": {"method": "orpo"}})
    draft = Draft(preset)
    draft.data = check_data(preset)
    assert draft.data.bad_records == 0 and len(draft.data.examples) == 3
    PlainWizard(draft, Services()).show_data()
    out = capsys.readouterr().out
    assert "  format: preference\n  360 training pairs, 40 validation pairs\n  tokens of the training pairs: " in out
    assert "every chosen answer ends with the end-of-sequence token </s>: the model learns to stop" in out
    assert "pair 1 of 3 as the model sees it: the prompt, the chosen and the rejected answer" in out
    assert "prompt (not trained):\n<s>### Instruction:\n" in out
    assert "### Response:\nchosen answer (preferred):\n«WALL</s>»\nrejected answer:\n«wwaallll</s>»" in out


def test_trying_a_tuned_model_renders_a_typed_prompt_as_the_pairs_were(tmp_path, tok, tok_plain):
    """``try`` and ``eval`` (engine.after) give a typed prompt the layout training gave the pair's prompt."""
    from engine.data.formats import get_format

    for record, fmt in ((PAIR, "preference"), (CONVERSATION, "preference_messages")):
        path = write_jsonl(tmp_path / f"{fmt}.jsonl", [record])
        for t in (tok, tok_plain):
            form = get_format(fmt)
            got, examples, held = D.held_out_examples(settings(path), 0, 1)
            assert (got, held) == (fmt, False)
            typed, reference = form.typed_prompt(examples[0])
            assert reference == examples[0]["chosen"]
            rendered = form.render_prompt(typed, t, adds_bos=True)
            prompt = decoded(t, prep(settings(path), t, tmp_path).train[0])[0]
            assert ("<s>" if rendered.bos else "") + rendered.text == prompt


# --------------------------------------------------------------------------------------------
# Statistics as files and events hold them


def test_pair_stats_round_trip_and_older_stats_read():
    from engine.events import StartData

    st = D.DataStats(format="preference", examples=3, pairs=3, prompt_tokens=30, chosen_tokens=9, rejected_tokens=8,
                     removed_identical=1, removed_empty_side=2, removed_prompt_too_long=1, seq_len=64)
    assert D.DataStats.from_json(json.loads(json.dumps(st.to_json()))) == st
    assert st.paired and not D.DataStats(format="alpaca").paired
    started = StartData.from_json(st.to_json())
    assert started.to_json() == st.to_json() and not started.extra
    assert (started.pairs, started.removed_prompt_too_long) == (3, 1)
    old = D.DataStats(format="alpaca", examples=3).to_json()
    for key in ("pairs", "prompt_tokens", "chosen_tokens", "rejected_tokens", "removed_identical",
                "removed_empty_side", "removed_prompt_too_long"):
        del old[key]
    assert D.DataStats.from_json(old) == D.DataStats(format="alpaca", examples=3)


# --------------------------------------------------------------------------------------------
# The bundled demo pairs


def test_demo_pairs_load_with_no_bad_record(tmp_path, tok):
    from engine.demo_data import DEMO_PAIRS_FILE
    from engine.demo_data.make_demo_pairs import pairs

    assert D.resolve_data_path("builtin:demo-pairs") == str(DEMO_PAIRS_FILE)
    assert D.check_records(DataSettings(train="builtin:demo-pairs"), method="dpo") == ("preference", 400, [])
    # The committed file is what the script writes.
    assert DEMO_PAIRS_FILE.read_text(encoding="utf-8") == "".join(json.dumps(p) + "\n" for p in pairs())
    st = D.prepare_data(DataSettings(train="builtin:demo-pairs"), tok, 256, 42, cache_dir=tmp_path / "cache",
                        method="dpo").stats
    assert (st.format, st.pairs + st.validation_examples, st.validation_examples) == ("preference", 400, 40)
    assert st.truncated == st.removed_identical == st.removed_empty_side == st.removed_prompt_too_long == 0
    assert st.skipped_bad == st.removed_duplicates == st.unstopped == 0
    with pytest.raises(UserError) as err:
        D.check_records(settings("builtin:nope"))
    assert err.value.hint == "the bundled ones are builtin:demo and builtin:demo-pairs"
