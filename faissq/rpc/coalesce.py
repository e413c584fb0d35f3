"""Client-side merging: concurrent searches of one client share a request (docs/benchmarks.md).

The parts both clients share, and the threads' Coalescer; the asyncio one is in aio_coalesce.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from faissq.errors import PermanentError, RpcError, SearchTimeout
from faissq.rpc.query_client import filter_key

if TYPE_CHECKING:
    from faissq.rpc.search_client import SearchResponse

MAX_ROWS = 256  # query rows of one merged request: bounds its size and the batch the worker runs

# search(first member, stacked queries, timeout_s): one round trip with the member's k and options
Search = Callable[["Pending", npt.NDArray[np.float32], float], "SearchResponse"]


@dataclasses.dataclass(eq=False)
class Pending:
    """One caller's search while it waits to be sent, is in flight, or has its answer."""

    queries: npt.NDArray[np.float32]
    k: int
    options: dict[str, Any]
    key: Hashable  # requests merge only when their keys are equal (k, parameters, dimension)
    deadline: float  # time.monotonic() by which the caller wants an answer
    turn: Any  # threading/asyncio Event: set when this caller leads, or its answer is in
    done: Any  # threading/asyncio Event: set when its answer (result or error) is in
    promoted: bool = False  # this caller leads its own round trip
    taken: bool = False  # in some leader's batch
    batch_left: list[int] | None = None  # threads: members of its batch still to leave run()
    result: SearchResponse | None = None
    error: BaseException | None = None

    def remaining(self) -> float:
        """Seconds left before the deadline (at least 1 ms: Redis cannot block for less)."""
        return max(1e-3, self.deadline - time.monotonic())

    def answer(self) -> SearchResponse:
        """The result, or raise the error."""
        if self.result is None:
            raise self.error or RpcError("the merged request ended without an answer")
        return self.result


def stacked(batch: list[Pending]) -> tuple[npt.NDArray[np.float32], float]:
    """The batch's queries as one array, and the tightest timeout among its members."""
    queries = batch[0].queries if len(batch) == 1 else np.concatenate([p.queries for p in batch])
    return queries, min(p.remaining() for p in batch)


def deliver(batch: list[Pending], res: SearchResponse) -> None:
    """Split a merged reply by rows into each member's result."""
    row = 0
    timings = {**res.timings, "merged": len(batch)}
    response = type(res)  # SearchResponse, built directly: dataclasses.replace costs more
    for p in batch:
        n = len(p.queries)
        p.result = response(
            res.scores[row : row + n],
            res.ids[row : row + n],
            res.version,
            res.worker,
            timings,
            res.target_met,
        )
        row += n


def finish(batch: list[Pending]) -> None:
    """Wake every member of a batch: its answer is in."""
    for p in batch:
        p.done.set()
        p.turn.set()


def serve(batch: list[Pending], search: Search) -> None:
    """Answer a batch with one request; a request-specific error is retried member by member."""
    try:
        queries, timeout_s = stacked(batch)
        deliver(batch, search(batch[0], queries, timeout_s))
    except PermanentError as exc:  # bad input (NaN, k, dimension): whose? ask one by one
        if len(batch) == 1:
            batch[0].error = exc
        else:
            for p in batch:
                serve([p], search)
    except Exception as exc:  # timeout, no worker, busy, Redis down: the same for every member
        for p in batch:
            p.error = exc
    finally:
        finish(batch)


class Waiting:
    """The searches of one client waiting for a round trip, and who leads (no locking here).

    A caller leads when fewer than `max_in_flight` round trips run: it takes every waiting query of
    its key (oldest first, up to `max_rows` rows), sends them as one request and splits the reply.
    A lone caller sends directly; a request-specific error is retried member by member.
    """

    def __init__(self, max_in_flight: int, max_rows: int) -> None:
        """At most `max_in_flight` leaders; at most `max_rows` query rows per merged request."""
        self.max_in_flight = max(1, max_in_flight)
        self.max_rows = max(1, max_rows)
        self.pending: list[Pending] = []
        self.leaders = 0

    def lead_alone(self) -> bool:
        """Take a free round trip when nothing waits: the caller sends its search as it is."""
        if self.pending or self.leaders >= self.max_in_flight:
            return False
        self.leaders += 1
        return True

    def join(self, p: Pending) -> None:
        """Queue p; it leads at once when a round trip is free."""
        self.pending.append(p)
        if self.leaders < self.max_in_flight:
            self.leaders += 1
            p.promoted = True

    def give_up(self, p: Pending) -> bool:
        """Withdraw p after its wait timed out; False when it was taken or promoted meanwhile."""
        if p.taken or p.promoted:
            return False
        self.pending.remove(p)
        return True

    def abandon(self, p: Pending) -> None:
        """p's caller stopped waiting (cancelled): withdraw p; free a round trip it was given."""
        if not p.taken and p in self.pending:
            self.pending.remove(p)
        if p.promoted:
            self.step_down()

    def take(self, p: Pending) -> list[Pending]:
        """The oldest waiting searches of p's key up to max_rows rows; empty if p was taken."""
        if p.taken:
            return []
        batch: list[Pending] = []
        rows = 0
        for q in self.pending:
            if q.key == p.key and (not batch or rows + len(q.queries) <= self.max_rows):
                batch.append(q)
                rows += len(q.queries)
        for q in batch:
            q.taken = True
            self.pending.remove(q)
        return batch

    def step_down(self) -> None:
        """A leader is done: wake the oldest waiters to lead while round trips are free."""
        self.leaders -= 1
        for q in self.pending:
            if self.leaders >= self.max_in_flight:
                return
            if not q.promoted:
                q.promoted = True
                self.leaders += 1
                q.turn.set()


class ThreadFlag:
    """A one-shot thread signal: one held lock that set() releases (the coalescer orders sets).

    Measured: 61 vs 78 µs client CPU per search with threading.Event,
    docs/benchmarks.md#rpc-fast-paths.
    """

    __slots__ = ("_lock", "_set")

    def __init__(self) -> None:
        """A flag, not set."""
        self._lock = threading.Lock()
        self._lock.acquire()
        self._set = False

    def set(self) -> None:
        """Wake the waiter (again: nothing happens)."""
        if not self._set:
            self._set = True
            self._lock.release()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until set or `timeout` seconds passed; whether it was set."""
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            return False
        self._lock.release()  # stays set for a later wait
        return True


class Coalescer:
    """Merges the concurrent searches of one SearchClient (threads).

    Measured: 6,175 vs 2,250 QPS of 16 threads with merging off, docs/benchmarks.md#rpc-fast-paths.
    """

    def __init__(self, search: Search, *, max_in_flight: int, max_rows: int = MAX_ROWS) -> None:
        """search(member, queries, timeout_s) is one round trip; `max_in_flight` run at once."""
        self.search = search
        self._lock = threading.Lock()
        self._waiting = Waiting(max_in_flight, max_rows)

    def alone(self) -> bool:
        """True when the caller may send its search directly; it must call `done_alone` after."""
        with self._lock:
            return self._waiting.lead_alone()

    def done_alone(self) -> None:
        """A direct search is over: hand its round trip to whoever waits."""
        with self._lock:
            self._waiting.step_down()

    def run(self, p: Pending) -> SearchResponse:
        """Search p's queries, merged with whatever else waits; raise its error."""
        with self._lock:
            self._waiting.join(p)
        try:
            woken = p.promoted or p.turn.wait(p.remaining())
        except BaseException:  # interrupted while waiting: leave nothing behind
            with self._lock:
                self._waiting.abandon(p)
            self._leave(p)  # taken into a batch meanwhile: count this member out of it
            raise
        if not woken:
            with self._lock:
                if self._waiting.give_up(p):
                    raise SearchTimeout("no round trip of this client was free before the deadline")
        if p.promoted:
            batch: list[Pending] = []
            try:
                with self._lock:
                    batch = self._waiting.take(p)
                    left = [len(batch)]
                    for q in batch:
                        q.batch_left = left
                if batch:
                    serve(batch, self.search)
            except BaseException:  # the leader is out; its members leave on their own
                self._leave(p)
                raise
            finally:
                if not batch:
                    with self._lock:
                        self._waiting.step_down()
        try:
            p.done.wait()  # taken by a leader: its request is bounded by this caller's deadline
        finally:
            self._leave(p)
        return p.answer()

    def _leave(self, p: Pending) -> None:
        """p's answer is in: the last member of a batch to leave frees its round trip.

        Held until then, the round trip goes to a leader that finds the batch's members back in
        line (they search again as soon as they wake), not to the first of them alone.
        """
        with self._lock:
            left, p.batch_left = p.batch_left, None  # once per member
            if left is None:
                return
            left[0] -= 1
            if left[0] == 0:
                self._waiting.step_down()

    def pending(self, q: npt.NDArray[np.float32], k: int, options: dict[str, Any], key: Hashable,
                timeout_s: float) -> Pending:  # fmt: skip
        """A Pending with thread flags."""
        return Pending(q, k, options, key, time.monotonic() + timeout_s, ThreadFlag(),
                       ThreadFlag())  # fmt: skip


def mergeable(options: dict[str, Any]) -> bool:
    """Whether a search may share a request: not with its own allow or deny list."""
    return options.get("allow_ids") is None and options.get("deny_ids") is None


def merge_key(k: int, dim: int, options: dict[str, Any]) -> Hashable | None:
    """The merge key of a search, or None when it must travel alone (allow or deny lists); an
    attribute filter is part of it in canonical form, so only equal filters merge."""
    if not mergeable(options):
        return None
    plain = tuple(sorted((n, v) for n, v in options.items() if n != "filter"))
    return (k, dim, plain, filter_key(options.get("filter")))
