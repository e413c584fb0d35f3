"""The base class of every faissq task: delivery counting, argument checks, progress, retries.

Storage trouble is retried in place: the job keeps the worker (and so its index's queue) until
storage answers, because a re-published job would be overtaken by the jobs behind it and the
mutations of one index must apply in the order they were enqueued.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from typing import Any

from celery import Task
from kombu.exceptions import OperationalError

from faissq.errors import (
    DeadLettered,
    InvalidParameter,
    JobTimeLimitExceeded,
    PermanentError,
    StorageUnavailable,
)
from faissq.telemetry.metric_families import metrics_of, observe_storage_retry
from faissq.worker import delivery
from faissq.worker.context import WorkerContext, context_of

log = logging.getLogger(__name__)


class FaissqTask(Task):  # type: ignore[misc]  # celery ships no type hints
    """Counts deliveries (dead-letter after N), checks kwargs, retries storage trouble in place."""

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
            return self._run_in_place(ctx, args, kwargs)
        finally:
            delivery.forget_delivery(ctx.redis, task_id)

    def _run_in_place(self, ctx: WorkerContext, args: tuple[Any, ...], kwargs: Any) -> Any:
        """Run the job; on StorageUnavailable wait (doubling) and run it again, never re-queue.

        The job is idempotent by construction (a logged batch_id is not logged twice; a build
        or save writes a new version), so running it again after a failed attempt is safe.
        """
        cfg = ctx.settings.worker
        for attempt in range(1, cfg.storage_retries + 2):
            try:
                return super().__call__(*args, **kwargs)
            except StorageUnavailable as exc:
                if attempt > cfg.storage_retries:
                    raise
                wait_s = min(cfg.retry_backoff_max_s, cfg.retry_backoff_s * 2 ** (attempt - 1))
                index = kwargs.get("index") if isinstance(kwargs.get("index"), str) else None
                log.warning("%s %s: storage unavailable (%s); retry %d/%d in %.2fs, holding the "
                            "queue", self.name, self.request.id, exc, attempt,
                            cfg.storage_retries, wait_s)  # fmt: skip
                observe_storage_retry(metrics_of(ctx.runtime), self.name, index)
                # RETRY with the exception as its info, as Celery's own retries show it
                self.update_state(state="RETRY", meta=exc)
                send_event(self, "task-retried", exception=repr(exc), traceback="")
                time.sleep(wait_s)
        raise AssertionError("unreachable: the last attempt returns or raises")

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
        # a phase's start and end always go out (a chunked phase may end within one interval)
        ends = done >= total
        if phase != self._last_phase or ends or now - self._last >= self.interval_s:
            self._last, self._last_phase = now, phase
            if self.task.request.id is not None:
                meta = {"phase": str(phase), "done": int(done), "total": int(total)}
                self.task.update_state(state="PROGRESS", meta=meta)  # AsyncResult.info
                # Flower shows a custom event's type as the state and its `result` field
                send_event(self.task, "task-progress", result=json.dumps(meta), **meta)

    def check(self) -> None:
        """Raise JobTimeLimitExceeded when the deadline passed (for steps without progress)."""
        if time.monotonic() > self.deadline:
            raise JobTimeLimitExceeded("job passed its time limit")


def send_event(task: Task, type_: str, **fields: Any) -> None:
    """Send a monitoring event if the broker answers: a job never fails for want of one."""
    try:
        task.send_event(type_, **fields)
    except (OperationalError, OSError) as exc:  # Redis down: the result itself waits for it
        log.warning("%s %s: event %s not sent: %s", task.name, task.request.id, type_, exc)


def _check_signature(task: Task, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Turn missing or unknown arguments into InvalidParameter instead of a bare TypeError."""
    run = getattr(task, "_orig_run", task.run)
    try:
        inspect.signature(run).bind(*args, **kwargs)
    except TypeError as exc:
        raise InvalidParameter(f"{task.name}: {exc}") from None
