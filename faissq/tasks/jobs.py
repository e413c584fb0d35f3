"""The faissq Celery tasks: check the payload, call the runtime, return a small dict.

Task names and keyword arguments are a public contract (docs/tasks.md): upstream services enqueue
with ``send_task("faissq.upsert", kwargs=..., queue="faissq.<index>")`` without importing faissq.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from celery import Celery

from faissq.config import Settings
from faissq.errors import DimensionMismatch, InvalidParameter, InvalidVectors
from faissq.tasks import payload
from faissq.tasks.base import FaissqTask
from faissq.tasks.control import CONTROL_TASKS
from faissq.worker import publish
from faissq.worker.maintenance import Maintenance, maintenance_of

SWEEP_QUERIES = 1000  # calibration queries of a sharded autotune (Engine.autotune's default)
MAX_SWEEP_QUERIES = 100_000


def build(
    self: FaissqTask,
    index: str,
    vectors: Any = None,
    vectors_ref: Any = None,
    ids: Any = None,
    ids_ref: Any = None,
    family: Any = None,
    time_limit_s: Any = None,
    force: Any = None,
    centroids: Any = None,
    centroids_ref: Any = None,
    attributes: Any = None,
    attributes_ref: Any = None,
) -> dict[str, Any]:
    """Build the index from scratch (ids default to 0..n-1), snapshot it, then swap it in.

    force: swap it in even when the recall gate refuses it (logged); centroids(_ref): an IVF
    family's coarse centroids, used instead of training them (a sharded build's shared ones);
    attributes(_ref): the rows' attribute columns, saved in the build's snapshot.
    """
    ctx = self.context()
    ctx.runtime.slot(index)
    cfg = ctx.settings
    limit = payload.time_limit_arg(time_limit_s, cfg.worker.job_time_limit_s)
    family = payload.optional_str("family", family)
    forced = payload.flag_arg("force", force)
    vecs = payload.vectors_arg(vectors, vectors_ref, root=cfg.storage.url,
                               inline_max_bytes=cfg.worker.inline_max_bytes)  # fmt: skip
    if ids is None and ids_ref is None:
        id_arr = np.arange(len(vecs), dtype=np.int64)
    else:
        id_arr = payload.ids_arg(ids, ids_ref, root=cfg.storage.url, n=len(vecs))
    cents = None
    if centroids is not None or centroids_ref is not None:
        cents = payload.vectors_arg(centroids, centroids_ref, root=cfg.storage.url,
                                    inline_max_bytes=cfg.worker.inline_max_bytes)  # fmt: skip
        if cents.shape[1] != vecs.shape[1]:
            raise DimensionMismatch(f"centroids have dimension {cents.shape[1]}, not "
                                    f"{vecs.shape[1]}")  # fmt: skip
    attrs = payload.attributes_arg(attributes, attributes_ref, root=cfg.storage.url)
    return ctx.runtime.build(index, vecs, id_arr, family=family, progress=self.progress(limit),
                             force=forced, centroids=cents, attributes=attrs)  # fmt: skip


def upsert(
    self: FaissqTask,
    index: str,
    ids: Any = None,
    vectors: Any = None,
    vectors_ref: Any = None,
    ids_ref: Any = None,
    batch_id: Any = None,
    attributes: Any = None,
    attributes_ref: Any = None,
) -> dict[str, Any]:
    """Insert or replace vectors by id; logged before applied, a known batch_id is a no-op.

    attributes(_ref): the rows' attribute columns (fields left out are null), logged with them.
    """
    ctx = self.context()
    slot = ctx.runtime.slot(index)
    cfg = ctx.settings
    bid = payload.batch_id_arg(batch_id, self.request.id)
    vecs = payload.vectors_arg(vectors, vectors_ref, root=cfg.storage.url,
                               inline_max_bytes=cfg.worker.inline_max_bytes)  # fmt: skip
    id_arr = payload.ids_arg(ids, ids_ref, root=cfg.storage.url, n=len(vecs))
    attrs = payload.attributes_arg(attributes, attributes_ref, root=cfg.storage.url)
    metric = (slot.cfg or cfg.index).metric  # its own when created at runtime
    return ctx.runtime.apply(
        index, "upsert", id_arr, vecs, bid,
        check=lambda eng: check_vectors(vecs, eng, metric, slot.dim), attributes=attrs,
    )  # fmt: skip


def delete(
    self: FaissqTask, index: str, ids: Any = None, ids_ref: Any = None, batch_id: Any = None
) -> dict[str, Any]:
    """Delete vectors by id (unknown ids are ignored); logged before applied."""
    ctx = self.context()
    ctx.runtime.slot(index)
    bid = payload.batch_id_arg(batch_id, self.request.id)
    id_arr = payload.ids_arg(ids, ids_ref, root=ctx.settings.storage.url, n=None)
    return ctx.runtime.apply(index, "delete", id_arr, None, bid, check=lambda eng: None)


def merge(self: FaissqTask, index: str, time_limit_s: Any = None) -> dict[str, Any]:
    """Fold the delta and tombstones into the primary index, re-using the trained quantizer."""
    ctx = self.context()
    limit = payload.time_limit_arg(time_limit_s, ctx.settings.worker.job_time_limit_s)
    return ctx.runtime.merge(index, self.progress(limit))


def rebuild(
    self: FaissqTask, index: str, family: Any = None, time_limit_s: Any = None, force: Any = None
) -> dict[str, Any]:
    """Retrain and rebuild the primary from the raw vectors (after drift or imbalance), then
    snapshot it so a restart keeps it.

    force: swap it in even when the recall gate refuses it (logged).
    """
    ctx = self.context()
    limit = payload.time_limit_arg(time_limit_s, ctx.settings.worker.job_time_limit_s)
    family = payload.optional_str("family", family)
    forced = payload.flag_arg("force", force)
    return ctx.runtime.rebuild(index, family, self.progress(limit), forced)


def save(self: FaissqTask, index: str) -> dict[str, Any]:
    """Write a snapshot of the live index; the log it covers can then be truncated."""
    return self.context().runtime.save(index)


def reload(self: FaissqTask, index: str) -> dict[str, Any]:
    """Reload the index from storage (snapshot + log) and swap it in."""
    return self.context().runtime.reload(index)


def autotune(
    self: FaissqTask,
    index: str,
    target_recall: Any = None,
    time_limit_s: Any = None,
    profile: Any = None,
) -> dict[str, Any]:
    """Choose the fastest search parameters meeting the target recall; snapshot; the profile.

    profile: install this tuning profile as it is (a sharded autotune's, on every shard).
    """
    from faissq.index.validate import check_recall

    ctx = self.context()
    limit = payload.time_limit_arg(time_limit_s, ctx.settings.worker.job_time_limit_s)
    target = check_recall(target_recall)
    given = payload.profile_arg(profile)
    return ctx.runtime.autotune(index, target, self.progress(limit), given)


def sweep(
    self: FaissqTask,
    index: str,
    queries: Any = None,
    queries_ref: Any = None,
    k: Any = None,
    num_queries: Any = None,
    target_recall: Any = None,
    time_limit_s: Any = None,
) -> dict[str, Any]:
    """One shard's part of a sharded autotune: with queries, its exact top-k and its top-k at
    each autotune setting; without, calibration queries to send to every shard. Changes nothing.
    """
    from faissq.index.validate import check_recall

    ctx = self.context()
    cfg = ctx.settings
    limit = payload.time_limit_arg(time_limit_s, cfg.worker.job_time_limit_s)
    target = check_recall(target_recall)
    top_k = payload.count_arg("k", k, 10, cfg.index.max_k)
    if queries is None and queries_ref is None:
        num = payload.count_arg("num_queries", num_queries, SWEEP_QUERIES, MAX_SWEEP_QUERIES)
        return publish.sweep_queries(ctx.runtime, index, top_k, num)
    xq = payload.vectors_arg(queries, queries_ref, root=cfg.storage.url,
                             inline_max_bytes=cfg.worker.inline_max_bytes)  # fmt: skip
    return publish.sweep(ctx.runtime, index, xq, top_k, target, self.progress(limit))


def maintain(self: FaissqTask, index: str, time_limit_s: Any = None) -> dict[str, Any]:
    """Merge and/or save, whichever is due now (the worker's background maintenance sends it)."""
    ctx = self.context()
    limit = payload.time_limit_arg(time_limit_s, ctx.settings.worker.job_time_limit_s)
    return maintenance_for(self).run(index, self.request.id, self.progress(limit))


def stats(self: FaissqTask, index: str) -> dict[str, Any]:
    """Describe the index: state, log seq, sizes, family, the engine's and maintenance counters."""
    out = self.context().runtime.stats(index)
    maint = maintenance_of(self.app)
    if maint is not None:
        out["maintenance"] = maint.stats(index)
    return out


TASKS = {
    "faissq.build": build,
    "faissq.upsert": upsert,
    "faissq.delete": delete,
    "faissq.merge": merge,
    "faissq.rebuild": rebuild,
    "faissq.save": save,
    "faissq.reload": reload,
    "faissq.autotune": autotune,
    "faissq.sweep": sweep,
    "faissq.maintain": maintain,
    "faissq.stats": stats,
}


def maintenance_for(task: FaissqTask) -> Maintenance:
    """The worker's maintenance (a faissq index worker always has one)."""
    maint = maintenance_of(task.app)
    if maint is None:
        raise InvalidParameter("faissq.maintain runs inside a faissq index worker only")
    return maint


def register_tasks(app: Celery, settings: Settings) -> None:
    """Register every faissq task on `app` under its stable name (retries: FaissqTask)."""
    for name, fn in {**TASKS, **CONTROL_TASKS}.items():
        app.task(name=name, bind=True, base=FaissqTask)(fn)


def check_vectors(
    vectors: npt.NDArray[np.float32], engine: Any, metric: str, created_dim: int | None = None
) -> None:
    """Refuse what the engine would refuse, before the batch is logged, without copying it.

    The engine validates again (as_vectors); this pre-check only keeps a batch the engine cannot
    apply out of the log, where replay would trip on it.
    """
    if vectors.ndim != 2 or vectors.shape[1] == 0:
        raise InvalidVectors(f"vectors must be a 2-D array (n, d), got shape {vectors.shape}")
    dim = getattr(engine, "dim", None) if engine is not None else created_dim
    if dim is not None and vectors.shape[1] != dim:
        raise DimensionMismatch(f"vectors have dimension {vectors.shape[1]}, the index has {dim}")
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise InvalidVectors(f"{int(bad.sum())} vector(s) hold NaN or Inf (first at row {first})")
    if metric == "cosine":
        zero = ~vectors.any(axis=1)
        if zero.any():
            first = int(np.flatnonzero(zero)[0])
            raise InvalidVectors(f"{int(zero.sum())} zero vector(s) under cosine (row {first})")
