"""Crash tests: a writer process is SIGKILLed at random moments; nothing acknowledged is lost.

The child (storage_crash_child.run, its own process) recovers, re-sends the last acknowledged
batch (a Celery redelivery), then logs, applies and acknowledges batches; with save_every it also
snapshots and trims the log, so kills land inside appends, saves, retention and truncation.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from storage_crash_child import DIM, B, batch, run, settings

from faissq.storage.durable import DurableStore

ITERATIONS = 20
# children fork from a server that already imported faiss and faissq: each start takes
# milliseconds instead of a fresh interpreter's ~0.4 s, so 20 kills fit in a few seconds
CTX = multiprocessing.get_context("forkserver")
# (python 3.11's server ignores this process's sys.path: preload by package name, found from
# the repository root; without it children still work, only slower)
CTX.set_forkserver_preload(["faissq.storage.durable"])


def run_and_kill(root: Path, start: int, save_every: int, acks: int) -> list[tuple[int, int]]:
    """Fork the child, SIGKILL it once it acknowledged `acks` batches; return its acks.

    The kill follows an event (the n-th acknowledgement), not a delay, so a busy machine changes
    where in the next append, save or truncation it lands, never whether work was acknowledged.
    """
    acks_file = root.parent / f"acks-{time.monotonic_ns()}.txt"
    child = CTX.Process(target=run, args=(str(root), start, save_every, str(acks_file)))
    child.start()
    deadline = time.monotonic() + 30
    while not (acks_file.exists() and acks_file.read_text().count("ACK ") >= acks):
        if not child.is_alive() or time.monotonic() > deadline:
            child.kill()
            raise AssertionError(f"child failed to ack {acks} batches (exit {child.exitcode})")
        time.sleep(0.001)
    assert child.pid is not None
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert child.exitcode == -signal.SIGKILL, f"child ended on its own: {child.exitcode}"
    acks = []
    for line in acks_file.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "ACK":
            acks.append((int(parts[1]), int(parts[2])))
    return acks


def check_recovered(root: Path, seqs: dict[int, int]) -> None:
    """Every acknowledged batch is live exactly once; acknowledged deletes hold; no torn state."""
    rec = DurableStore(settings(str(root))).recover("default", dim=DIM, quarantine=False)
    assert rec.notes == [], "a kill left a damaged entry or snapshot behind"
    if not seqs:
        return
    top = max(seqs)
    assert rec.seq >= max(seqs.values())
    eng = rec.engine
    assert eng is not None
    live = eng.contains(np.arange(0, (top + 3) * B, dtype=np.int64))
    assert eng.ntotal == int(live.sum()), "a vector is counted twice or lives outside the batches"
    for k in range(top + 1):
        assert live[k * B + 1 : (k + 1) * B].all(), f"acknowledged batch {k} lost"
        if k < top:
            assert not live[k * B], f"acknowledged delete of {k * B} lost"
    assert not live[(top + 2) * B :].any()
    found = eng.search(batch(top)[1][1:2], 1).ids[0, 0]
    assert found == top * B + 1


@pytest.mark.parametrize("save_every", [0, 2], ids=["appends", "appends+saves"])
def test_sigkill_at_random_moments_loses_no_acknowledged_batch(
    tmp_path: Path, save_every: int
) -> None:
    rng = random.Random(1234 + save_every)
    root = tmp_path / "data"
    seqs: dict[int, int] = {}
    for _ in range(ITERATIONS):
        start = max(seqs, default=0)
        for k, seq in run_and_kill(root, start, save_every, rng.randint(1, 6)):
            # a re-sent batch must come back with its original seq (applied once)
            assert seqs.setdefault(k, seq) == seq, f"batch {k} logged twice"
        check_recovered(root, seqs)
    assert len(seqs) >= ITERATIONS  # every round acknowledged new work before its kill
