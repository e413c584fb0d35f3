"""What a running faissq worker process shares with its tasks: settings, runtime, Redis client."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis
from celery import Celery

from faissq.config import Settings
from faissq.worker.runtime import IndexRuntime

if TYPE_CHECKING:
    from faissq.worker.dynamic import DynamicIndexes


@dataclass
class WorkerContext:
    """The process-local state of one worker app (one per process in practice)."""

    settings: Settings
    runtime: IndexRuntime
    redis: redis.Redis
    dynamic: DynamicIndexes | None = None  # set on a dynamic worker (faissq.control)


_CONTEXTS: weakref.WeakKeyDictionary[Celery, WorkerContext] = weakref.WeakKeyDictionary()


def attach_context(app: Celery, ctx: WorkerContext) -> None:
    """Make `ctx` the context of `app`'s tasks in this process."""
    _CONTEXTS[app] = ctx


def context_of(app: Celery) -> WorkerContext | None:
    """Return the context attached to `app`, or None outside a faissq worker."""
    return _CONTEXTS.get(app)
