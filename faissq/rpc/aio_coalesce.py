"""Client-side merging for AsyncSearchClient: the asyncio side of coalesce (same Waiting line)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from faissq.errors import PermanentError, SearchTimeout
from faissq.rpc.coalesce import MAX_ROWS, Pending, Waiting, deliver, finish, stacked

if TYPE_CHECKING:
    from faissq.rpc.search_client import SearchResponse

# search(first member, stacked queries, timeout_s): one round trip with the member's k and options
AsyncSearch = Callable[["Pending", npt.NDArray[np.float32], float], Awaitable["SearchResponse"]]


async def aserve(batch: list[Pending], search: AsyncSearch) -> None:
    """serve() for asyncio clients."""
    try:
        queries, timeout_s = stacked(batch)
        deliver(batch, await search(batch[0], queries, timeout_s))
    except PermanentError as exc:
        if len(batch) == 1:
            batch[0].error = exc
        else:
            for p in batch:
                await aserve([p], search)
    except Exception as exc:
        for p in batch:
            p.error = exc
    finally:
        finish(batch)


class Flag:
    """A one-shot asyncio signal: one future, set once (woken by AsyncCoalescer's one timer).

    Measured: 80 vs 104 µs client CPU per search with asyncio.Event,
    docs/benchmarks.md#rpc-fast-paths.
    """

    __slots__ = ("future",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        """A flag of `loop`, not set."""
        self.future: asyncio.Future[None] = loop.create_future()

    def set(self) -> None:
        """Wake the waiter (again: nothing happens)."""
        if not self.future.done():
            self.future.set_result(None)

    def expire(self) -> None:
        """The waiter's deadline passed: it wakes with TimeoutError unless set before."""
        if not self.future.done():
            self.future.set_exception(TimeoutError())


class AsyncCoalescer:
    """Merges the concurrent searches of one AsyncSearchClient (tasks of one event loop).

    Measured: 3,158 vs 1,352 QPS of 16 tasks with merging off, docs/benchmarks.md#rpc-fast-paths.
    """

    def __init__(
        self, search: AsyncSearch, *, max_in_flight: int, max_rows: int = MAX_ROWS
    ) -> None:
        """search(member, queries, timeout_s) is one round trip; `max_in_flight` run at once."""
        self.search = search
        self._waiting = Waiting(max_in_flight, max_rows)
        self._trips: set[asyncio.Future[None]] = set()  # round trips in flight (kept referenced)
        self._sweep: asyncio.TimerHandle | None = None  # wakes waiters whose deadline passed
        self._sweep_at = math.inf  # the deadline (time.monotonic) it is set for
        self._sweep_loop: asyncio.AbstractEventLoop | None = None  # the loop it runs in

    def alone(self) -> bool:
        """True when the caller may send its search directly; it must call `done_alone` after."""
        return self._waiting.lead_alone()

    def done_alone(self) -> None:
        """A direct search is over: hand its round trip to whoever waits."""
        self._waiting.step_down()

    async def run(self, p: Pending) -> SearchResponse:
        """Search p's queries, merged with whatever else waits; raise its error."""
        self._waiting.join(p)
        if not p.promoted:
            self._watch(p)
            try:
                await p.turn.future
            except TimeoutError:
                if self._waiting.give_up(p):
                    raise SearchTimeout(
                        "no round trip of this client was free before the deadline"
                    ) from None
            except BaseException:  # cancelled while waiting: leave nothing behind
                self._waiting.abandon(p)
                raise
        if p.promoted:
            batch = self._waiting.take(p)
            if not batch:
                self._waiting.step_down()
            else:
                # the round trip answers every member: it runs as its own task, so cancelling
                # this caller cancels only its wait, and the turn is handed on when it ends
                trip = asyncio.ensure_future(aserve(batch, self.search))
                self._trips.add(trip)
                trip.add_done_callback(self._trip_done)
                await asyncio.shield(trip)
        await p.done.future
        return p.answer()

    def _watch(self, p: Pending) -> None:
        """Have p's wait end by its deadline: one timer serves every waiter, set for the earliest
        deadline, instead of a timer per search (each costs a heap push and a cancel)."""
        loop = asyncio.get_running_loop()
        if p.deadline < self._sweep_at or self._sweep_loop is not loop:  # a new loop: re-arm
            if self._sweep is not None:
                self._sweep.cancel()
            self._sweep_at, self._sweep_loop = p.deadline, loop
            self._sweep = loop.call_later(p.remaining(), self._expire)

    def _expire(self) -> None:
        """The earliest deadline came: wake the waiters past theirs; watch the next one."""
        self._sweep, self._sweep_at = None, math.inf
        now = time.monotonic()
        nxt: Pending | None = None
        for q in self._waiting.pending:
            if q.promoted or q.taken:
                continue
            if q.deadline <= now:
                q.turn.expire()
            elif nxt is None or q.deadline < nxt.deadline:
                nxt = q
        if nxt is not None:
            self._watch(nxt)

    def _trip_done(self, trip: asyncio.Future[None]) -> None:
        """A merged round trip ended: free its slot for the next waiter."""
        self._trips.discard(trip)
        self._waiting.step_down()

    def pending(self, q: npt.NDArray[np.float32], k: int, options: dict[str, Any], key: Hashable,
                timeout_s: float) -> Pending:  # fmt: skip
        """A Pending with asyncio flags."""
        loop = asyncio.get_running_loop()
        return Pending(q, k, options, key, time.monotonic() + timeout_s, Flag(loop), Flag(loop))
