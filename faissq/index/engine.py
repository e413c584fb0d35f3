"""The FAISS engine: build, upsert, delete, contains, search, merge, rebuild; no Celery, no Redis.

One writer, many readers: every mutation builds a new immutable State under the write lock and
publishes it with one reference assignment, so a search never waits for a build or merge and
always reads one committed state.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import faiss
import numpy as np

from faissq.config import GpuSettings, IndexSettings
from faissq.errors import EmptyBuild, IndexNotReady, InvalidParameter
from faissq.index import tuning
from faissq.index.builder import (
    Progress,
    _noop,
    build_primary,
    imbalance,
    merge_primary,
    metric_type,
)
from faissq.index.delta import Delta
from faissq.index.gpu import GpuCopy, clone_to_gpu, probe
from faissq.index.memory import host_budget, index_bytes, raw_store_bytes
from faissq.index.params import hnsw_of
from faissq.index.policy import Plan, choose_plan
from faissq.index.reader import Reader
from faissq.index.state import Primary, State, union_sorted
from faissq.index.validate import (
    F32,
    I64,
    as_ids,
    as_vectors,
    check_k,
    check_positive,
    check_recall,
)

Cloner = Callable[[Any], tuple[GpuCopy | None, str]]


@dataclass(frozen=True)
class SearchResult:
    """Top-k scores (nq, k) and ids (nq, k; -1 pads) and the state version that answered."""

    scores: F32
    ids: I64
    version: int


@dataclass(frozen=True)
class EngineExport:
    """A consistent, read-only view of the engine for snapshots."""

    dim: int
    metric: str
    plan: dict[str, Any]
    index: Any
    primary_ids: I64
    primary_vectors: F32
    delta_ids: I64
    delta_vectors: F32
    tombstones: I64
    tuning: dict[str, Any] | None


class Engine:
    """One named vector index held in this process's memory."""

    def __init__(
        self,
        dim: int,
        settings: IndexSettings,
        name: str = "default",
        *,
        gpu: GpuSettings | None = None,
        cloner: Cloner | None = None,
    ) -> None:
        """Create an empty engine.

        dim: vector dimension; settings: the index section; name: the index's name;
        gpu: GPU settings (None: CPU only); cloner: replaces clone_to_gpu (tests, custom devices).
        """
        if dim <= 0:
            raise InvalidParameter(f"dim must be > 0, got {dim}")
        self.dim = dim
        self.cfg = settings
        self.name = name
        self.metric = settings.metric
        self._reader = Reader(name, metric_type(settings.metric), settings.metric == "cosine",
                              settings.k_factor)  # fmt: skip
        self._gpu_cfg = gpu
        self._cloner = cloner
        self._write_lock = threading.RLock()
        self._state = State.make(dim, None, Delta(dim), _EMPTY, 0)
        self._tuning: dict[str, Any] | None = None
        self._family_request: str | None = None
        self.last_durations: dict[str, float] = {}

    # ----------------------------------------------------------------- reading
    @property
    def state(self) -> State:
        """The current committed state (immutable)."""
        return self._state

    @property
    def ntotal(self) -> int:
        """Number of live vectors."""
        return self._state.ntotal

    @property
    def version(self) -> int:
        """Counter bumped by every committed mutation."""
        return self._state.version

    @property
    def tuning_profile(self) -> dict[str, Any] | None:
        """The autotune profile in use, if any."""
        return self._tuning

    def contains(self, ids: Any) -> np.ndarray[Any, np.dtype[np.bool_]]:
        """Whether each id is live (vectorised)."""
        return self._state.contains(as_ids(ids, unique=False))

    def search(
        self,
        queries: Any,
        k: int,
        *,
        nprobe: int | None = None,
        ef_search: int | None = None,
        k_factor: int | None = None,
        target_recall: float | None = None,
        allow_ids: Any = None,
        deny_ids: Any = None,
    ) -> SearchResult:
        """Top-k over primary + delta, tombstones excluded, merged by score, ids de-duplicated."""
        st = self._state
        k = check_k(k, self.cfg.max_k)
        nprobe = check_positive("nprobe", nprobe)
        ef_search = check_positive("ef_search", ef_search)
        k_factor = check_positive("k_factor", k_factor)
        target = check_recall(target_recall)
        xq = as_vectors(queries, self.dim, self.metric)
        allow = None if allow_ids is None else np.unique(as_ids(allow_ids, unique=False))
        deny = None if deny_ids is None else np.unique(as_ids(deny_ids, unique=False))
        if nprobe is None and ef_search is None and k_factor is None:
            chosen = tuning.pick(self._tuning, target) if self._tuning else {}
            nprobe = chosen.get("nprobe") or self.cfg.default_nprobe
            ef_search = chosen.get("ef_search") or self.cfg.default_ef_search
            k_factor = chosen.get("k_factor")
        scores, ids = self._reader.top_k(st, xq, k, nprobe, ef_search, k_factor, allow, deny)
        return SearchResult(scores, ids, st.version)

    def range_search(
        self, queries: Any, radius: float, *, nprobe: int | None = None
    ) -> tuple[list[F32], list[I64]]:
        """Every live vector within radius (cosine: score > radius; L2: distance < radius).

        Returns per-query score and id arrays, best first. Exact over the delta; the primary
        answers through FAISS range_search (IVF probes nprobe lists; PQ scores are approximate).
        """
        st = self._state
        nprobe = check_positive("nprobe", nprobe) or self.cfg.default_nprobe
        if isinstance(radius, bool) or not isinstance(radius, float | int):
            raise InvalidParameter(f"radius must be a number, got {type(radius).__name__}")
        xq = as_vectors(queries, self.dim, self.metric)
        return self._reader.within(st, xq, radius, nprobe)

    # ----------------------------------------------------------------- writing
    def build(
        self,
        vectors: Any,
        ids: Any,
        *,
        family: str | None = None,
        progress: Progress | None = None,
        version: int | None = None,
    ) -> dict[str, Any]:
        """Replace the whole index with a fresh build of (ids, vectors); returns a report.

        version: the version the built state carries (the service passes the build's log seq);
        None: the current version + 1.
        """
        progress = progress or _noop
        with self._write_lock:
            new_version = self._next_version(version)
            t0 = time.perf_counter()
            vecs = as_vectors(vectors, self.dim, self.metric)
            id_arr = as_ids(ids, vecs.shape[0])
            if id_arr.size == 0:
                raise EmptyBuild(f"build of index {self.name!r} got no vectors")
            plan = choose_plan(int(id_arr.size), self.dim, self.cfg, host_budget(self.cfg), family)
            order = np.argsort(id_arr, kind="stable")
            id_arr, vecs = id_arr[order], vecs[order]
            primary = build_primary(
                id_arr,
                vecs,
                plan,
                seed=self.cfg.seed,
                ef_construction=self.cfg.ef_construction,
                progress=progress,
            )
            primary = self._with_gpu(primary)
            self._family_request = family
            self._tuning = None
            self._publish(primary, Delta(self.dim), _EMPTY, new_version)
            return self._report("build", t0, primary)

    def upsert(self, ids: Any, vectors: Any, *, version: int | None = None) -> int:
        """Insert or replace vectors by id (into the delta; older primary copies tombstoned).

        version: the version of the new state (the service passes the batch's log seq).
        """
        with self._write_lock:
            new_version = self._next_version(version)
            st = self._state
            vecs = as_vectors(vectors, self.dim, self.metric)
            id_arr = as_ids(ids, vecs.shape[0])
            tomb = _tombstone(st, id_arr)
            delta = st.delta.without(id_arr).appended(id_arr, vecs)
            self._state = State.make(self.dim, st.primary, delta, tomb, new_version, before=st)
            return int(id_arr.size)

    def delete(self, ids: Any, *, version: int | None = None) -> int:
        """Delete ids (tombstone in the primary, drop from the delta); return how many were live."""
        with self._write_lock:
            new_version = self._next_version(version)
            st = self._state
            id_arr = np.unique(as_ids(ids, unique=False))
            live = int(st.contains(id_arr).sum())
            tomb = _tombstone(st, id_arr)
            delta = st.delta.without(id_arr)
            changed = live or tomb is not st.tombstones or delta is not st.delta
            if changed or new_version != st.version:
                self._state = State.make(self.dim, st.primary, delta, tomb, new_version, before=st)
            return live

    def merge(self, progress: Progress | None = None) -> dict[str, Any]:
        """Fold delta and tombstones into a copy of the primary (trained quantizer reused), swap."""
        progress = progress or _noop
        with self._write_lock:
            st = self._state
            t0 = time.perf_counter()
            if st.primary is None:
                if not len(st.delta):
                    raise IndexNotReady(f"index {self.name!r} is empty: nothing to merge")
                return self.build(
                    st.delta.vectors, st.delta.ids, progress=progress, version=st.version
                )
            if st.tombstones.size and hnsw_of(st.primary.index) is not None:
                return self.rebuild(progress)
            primary = merge_primary(
                st.primary, st.tombstones, st.delta.ids, st.delta.vectors, progress
            )
            primary = self._with_gpu(primary)
            self._publish(primary, Delta(self.dim), _EMPTY)
            return self._report("merge", t0, primary)

    def rebuild(
        self, progress: Progress | None = None, family: str | None = None
    ) -> dict[str, Any]:
        """Retrain from the raw vectors of every live id (re-tiering the family when auto)."""
        progress = progress or _noop
        with self._write_lock:
            st = self._state
            t0 = time.perf_counter()
            ids, vecs = st.live_vectors()
            if ids.size == 0:
                raise IndexNotReady(f"index {self.name!r} is empty: nothing to rebuild")
            request = family if family is not None else self._family_request
            plan = choose_plan(int(ids.size), self.dim, self.cfg, host_budget(self.cfg), request)
            order = np.argsort(ids, kind="stable")
            primary = build_primary(
                ids[order],
                vecs[order],
                plan,
                seed=self.cfg.seed,
                ef_construction=self.cfg.ef_construction,
                progress=progress,
            )
            primary = self._with_gpu(primary)
            self._tuning = None
            self._publish(primary, Delta(self.dim), _EMPTY)
            return self._report("rebuild", t0, primary)

    def autotune(
        self,
        *,
        target_recall: float | None = None,
        k: int = 10,
        queries: Any = None,
        num_queries: int = 1000,
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        """Sweep search parameters against exact ground truth; keep and return the profile."""
        target = check_recall(target_recall) or self.cfg.target_recall
        with self._write_lock:
            xq = None if queries is None else as_vectors(queries, self.dim, self.metric)
            profile = tuning.autotune(
                self, target, k, xq, num_queries, self.cfg.seed, progress or _noop
            )
            self._tuning = profile
            return profile

    def set_tuning(self, profile: dict[str, Any] | None) -> None:
        """Install a stored autotune profile (from a snapshot)."""
        self._tuning = profile

    def _next_version(self, version: int | None) -> int:
        """The version a mutation publishes: the given one (never lower), else current + 1."""
        current = self._state.version
        if version is None:
            return current + 1
        if isinstance(version, bool) or not isinstance(version, int) or version < current:
            raise InvalidParameter(f"version {version!r} would move back from {current}")
        return version

    def _publish(
        self, primary: Primary, delta: Delta, tombstones: I64, version: int | None = None
    ) -> None:
        """Swap in a new state with one reference assignment (merges keep the version: the
        live vectors are the same)."""
        version = self._state.version if version is None else version
        self._state = State.make(self.dim, primary, delta, tombstones, version)

    def _with_gpu(self, primary: Primary) -> Primary:
        """Attach a GPU copy when configured and possible; the reason is kept either way."""
        if self._cloner is not None:
            copy, reason = self._cloner(primary.index)
        elif self._gpu_cfg is None:
            return primary
        else:
            need = index_bytes(primary.plan)
            copy, reason = clone_to_gpu(primary.index, self._gpu_cfg, _probe_once(), need)
        return replace(primary, gpu=copy, gpu_reason=reason)

    def _report(self, op: str, t0: float, primary: Primary) -> dict[str, Any]:
        """The small dict a build/merge/rebuild returns."""
        seconds = time.perf_counter() - t0
        self.last_durations[op] = seconds
        plan = primary.plan
        return {
            "op": op,
            "family": plan.family,
            "factory": plan.factory,
            "reason": plan.reason,
            "ntotal": self.ntotal,
            "estimate_bytes": plan.estimate_bytes,
            "seconds": round(seconds, 4),
            "version": self.version,
            "device": primary.gpu_reason,
        }

    # ------------------------------------------------------------ maintenance
    def maintenance(self) -> dict[str, Any]:
        """Whether a merge or a rebuild is due, and why."""
        st = self._state
        reasons: list[str] = []
        merge_due = len(st.delta) >= self.cfg.merge_delta_max
        if merge_due:
            reasons.append(f"delta {len(st.delta)} >= merge_delta_max {self.cfg.merge_delta_max}")
        rebuild_due = False
        if st.primary is not None:
            imb = imbalance(st.primary.index)
            if imb > self.cfg.imbalance_rebuild:
                rebuild_due = True
                reasons.append(f"IVF imbalance {imb:.2f} > {self.cfg.imbalance_rebuild}")
            if (self._family_request or self.cfg.family) == "auto":
                fam = choose_plan(st.ntotal, self.dim, self.cfg, 1 << 62).family
                if fam != st.primary.plan.family:
                    rebuild_due = True
                    reasons.append(f"{st.ntotal} vectors now call for {fam}")
        return {"merge_due": merge_due, "rebuild_due": rebuild_due, "reasons": reasons}

    def stats(self) -> dict[str, Any]:
        """Actual state, for the stats task, metrics and status."""
        st = self._state
        p = st.primary
        plan = p.plan if p is not None else None
        return {
            "name": self.name,
            "dim": self.dim,
            "metric": self.metric,
            "family": plan.family if plan else None,
            "factory": plan.factory if plan else None,
            "ntotal": st.ntotal,
            "primary": int(p.ids.size) if p is not None else 0,
            "delta": len(st.delta),
            "tombstones": int(st.tombstones.size),
            "version": st.version,
            "imbalance": imbalance(p.index) if p is not None else 1.0,
            "device": p.gpu_reason if p is not None else "CPU",
            "gpu": p is not None and p.gpu is not None,
            "gpu_failures": p.gpu.failures if p is not None and p.gpu is not None else 0,
            "raw_bytes": raw_store_bytes(int(p.ids.size), self.dim) if p is not None else 0,
            "delta_bytes": st.delta.nbytes,
            "delta_dead": st.delta.dead,
            "tuning": None if self._tuning is None else self._tuning.get("chosen"),
            **self.maintenance(),
        }

    # ---------------------------------------------------------------- export
    def export(self) -> EngineExport:
        """A consistent view of the current state for snapshots (arrays are not copied)."""
        st = self._state
        p = st.primary
        return EngineExport(
            dim=self.dim,
            metric=self.metric,
            plan=p.plan.to_dict() if p is not None else {},
            index=p.index if p is not None else None,
            primary_ids=p.ids if p is not None else _EMPTY,
            primary_vectors=p.vectors if p is not None else np.empty((0, self.dim), np.float32),
            delta_ids=st.delta.ids,
            delta_vectors=st.delta.vectors,
            tombstones=st.tombstones,
            tuning=self._tuning,
        )

    @classmethod
    def from_export(
        cls,
        exp: EngineExport,
        settings: IndexSettings,
        name: str = "default",
        *,
        gpu: GpuSettings | None = None,
        cloner: Cloner | None = None,
        version: int = 0,
    ) -> Engine:
        """Recreate an engine from an export (e.g. a loaded snapshot covering log seq `version`)."""
        eng = cls(
            exp.dim,
            settings.model_copy(update={"metric": exp.metric}),
            name,
            gpu=gpu,
            cloner=cloner,
        )
        primary = None
        if exp.index is not None:
            ids, vecs = exp.primary_ids, exp.primary_vectors
            if ids.size > 1 and not bool(np.all(ids[1:] > ids[:-1])):
                order = np.argsort(ids, kind="stable")
                ids, vecs = ids[order], vecs[order]
            # sorted arrays (what export() writes) are used as given: a memory-mapped .npy
            # stays mapped, so a restart does not copy the raw store
            primary = Primary(
                index=exp.index,
                ids=np.asarray(ids, dtype=np.int64),
                vectors=np.asarray(vecs, dtype=np.float32),
                plan=Plan.from_dict(exp.plan),
            )
            primary = eng._with_gpu(primary)
        delta = Delta(exp.dim).appended(
            np.asarray(exp.delta_ids, dtype=np.int64),
            np.asarray(exp.delta_vectors, dtype=np.float32).reshape(-1, exp.dim),
        )
        tomb = np.unique(np.asarray(exp.tombstones, dtype=np.int64))
        eng._state = State.make(exp.dim, primary, delta, tomb, version)
        eng._tuning = exp.tuning
        return eng


_EMPTY: I64 = np.empty(0, dtype=np.int64)
_PROBE: list[Any] = []


def _probe_once() -> Any:
    """Probe the GPU once per process (the answer does not change while it runs)."""
    if not _PROBE:
        _PROBE.append(probe())
    return _PROBE[0]


def _tombstone(st: State, ids: I64) -> I64:
    """The state's tombstones plus those of ids that have a copy in the primary."""
    if st.primary is None or ids.size == 0:
        return st.tombstones
    in_primary = st.primary.rows_of(ids) >= 0
    return union_sorted(st.tombstones, ids[in_primary]) if in_primary.any() else st.tombstones


def faiss_version() -> str:
    """The faiss library version this engine runs on."""
    return str(faiss.__version__)
