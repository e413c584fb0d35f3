"""The FAISS engine: build, upsert, delete, contains, search, merge, rebuild; no Celery, no Redis.

One writer, many readers: every mutation builds a new immutable State under the write lock and
publishes it with one reference assignment, so a search never waits for a build or merge and
always reads one committed state.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from typing import Any

import numpy as np

from faissq.config import GpuSettings, IndexSettings
from faissq.errors import EmptyBuild, IndexNotReady, InvalidParameter
from faissq.index import tuning, upkeep
from faissq.index.attributes import AttrTable, check_batch, check_schema
from faissq.index.builder import Progress, _noop, build_primary, merge_primary, metric_type
from faissq.index.calibrate import sample_calibrator
from faissq.index.delta import Delta
from faissq.index.export import EngineExport, export_state, restore_parts
from faissq.index.filters import filtered_allow
from faissq.index.live import attach, unmerged
from faissq.index.memory import host_budget
from faissq.index.params import hnsw_of
from faissq.index.placement import Cloner, gpu_budget, with_gpu
from faissq.index.policy import choose_plan
from faissq.index.reader import Reader
from faissq.index.results import SearchResult
from faissq.index.state import Primary, State
from faissq.index.validate import (
    F32,
    I64,
    as_ids,
    as_vectors,
    check_k,
    check_positive,
    check_recall,
)


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
        gpu: GPU settings (None: CPU only); cloner: replaces clone_to_gpu (tests, own devices)."""
        if dim <= 0:
            raise InvalidParameter(f"dim must be > 0, got {dim}")
        self.dim = dim
        self.cfg = settings
        self.name = name
        self.metric = settings.metric
        self._reader = Reader(name, metric_type(settings.metric), settings.metric == "cosine",
                              settings.k_factor, settings.filter_exact_rows)  # fmt: skip
        self._gpu_cfg = gpu
        self._cloner = cloner
        self._write_lock = threading.RLock()
        self.schema = check_schema(settings.attributes)
        attrs = AttrTable(self.schema) if self.schema else None
        self._state = State.make(dim, None, Delta(dim), _EMPTY, 0, attrs=attrs)
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
        filter: Any = None,
    ) -> SearchResult:
        """Top-k over primary + delta, tombstones excluded, merged by score, ids de-duplicated.

        filter: a condition on attribute fields (faissq.index.filters); the top-k is exact with
        respect to it (FAISS skips the rows it refuses; few passing rows are scanned exactly).
        """
        st = self._state
        k = check_k(k, self.cfg.max_k)
        nprobe = check_positive("nprobe", nprobe)
        ef_search = check_positive("ef_search", ef_search)
        k_factor = check_positive("k_factor", k_factor)
        target = check_recall(target_recall)
        xq = as_vectors(queries, self.dim, self.metric)
        allow = None if allow_ids is None else np.unique(as_ids(allow_ids, unique=False))
        deny = None if deny_ids is None else np.unique(as_ids(deny_ids, unique=False))
        if filter is not None:
            allow = filtered_allow(st.attrs, self.schema, filter, allow)
        nprobe, ef_search, k_factor, met = tuning.fill(
            self._tuning, target, nprobe, ef_search, k_factor, self.cfg
        )
        scores, ids = self._reader.top_k(st, xq, k, nprobe, ef_search, k_factor, allow, deny)
        return SearchResult(scores, ids, st.version, met)

    def range_search(
        self, queries: Any, radius: float, *, nprobe: int | None = None, filter: Any = None
    ) -> tuple[list[F32], list[I64]]:
        """Every live vector within radius (cosine: score > radius; L2: distance < radius) that
        passes `filter` (as for search), per query: scores and ids, best first. Exact over the
        delta; the primary answers through FAISS range_search (IVF probes nprobe lists)."""
        st = self._state
        nprobe = check_positive("nprobe", nprobe) or self.cfg.default_nprobe
        if isinstance(radius, bool) or not isinstance(radius, float | int):
            raise InvalidParameter(f"radius must be a number, got {type(radius).__name__}")
        xq = as_vectors(queries, self.dim, self.metric)
        allow = None if filter is None else filtered_allow(st.attrs, self.schema, filter, None)
        return self._reader.within(st, xq, radius, nprobe, allow)

    # ----------------------------------------------------------------- writing
    def build(
        self,
        vectors: Any,
        ids: Any,
        *,
        family: str | None = None,
        progress: Progress | None = None,
        version: int | None = None,
        centroids: F32 | None = None,
        attributes: Any = None,
    ) -> dict[str, Any]:
        """Replace the whole index with a fresh build of (ids, vectors); returns a report.

        version: the version the built state carries (the service passes the build's log seq);
        None: the current version + 1. centroids: an IVF family's coarse centroids (not trained).
        attributes: the rows' attribute columns ({field: values}; absent fields are null).
        """
        progress = progress or _noop
        with self._write_lock:
            new_version = self._next_version(version)
            t0 = time.perf_counter()
            arr = np.asarray(vectors)
            # shape, dtype and dimension up front; every row is checked as it streams in
            as_vectors(arr[:1] if arr.ndim == 2 else arr, self.dim, self.metric)
            id_arr = as_ids(ids, arr.shape[0])
            if id_arr.size == 0:
                raise EmptyBuild(f"build of index {self.name!r} got no vectors")
            batch = check_batch(self.schema, attributes, int(id_arr.size))
            primary = self._build(id_arr, arr, family, progress, self._prepare, centroids)
            self._family_request = family
            self._tuning = None
            attrs = self._state.attrs
            attrs = attrs.built(id_arr, batch) if attrs is not None else None
            self._publish(primary, Delta(self.dim), _EMPTY, new_version, attrs)
            return self._report("build", t0, primary)

    def upsert(
        self, ids: Any, vectors: Any, *, version: int | None = None, attributes: Any = None
    ) -> int:
        """Insert or replace vectors by id (into the delta; older primary copies tombstoned).

        version: the version of the new state (the service passes the batch's log seq);
        attributes: the rows' attribute columns (absent fields are null; replaces old values).
        """
        with self._write_lock:
            new_version = self._next_version(version)
            st = self._state
            vecs = as_vectors(vectors, self.dim, self.metric)
            id_arr = as_ids(ids, vecs.shape[0])
            batch = check_batch(self.schema, attributes, int(id_arr.size))
            attrs = st.attrs.upserted(id_arr, batch) if st.attrs is not None else None
            tomb = st.tombstoned(id_arr)
            p = st.primary
            lists = p.lists_of(vecs) if p is not None else None
            coarse = p.serial if p is not None else None
            delta = st.delta.without(id_arr).appended(id_arr, vecs, lists, coarse)
            new = State.make(self.dim, st.primary, delta, tomb, new_version, before=st, attrs=attrs)
            if p is not None and p.live is not None and lists is not None:
                p.live.put(id_arr, vecs, lists)
            self._state = new
            return int(id_arr.size)

    def delete(self, ids: Any, *, version: int | None = None) -> int:
        """Delete ids (tombstone in the primary, drop from the delta); return how many were live."""
        with self._write_lock:
            new_version = self._next_version(version)
            st = self._state
            id_arr = np.unique(as_ids(ids, unique=False))
            live = int(st.contains(id_arr).sum())
            tomb = st.tombstoned(id_arr)
            delta = st.delta.without(id_arr)
            changed = live or tomb is not st.tombstones or delta is not st.delta
            if changed or new_version != st.version:
                attrs = st.attrs.without(id_arr) if st.attrs is not None else None
                new = State.make(self.dim, st.primary, delta, tomb, new_version, before=st,
                                 attrs=attrs)  # fmt: skip
                if st.primary is not None and st.primary.live is not None:
                    st.primary.live.remove(id_arr)
                self._state = new
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
                report = self.build(
                    st.delta.vectors, st.delta.ids, progress=progress, version=st.version
                )
                self._state = replace(self._state, attrs=st.attrs)  # the same rows: same values
                return report
            if st.tombstones.size and hnsw_of(st.primary.index) is not None:
                return self.rebuild(progress)
            delta = st.delta
            primary = merge_primary(
                st.primary, st.tombstones, delta.ids, delta.vectors, progress, self.cfg.raw_dir
            )
            primary = with_gpu(primary, self._gpu_cfg, self._cloner)
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
            primary = self._build(ids, vecs, request, progress, np.ascontiguousarray)
            self._tuning = None
            self._publish(primary, Delta(self.dim), _EMPTY)
            return self._report("rebuild", t0, primary)

    def autotune(self, *, target_recall: float | None = None, k: int = 10, queries: Any = None,
                 num_queries: int = 1000, progress: Progress | None = None,
                 source: str | None = None) -> dict[str, Any]:  # fmt: skip
        """Sweep search parameters against exact ground truth; keep and return the profile.

        source: what the queries are, recorded in the profile (default: synthetic or given).
        """
        target = check_recall(target_recall) or self.cfg.target_recall
        with self._write_lock:
            xq = None if queries is None else as_vectors(queries, self.dim, self.metric)
            profile = tuning.autotune(
                self, target, k, xq, num_queries, self.cfg.seed, progress or _noop, source
            )
            self._tuning = profile
            return profile

    def sweep(self, queries: Any, k: int, target_recall: float | None = None,
              progress: Progress | None = None) -> dict[str, Any]:  # fmt: skip
        """This index's part of a sharded autotune (tuning.sweep); installs nothing."""
        target = check_recall(target_recall) or self.cfg.target_recall
        with self._write_lock:
            xq = as_vectors(queries, self.dim, self.metric)
            return tuning.sweep(self, xq, check_k(k, self.cfg.max_k), target, progress or _noop)

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
        self, primary: Primary, delta: Delta, tombstones: I64, version: int | None = None,
        attrs: AttrTable | None = None,
    ) -> None:  # fmt: skip
        """Swap in a new state with one reference assignment (merges keep the version and the
        attributes: the live vectors are the same)."""
        version = self._state.version if version is None else version
        attrs = attrs if attrs is not None else self._state.attrs
        primary = attach(primary, delta, tombstones, self.cfg.live_lists)
        self._state = State.make(self.dim, primary, delta, tombstones, version, attrs=attrs)

    def _prepare(self, rows: Any) -> F32:
        """Check one chunk of build input (normalised under cosine; no copy when ready)."""
        return as_vectors(rows, self.dim, self.metric, copy=False)

    def _build(
        self, ids: I64, vectors: Any, family: str | None, progress: Progress, prepare: Any,
        centroids: F32 | None = None,
    ) -> Primary:  # fmt: skip
        """Plan (calibrating when auto must choose) and stream a fresh primary."""
        plan = choose_plan(int(ids.size), self.dim, self.cfg, host_budget(self.cfg), family,
                           calibrator=sample_calibrator(vectors, self.cfg, prepare, progress),
                           gpu_budget=gpu_budget(self._gpu_cfg, self._cloner))  # fmt: skip
        primary = build_primary(ids, vectors, plan, seed=self.cfg.seed,
                                ef_construction=self.cfg.ef_construction, progress=progress,
                                prepare=prepare, raw_dir=self.cfg.raw_dir,
                                chunk=self.cfg.add_chunk, centroids=centroids)  # fmt: skip
        return with_gpu(primary, self._gpu_cfg, self._cloner)

    def _report(self, op: str, t0: float, primary: Primary) -> dict[str, Any]:
        """The small dict a build/merge/rebuild returns."""
        self.last_durations[op] = seconds = time.perf_counter() - t0
        return upkeep.report(self, op, seconds, primary)

    # ------------------------------------------------------ maintenance, export
    @property
    def family_request(self) -> str:
        """The family the last build asked for (the settings' family when it named none)."""
        return self._family_request or self.cfg.family

    def maintenance(self) -> dict[str, Any]:
        """Whether a merge or a rebuild is due, and why."""
        return upkeep.maintenance(self)

    def stats(self) -> dict[str, Any]:
        """Actual state, for the stats task, metrics and status."""
        return upkeep.stats(self)

    def export(self) -> EngineExport:
        """A consistent view of the state for snapshots, arrays not copied (live.unmerged)."""
        with self._write_lock:
            if unmerged(self._state):
                self.merge()
            return export_state(self._state, self.metric, self._tuning)

    def attributes_of(self, ids: Any) -> dict[str, list[Any]]:
        """Each declared field's value per id (None: null or not live); {} without fields."""
        attrs = self._state.attrs
        return {} if attrs is None else attrs.values_of(as_ids(ids, unique=False))

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
        eng = cls(exp.dim, settings.model_copy(update={"metric": exp.metric}), name, gpu=gpu,
                  cloner=cloner)  # fmt: skip
        primary, delta, tomb = restore_parts(exp)
        if primary is not None:
            primary = attach(with_gpu(primary, gpu, cloner), delta, tomb, settings.live_lists)
        st = State.make(exp.dim, primary, delta, tomb, version)
        attrs = eng._state.attrs
        if attrs is not None:  # live ids a snapshot holds no values for are null
            saved = AttrTable.from_bytes(eng.schema, exp.attributes) if exp.attributes else attrs
            attrs = saved.covering(st.live_ids())
        eng._state = replace(st, attrs=attrs)
        eng._tuning = exp.tuning
        return eng


_EMPTY: I64 = np.empty(0, dtype=np.int64)
