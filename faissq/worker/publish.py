"""New builds measured on sampled real queries: autotune on them, and the recall gate of a swap.

Once an index has `recall.min_queries` sampled queries (faissq.worker.recall_live), autotune
calibrates on them instead of synthetic ones, and a build or rebuild is autotuned on them and
swapped in only when its recall there holds against the serving index (recall_gate.gate);
otherwise the job fails with RecallRegression and the old index keeps serving. `force` lets a
refused build through, logged.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from faissq import codec
from faissq.errors import IndexNotReady, RecallRegression
from faissq.index import recall_gate
from faissq.index.merged_tuning import pack_sweep
from faissq.index.tuning import held_out_queries
from faissq.index.validate import F32
from faissq.worker.recall_live import recall_of
from faissq.worker.slots import IndexState, counts, small

if TYPE_CHECKING:
    from faissq.index.engine import Engine
    from faissq.worker.runtime import IndexRuntime, Progress

log = logging.getLogger(__name__)


def sampled(runtime: IndexRuntime, name: str) -> tuple[F32, int, int]:
    """The index's sampled queries, the k most of them asked for, and how many there are."""
    live = recall_of(runtime)
    if live is None or name not in live.samplers:
        return F32_EMPTY, 0, 0
    queries, ks = live.samplers[name].queries()
    if not ks.size:
        return queries, 0, 0
    return queries, recall_gate.dominant_k(ks), int(ks.size)


def enough(runtime: IndexRuntime, name: str) -> bool:
    """Whether the index has enough sampled queries to tune and gate on."""
    return sampled(runtime, name)[2] >= runtime.settings.recall.min_queries


def autotune(
    runtime: IndexRuntime,
    name: str,
    eng: Engine,
    target: float | None,
    progress: Progress | None,
    given: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Autotune on sampled real queries when there are enough, else on synthetic ones; a
    given profile (a sharded autotune's, measured on merged results) is installed as it is."""
    if given is not None:
        eng.set_tuning(given)
        return given
    queries, k, n = sampled(runtime, name)
    if n >= runtime.settings.recall.min_queries and queries.shape[1] == eng.dim:
        return eng.autotune(target_recall=target, k=k, queries=queries, progress=progress,
                            source="live")  # fmt: skip
    profile = eng.autotune(target_recall=target, progress=progress, source="synthetic")
    log.info("index %s: autotune on synthetic queries (%d sampled < recall.min_queries %d)",
             name, n, runtime.settings.recall.min_queries)  # fmt: skip
    return profile


def sweep_queries(runtime: IndexRuntime, name: str, k: int, num: int) -> dict[str, Any]:
    """Calibration queries for a sharded autotune: the index's sampled real queries when
    there are enough (every fan-out search reaches every shard), else synthetic ones."""
    eng = runtime.engine(name)
    queries, live_k, n = sampled(runtime, name)
    if n >= runtime.settings.recall.min_queries and queries.shape[1] == eng.dim:
        return {"queries": codec.pack_array(queries), "k": live_k, "source": "live"}
    if eng.ntotal <= 0:
        raise IndexNotReady(f"index {name!r} is empty: nothing to tune")
    cosine = eng.metric == "cosine"
    made = held_out_queries(eng.state, num, eng.cfg.seed + 1, cosine)
    return {"queries": codec.pack_array(made), "k": k, "source": "synthetic"}


def sweep(
    runtime: IndexRuntime,
    name: str,
    queries: F32,
    k: int,
    target: float | None,
    progress: Progress | None,
) -> dict[str, Any]:
    """This shard's part of a sharded autotune (Engine.sweep), arrays framed for the result."""
    return pack_sweep(runtime.engine(name).sweep(queries, k, target, progress))


def check(
    runtime: IndexRuntime,
    name: str,
    serving: Engine | None,
    candidate: Engine,
    force: bool,
    progress: Progress | None,
) -> dict[str, Any]:
    """Autotune candidate on sampled queries and compare it with serving; raise when it loses.

    Returns the gate's report ("gated": False with the reason when the gate does not apply).
    """
    cfg = runtime.settings.recall
    queries, k, n = sampled(runtime, name)
    if not cfg.gate:
        return {"gated": False, "reason": "recall.gate is off"}
    if n < cfg.min_queries:
        why = f"{n} sampled queries < recall.min_queries {cfg.min_queries}"
        return {"gated": False, "samples": n, "reason": why}
    if queries.shape[1] != candidate.dim:
        why = f"sampled queries have dimension {queries.shape[1]}, the new index {candidate.dim}"
        return {"gated": False, "samples": n, "reason": why}
    candidate.autotune(k=k, queries=queries, progress=progress, source="live")
    target, margin = candidate.cfg.target_recall, cfg.gate_margin
    report = recall_gate.gate(serving, candidate, queries, k, target=target, margin=margin)
    report["gated"] = True
    if report["passed"]:
        return report
    if force:
        report["forced"] = True
        log.warning("index %s: recall gate refused the new index, published anyway (force): %s",
                    name, report["reason"])  # fmt: skip
        return report
    cand, serv = report["candidate"], report["serving"] or {}
    raise RecallRegression(
        f"index {name!r}: the new index recalls {cand['recall']} (lower bound "
        f"{cand['recall_lo']}) at {recall_gate.label(k, cand['setting'])} on {n} sampled "
        f"queries, the serving one {serv.get('recall')}: not swapped in, the serving index "
        f"stays (force=True publishes it anyway)",
        small(report),
    )


def rebuild(
    runtime: IndexRuntime, name: str, family: str | None, force: bool, progress: Progress | None
) -> dict[str, Any]:
    """Rebuild into a new engine beside the serving one, gate it, then swap it in.

    The serving engine answers meanwhile and stays when the gate refuses the new one.
    """
    slot = runtime._writable(name)
    eng = runtime.engine(name)
    runtime._check_mapped(slot, eng)
    before = slot.state
    slot.state = IndexState.REBUILDING
    try:
        ids, vecs = eng.state.live_vectors()
        cand = runtime._new_engine(name, eng.dim)
        attrs = eng.attributes_of(ids) if eng.schema else None  # the same rows keep their values
        report = cand.build(vecs, ids, family=family or eng.family_request, progress=progress,
                            version=eng.version, attributes=attrs)  # fmt: skip
        del vecs
        report["op"] = "rebuild"
        cand.last_durations["rebuild"] = cand.last_durations.pop("build", report["seconds"])
        report["recall_gate"] = check(runtime, name, eng, cand, force, progress)
    finally:
        slot.state = before
    slot.engine = cand  # one reference assignment: readers see the new engine on their next call
    return {**small(report), **counts(slot)}


def note_added(runtime: IndexRuntime, name: str, vectors: F32) -> None:
    """Keep a few rows of an upserted batch for the drift measure (recall_live)."""
    live = recall_of(runtime)
    if live is not None and name in live.samplers:
        live.samplers[name].note_added(vectors)


def drift_due(runtime: IndexRuntime, name: str) -> bool:
    """Whether maintenance should rebuild: drift advises it and recall.drift_rebuild is on."""
    live = recall_of(runtime)
    if not runtime.settings.recall.drift_rebuild or live is None or name not in live.samplers:
        return False
    return bool((live.samplers[name].drift or {}).get("advised"))


def drift_measured_again(runtime: IndexRuntime, name: str) -> None:
    """Forget the drift advice after a rebuild: the next measure is against the new centroids."""
    live = recall_of(runtime)
    if live is not None and name in live.samplers:
        live.samplers[name].drift, live.samplers[name].next_drift = None, 0.0


def summary(runtime: IndexRuntime, name: str) -> dict[str, Any] | None:
    """The index's live-recall summary (None before the search loops started)."""
    live = recall_of(runtime)
    if live is None or name not in live.samplers:
        return None
    return live.samplers[name].summary()


F32_EMPTY: F32 = np.empty((0, 0), dtype=np.float32)
