"""How the command line shows a job: a progress bar while it runs, its result after."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from faissq.errors import FaissqError

POLL_S = 0.1  # result-backend reads per second while waiting: short jobs still show a phase
QUEUED_STATES = {"PENDING": "queued", "RECEIVED": "queued", "STARTED": "started"}


def bar(phase: str, done: int, total: int, width: int = 30) -> str:
    """A one-line text progress bar (no line ending)."""
    frac = 0.0 if total <= 0 else min(1.0, done / total)
    fill = int(frac * width)
    return f"  {phase:<9} [{'#' * fill}{'.' * (width - fill)}] {done}/{total}"


class ProgressView:
    """Draws a job's PROGRESS states, one bar per phase: redrawn in place on a terminal, one line
    per change otherwise. Phases run one after another, so a new phase completes the bar of the
    one before; the job's success completes the last."""

    def __init__(self, out: TextIO) -> None:
        """out: where to draw (a pipe or file gets plain lines, so logs stay readable)."""
        self.out = out
        self.tty = out.isatty()
        self.last = ""
        self.drawn = False
        self.phase = ""
        self.total = 0

    def show(self, line: str) -> None:
        """Draw one state line unless it is the one already shown."""
        if line == self.last:
            return
        pad = " " * max(0, len(self.last) - len(line))  # a shorter line must cover the longer
        self.last = line
        self.out.write(f"\r{line}{pad}" if self.tty else f"{line}\n")
        self.out.flush()
        self.drawn = True

    def progress(self, phase: str, done: int, total: int) -> None:
        """Draw a PROGRESS report; a new phase first completes the bar of the previous one."""
        if self.phase and phase != self.phase:
            self._complete()
        self.phase, self.total = phase, total
        self.show(bar(phase, done, total))

    def finish(self) -> None:
        """The job succeeded: complete the bar of its last phase."""
        if self.phase:
            self._complete()

    def _complete(self) -> None:
        self.show(bar(self.phase, self.total, self.total))
        self.phase = ""
        self.close()  # the finished phase keeps its line; the next bar starts below it
        self.last, self.drawn = "", False

    def close(self) -> None:
        """End the redrawn line on a terminal."""
        if self.tty and self.drawn:
            self.out.write("\n")
            self.out.flush()


def wait_with_progress(
    result: Any, timeout_s: float | None = 3600.0, out: TextIO | None = None
) -> dict[str, Any]:
    """Wait for a job, drawing its PROGRESS states as a bar; return its result dict.

    A failed job raises its typed error (faissq errors travel back by class name); any other
    failure, and waiting past `timeout_s` (None: no limit), raises FaissqError.
    """
    view = ProgressView(out or sys.stdout)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while not result.ready():
            if deadline is not None and time.monotonic() > deadline:
                raise FaissqError(
                    f"job {result.id} still {result.state} after {timeout_s:.0f}s "
                    "(it goes on in the worker)"
                )
            state, info = result.state, result.info
            if state == "PROGRESS" and isinstance(info, dict):
                phase = str(info.get("phase", ""))
                view.progress(phase, int(info.get("done", 0)), int(info.get("total", 0)))
            elif state in QUEUED_STATES:
                view.show(f"  {QUEUED_STATES[state]}")
            time.sleep(POLL_S)
        if result.successful():
            view.finish()
    finally:
        view.close()
    try:
        value = result.get(propagate=True)
    except FaissqError:
        raise
    except Exception as exc:  # an error class this process cannot rebuild: keep its name
        raise FaissqError(f"job {result.id} failed: {type(exc).__name__}: {exc}") from exc
    return dict(value) if isinstance(value, dict) else {"result": value}


def print_profile(profile: dict[str, Any], out: TextIO | None = None) -> None:
    """The autotune table: parameters, recall, latency; the chosen row marked."""
    out = out or sys.stdout
    table = profile.get("table", [])
    chosen = profile.get("chosen", {})
    met = "" if profile.get("met", True) else "  (not met: highest-recall row chosen)"
    print(f"  autotune   target recall@{profile.get('k')} >= {profile.get('target_recall')}{met}",
          file=out)  # fmt: skip
    if profile.get("source"):
        print(f"  queries    {profile.get('num_queries')} {profile['source']} (docs/operations.md "
              "5.1)", file=out)  # fmt: skip
    if isinstance(profile.get("installed"), dict):  # a sharded index, tuned as a whole
        print(f"  shards     {len(profile['installed'])}, each given this profile (recall of their"
              " merged top-k; ms/query: the slowest shard's)", file=out)  # fmt: skip
    for row in table:
        params = ", ".join(
            f"{key}={row[key]}" for key in ("nprobe", "ef_search", "k_factor") if key in row
        )
        mark = "  <- chosen" if row == chosen else ""
        print(
            f"    {params:<24} recall {row['recall']:.3f} (>= {row.get('recall_lo', 0):.3f})"
            f"  {row['ms_per_query']:.3f} ms/query{mark}",
            file=out,
        )
