"""One writer, many readers: searches while another thread upserts, deletes, merges, rebuilds."""

from __future__ import annotations

import threading

import numpy as np
from engine_support import data

from faissq.config import IndexSettings
from faissq.index.engine import Engine

DIM = 16


def test_readers_always_see_a_committed_state() -> None:
    # ids encode their generation: id = gen * 10_000 + slot; every committed state holds
    # exactly one generation per slot, so a reader must never see two generations of a slot
    slots = 400
    eng = Engine(DIM, IndexSettings(family="ivf_flat", flat_max=10))
    base = data(slots, DIM, seed=1)
    eng.build(base, np.arange(slots, dtype=np.int64))
    xq = data(16, DIM, seed=2)
    stop = threading.Event()
    errors: list[str] = []
    searches = [0]

    def reader() -> None:
        while not stop.is_set():
            try:
                res = eng.search(xq, 50, nprobe=64)
                for row in res.ids:
                    found = row[row >= 0]
                    if found.size != 50:
                        errors.append(f"short result {found.size}")
                    slots_seen = found % 10_000
                    if np.unique(slots_seen).size != found.size:
                        errors.append(f"two generations of one slot: {sorted(found.tolist())}")
                    if (found // 10_000 > 1000).any():
                        errors.append("impossible id")
                searches[0] += 1
            except Exception as exc:  # any crash in a reader fails the test
                errors.append(repr(exc))

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    current = np.arange(slots, dtype=np.int64)
    rng = np.random.default_rng(0)
    for gen in range(1, 25):
        pick = rng.choice(slots, size=40, replace=False)
        new_ids = gen * 10_000 + pick
        eng.delete(current[pick])  # delete old generation, then add new: both committed states
        eng.upsert(new_ids, data(40, DIM, seed=100 + gen))
        current[pick] = new_ids
        if gen % 6 == 0:
            eng.merge()
        if gen % 11 == 0:
            eng.rebuild()
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:5]
    assert searches[0] > 10
    assert eng.ntotal == slots
    assert eng.contains(current).all()
