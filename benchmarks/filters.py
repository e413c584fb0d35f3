"""Filtered search: p50 and recall@10 at 50%, 10%, 1% and 0.1% selectivity against unfiltered.

    python benchmarks/filters.py                      # 200k x 128, flat, ivf_flat, hnsw
    python benchmarks/filters.py --n 20000 --families ivf_flat   # a quick look

In process, one run: each family is built with one int64 attribute (`bucket`, uniform over
10,000 values; a filter `bucket < s * 10,000` passes a share s of the rows) and autotuned to
recall@10 0.95 unfiltered. Per selectivity, single-query searches (as the RPC serves them) through
the engine with the filter, and through raw FAISS with the same rows in an IDSelectorBitmap at the
same autotuned setting (what a FAISS user writes by hand); recall@10 is against the exact filtered
top-10. The engine scans few passing rows exactly (index.filter_exact_rows) and otherwise widens
nprobe / efSearch by the inverse share of rows passing.
"""

from __future__ import annotations

import argparse
import os
import time

import faiss
import numpy as np

from faissq.cli.demo_data import clustered, queries_like
from faissq.config import IndexSettings
from faissq.index.engine import Engine
from faissq.index.params import bitmap_selector, make_params

SHARES = (1.0, 0.5, 0.1, 0.01, 0.001)
BUCKETS = 10_000


def truth(xb: np.ndarray, passing: np.ndarray, xq: np.ndarray, k: int) -> np.ndarray:
    """Exact filtered top-k ids (inner product over normalised rows)."""
    rows = np.flatnonzero(passing)
    flat = faiss.IndexFlatIP(xb.shape[1])
    flat.add(xb[rows])
    _, found = flat.search(xq, k)
    return np.where(found >= 0, rows[np.maximum(found, 0)], -1)


def recall(found: np.ndarray, want: np.ndarray) -> float:
    """Mean share of each query's true filtered neighbours found."""
    hits = [np.intersect1d(f[f >= 0], w[w >= 0]).size / max(1, int((w >= 0).sum()))
            for f, w in zip(found, want, strict=True)]  # fmt: skip
    return float(np.mean(hits))


def timed(search, xq: np.ndarray) -> tuple[np.ndarray, float]:  # type: ignore[no-untyped-def]
    """Ids of one-query searches and their p50 in ms."""
    out, times = [], []
    for q in xq:
        t0 = time.perf_counter()
        out.append(search(q[None]))
        times.append(time.perf_counter() - t0)
    return np.vstack(out), 1e3 * float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000, help="stored vectors")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=300, help="single-query searches per row")
    ap.add_argument("--families", default="flat,ivf_flat,hnsw")
    args = ap.parse_args()
    n, dim, k = args.n, args.dim, 10
    clusters = int(np.sqrt(n))
    xb = clustered(n, dim, clusters=clusters, seed=0)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq = queries_like(n, dim, clusters=clusters, seed=0, nq=args.queries)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    bucket = np.random.default_rng(1).integers(0, BUCKETS, n).astype(np.int64)
    print(f"# {n} x {dim} cosine, {args.queries} single-query searches per row, "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")  # fmt: skip
    print("| family | setting | share | route | faissq p50 ms | faissq recall@10 | "
          "raw FAISS p50 ms | raw FAISS recall@10 |")  # fmt: skip
    print("|---|---|---:|---|---:|---:|---:|---:|")
    for family in args.families.split(","):
        run_family(family, xb, xq, bucket, k)


def run_family(family: str, xb: np.ndarray, xq: np.ndarray, bucket: np.ndarray, k: int) -> None:
    """Build, autotune, and print one row per share for one family."""
    n, dim = xb.shape
    ids = np.arange(n, dtype=np.int64)
    cfg = IndexSettings(metric="cosine", attributes={"bucket": "int64"})
    eng = Engine(dim, cfg)
    t0 = time.perf_counter()
    eng.build(xb, ids, family=family, attributes={"bucket": bucket})
    eng.autotune(target_recall=0.95)
    built = time.perf_counter() - t0
    primary = eng.state.primary
    assert primary is not None
    setting = _setting(eng)
    label = ", ".join(f"{a} {b}" for a, b in setting.items()) or "exact"
    for share in SHARES:
        passing = bucket < int(share * BUCKETS)
        flt = None if share == 1.0 else {"field": "bucket", "lt": int(share * BUCKETS)}
        want = truth(xb, passing, xq, k)
        got, p50 = timed(lambda q, f=flt: eng.search(q, k, filter=f).ids, xq)
        route = "-"
        if flt is not None:
            route = "exact" if passing.sum() <= cfg.filter_exact_rows else "selector"
        sel = bitmap_selector(ids[passing]) if share < 1.0 else None
        call = make_params(primary.shape, nprobe=setting.get("nprobe"),
                           ef_search=setting.get("ef_search"),
                           sel=None if sel is None else sel[0],
                           keep=[] if sel is None else sel[1])  # fmt: skip
        raw, raw_p50 = timed(lambda q, c=call: primary.index.search(q, k, params=c.params)[1], xq)
        print(f"| {family} | {label} | {100 * share:g}% | {route} | {p50:.3f} | "
              f"{recall(got, want):.3f} | {raw_p50:.3f} | {recall(raw, want):.3f} |")  # fmt: skip
    print(f"# {family}: build + autotune {built:.1f} s")


def _setting(eng: Engine) -> dict[str, int]:
    """The autotuned parameters the engine uses with no per-request ones."""
    prof = eng.tuning_profile or {}
    chosen = prof.get("chosen") or {}
    return {key: int(chosen[key]) for key in ("nprobe", "ef_search") if chosen.get(key)}


if __name__ == "__main__":
    main()
