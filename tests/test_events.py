"""The run protocol: events are whole JSON lines; a reader survives torn lines and folds resumes."""

from __future__ import annotations

import json

import pytest

from engine.events import (
    EndEvent,
    EventTail,
    EventWriter,
    StartEvent,
    StepEvent,
    extend_history,
    fold_history,
    parse_event,
    read_events,
)


def test_writer_appends_one_json_object_per_line(tmp_path):
    w = EventWriter(tmp_path)
    w.emit("start", total_steps=3)
    w.emit("step", step=1, loss=float("nan"))
    w.close()
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert [json.loads(ln)["kind"] for ln in lines] == ["start", "step"]
    assert json.loads(lines[1])["loss"] == "nan"  # strict JSON, still recognisable


def test_reader_waits_for_a_half_written_last_line(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"kind":"start","total_steps":2}\n{"kind":"step","st')
    tail = EventTail(tmp_path)
    assert [e.kind for e in tail.read_new()] == ["start"]
    with open(path, "a") as fh:
        fh.write('ep":1,"loss":2.0}\n')
    assert tail.read_new() == [StepEvent(step=1, loss=2.0)]
    assert tail.read_new() == []


def test_a_torn_line_in_the_middle_is_skipped(tmp_path):
    (tmp_path / "events.jsonl").write_text('{"kind":"start"}\n{"kind":"ste\n{"kind":"end","status":"finished"}\n')
    assert [e.kind for e in read_events(tmp_path)] == ["start", "end"]


RESUMED_RUN = [
    {"kind": "start", "total_steps": 10},
    *({"kind": "step", "step": s, "loss": 1.0 / s} for s in range(1, 8)),
    {"kind": "checkpoint", "step": 5},
    {"kind": "eval", "step": 6, "eval_loss": 0.5},
    # kill -9 at step 7; resume from the checkpoint at step 5
    {"kind": "start", "total_steps": 10, "resumed_from_step": 5},
    *({"kind": "step", "step": s, "loss": 1.0 / s} for s in range(6, 11)),
    {"kind": "end", "status": "finished", "step": 10},
]


def test_fold_history_drops_work_lost_before_a_resume():
    h = fold_history(RESUMED_RUN)
    assert [s.step for s in h.steps] == list(range(1, 11))
    assert h.evals == []
    assert h.end.status == "finished"
    assert len(h.resumes) == 1


def test_an_end_before_a_resume_no_longer_describes_the_run():
    h = fold_history([{"kind": "start"}, {"kind": "end", "status": "stopped", "step": 3},
                      {"kind": "start", "resumed_from_step": 3}])
    assert h.end is None


def test_a_follower_folding_each_poll_sees_what_folding_the_whole_file_gives():
    for cut in range(len(RESUMED_RUN) + 1):
        h = extend_history(fold_history(RESUMED_RUN[:cut]), RESUMED_RUN[cut:])
        assert h == fold_history(RESUMED_RUN), cut


def test_events_are_typed_and_a_file_from_another_version_still_reads(tmp_path):
    """A dataclass per kind; an older file's missing fields read as None, a newer file's extra keys are kept,
    a NaN loss written as "nan" reads as a number again, and a line of an unknown kind is passed over."""
    (tmp_path / "events.jsonl").write_text(
        '{"kind":"start","time":1.0,"total_steps":4,"data":{"examples":9}}\n'
        '{"kind":"step","time":2.0,"step":1,"loss":"nan","gpu_temperature":71}\n'
        '{"kind":"telemetry","watts":300}\n'
        '{"kind":"end","time":3.0,"status":"finished","step":1}\n')
    start, step, end = read_events(tmp_path)
    assert isinstance(start, StartEvent) and start.total_steps == 4 and start.data.examples == 9
    assert start.resumed_from_step is None and start.estimate.total_bytes is None
    assert isinstance(step, StepEvent) and step.loss != step.loss and step.extra == {"gpu_temperature": 71}
    assert isinstance(end, EndEvent) and end.status == "finished" and end.adapter is None
    h = fold_history([start, step, end])
    assert h.status(alive=False) == "finished" and h.step == 1 and h.total_steps == 4


@pytest.mark.parametrize("events,alive,status", [
    ([], True, "starting"), ([{"kind": "start"}], True, "running"), ([{"kind": "start"}], False, "crashed"),
    ([{"kind": "start"}, {"kind": "end", "status": "stopped"}], True, "stopped"),
])
def test_one_function_says_a_runs_status(events, alive, status):
    assert fold_history(events).status(alive) == status


def test_the_writer_refuses_a_field_its_kind_does_not_have(tmp_path):
    w = EventWriter(tmp_path)
    with pytest.raises(TypeError):
        w.emit("step", stpe=1)
    w.close()
    assert (tmp_path / "events.jsonl").read_text() == ""
    assert parse_event({"kind": "end", "status": "failed"}) == EndEvent(status="failed")
