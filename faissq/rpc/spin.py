"""Socket readiness of a redis-py connection: a cheap check, and busy-polling before a read.

On virtual machines whose idle CPUs halt at once, a process that sleeps on a socket pays tens
of microseconds to be woken again; polling for a bounded time keeps the CPU awake instead.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable
from typing import Any


def readable_now(conn: Any) -> bool:
    """Whether conn's socket holds something to read right now (an answer, or end of file)."""
    sock = getattr(conn, "_sock", None)
    if sock is None:
        return False
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def spin_until_readable(
    conn: Any, seconds: float, worth_it: Callable[[], bool] | None = None
) -> bool:
    """Poll conn's socket up to `seconds` for an answer; True once one can be read.

    worth_it, when given, is asked on every poll; polling ends when it says no (another thread
    of the process needs the interpreter lock the poll keeps taking back).
    """
    if conn.can_read(timeout=0):  # already parsed or buffered
        return True
    sock = getattr(conn, "_sock", None)
    if sock is None:
        return False
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    until = time.perf_counter() + seconds
    while True:
        if poller.poll(0):
            return True
        if time.perf_counter() >= until or (worth_it is not None and not worth_it()):
            return False
        os.sched_yield()  # a process woken on this CPU (Redis, say) runs now, not at the tick
