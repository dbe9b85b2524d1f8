"""engine.data: sources, formats, bad records, cleaning, split, masking, cache, preview.

Uses the demo tokenizer (character level, adds <s>): one token per character makes the expected
counts exact. Nothing here touches the network.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import data_settings as settings
from conftest import write_jsonl
from engine import data as D
from engine.errors import UserError
from engine.preset import DataSettings, ModelSettings

REPO = Path(__file__).resolve().parent.parent


def prep(s: DataSettings, tok, tmp_path: Path, seq_len: int = 512, seed: int = 0):
    return D.prepare_data(s, tok, seq_len, seed, cache_dir=tmp_path / "cache")


def text_of(tok, ids) -> str:
    return tok.decode(list(ids), skip_special_tokens=False)


def trained_text(tok, ids, labels) -> str:
    return tok.decode([t for i, (t, lab) in enumerate(zip(ids, labels)) if i > 0 and lab != -100])


# --------------------------------------------------------------------------------------------
# Formats


FORMAT_CASES = [
    (
        "alpaca",
        {"instruction": "Say hi.", "input": "Bob", "output": "Hi Bob"},
        "<s>### Instruction:\nSay hi.\n\n### Input:\nBob\n\n### Response:\nHi Bob</s>",
        "Hi Bob</s>",
    ),
    (
        "alpaca",
        {"instruction": "Say hi.", "output": "Hi"},
        "<s>### Instruction:\nSay hi.\n\n### Response:\nHi</s>",
        "Hi</s>",
    ),
    (
        "input_output",
        {"input": "2+2", "output": "4"},
        "<s>### Input:\n2+2\n\n### Response:\n4</s>",
        "4</s>",
    ),
    (
        "prompt_completion",
        {"prompt": "Q: 2+2?\nA:", "completion": " 4"},
        "<s>Q: 2+2?\nA: 4</s>",
        " 4</s>",
    ),
    ("text", {"text": "Just some text."}, "<s>Just some text.</s>", "Just some text.</s>"),
    (
        "messages",
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
        "<s>### User:\nHi\n\n### Assistant:\nYo</s>\n\n",
        "Yo</s>",
    ),
    (
        "sharegpt",
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]},
        "<s>### User:\nHi\n\n### Assistant:\nYo</s>\n\n",
        "Yo</s>",
    ),
]


@pytest.mark.parametrize("fmt,record,rendered,trained", FORMAT_CASES, ids=[c[0] for c in FORMAT_CASES])
def test_each_format_detected_and_rendered(tmp_path, tok, fmt, record, rendered, trained):
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    s = settings(path)
    assert D.check_records(s) == (fmt, 1, [])
    out = prep(s, tok, tmp_path)
    assert out.format == fmt and out.stats.format == fmt
    row = out.train[0]
    assert text_of(tok, row["input_ids"]) == rendered
    assert trained_text(tok, row["input_ids"], row["labels"]) == trained
    assert out.validation is None


def test_format_setting_overrides_detection(tmp_path, tok):
    # Has instruction+output (alpaca) but also text; forcing text trains everything.
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b", "text": "whole"}])
    assert D.check_records(settings(path))[0] == "alpaca"
    assert D.check_records(settings(path, format="text"))[0] == "text"
    out = prep(settings(path, format="text"), tok, tmp_path)
    assert text_of(tok, out.train[0]["input_ids"]) == "<s>whole</s>"


def test_unknown_keys_one_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(UserError) as err:
        D.check_records(settings(path))
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: cannot tell the data format from the keys answer, question (line 1); accepted: ")
    for fmt in D.FORMATS:
        assert fmt in msg
    assert msg.endswith("rename the fields, or set data.format")


# --------------------------------------------------------------------------------------------
# Masking and counting


def test_prompt_masked_and_train_on_inputs(tmp_path, tok):
    rec = {"instruction": "Reverse.", "input": "abc", "output": "cba"}
    path = write_jsonl(tmp_path / "d.jsonl", [rec])
    masked = prep(settings(path), tok, tmp_path).train[0]
    prompt_len = len("<s>### Instruction:\nReverse.\n\n### Input:\nabc\n\n### Response:\n".replace("<s>", "x"))
    assert masked["labels"][:prompt_len] == [-100] * prompt_len
    assert masked["labels"][prompt_len:] == masked["input_ids"][prompt_len:]
    full = prep(settings(path, train_on_inputs=True), tok, tmp_path).train[0]
    assert full["input_ids"] == masked["input_ids"]
    assert full["labels"] == full["input_ids"]


def test_supervised_tokens_are_unmasked_labels_minus_first(tmp_path, tok):
    recs = [{"instruction": f"Say {w}.", "output": w} for w in ("one", "three", "seventeen")]
    path = write_jsonl(tmp_path / "d.jsonl", recs)
    out = prep(settings(path), tok, tmp_path)
    expected = sum(sum(1 for lab in row["labels"][1:] if lab != -100) for row in out.train)
    assert out.stats.supervised_tokens == expected == sum(len(w) + 1 for w in ("one", "three", "seventeen"))
    assert out.stats.tokens == sum(len(row["input_ids"]) for row in out.train)
    # With train_on_inputs the first label is still not counted: nothing predicts the first token.
    full = prep(settings(path, train_on_inputs=True), tok, tmp_path)
    assert full.stats.supervised_tokens == full.stats.tokens - full.stats.examples
    assert D.supervised_count([5, 6, -100, 7]) == 2


def test_truncation_counted_and_empty_dropped(tmp_path, tok):
    recs = [
        {"instruction": "Short.", "output": "ok"},  # 43 tokens with <s> and </s>
        {"instruction": "Short.", "output": "a much longer answer than the limit"},
        {"instruction": "x" * 80, "output": "never reached"},  # prompt alone is longer than seq_len
    ]
    path = write_jsonl(tmp_path / "d.jsonl", recs)
    out = prep(settings(path), tok, tmp_path, seq_len=45)
    assert out.stats.truncated == 2
    assert out.stats.removed_empty == 1
    assert out.stats.examples == 2
    assert [len(r["input_ids"]) for r in out.train] == [43, 45]
    assert out.stats.max_len == 45 and out.stats.seq_len == 45
    assert trained_text(tok, out.train[1]["input_ids"], out.train[1]["labels"]) == "a muc"
    with pytest.raises(UserError, match="no example has anything left to train at seq_len 40"):
        prep(settings(path), tok, tmp_path, seq_len=40)


# --------------------------------------------------------------------------------------------
# Stopping: does every example teach the model to stop?


def test_examples_cut_at_seq_len_are_warned_they_do_not_teach_stopping(tmp_path, tok):
    recs = [{"instruction": "Short.", "output": "ok"}, {"instruction": "Short.", "output": "no"}] + [
        {"instruction": "Short.", "output": f"a much longer answer than the limit {i}"} for i in range(3)]
    path = write_jsonl(tmp_path / "d.jsonl", recs)
    cut = prep(settings(path), tok, tmp_path, seq_len=45).stats
    assert (cut.examples, cut.unstopped, cut.unstopped_cut) == (5, 3, 3)
    assert cut.summary_lines()[-1] == (
        "warning: 3 of 5 examples do not end with the end-of-sequence token </s> (3 cut at seq_len 45): "
        "the model will not learn to stop on them; raise training.seq_len or shorten them")
    whole = prep(settings(path), tok, tmp_path, seq_len=512).stats
    assert (whole.unstopped, whole.stop_token, whole.stop_is_eos) == (0, "</s>", True)
    assert whole.summary_lines()[-1] == "every example ends with the end-of-sequence token </s>: the model learns to stop"
    assert not any(line.startswith("warning:") for line in whole.summary_lines())


def test_every_assistant_turn_must_end_with_the_templates_marker(tmp_path, tok, tok_plain):
    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
                        {"role": "user", "content": "and?"}, {"role": "assistant", "content": "bye"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [rec])
    # The demo chat template and the plain layout end each assistant turn with </s>.
    assert prep(settings(path), tok, tmp_path).stats.unstopped == 0
    assert prep(settings(path), tok_plain, tmp_path).stats.unstopped == 0
    # Cut inside the first answer: that turn ends without its marker.
    cut = prep(settings(path), tok, tmp_path, seq_len=40).stats
    assert (cut.unstopped, cut.unstopped_cut) == (1, 1)
    # A template that ends a turn with a plain line break: nothing teaches the model to stop.
    import copy

    bare = copy.deepcopy(tok)
    bare.chat_template = tok.chat_template.replace("{{ eos_token }}", "")
    st = prep(settings(path), bare, tmp_path).stats
    assert (st.unstopped, st.unstopped_cut) == (1, 0)
    assert st.stop_line() == (
        "warning: 1 of 1 example does not end with the end-of-sequence token </s> (1 whose template puts no "
        "special token after the answer): the model will not learn to stop on them; pick a model whose chat "
        "template ends each turn with a special token")


def test_stop_count_missing_from_older_stats_says_nothing():
    old = D.DataStats(format="alpaca", examples=3, seq_len=16).to_json()
    for key in ("unstopped", "unstopped_cut", "stop_token", "stop_is_eos"):
        del old[key]
    stats = D.DataStats.from_json(old)
    assert stats.unstopped is None and stats.stop_line() == ""
    assert not any("stop" in line for line in stats.summary_lines())
    chat = D.DataStats(format="messages", examples=4, seq_len=16, unstopped=0, stop_token="<|im_end|>",
                       stop_is_eos=False)
    assert D.DataStats.from_json(json.loads(json.dumps(chat.to_json()))) == chat
    assert chat.stop_line() == "every example ends with the end-of-turn marker <|im_end|>: the model learns to stop"


# --------------------------------------------------------------------------------------------
# Bad records


def test_malformed_jsonl_line_reported_with_line_number(tmp_path):
    good = json.dumps({"instruction": "a", "output": "b"})
    lines = [good, good, '{"instruction": "a" "output": "b"}', good, "[1, 2]", good]
    path = write_jsonl(tmp_path / "train.jsonl", lines)
    with pytest.raises(UserError) as err:
        D.check_records(settings(path))
    assert str(err.value) == (
        f"{path} line 3: invalid JSON (Expecting ',' delimiter: column 21) (and 1 more bad record); "
        "fix the line or set data.skip_bad_records: true"
    )


def test_bad_records_skipped_and_counted(tmp_path, tok):
    good = json.dumps({"instruction": "a", "output": "b"})
    lines = [
        good,
        "{not json",
        json.dumps({"instruction": "a"}),
        json.dumps({"instruction": "c", "output": "  "}),
        json.dumps(["a", "list"]),
        json.dumps({"instruction": "d", "output": ["x"]}),
        json.dumps({"instruction": "e", "output": 5}),  # a number is taken as its text
    ]
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    s = settings(path, skip_bad_records=True)
    fmt, count, bad = D.check_records(s)
    assert (fmt, count) == ("alpaca", 2)
    assert [(b.number, b.problem) for b in bad] == [
        (2, "invalid JSON (Expecting property name enclosed in double quotes: column 2)"),
        (3, "missing field 'output'"),
        (4, "empty response ('output' is empty)"),
        (5, "a record must be an object with named fields, this is a list"),
        (6, "field 'output' is a list, expected text"),
    ]
    assert str(bad[1]) == f"{path} line 3: missing field 'output'"
    out = prep(s, tok, tmp_path)
    assert out.stats.skipped_bad == 5
    assert out.stats.examples == 2
    with pytest.raises(UserError, match=r"line 2: invalid JSON .* \(and 4 more bad records\)"):
        prep(settings(path), tok, tmp_path)


def test_conversation_bad_records(tmp_path):
    lines = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "x"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
        {"messages": "hi"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    _, count, bad = D.check_records(settings(path, skip_bad_records=True))
    assert count == 1
    assert [b.problem for b in bad] == [
        "no assistant turn",
        "turn 2 has unknown role 'wizard' (accepted: system, user, assistant; ShareGPT: human, gpt)",
        "empty response (turn 2)",
        "field 'messages' is a str, expected a list of turns",
    ]


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(UserError, match="has no records"):
        D.check_records(settings(str(empty)))
    with pytest.raises(UserError, match=r"^data.train: no data file at missing/train.jsonl"):
        D.check_records(settings("missing/train.jsonl"))
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(UserError, match=r"unknown file type '\.txt'"):
        D.check_records(settings(str(tmp_path / "d.txt")))


# --------------------------------------------------------------------------------------------
# Cleaning, split, cap


def test_drop_phrases_and_duplicates_counted(tmp_path, tok):
    recs = [
        {"instruction": "q1", "output": "fine answer"},
        {"instruction": "q1", "output": "fine answer"},  # duplicate
        {"instruction": "q2", "output": "As an AI language model, I cannot."},  # default drop phrase
        {"instruction": "q3", "output": "Something BANANA here"},  # custom phrase, other case
        {"instruction": "q4", "output": "another"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", recs)
    out = prep(settings(path), tok, tmp_path)
    assert (out.stats.removed_duplicates, out.stats.removed_phrases, out.stats.examples) == (1, 1, 3)
    out = prep(settings(path, drop_phrases=["banana"], dedupe=False), tok, tmp_path)
    assert (out.stats.removed_duplicates, out.stats.removed_phrases, out.stats.examples) == (0, 1, 4)
    lines = out.stats.summary_lines()
    assert any("containing a drop phrase" in line for line in lines)


def test_split_sizes_deterministic_for_seed(tmp_path, tok):
    recs = [{"instruction": f"item {i}", "output": f"answer {i}"} for i in range(50)]
    path = write_jsonl(tmp_path / "d.jsonl", recs)
    s = settings(path, validation_split=0.2)

    def val_texts(seed):
        out = D.prepare_data(s, tok, 256, seed, cache_dir=tmp_path / f"c{seed}")
        assert (out.stats.examples, out.stats.validation_examples) == (40, 10)
        assert len(out.train) == 40 and len(out.validation) == 10
        return [text_of(tok, r["input_ids"]) for r in out.validation]

    first = val_texts(1)
    assert val_texts(1) == first  # rebuilt in another cache folder: same split
    assert val_texts(2) != first
    none = D.prepare_data(settings(path, validation_split=0), tok, 256, 1, cache_dir=tmp_path / "c0")
    assert none.validation is None and none.stats.validation_examples == 0


def test_max_examples_and_validation_file(tmp_path, tok):
    recs = [{"input": f"in {i}", "output": f"out {i}"} for i in range(20)]
    path = write_jsonl(tmp_path / "train.jsonl", recs)
    val = write_jsonl(tmp_path / "val.jsonl", recs[:3])
    out = prep(settings(path, validation=val, max_examples=5, validation_split=0.3), tok, tmp_path)
    assert (out.stats.examples, out.stats.validation_examples) == (5, 3)
    assert text_of(tok, out.train[0]["input_ids"]).endswith("in 0\n\n### Response:\nout 0</s>")
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": "abc"}])
    with pytest.raises(UserError, match="missing field 'input'"):
        D.check_records(settings(path, validation=other))


# --------------------------------------------------------------------------------------------
# Other file types


def test_csv_and_parquet_load(tmp_path, tok):
    rows = [
        {"instruction": "Up.", "input": "ab", "output": "AB"},
        {"instruction": "Up.", "input": "cd", "output": "CD"},
    ]
    csv_path = tmp_path / "d.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerows(rows)
        fh.write("Up.,ef\n")  # short row: row 4
    _, count, bad = D.check_records(settings(str(csv_path), skip_bad_records=True))
    assert count == 2
    assert [str(b) for b in bad] == [f"{csv_path} row 4: has 2 fields, the header has 3"]

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq_path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), pq_path)
    a = prep(settings(str(pq_path)), tok, tmp_path)
    b = prep(settings(str(csv_path), skip_bad_records=True), tok, tmp_path)
    assert a.format == b.format == "alpaca"
    assert a.train["input_ids"] == b.train["input_ids"]
    assert a.train["labels"] == b.train["labels"]


def test_json_list_object_and_json_lines(tmp_path, tok):
    recs = [{"prompt": "p", "completion": "c"}, {"prompt": "q", "completion": "d"}]
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(recs))
    assert D.check_records(settings(str(as_list))) == ("prompt_completion", 2, [])
    as_lines = tmp_path / "lines.json"
    as_lines.write_text("\n".join(json.dumps(r) for r in recs))
    assert D.check_records(settings(str(as_lines))) == ("prompt_completion", 2, [])
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": recs}))
    with pytest.raises(UserError, match=r"holds one JSON object \(keys: data\), not a list of records"):
        D.check_records(settings(str(wrapped)))
    broken = tmp_path / "broken.json"
    broken.write_text('[{"prompt": "p",\n "completion": }]')
    with pytest.raises(UserError, match=r"is not valid JSON \(line 2, column 16"):
        D.check_records(settings(str(broken)))


def test_builtin_demo_resolves():
    from engine.demo import DEMO_DATA_FILE

    assert D.resolve_data_path("builtin:demo") == str(DEMO_DATA_FILE)
    assert D.resolve_data_path("data/x.jsonl") == "data/x.jsonl"
    with pytest.raises(UserError, match="unknown built-in data set 'builtin:nope'"):
        D.check_records(settings("builtin:nope"))


# --------------------------------------------------------------------------------------------
# Hub datasets (offline: only the error path)


def test_hub_offline_error_is_one_line(monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as err:
        D.check_records(settings("qlora-wizard-test/no-such-dataset"))
    msg = str(err.value)
    assert "\n" not in msg
    assert "qlora-wizard-test/no-such-dataset" in msg


def test_hub_errors_mapped(monkeypatch):
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'org/name' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError) as err:
        D.check_records(settings("org/name"))
    assert str(err.value) == (
        "cannot load dataset org/name: the Hugging Face Hub cannot be reached "
        "(Couldn't reach 'org/name' on the Hub (OfflineModeIsEnabled)); "
        "check the network (HF_HUB_OFFLINE must not be set), or use a local file"
    )

    def missing(*a, **k):
        raise DatasetNotFoundError("Dataset 'org/name' doesn't exist on the Hub or cannot be accessed.")

    monkeypatch.setattr(datasets, "load_dataset", missing)
    with pytest.raises(UserError, match=r"^no local file or Hub dataset named org/name"):
        D.check_records(settings("org/name"))


def test_hub_dataset_records(monkeypatch, tmp_path, tok):
    import datasets

    calls = []

    def fake(name, split):
        calls.append((name, split))
        rows = [{"text": f"doc {i}"} for i in range(5)] if split == "train" else [{"text": "held out"}]
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    s = DataSettings(train="org/name", validation="test")
    assert D.check_records(s) == ("text", 5, [])
    out = prep(s, tok, tmp_path)
    assert (out.stats.examples, out.stats.validation_examples) == (5, 1)
    assert ("org/name", "test") in calls


# --------------------------------------------------------------------------------------------
# Conversations


def test_conversation_trains_only_assistant_turns(tmp_path, tok, tok_plain):
    rec = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Ciao"},
            {"role": "user", "content": "never answered"},
        ]
    }
    path = write_jsonl(tmp_path / "d.jsonl", [rec])
    for t in (tok, tok_plain):
        segments = D.preview(settings(path), t, 512)[0]
        assert [s for s, trained in segments if trained] == ["Hello</s>", "Ciao</s>"]
        assert "never answered" not in "".join(s for s, _ in segments)
        row = prep(settings(path), t, tmp_path).train[0]
        assert trained_text(t, row["input_ids"], row["labels"]) == "Hello</s>Ciao</s>"
    # The chat template path and the plain path render the demo tokenizer's layout the same way.
    with_template = "".join(s for s, _ in D.preview(settings(path), tok, 512)[0])
    plain = "".join(s for s, _ in D.preview(settings(path), tok_plain, 512)[0])
    assert with_template.rstrip("\n") == plain


def test_chat_template_that_rewrites_history_falls_back(tmp_path, tok):
    import copy

    t = copy.deepcopy(tok)
    # Earlier assistant turns are rendered differently from the last one: prefixes do not match.
    t.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{% if m['role'] == 'assistant' and not loop.last %}"
        "[old]{% endif %}{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    rec = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [rec])
    segments = D.preview(settings(path), t, 512)[0]
    assert [s for s, trained in segments if trained] == ["b</s>", "d</s>"]


# --------------------------------------------------------------------------------------------
# Cache, preview, tokenizer, stats


def test_cache_hit_returns_same_data_without_tokenizing(tmp_path, tok, monkeypatch):
    recs = [{"instruction": f"n{i}", "output": f"v{i}"} for i in range(30)]
    path = write_jsonl(tmp_path / "d.jsonl", recs)
    s = settings(path, validation_split=0.1)
    first = D.prepare_data(s, tok, 128, 3, cache_dir=tmp_path / "cache")
    assert not first.cache_hit

    def no_tokenizing(*a, **k):
        raise AssertionError("tokenized again on a cache hit")

    monkeypatch.setattr(D, "tokenize_examples", no_tokenizing)
    again = D.prepare_data(s, tok, 128, 3, cache_dir=tmp_path / "cache")
    assert again.cache_hit and again.cache_path == first.cache_path
    assert again.train["input_ids"] == first.train["input_ids"]
    assert again.train["labels"] == first.train["labels"]
    assert again.validation["input_ids"] == first.validation["input_ids"]
    assert again.stats == first.stats
    # A reloaded tokenizer has the same fingerprint: still a hit.
    reloaded = D.load_tokenizer(ModelSettings(source="builtin:tiny-llama"))
    assert D.tokenizer_fingerprint(reloaded) == D.tokenizer_fingerprint(tok)
    # Anything in the key changing is a miss.
    for changed in (dict(seq_len=64, seed=3), dict(seq_len=128, seed=4)):
        with pytest.raises(AssertionError, match="tokenized again"):
            D.prepare_data(s, tok, changed["seq_len"], changed["seed"], cache_dir=tmp_path / "cache")
    with open(path, "a") as fh:
        fh.write(json.dumps({"instruction": "new", "output": "record"}) + "\n")
    with pytest.raises(AssertionError, match="tokenized again"):
        D.prepare_data(s, tok, 128, 3, cache_dir=tmp_path / "cache")


def test_a_rerun_finds_its_prepared_data_without_loading_the_tokenizer(tmp_path, demo_cache):
    """What ``--preset`` checks before starting a run it prepared the data for before: the same
    statistics, read in a fresh interpreter that never imports transformers or torch."""
    import shutil

    from engine.demo import ensure_demo_model

    model = tmp_path / "model"
    shutil.copytree(ensure_demo_model(), model)
    recs = [{"instruction": f"n{i}", "output": f"v{i}"} for i in range(30)]
    s = settings(write_jsonl(tmp_path / "d.jsonl", recs), validation_split=0.1)
    m = ModelSettings(source=str(model))
    cache = tmp_path / "cache"
    assert D.cached_stats(s, m, 128, 3, cache_dir=cache) is None  # never prepared
    assert D.cached_prepared_data(s, m, 128, 3, cache_dir=cache) is None
    prepared = D.prepare_data(s, D.load_tokenizer(m), 128, 3, cache_dir=cache)
    again = D.cached_prepared_data(s, m, 128, 3, cache_dir=cache)  # what eval reads: the data itself
    assert again.cache_hit and again.stats == prepared.stats
    assert again.validation["input_ids"] == prepared.validation["input_ids"] and len(again.train) == len(prepared.train)
    script = (f"import json, sys\nfrom engine import data as D\nfrom engine.preset import DataSettings, ModelSettings\n"
              f"s = DataSettings.model_validate_json({s.model_dump_json()!r})\n"
              f"st = D.cached_stats(s, ModelSettings(source={str(model)!r}), 128, 3, cache_dir={str(cache)!r})\n"
              f"print(json.dumps(st.to_json()))\n"
              f"print(sorted(n for n in ('torch', 'transformers', 'datasets') if n in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).parent.parent)
    assert r.returncode == 0, r.stderr
    stats, imported = r.stdout.splitlines()
    assert D.DataStats.from_json(json.loads(stats)) == prepared.stats and imported == "[]"
    # Other settings, or a tokenizer file changed since, are not found: the data is prepared again.
    assert D.cached_stats(s, m, 64, 3, cache_dir=cache) is None
    (model / "tokenizer_config.json").write_text((model / "tokenizer_config.json").read_text() + "\n")
    assert D.cached_stats(s, m, 128, 3, cache_dir=cache) is None
    assert D.cached_prepared_data(s, m, 128, 3, cache_dir=cache) is None


def test_default_cache_dir_under_cache_root(demo_cache):
    assert D.default_data_cache_dir() == demo_cache / "data"


def test_preview_segments(tmp_path, tok):
    recs = [
        {"instruction": "Shout.", "input": "hey", "output": "HEY"},
        {"instruction": "Shout.", "input": "yo", "output": "YO"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", recs)
    out = D.preview(settings(path), tok, 256, n=1)
    assert out == [[("<s>### Instruction:\nShout.\n\n### Input:\nhey\n\n### Response:\n", False), ("HEY</s>", True)]]
    assert len(D.preview(settings(path), tok, 256, n=5)) == 2


def test_load_tokenizer_errors(tmp_path, tok):
    assert tok.pad_token is not None and tok.eos_token == "</s>"
    (tmp_path / "empty-model").mkdir()
    with pytest.raises(UserError) as err:
        D.load_tokenizer(ModelSettings(source=str(tmp_path / "empty-model")))
    assert str(err.value).startswith(f"cannot load the tokenizer of {tmp_path / 'empty-model'}: ")
    assert "\n" not in str(err.value)


def test_stats_json_round_trip():
    s = D.DataStats(format="alpaca", examples=3, tokens=30, supervised_tokens=9, truncated=1, seq_len=16)
    assert D.DataStats.from_json(json.loads(json.dumps(s.to_json()))) == s
    lines = s.summary_lines()
    assert lines[0] == "format: alpaca"
    assert "9 of them trained (30 %)" in lines[2]
    assert any("longer than 16 tokens were truncated" in line for line in lines)


def test_demo_data_stats(tok, tmp_path):
    out = D.prepare_data(DataSettings(train="builtin:demo"), tok, 256, 42, cache_dir=tmp_path / "cache")
    st = out.stats
    assert st.format == "alpaca"
    assert st.examples + st.validation_examples == 1500
    assert st.validation_examples == 150
    assert st.truncated == 0 and st.skipped_bad == 0 and st.removed_duplicates == 0
    assert 0 < st.supervised_tokens < st.tokens
    assert st.unstopped == 0
    assert st.summary_lines()[-1] == "every example ends with the end-of-sequence token </s>: the model learns to stop"


def test_import_is_light():
    code = (
        "import sys, engine.data, engine.demo\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'tokenizers') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_conversation_starting_with_assistant(tmp_path, tok):
    rec = {"messages": [{"role": "assistant", "content": "Welcome"}, {"role": "user", "content": "x"},
                        {"role": "assistant", "content": "y"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [rec])
    segments = D.preview(settings(path), tok, 512)[0]
    assert segments[0] == ("<s>### Assistant:\n", False)
    assert [s for s, trained in segments if trained] == ["Welcome</s>", "y</s>"]


def test_every_record_format_is_a_preset_choice_and_every_choice_is_a_format():
    """Adding a format is one class in engine.data.formats and one name in the schema; missing either fails here."""
    from engine.preset import choices

    assert set(choices("data.format")) == {"auto", *D.FORMATS}
    for name, fmt in D.FORMATS.items():
        assert fmt.name == name and fmt.keys and fmt.__doc__
    assert [D.detect_format(k) for k in (["messages"], ["conversations"], ["instruction", "output"],
                                         ["prompt", "completion"], ["input", "output"], ["text"])] == \
        ["messages", "sharegpt", "alpaca", "prompt_completion", "input_output", "text"]
