"""Waiting out storage trouble at start-up: a blip must delay a worker, never fail it for good."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from typing import TypeVar

from faissq.config import WorkerSettings
from faissq.errors import StorageUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
NAP_S = 0.1  # longest sleep between two looks at `stopping`: a shutdown ends the wait soon


def wait_out_storage(
    step: Callable[[], T],
    cfg: WorkerSettings,
    what: str,
    stopping: Callable[[], bool],
    on_retry: Callable[[str], None] | None = None,
) -> T | None:
    """Run `step` until it does not raise StorageUnavailable, and return its value.

    Waits worker.retry_backoff_s, doubling up to retry_backoff_max_s, between tries, for as
    long as storage stays unavailable (there is nothing else a worker could do meanwhile).
    Returns None when `stopping()` turns true while it waits. on_retry(reason) is told why.
    """
    for attempt in itertools.count(1):
        try:
            return step()
        except StorageUnavailable as exc:
            wait_s = min(cfg.retry_backoff_max_s, cfg.retry_backoff_s * 2.0 ** min(attempt - 1, 30))
            reason = f"storage unavailable (try {attempt}, next in {wait_s:.2f}s): {exc}"
            log.warning("%s: %s", what, reason)
            if on_retry is not None:
                on_retry(reason)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if stopping():
                return None
            time.sleep(min(NAP_S, wait_s))
    return None  # unreachable: the count never ends
