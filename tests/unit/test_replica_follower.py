"""A replica's runtime and follower against a writer's runtime on the same storage (no Redis)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from faissq.config import Settings
from faissq.errors import WriterConflict
from faissq.storage.durable import DurableStore
from faissq.worker.follower import Follower
from faissq.worker.replica import make_replica
from faissq.worker.runtime import IndexRuntime
from faissq.worker.slots import IndexState


def settings(root: Path, *, replica: bool, retention: int = 3, **index: Any) -> Settings:
    """Settings for index 'a' on `root` (`index`: its settings)."""
    return Settings(
        storage={"url": str(root), "retention": retention},
        gpu={"mode": "off"},
        worker={"indexes": ["a"], "replica": replica},
        index=index,
    )


def writer(root: Path, retention: int = 3, **index: Any) -> IndexRuntime:
    """A loaded writer runtime."""
    s = settings(root, replica=False, retention=retention, **index)
    rt = IndexRuntime(s, DurableStore(s))
    rt.load_all()
    return rt


def replica(root: Path, **index: Any) -> tuple[IndexRuntime, Follower]:
    """A loaded replica runtime and its follower (polled by hand, not started)."""
    rt, follower = make_replica(settings(root, replica=True, **index))
    rt.load_all()
    follower._seen["a"] = rt.slot("a").version  # what start() records
    return rt, follower


def vecs(n: int, seed: int = 0) -> np.ndarray:
    """Random float32 vectors of dimension 8."""
    return np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)


def no_check(engine: object) -> None:
    """Accept every batch."""


def upsert(rt: IndexRuntime, ids: np.ndarray, seed: int, batch: str) -> None:
    """Upsert through the writer's write-ahead path."""
    rt.apply("a", "upsert", ids, vecs(len(ids), seed), batch, check=no_check)


def test_replica_follows_upserts_and_deletes_from_an_empty_start(tmp_path: Path) -> None:
    w = writer(tmp_path)
    rep, follower = replica(tmp_path)  # before anything exists: empty, takes no writer lock
    assert rep.slot("a").state is IndexState.EMPTY
    upsert(w, np.arange(10), 0, "b1")
    assert follower.poll_once("a") == 1
    assert rep.slot("a").state is IndexState.READY and rep.engine("a").ntotal == 10
    w.apply("a", "delete", np.arange(4), None, "b2", check=no_check)
    upsert(w, np.arange(100, 105), 1, "b3")
    assert follower.poll_once("a") == 2 and follower.poll_once("a") == 0
    assert rep.engine("a").ntotal == 11 and rep.slot("a").seq == w.slot("a").seq == 3
    got = rep.engine("a").search(vecs(5, 1), 1).ids[:, 0]
    np.testing.assert_array_equal(got, np.arange(100, 105))
    status = rep.role_status("a")
    assert status["role"] == "replica" and status["seq"] == 3 and status["behind"] == 0
    assert 0 <= status["lag_seconds"] < 5 and w.role_status("a") == {"role": "writer", "seq": 3}
    w.close()
    rep.close()


def test_replica_applies_the_attributes_logged_with_each_upsert(tmp_path: Path) -> None:
    """What the writer logged with an upsert, the follower applies (omitted fields: null)."""
    schema = {"tenant": "int64", "lang": "keyword"}
    w = writer(tmp_path, attributes=schema)
    rep, follower = replica(tmp_path, attributes=schema)
    w.apply("a", "upsert", np.arange(3), vecs(3), "b1", check=no_check,
            attributes={"tenant": [5, None, 7], "lang": ["en", "de", None]})  # fmt: skip
    w.apply("a", "upsert", np.arange(1, 2), vecs(1, 1), "b2", check=no_check,
            attributes={"lang": ["fr"]})  # fmt: skip
    assert follower.poll_once("a") == 2
    want = {"tenant": [5, None, 7], "lang": ["en", "fr", None]}
    assert rep.engine("a").attributes_of(np.arange(3)) == w.engine("a").attributes_of(np.arange(3))
    assert rep.engine("a").attributes_of(np.arange(3)) == want


def test_replica_reloads_a_new_snapshot_then_follows_after_it(tmp_path: Path) -> None:
    w = writer(tmp_path)
    upsert(w, np.arange(10), 0, "b1")
    rep, follower = replica(tmp_path)
    built = w.build("a", vecs(300, 2), np.arange(1000, 1300), family="flat", progress=None)
    upsert(w, np.arange(2000, 2005), 3, "b2")
    follower.poll_once("a")
    assert rep.slot("a").version == built["snapshot"]["version"] and rep.slot("a").reloads == 1
    assert rep.engine("a").ntotal == 305 and rep.slot("a").seq == w.slot("a").seq
    assert not rep.engine("a").contains(np.arange(10)).any()
    assert follower.poll_once("a") == 0 and rep.slot("a").reloads == 1  # CURRENT did not move
    w.close()
    rep.close()


def test_replica_behind_a_truncated_log_reloads_from_the_newest_snapshot(tmp_path: Path) -> None:
    w = writer(tmp_path, retention=1)  # each save trims the log up to its own seq
    upsert(w, np.arange(10), 0, "b1")
    rep, follower = replica(tmp_path)
    follower.poll_once("a")
    upsert(w, np.arange(10, 20), 1, "b2")
    w.save("a")
    upsert(w, np.arange(20, 30), 2, "b3")
    # entries 2.. are gone from the log, whatever this replica thinks CURRENT is
    assert follower.replay("a") == 0
    assert rep.slot("a").seq == 3 and rep.engine("a").ntotal == 30
    assert rep.slot("a").reloads == 1
    w.close()
    rep.close()


def test_replica_refuses_jobs_and_never_blocks_the_writer(tmp_path: Path) -> None:
    rep, _ = replica(tmp_path)
    with pytest.raises(WriterConflict):
        rep.apply("a", "upsert", np.arange(3), vecs(3), "b1", check=no_check)
    with pytest.raises(WriterConflict):
        rep.build("a", vecs(30), np.arange(30), family=None, progress=None)
    w = writer(tmp_path)  # the writer lock is free: the replica never took it
    upsert(w, np.arange(3), 0, "b1")
    assert w.slot("a").seq == 1
    w.close()
    rep.close()


def test_worker_command_takes_a_replica_flag() -> None:
    from faissq.cli.main import build_parser

    args = build_parser().parse_args(["worker", "--index", "a", "--replica"])
    assert args.replica is True and args.index == ["a"]
    assert build_parser().parse_args(["worker"]).replica is False


def test_a_replica_answers_with_the_writers_version_through_builds_and_merges(
    tmp_path: Path,
) -> None:
    """Versions are log seqs: the same on writer and replica at the same point, never back."""
    w = writer(tmp_path)
    rep, follower = replica(tmp_path)
    seen = []
    upsert(w, np.arange(10), 0, "b1")
    follower.poll_once("a")
    seen.append((w.engine("a").version, rep.engine("a").version))
    w.build("a", vecs(200, 3), np.arange(100, 300), family="flat", progress=None)
    follower.poll_once("a")
    seen.append((w.engine("a").version, rep.engine("a").version))
    upsert(w, np.arange(400, 410), 1, "b2")
    w.merge("a", None)
    w.save("a")
    follower.poll_once("a")
    seen.append((w.engine("a").version, rep.engine("a").version))
    assert seen == [(1, 1), (2, 2), (3, 3)]
    w.close()
