"""Recall on real (sampled) queries: the setting a search ran with, exact checks, the publish gate.

Autotune's synthetic queries (stored vectors moved off their point) can overstate recall against
real traffic; the worker samples the queries it serves (faissq.worker.recall_live) and these
functions measure an engine on them against exact search over its own live vectors, so a new
build is compared with the serving one on the queries users actually send.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
import numpy.typing as npt

from faissq.index import tuning
from faissq.index.params import hnsw_of, ivf_of
from faissq.index.validate import F32, I64

if TYPE_CHECKING:
    from faissq.index.engine import Engine
    from faissq.index.state import State

Setting = dict[str, int]


def resolve(
    engine: Engine,
    nprobe: int | None = None,
    ef_search: int | None = None,
    k_factor: int | None = None,
    target: float | None = None,
) -> Setting:
    """The parameters a search with these arguments runs with, only those the family reads."""
    p = engine.state.primary
    if p is None:
        return {}
    nprobe, ef_search, k_factor, _ = tuning.fill(
        engine.tuning_profile, target, nprobe, ef_search, k_factor, engine.cfg
    )
    out: Setting = {}
    if ivf_of(p.index) is not None:
        out["nprobe"] = int(nprobe)
    elif hnsw_of(p.index) is not None:
        out["ef_search"] = int(ef_search)
    if p.lossy:
        out["k_factor"] = int(k_factor or engine.cfg.k_factor)
    return out


def label(k: int, setting: Setting) -> str:
    """The metric label of a setting: "k=10 nprobe=8", "k=10 ef_search=32 k_factor=4", ..."""
    parts = [f"{name}={setting[name]}" for name in ("nprobe", "ef_search", "k_factor")
             if name in setting]  # fmt: skip
    return " ".join([f"k={k}", *(parts or ["exact"])])


def metric_of(engine: Engine) -> int:
    """The FAISS metric exact search uses for this engine."""
    return int(faiss.METRIC_INNER_PRODUCT if engine.metric == "cosine" else faiss.METRIC_L2)


def exact_top(engine: Engine, st: State, queries: F32, k: int) -> I64:
    """Exact top-k over the live vectors of one state (the raw store read block by block)."""
    return tuning.exact_knn(queries, tuning.live_blocks(st), k, metric_of(engine))


def recall_rows(found: I64, truth: I64, ks: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    """Recall@k_i of each row: found[i, :k_i] against truth[i, :k_i]."""
    out = np.empty(found.shape[0])
    for i, k in enumerate(ks):
        t = truth[i, :k]
        t = t[t >= 0]
        out[i] = np.intersect1d(found[i, :k], t).size / t.size if t.size else 1.0
    return out


def measure(engine: Engine, queries: F32, k: int, setting: Setting) -> dict[str, Any]:
    """Recall@k of engine at setting on queries (mean, lower bound, count), exact truth."""
    truth = exact_top(engine, engine.state, queries, k)
    res = engine.search(queries, k, **setting)
    per = tuning.recall_per_query(res.ids, truth)
    return {
        "recall": round(float(per.mean()), 4),
        "recall_lo": round(tuning.lower_bound(per), 4),
        "samples": int(per.size),
        "setting": dict(setting),
    }


def dominant_k(ks: npt.NDArray[np.int64]) -> int:
    """The k most sampled searches asked for (autotune and the gate measure at one k)."""
    return int(Counter(int(k) for k in ks).most_common(1)[0][0])


def gate(
    serving: Engine | None,
    candidate: Engine,
    queries: F32,
    k: int,
    *,
    target: float,
    margin: float,
) -> dict[str, Any]:
    """Compare candidate (at its chosen setting) with serving (at its default) on queries.

    Passes when the candidate's recall is at least the serving one's minus margin, or when its
    lower confidence bound meets the target; `passed` and `reason` say which.
    """
    cand = measure(candidate, queries, k, resolve(candidate))
    serv = measure(serving, queries, k, resolve(serving)) if serving is not None else None
    report: dict[str, Any] = {
        "k": k,
        "samples": int(queries.shape[0]),
        "target_recall": target,
        "margin": margin,
        "candidate": cand,
        "serving": serv,
    }
    if cand["recall_lo"] >= target:
        report.update(passed=True, reason=f"candidate recall_lo {cand['recall_lo']} >= target")
    elif serv is None:
        report.update(passed=True, reason="no serving index to compare with")
    elif cand["recall"] >= serv["recall"] - margin:
        report.update(passed=True, reason=f"candidate recall {cand['recall']} >= serving "
                      f"{serv['recall']} - margin {margin}")  # fmt: skip
    else:
        report.update(passed=False, reason=f"candidate recall {cand['recall']} < serving "
                      f"{serv['recall']} - margin {margin} and recall_lo {cand['recall_lo']} "
                      f"< target {target}")  # fmt: skip
    return report
