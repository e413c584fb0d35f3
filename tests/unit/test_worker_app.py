"""make_celery_app follows DESIGN §5; routing sends each index's jobs to its own queue."""

from __future__ import annotations

import pytest

from faissq.config import Settings
from faissq.errors import InvalidParameter
from faissq.tasks.jobs import register_tasks
from faissq.worker.app import celery_url, make_celery_app, route_by_index
from faissq.worker.lifecycle import WriterStep, make_worker_app


def settings(**worker: object) -> Settings:
    """Settings with a Redis URL (nothing connects in these tests)."""
    return Settings(
        redis={"url": "redis://127.0.0.1:1/0"}, worker={"indexes": ["a", "b"], **worker}
    )


def test_celery_conventions() -> None:
    """msgpack without pickle, late acks, prefetch 1, events, visibility timeout everywhere."""
    conf = make_celery_app(settings(visibility_timeout_s=7200)).conf
    assert conf.task_serializer == conf.result_serializer == "msgpack"
    assert "pickle" not in conf.accept_content and "pickle" not in conf.result_accept_content
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] == 7200
    assert conf.result_backend_transport_options["visibility_timeout"] == 7200
    assert conf.task_track_started and conf.worker_send_task_events and conf.task_send_sent_event
    assert [q.name for q in conf.task_queues] == ["faissq.a", "faissq.b"]


def test_routing_by_the_index_kwarg() -> None:
    """faissq.* jobs go to faissq.<index>; other tasks and index-less calls are left alone."""
    assert route_by_index("faissq.upsert", (), {"index": "a"}, {}) == {"queue": "faissq.a"}
    assert route_by_index("other.task", (), {"index": "a"}, {}) is None
    assert route_by_index("faissq.upsert", (), {}, {}) is None
    app = make_celery_app(settings())
    route = app.amqp.router.route({}, "faissq.upsert", (), {"index": "b"})
    assert route["queue"].name == "faissq.b" and route["queue"].routing_key == "faissq.b"
    explicit = app.amqp.router.route({"queue": "faissq.a"}, "faissq.upsert", (), {"index": "b"})
    assert explicit["queue"].name == "faissq.a" and "routing_key" not in explicit


def test_urls() -> None:
    """unix:// sockets are spelled redis+socket:// for kombu; no URL is a clear error."""
    assert celery_url("unix:///tmp/r.sock") == "redis+socket:///tmp/r.sock"
    assert celery_url("rediss://h:6380/0") == "rediss://h:6380/0"
    with pytest.raises(InvalidParameter, match="FAISSQ_REDIS__URL"):
        make_celery_app(Settings())


def test_the_worker_app_carries_the_writer_step() -> None:
    """The lifecycle runs as the worker's bootstep (so before its consumer), with the jobs."""
    app = make_worker_app(settings(), register_tasks)
    steps = [s for s in app.steps["worker"] if isinstance(s, type) and issubclass(s, WriterStep)]
    assert len(steps) == 1 and steps[0].settings.worker.indexes == ["a", "b"]
    assert steps[0].maintenance is not None
    assert {"faissq.build", "faissq.upsert", "faissq.maintain"} <= set(app.tasks)
