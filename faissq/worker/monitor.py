"""The app for Celery's own commands: `celery -A faissq.worker.monitor flower` (inspect, events).

`app` is built from FAISSQ_* on first access, not at import, so importing this module reads no
environment and opens no connection. It has no tasks and no runtime: it only decodes faissq's
messages and results (msgpack) the way the workers write them.
"""

from __future__ import annotations

from typing import Any

from faissq.config import Settings
from faissq.worker.app import make_celery_app

_app: Any = None


def __getattr__(name: str) -> Any:
    """Build `app` lazily on first access (PEP 562)."""
    global _app
    if name != "app":
        raise AttributeError(name)
    if _app is None:
        app = make_celery_app(Settings(), main="faissq-monitor", set_as_current=True)
        # it consumes only its own event and reply queues, which need no acks; with kombu's ack
        # emulation its poller would also restore other consumers' unacked jobs (the
        # unacked_mutex lock, then requeues), which the flower and monitor roles refuse
        options = app.conf.broker_transport_options
        app.conf.broker_transport_options = {**options, "ack_emulation": False}
        _app = app
    return _app
