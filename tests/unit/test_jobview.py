"""Job progress as the command line and the demo draw it: every phase's bar reaches its end."""

from __future__ import annotations

import io
import time
from types import SimpleNamespace
from typing import Any

import numpy as np

from faissq.cli.demo_data import clustered
from faissq.cli.progress_view import ProgressView, bar
from faissq.config import IndexSettings
from faissq.index.engine import Engine
from faissq.tasks.base import JobProgress


class RecordingTask:
    """The two calls JobProgress makes on its Celery task, recorded in order."""

    def __init__(self) -> None:
        self.request = SimpleNamespace(id="job-1")
        self.states: list[dict[str, Any]] = []

    def update_state(self, state: str, meta: dict[str, Any]) -> None:
        assert state == "PROGRESS"
        self.states.append(meta)

    def send_event(self, type_: str, **fields: Any) -> None:
        pass


def build_reports() -> list[dict[str, Any]]:
    """The PROGRESS states a real IVF-Flat build sends through JobProgress.

    The interval is an hour: only what JobProgress sends regardless of time goes out, so the
    figures do not depend on how fast this machine builds.
    """
    task = RecordingTask()
    progress = JobProgress(task, deadline=time.monotonic() + 3600, interval_s=3600.0)  # type: ignore[arg-type]
    xb = clustered(6_000, 16, clusters=40, seed=0)
    Engine(16, IndexSettings(family="ivf_flat")).build(xb, np.arange(6_000), progress=progress)
    return task.states


def phases(states: list[dict[str, Any]]) -> list[str]:
    """Phase names in first-seen order."""
    return list(dict.fromkeys(s["phase"] for s in states))


def test_every_phase_reports_its_end_within_one_interval() -> None:
    states = build_reports()
    assert {"store", "train", "add"} <= set(phases(states))
    for phase in phases(states):
        last = [s for s in states if s["phase"] == phase][-1]
        assert last["done"] == last["total"] > 0, last


def test_the_bars_advance_to_the_end_of_every_phase() -> None:
    """All reports drawn, then success: each phase's last line is its full bar."""
    states = build_reports()
    out = io.StringIO()
    view = ProgressView(out)
    for s in states:
        view.progress(s["phase"], s["done"], s["total"])
    view.finish()
    view.close()
    lines = out.getvalue().splitlines()
    for phase in phases(states):
        total = next(s["total"] for s in states if s["phase"] == phase)
        drawn = [ln for ln in lines if ln.split()[0] == phase]
        assert drawn[0] == bar(phase, 0, total) and drawn[-1] == bar(phase, total, total)


def test_a_slow_poll_still_sees_each_phase_completed() -> None:
    """The viewer polls: it may see only each phase's first state. The next phase, and finally
    the job's success, complete the bar it saw."""
    states = build_reports()
    first = [next(s for s in states if s["phase"] == p) for p in phases(states)]
    assert all(s["done"] == 0 for s in first)
    out = io.StringIO()
    view = ProgressView(out)
    for s in first:
        view.progress(s["phase"], s["done"], s["total"])
    view.finish()
    expected = []
    for s in first:
        expected += [bar(s["phase"], 0, s["total"]), bar(s["phase"], s["total"], s["total"])]
    assert out.getvalue().splitlines() == expected


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_each_finished_phase_keeps_its_line() -> None:
    out = Terminal()
    view = ProgressView(out)
    view.progress("train", 0, 10)
    view.progress("add", 5, 8)
    view.finish()
    view.close()
    screen = [ln.rsplit("\r", 1)[-1] for ln in out.getvalue().split("\n") if ln]
    assert screen == [bar("train", 10, 10), bar("add", 8, 8)]
