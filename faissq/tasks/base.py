"""The base class of every faissq task: delivery counting, argument checks, progress, retries."""

from __future__ import annotations

import inspect
import json
import logging
import time
from typing import Any

from celery import Task

from faissq.errors import (
    DeadLettered,
    InvalidParameter,
    JobTimeLimitExceeded,
    PermanentError,
    StorageUnavailable,
)
from faissq.worker import delivery
from faissq.worker.context import WorkerContext, context_of

log = logging.getLogger(__name__)


class FaissqTask(Task):  # type: ignore[misc]  # celery ships no type hints
    """Counts deliveries (dead-letter after N), checks kwargs, retries only StorageUnavailable."""

    autoretry_for = (StorageUnavailable,)
    retry_backoff = 2  # first retry after about 2 s, doubling (max_retries, retry_backoff_max
    retry_backoff_max = 120  # come from settings.worker at registration)
    retry_jitter = True
    max_retries = 8
    throws = (PermanentError,)  # expected failures: logged as one line, no traceback
    typing = False  # arguments are checked in __call__, so a bad call is a named error

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task unless it already crashed the worker too often."""
        ctx = context_of(self.app)
        task_id = self.request.id
        if task_id is None or ctx is None:  # a direct call outside a worker
            return super().__call__(*args, **kwargs)
        n = delivery.count_delivery(ctx.redis, task_id)
        if n > ctx.settings.worker.dead_letter_after:
            index = kwargs.get("index") if isinstance(kwargs.get("index"), str) else "unknown"
            delivery.dead_letter(ctx.redis, str(index), task_id=task_id, name=self.name,
                                 deliveries=n - 1, kwargs=kwargs)  # fmt: skip
            delivery.forget_delivery(ctx.redis, task_id)
            raise DeadLettered(
                f"{self.name} {task_id} was delivered {n - 1} times without finishing "
                f"(the worker died each time); moved to the dead-letter list"
            )
        try:
            _check_signature(self, args, kwargs)
            return super().__call__(*args, **kwargs)
        finally:
            delivery.forget_delivery(ctx.redis, task_id)

    def context(self) -> WorkerContext:
        """The worker's runtime and settings; only inside a faissq worker."""
        ctx = context_of(self.app)
        if ctx is None:
            raise InvalidParameter("faissq tasks run inside a faissq worker only")
        return ctx

    def progress(self, time_limit_s: float) -> JobProgress:
        """A progress callback that reports PROGRESS and enforces the job's time limit."""
        interval = self.context().settings.worker.progress_interval_s
        return JobProgress(self, deadline=time.monotonic() + time_limit_s, interval_s=interval)


class JobProgress:
    """progress(phase, done, total): throttled PROGRESS states and events, a cooperative deadline.

    The state goes to the result backend (`AsyncResult.state == "PROGRESS"`, `.info` the meta);
    a `task-progress` event carries them to Flower (state PROGRESS, the meta as its result).
    """

    def __init__(self, task: Task, *, deadline: float, interval_s: float) -> None:
        """Report through `task.update_state` at most every `interval_s`; stop past `deadline`."""
        self.task = task
        self.deadline = deadline
        self.interval_s = interval_s
        self._last = 0.0
        self._last_phase = ""

    def __call__(self, phase: str, done: int, total: int) -> None:
        """Record progress; raises JobTimeLimitExceeded between chunks once the deadline passed."""
        now = time.monotonic()
        if now > self.deadline:
            raise JobTimeLimitExceeded(f"job passed its time limit during {phase} ({done}/{total})")
        if phase != self._last_phase or now - self._last >= self.interval_s:
            self._last, self._last_phase = now, phase
            if self.task.request.id is not None:
                meta = {"phase": str(phase), "done": int(done), "total": int(total)}
                self.task.update_state(state="PROGRESS", meta=meta)  # AsyncResult.info
                # Flower shows a custom event's type as the state and its `result` field
                self.task.send_event("task-progress", result=json.dumps(meta), **meta)

    def check(self) -> None:
        """Raise JobTimeLimitExceeded when the deadline passed (for steps without progress)."""
        if time.monotonic() > self.deadline:
            raise JobTimeLimitExceeded("job passed its time limit")


def _check_signature(task: Task, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Turn missing or unknown arguments into InvalidParameter instead of a bare TypeError."""
    run = getattr(task, "_orig_run", task.run)
    try:
        inspect.signature(run).bind(*args, **kwargs)
    except TypeError as exc:
        raise InvalidParameter(f"{task.name}: {exc}") from None
