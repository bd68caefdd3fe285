"""The demo's stage scheduler: inputs before the stages that read them, exclusive stages alone, at most
``parallel`` at a time with the threads split between them, and a failure that loses no finished work."""

import json
import sys

import pytest

from vl.demo.config import DemoConfig
from vl.demo.pipeline import Demo, Stage
from vl.errors import UserError

# Each command appends "start NAME THREADS" and "end NAME" to a trace file, sleeping in between.
RECORD = ("import os, sys, time; trace = open(sys.argv[1], 'a'); "
          "trace.write(f\"start {sys.argv[2]} {os.environ.get('OMP_NUM_THREADS', '-')}\\n\"); trace.flush(); "
          "time.sleep(float(sys.argv[3])); trace.write(f'end {sys.argv[2]}\\n'); trace.close(); "
          "sys.exit(int(sys.argv[4]))")


def stage(trace, name, needs=(), alone=False, seconds=0.2, code=0):
    command = [sys.executable, "-c", RECORD, str(trace), name, str(seconds), str(code)]
    return Stage(name, name, lambda: [command], tuple(needs), alone)


def events(trace):
    return [line.split() for line in trace.read_text().splitlines()]


def check_schedule(trace, stages, slots):
    """Replay the trace: every stage starts after its inputs ended, alone stages never overlap another, and no more
    than ``slots`` run at a time."""
    by_name = {s.name: s for s in stages}
    running, ended = set(), set()
    for event in events(trace):
        kind, name = event[0], event[1]
        if kind == "start":
            assert set(by_name[name].needs) <= ended, f"{name} started before its inputs"
            running.add(name)
            assert len(running) <= slots
            if len(running) > 1:
                assert not any(by_name[n].alone for n in running), f"an alone stage overlapped: {running}"
        else:
            running.remove(name)
            ended.add(name)
    return ended


@pytest.fixture
def demo(tmp_path, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    out = tmp_path / "demo"
    (out / "logs").mkdir(parents=True)
    return Demo(out, DemoConfig(parallel=2))


def test_stages_run_two_at_a_time_after_their_inputs(demo, tmp_path):
    trace = tmp_path / "trace.txt"
    stages = [stage(trace, "world", alone=True), stage(trace, "detector", ["world"], alone=True),
              stage(trace, "a", ["detector"], seconds=1.5), stage(trace, "b", ["detector"]),
              stage(trace, "c", ["b"]), stage(trace, "d", ["a", "c"])]
    timings = demo.run_stages(stages)
    assert list(timings) == [s.name for s in stages]  # stage order, whatever order they finished in
    assert check_schedule(trace, stages, slots=2) == {s.name for s in stages}
    starts = {e[1]: e[2] for e in events(trace) if e[0] == "start"}
    assert starts["world"] == starts["detector"] == "-"  # alone: the whole machine, threads left to torch
    assert starts["a"] == starts["b"] == starts["c"] == starts["d"] == "2"  # 4 cores / 2 at a time
    overlapped = events(trace).index(["start", "b", "2"]) < events(trace).index(["end", "a"])
    assert overlapped  # a and b shared the machine
    # the state file records every stage: a second run starts nothing
    trace.unlink()
    assert demo.run_stages(stages) == timings and not trace.exists()


def test_parallel_one_runs_stages_one_after_another(tmp_path, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    demo = Demo(tmp_path / "demo", DemoConfig(parallel=1))
    demo.logs.mkdir(parents=True)
    trace = tmp_path / "trace.txt"
    stages = [stage(trace, "a"), stage(trace, "b"), stage(trace, "c", ["a"])]
    demo.run_stages(stages)
    check_schedule(trace, stages, slots=1)
    assert {e[2] for e in events(trace) if e[0] == "start"} == {"-"}


def test_a_failed_stage_keeps_the_work_of_the_others(demo, tmp_path):
    trace = tmp_path / "trace.txt"
    stages = [stage(trace, "slow", seconds=0.8), stage(trace, "broken", seconds=0.1, code=3),
              stage(trace, "after", ["broken"]), stage(trace, "later")]
    with pytest.raises(UserError, match="demo stage 'broken' failed \\(exit 3\\)"):
        demo.run_stages(stages)
    names = sorted(e[1] for e in events(trace) if e[0] == "start")  # the two start together, in either order
    assert names == ["broken", "slow"]  # nothing new started after the failure
    assert ["end", "slow"] in events(trace)  # the running stage finished ...
    assert set(json.loads(demo.state_path.read_text())["done"]) == {"slow"}  # ... and was recorded as done
    # fixed, the rerun starts from there
    stages[1] = stage(trace, "broken", seconds=0.1)
    trace.unlink()
    demo.run_stages(stages)
    assert sorted(e[1] for e in events(trace) if e[0] == "start") == ["after", "broken", "later"]


def test_a_stage_that_needs_a_later_one_is_an_error(demo, tmp_path):
    with pytest.raises(ValueError, match="'a' needs \\['b'\\]"):
        demo.run_stages([stage(tmp_path / "t", "a", ["b"]), stage(tmp_path / "t", "b")])


# A stage that draws a progress bar the way every vl command does, then ends.
BAR = ("import time; from vl.progress import progress_bar\n"
       "bar = progress_bar(total=40, desc='train', mininterval=0)\n"
       "for step in range(40):\n"
       "    time.sleep(0.03); bar.update(1); bar.set_postfix(loss=f'{1 / (step + 1):.3f}')\n"
       "bar.close()\n")


def test_the_console_shows_each_running_stages_progress(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    demo = Demo(tmp_path / "demo", DemoConfig(parallel=1), progress_seconds=0.3)
    demo.logs.mkdir(parents=True)
    demo.run_stages([Stage("train", "train a model", lambda: [[sys.executable, "-c", BAR]])])
    shown = [line for line in capsys.readouterr().out.splitlines() if line.startswith("    [1/1] train a model: ")]
    assert shown, "no progress line on the console"
    assert all("/40 [" in line and "loss=" in line for line in shown)  # step N of M, time, the loss
    assert "|" not in shown[-1].split(": ", 1)[1]  # the bar's glyphs are left out


def test_latest_progress_reads_the_last_bar_state():
    from vl.progress import latest_progress

    log = ("pretrain: resuming\n\rpretrain:  10%|#         | 100/1000 [00:10<01:30, 9.9it/s, loss=2.1]"
           "\rpretrain:  20%|##        | 200/1000 [00:20<01:20, 9.9it/s, loss=1.5]")
    assert latest_progress(log) == "pretrain: 20% 200/1000 [00:20<01:20, 9.9it/s, loss=1.5]"
    assert latest_progress("no bar here\n") is None


def test_example_grid_draws_one_box_per_object():
    from vl.demo.report import one_box_per_object

    detections = [{"bbox": [10, 10, 20, 20], "score": 0.9, "category_id": 1},
                  {"bbox": [11, 10, 20, 20], "score": 0.6, "category_id": 2},  # the same object, another class
                  {"bbox": [50, 50, 10, 10], "score": 0.7, "category_id": 2},
                  {"bbox": [80, 80, 10, 10], "score": 0.3, "category_id": 3}]  # too unsure to draw
    kept = one_box_per_object(detections)
    assert [(d["category_id"], d["score"]) for d in kept] == [(1, 0.9), (2, 0.7)]
    assert one_box_per_object([]) == []
