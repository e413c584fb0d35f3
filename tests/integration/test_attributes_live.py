"""Attribute columns through real workers: built, upserted, killed, restarted, saved, refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from celery import Celery

from faissq.config import Settings
from faissq.storage.durable import DurableStore
from faissq.tasks.producer import JobClient

DIM = 8
TIMEOUT = 60
SCHEMA = {"tenant": "int64", "lang": "keyword"}
ENV = {"FAISSQ_INDEX__ATTRIBUTES": json.dumps(SCHEMA)}


def vecs(n: int, seed: int) -> np.ndarray:
    """n random float32 vectors."""
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def read_side(storage_root: Path, index: str) -> DurableStore:
    """The storage as a replica reads it (no writer lock), with the worker's declared fields."""
    s = Settings(storage={"url": str(storage_root)}, gpu={"mode": "off"},
                 index={"attributes": SCHEMA}, worker={"indexes": [index]})  # fmt: skip
    return DurableStore(s)


def test_attributes_survive_a_kill_9_from_the_log_then_come_from_the_snapshot(
    worker_factory: Any, index_name: str, job_settings: Settings, storage_root: Path
) -> None:
    """A build (attributes by reference) and acknowledged upserts (inline) are all there after
    SIGKILL: the restarted worker replays them from the log and its next snapshot holds them."""
    worker = worker_factory([index_name], env=ENV).start()
    client = JobClient(job_settings)
    ids = np.arange(6)
    built = {"tenant": ids % 2, "lang": ["en", "de"] * 3}
    jobs = [
        client.build(index_name, vecs(6, 0), ids, family="flat", by_reference=True,
                     attributes=built),
        client.upsert(index_name, [6, 7], vecs(2, 1), by_reference=False,
                      attributes={"tenant": [7, None], "lang": ["fr", "en"]}),
        client.upsert(index_name, [1], vecs(1, 2), by_reference=True,
                      attributes={"tenant": np.array([7])}),  # lang left out: null
    ]  # fmt: skip
    for job in jobs:
        job.get(timeout=TIMEOUT)
    worker.kill()  # after the acknowledgements: nothing was saved since the build
    worker.start()
    assert client.stats(index_name).get(timeout=TIMEOUT)["seq"] == 3
    want = {"tenant": [0, 7, 0, 1, 0, 1, 7, None], "lang": ["en", None, "en", "de", "en", "de",
                                                           "fr", "en"]}  # fmt: skip
    store = read_side(storage_root, index_name)
    rec = store.recover(index_name, quarantine=False)
    assert rec.engine is not None and rec.replayed == 2  # the build's snapshot + the log
    assert rec.engine.attributes_of(np.arange(8)) == want
    hits = rec.engine.search(vecs(1, 3), 8, filter={"field": "tenant", "eq": 7}).ids[0]
    assert sorted(int(i) for i in hits if i >= 0) == [1, 6]

    saved = client.save(index_name).get(timeout=TIMEOUT)["snapshot"]  # the restarted engine
    rec = store.recover(index_name, quarantine=False)
    assert rec.version == saved["version"] and rec.replayed == 0
    assert (
        storage_root / index_name / "snapshots" / saved["version"] / "attributes.msgpack"
    ).exists()
    assert rec.engine is not None and rec.engine.attributes_of(np.arange(8)) == want
    client.close()


def plain_app(redis_url: str) -> Celery:
    """A producer that never imports faissq: plain send_task, msgpack."""
    app = Celery("upstream", broker=redis_url, backend=redis_url, set_as_current=False)
    app.conf.update(
        task_serializer="msgpack", result_serializer="msgpack", accept_content=["msgpack", "json"]
    )
    return app


def test_a_bad_attribute_batch_is_refused_before_anything_is_logged(
    worker_factory: Any, index_name: str, redis_url: str, storage_root: Path
) -> None:
    """InvalidAttributes (wrong type, unknown field, wrong length) leaves no log entry and no
    seq behind; a good batch sent the same way is then seq 1."""
    worker_factory([index_name], env=ENV).start()
    app = plain_app(redis_url)
    x = vecs(2, 0)
    frame = {"dtype": "<f4", "shape": [2, DIM], "data": x.tobytes()}

    def upsert(**kwargs: Any) -> Any:
        body = {"index": index_name, "ids": [1, 2], "vectors": frame, **kwargs}
        r = app.send_task("faissq.upsert", kwargs=body, queue=f"faissq.{index_name}")
        return r.get(timeout=TIMEOUT)

    for bad in ({"tenant": ["7", 8]}, {"colour": ["red", "red"]}, {"lang": ["en"]}, ["en", "de"]):
        with pytest.raises(Exception) as refused:
            upsert(attributes=bad)
        assert type(refused.value).__name__ == "InvalidAttributes", bad
    with pytest.raises(Exception) as both:
        upsert(attributes={}, attributes_ref={"path": "x", "sha256": "0" * 64})
    assert type(both.value).__name__ == "InvalidParameter"
    store = read_side(storage_root, index_name)
    assert store.log(index_name).entry_seqs() == []
    out = upsert(attributes={"tenant": [7, None], "lang": ["en", "de"]})
    assert out["seq"] == 1 and out["applied"] == 2
    rec = store.recover(index_name, quarantine=False)
    assert rec.engine is not None
    assert rec.engine.attributes_of([1, 2]) == {"tenant": [7, None], "lang": ["en", "de"]}
    app.close()
