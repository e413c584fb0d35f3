"""Child of the crash tests: recovers, then logs, applies and snapshots batches until killed.

`run` writes "ACK <k> <seq>" lines to a file once batch k is acknowledged (logged durably and
applied), the moment a real task would return; each line is one write(2), so a SIGKILL cannot
lose a line that was written.
"""

from __future__ import annotations

import os

import numpy as np

from faissq.config import IndexSettings, Settings, StorageSettings
from faissq.index.engine import Engine
from faissq.storage.durable import DurableStore

B = 20  # vectors per batch; batch k holds ids k*B .. k*B+B-1
DIM = 8


def batch(k: int) -> tuple[np.ndarray, np.ndarray]:
    """The deterministic content of batch k."""
    ids = np.arange(k * B, (k + 1) * B, dtype=np.int64)
    return ids, np.random.default_rng(k).random((B, DIM), dtype=np.float32)


def settings(root: str) -> Settings:
    """Settings shared by the child and the checking parent."""
    return Settings(
        storage=StorageSettings(url=root, retention=2), index=IndexSettings(metric="l2")
    )


def run(root: str, start: int, save_every: int, ack_path: str) -> None:
    """Resume at batch `start` (re-sending it: a redelivery) and run until killed."""
    fd = os.open(ack_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def say(line: str) -> None:
        os.write(fd, (line + "\n").encode())

    cfg = settings(root)
    store = DurableStore(cfg)
    engine = store.recover("default", dim=DIM).engine or Engine(DIM, cfg.index, "default")
    say("READY")
    applied = engine.version
    for k in range(start, start + 100_000):
        ids, vecs = batch(k)
        up = store.append("default", "upsert", ids, vecs, f"b{k}")
        if not up.duplicate:
            engine.upsert(ids, vecs, version=up.seq)
            applied = up.seq
        if k > 0:  # each batch also deletes the first id of the previous one
            gone = np.array([(k - 1) * B], np.int64)
            down = store.append("default", "delete", gone, None, f"d{k}")
            if not down.duplicate:
                engine.delete(gone, version=down.seq)
                applied = down.seq
        say(f"ACK {k} {up.seq}")
        if save_every and k % save_every == 0:
            store.save("default", engine, applied)
