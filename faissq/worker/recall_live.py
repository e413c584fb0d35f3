"""Live recall: sample the searches a worker serves; check them by exact search in the background.

The RPC loop hands each turn's answered outcomes to `IndexSampler.offer`, which keeps a
`recall.sample_rate` fraction of the query vectors (a geometric skip: O(1) per request) in a ring
of at most `recall.ring_size`, with their k, the setting they ran with and the ids served. One
thread (`LiveRecall`) computes their exact top-k from the raw vectors at nice `recall.nice`, on
one OpenMP thread, and sleeps after each batch so that its CPU time stays within
`recall.cpu_fraction` of one core: searches are never delayed by it beyond that share. Only
plain top-k searches are sampled (no filters, range searches, fetches or later pages).

The ring's queries are also what autotune and the publish gate measure on (faissq.worker.publish).
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from faissq.config import RecallSettings
from faissq.errors import FaissqError
from faissq.index import drift, recall_gate, tuning
from faissq.index.engine import Engine
from faissq.index.validate import F32, I64

log = logging.getLogger(__name__)

BATCH = 16  # queries per pass over the vectors: one read of the raw store serves them all
IDLE_S = 1.0  # longest wait for new samples (bounds how late stop() is seen)
ADDED_ROWS = 2_048  # newly added vectors kept per index for the drift measure
ADDED_PER_BATCH = 64  # of which at most this many from one upsert batch


@dataclass
class Sample:
    """One sampled query vector, how it was searched and, once checked, its recall."""

    query: F32  # (dim,) as the client sent it (exact top-k ranks alike unnormalised under IP)
    k: int
    setting: recall_gate.Setting
    label: str
    version: int  # the state version that answered
    found: I64  # (k,) the ids served
    recall: float | None = None


class IndexSampler:
    """The sampled queries of one index and their checks."""

    def __init__(
        self, index: str, engine: Callable[[], Engine], cfg: RecallSettings, wake: threading.Event
    ) -> None:
        """engine: returns the engine serving now (raises IndexNotReady while there is none)."""
        self.index = index
        self.engine = engine
        self.cfg = cfg
        self._wake = wake
        self._ring: deque[Sample] = deque(maxlen=cfg.ring_size)
        self._lock = threading.Lock()
        self._rand = random.Random()  # the search loop's
        self._rand_added = random.Random()  # the writer's (note_added)
        self._skip = self._gap()
        self.sampled = 0
        self.evaluated = 0
        self.cpu_seconds = 0.0
        self.drift: dict[str, Any] | None = None
        self._added: deque[F32] = deque(maxlen=ADDED_ROWS)
        self.next_drift = 0.0  # monotonic time of the next drift measure

    def _gap(self) -> int:
        """Rows to pass over before the next sample: geometric, mean 1 / sample_rate."""
        rate = self.cfg.sample_rate
        if rate >= 1.0:
            return 0
        if rate <= 0.0:
            return 1 << 62
        return int(math.log(1.0 - self._rand.random()) / math.log(1.0 - rate))

    def offer(self, outcomes: Iterable[Any]) -> None:
        """Keep the sampled rows of a turn's answered outcomes (the RPC thread; cheap)."""
        for out in outcomes:
            ids, req = out.ids, out.request
            if ids is None or not _plain(req):
                continue
            row, n = self._skip, int(ids.shape[0])
            while row < n:
                self._take(out, row)
                row += 1 + self._gap()
            self._skip = row - n

    def _take(self, out: Any, row: int) -> None:
        """Record one row of an outcome as a sample."""
        req = out.request
        try:
            eng = self.engine()
            setting = recall_gate.resolve(eng, req.nprobe, req.ef_search, req.k_factor,
                                          req.target_recall)  # fmt: skip
        except FaissqError:
            return
        query = np.array(req.queries[row], dtype=np.float32)
        sample = Sample(query, int(req.k), setting, recall_gate.label(int(req.k), setting),
                        int(out.version), np.array(out.ids[row], dtype=np.int64))  # fmt: skip
        with self._lock:
            if self._ring and self._ring[-1].query.shape != query.shape:
                self._ring.clear()  # a build changed the dimension: older queries mean nothing
            self._ring.append(sample)
            self.sampled += 1
        self._wake.set()

    def note_added(self, vectors: F32) -> None:
        """Keep a few rows of an upserted batch for the drift measure (the writer's thread)."""
        n = int(vectors.shape[0])
        rows = self._rand_added.sample(range(n), min(n, ADDED_PER_BATCH))
        with self._lock:
            self._added.extend(np.array(vectors[r], dtype=np.float32) for r in rows)

    def check_drift(self) -> None:
        """Measure IVF drift of the kept added rows against the serving primary's training."""
        self.next_drift = time.monotonic() + self.cfg.drift_interval_s
        try:
            eng = self.engine()
        except FaissqError:
            return
        primary = eng.state.primary
        with self._lock:
            rows = [r for r in self._added if r.shape[0] == eng.dim]  # a build may change dim
        if primary is None or not primary.plan.is_ivf:
            self.drift = None
            return
        added = np.stack(rows) if rows else np.empty((0, eng.dim), dtype=np.float32)
        if eng.metric == "cosine" and rows:
            added /= np.maximum(np.linalg.norm(added, axis=1, keepdims=True), 1e-12)
        self.drift = drift.measure(primary, added, self.cfg.drift_ratio,
                                   eng.cfg.imbalance_rebuild) or None  # fmt: skip

    def pending(self) -> list[Sample]:
        """Unchecked samples, oldest first, at most one batch."""
        with self._lock:
            return [s for s in self._ring if s.recall is None][:BATCH]

    def check(self) -> int:
        """Check one batch of samples by exact search; how many were checked."""
        todo = self.pending()
        if not todo:
            return 0
        try:
            eng = self.engine()
        except FaissqError:
            return 0
        st = eng.state
        if any(s.query.shape[0] != eng.dim for s in todo):  # the index changed its dimension
            with self._lock:
                self._ring.clear()
            return 0
        queries = np.ascontiguousarray(np.stack([s.query for s in todo]))
        truth = recall_gate.exact_top(eng, st, queries, max(s.k for s in todo))
        for i, s in enumerate(todo):
            found = s.found
            if s.version != st.version:  # the state changed since: search it as it is now
                found = eng.search(s.query[None], s.k, **s.setting).ids[0]
            got = recall_gate.recall_rows(found[None], truth[i : i + 1], np.array([s.k]))
            s.recall = float(got[0])
        with self._lock:
            self.evaluated += len(todo)
        return len(todo)

    def queries(self) -> tuple[F32, npt.NDArray[np.int64]]:
        """Every sampled query in the ring (checked or not) and its k, oldest first."""
        with self._lock:
            items = list(self._ring)
        if not items:
            return np.empty((0, 0), dtype=np.float32), np.empty(0, dtype=np.int64)
        return (np.ascontiguousarray(np.stack([s.query for s in items])),
                np.array([s.k for s in items], dtype=np.int64))  # fmt: skip

    def summary(self) -> dict[str, Any]:
        """Recall per setting over the checked samples of the ring, counters and backlog."""
        with self._lock:
            items = list(self._ring)
            sampled, evaluated, cpu = self.sampled, self.evaluated, self.cpu_seconds
        by: dict[str, list[float]] = {}
        for s in items:
            if s.recall is not None:
                by.setdefault(s.label, []).append(s.recall)
        ranked = sorted(by, key=lambda lb: -len(by[lb]))
        cap = self.cfg.max_params
        keep = cap if len(ranked) <= cap else cap - 1  # the last series is "other"
        params: dict[str, list[float]] = {lb: by[lb] for lb in ranked[:keep]}
        rest = [r for lb in ranked[keep:] for r in by[lb]]
        if rest:
            params["other"] = rest
        done = sum(len(v) for v in by.values())
        return {
            "sample_rate": self.cfg.sample_rate,
            "sampled": sampled,
            "evaluated": evaluated,
            "cpu_seconds": round(cpu, 6),
            "ring": len(items),
            "backlog": len(items) - done,
            "params": {lb: _row(v) for lb, v in params.items()},
            "drift": self.drift,
        }


def _plain(req: Any) -> bool:
    """Whether a request is a plain top-k search from rank 0: what an exact top-k checks.

    Filtered searches (allow/deny ids, attribute filters) have another truth; range searches,
    fetches and later pages (offset) answer other questions.
    """
    return (req.allow_ids is None and req.deny_ids is None and getattr(req, "filter", None) is None
            and getattr(req, "kind", "knn") == "knn" and not getattr(req, "offset", 0))  # fmt: skip


def _row(recalls: list[float]) -> dict[str, Any]:
    """Mean, lower bound and count of per-query recalls."""
    per = np.asarray(recalls)
    return {"recall": round(float(per.mean()), 4), "recall_lo": round(tuning.lower_bound(per), 4),
            "samples": int(per.size)}  # fmt: skip


class LiveRecall:
    """The samplers of a worker's indexes and the one low-priority thread that checks them."""

    def __init__(
        self, cfg: RecallSettings, engines: Callable[[str], Engine], indexes: tuple[str, ...] = ()
    ) -> None:
        """engines: the runtime's `engine(name)`; indexes: samplers made now (more: sampler_for)."""
        self.cfg = cfg
        self._engines = engines
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.samplers = {
            name: IndexSampler(name, _bind(engines, name), cfg, self._wake) for name in indexes
        }
        self._thread: threading.Thread | None = None

    def sampler_for(self, index: str) -> IndexSampler:
        """The sampler of an index, made when the index is added (a new dict: the checking
        thread iterates the old one meanwhile)."""
        if index not in self.samplers:
            made = IndexSampler(index, _bind(self._engines, index), self.cfg, self._wake)
            self.samplers = {**self.samplers, index: made}
        return self.samplers[index]

    def start(self) -> LiveRecall:
        """Start the checking thread (it measures IVF drift even when sampling is off)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="faissq-recall", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread; samples are dropped with the process."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        """Check batches while there are samples; sleep to keep within the CPU share."""
        _lower_priority(self.cfg.nice)
        while not self._stop.is_set():
            did = 0
            for sampler in list(self.samplers.values()):
                t0 = time.thread_time()
                try:
                    if time.monotonic() >= sampler.next_drift:
                        sampler.check_drift()
                    n = sampler.check()
                except Exception:  # a bug here must never reach the search path
                    log.exception("recall %s: checking samples failed", sampler.index)
                    n = 0
                spent = time.thread_time() - t0
                with sampler._lock:
                    sampler.cpu_seconds += spent
                did += n
                self._budget(spent)
            if did:
                continue
            self._wake.wait(IDLE_S)
            self._wake.clear()

    def _budget(self, spent: float) -> None:
        """Sleep so that `spent` CPU seconds are at most cpu_fraction of the time passed."""
        if spent > 0:
            self._stop.wait(spent * (1.0 / self.cfg.cpu_fraction - 1.0))


def _bind(engines: Callable[[str], Engine], name: str) -> Callable[[], Engine]:
    """engines(name) as a thunk: the engine serving that index at each call."""
    return lambda: engines(name)


def _lower_priority(nice: int) -> None:
    """This thread only: lowest CPU priority and one OpenMP thread for its FAISS calls."""
    import faiss

    faiss.omp_set_num_threads(1)  # per thread in libgomp: the search threads keep theirs
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, max(nice, os.getpriority(os.PRIO_PROCESS, tid)))
    except (OSError, AttributeError) as exc:
        log.debug("recall: priority unchanged: %s", exc)


_BY_RUNTIME: weakref.WeakKeyDictionary[Any, LiveRecall] = weakref.WeakKeyDictionary()


def attach_recall(runtime: Any, live: LiveRecall) -> None:
    """Make `live` the live recall of `runtime` (the worker's IndexRuntime)."""
    _BY_RUNTIME[runtime] = live


def recall_of(runtime: Any) -> LiveRecall | None:
    """The live recall attached to runtime (None: the RPC loops have not started)."""
    return _BY_RUNTIME.get(runtime)
