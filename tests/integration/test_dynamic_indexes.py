"""Indexes created and dropped at runtime on a real `faissq worker --dynamic`, Redis and FAISS."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from celery import Celery

from faissq.config import Settings
from faissq.errors import FaissqError
from faissq.rpc.search_client import SearchClient
from faissq.storage.catalog import FOLDER

DIM = 8
TIMEOUT = 30


def plain_app(redis_url: str) -> Celery:
    """A producer that never imports faissq: plain send_task, msgpack."""
    app = Celery("upstream", broker=redis_url, backend=redis_url, set_as_current=False)
    app.conf.update(
        task_serializer="msgpack", result_serializer="msgpack", accept_content=["msgpack", "json"]
    )
    return app


def control(app: Celery, task: str, **kwargs: Any) -> Any:
    """Send one control job to faissq.control and wait for its result."""
    return app.send_task(task, kwargs=kwargs, queue="faissq.control").get(timeout=TIMEOUT)


def job(app: Celery, task: str, index: str, **kwargs: Any) -> Any:
    """Send one job to the index's own queue and wait for its result."""
    r = app.send_task(task, kwargs={"index": index, **kwargs}, queue=f"faissq.{index}")
    return r.get(timeout=TIMEOUT)


def upsert(app: Celery, index: str, n: int, seed: int = 0, **kw: Any) -> tuple[np.ndarray, Any]:
    """Upsert n random vectors with ids 0..n-1; the vectors and the job's result."""
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype("<f4")
    frame = {"dtype": "<f4", "shape": list(x.shape), "data": x.tobytes()}
    return x, job(app, "faissq.upsert", index, ids=list(range(n)), vectors=frame, **kw)


def error_code(exc: BaseException) -> str:
    """The stable code of a faissq error (a remote one keeps it in remote_code)."""
    return str(getattr(exc, "remote_code", None) or getattr(exc, "code", type(exc).__name__))


@pytest.fixture
def dynamic(worker_factory: Any) -> Any:
    """make(grace_s) -> a started dynamic worker serving no configured index."""

    def make(grace_s: float = 3600) -> Any:
        env = {"FAISSQ_WORKER__DYNAMIC": "true", "FAISSQ_WORKER__DROP_GRACE_S": str(grace_s)}
        return worker_factory([], env=env).start()

    return make


def test_create_upsert_search_restart_drop(
    dynamic: Any, redis_url: str, storage_root: Path, job_settings: Settings
) -> None:
    """Created at runtime: served at once and after a restart; dropped: unknown_index."""
    worker = dynamic()
    app = plain_app(redis_url)
    made = control(app, "faissq.create_index", name="shoes", dim=DIM, metric="l2",
                   family="flat", attributes={"color": "keyword"})  # fmt: skip
    assert made["created"] is True and made["queue"] == "faissq.shoes"
    assert made["state"] == "created" and made["attributes"] == {"color": "keyword"}
    again = control(app, "faissq.create_index", name="shoes", dim=DIM, metric="l2",
                    family="flat", attributes={"color": "keyword"})  # fmt: skip
    assert again["created"] is False  # the same definition: a no-op

    x, up = upsert(app, "shoes", 50, attributes={"color": ["red", None] * 25})
    assert up["applied"] == 50 and up["ntotal"] == 50
    client = SearchClient(job_settings, "shoes")
    hit = client.search(x[7:8], k=1)
    assert int(hit.ids[0][0]) == 7

    assert worker.stop() == 0
    worker.start()  # nothing names the index: the catalog does
    hit = client.search(x[9:10], k=1)
    assert int(hit.ids[0][0]) == 9
    assert job(app, "faissq.stats", "shoes")["ntotal"] == 50
    with pytest.raises(Exception) as undeclared:  # the catalog's fields hold after a restart
        upsert(app, "shoes", 1, attributes={"size": [42]})
    assert type(undeclared.value).__name__ == "InvalidAttributes"

    dropped = control(app, "faissq.drop_index", name="shoes")
    assert dropped["dropped"] is True and dropped["state"] == "dropped"
    with pytest.raises(FaissqError) as info:
        client.search(x[:1], k=1)
    assert error_code(info.value) == "unknown_index"
    with pytest.raises(Exception) as failed:
        job(app, "faissq.stats", "shoes")
    assert type(failed.value).__name__ == "UnknownIndex"
    assert (storage_root / "shoes").exists()  # kept for the grace period
    with pytest.raises(Exception) as refused:  # a dropped name waits for its purge
        control(app, "faissq.create_index", name="shoes", dim=DIM, metric="l2", family="flat")
    assert type(refused.value).__name__ == "IndexExists"

    assert worker.stop() == 0
    worker.start()  # still dropped after a restart
    with pytest.raises(FaissqError) as info:
        client.search(x[:1], k=1)
    assert error_code(info.value) == "unknown_index"
    client.close()


def test_drop_with_no_grace_removes_the_data(
    dynamic: Any, redis_url: str, storage_root: Path
) -> None:
    """Grace 0: the data and the record go at the drop; the name can be created again."""
    dynamic(grace_s=0)
    app = plain_app(redis_url)
    control(app, "faissq.create_index", name="hats", dim=DIM, metric="cosine")
    upsert(app, "hats", 10)
    assert (storage_root / "hats").exists()
    control(app, "faissq.drop_index", name="hats")
    assert not (storage_root / "hats").exists()
    assert not (storage_root / FOLDER / "hats.json").exists()
    with pytest.raises(Exception) as unknown:
        control(app, "faissq.drop_index", name="hats")
    assert type(unknown.value).__name__ == "UnknownIndex"
    remade = control(app, "faissq.create_index", name="hats", dim=DIM * 2, metric="l2")
    assert remade["created"] is True and remade["dim"] == DIM * 2


BAD_CREATES = [
    ({"name": "../etc", "dim": DIM}, "InvalidParameter"),
    ({"name": "ok", "dim": 0}, "InvalidParameter"),
    ({"name": "ok", "dim": "8"}, "InvalidParameter"),
    ({"name": "ok", "dim": DIM, "metric": "hamming"}, "InvalidParameter"),
    ({"name": "ok", "dim": DIM, "family": "NoSuchFactory99"}, "UnknownFamily"),
    ({"name": "ok", "dim": DIM, "attributes": "color"}, "InvalidAttributes"),
    ({"name": "ok", "dim": DIM, "attributes": {"color": "float"}}, "InvalidAttributes"),
    ({"name": "base", "dim": DIM + 1}, "IndexExists"),
]


def test_bad_creates_are_typed_and_harmless(
    dynamic: Any, redis_url: str, storage_root: Path
) -> None:
    """Each bad create fails with its error; nothing is recorded, the served index untouched."""
    dynamic()
    app = plain_app(redis_url)
    control(app, "faissq.create_index", name="base", dim=DIM, metric="l2")
    for kwargs, error in BAD_CREATES:
        with pytest.raises(Exception) as info:
            control(app, "faissq.create_index", **{"metric": "l2", **kwargs})
        assert (kwargs, type(info.value).__name__) == (kwargs, error)
    assert sorted(p.name for p in (storage_root / FOLDER).iterdir()) == ["base.json"]
    assert not (storage_root / "ok").exists()
    # the created dimension holds before any vector arrived
    wrong = np.ones((1, DIM + 1), "<f4")
    with pytest.raises(Exception) as mismatch:
        job(app, "faissq.upsert", "base", ids=[1],
            vectors={"dtype": "<f4", "shape": [1, DIM + 1], "data": wrong.tobytes()})  # fmt: skip
    assert type(mismatch.value).__name__ == "DimensionMismatch"
    _, up = upsert(app, "base", 5)
    assert up["ntotal"] == 5 and job(app, "faissq.stats", "base")["state"] == "ready"
