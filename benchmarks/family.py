"""The auto index family against raw FAISS IVF-Flat and HNSW32, per data set and size.

    python benchmarks/family.py                          # 3 sizes x 2 kinds, table + plot
    python benchmarks/family.py --quick                  # one small size of each kind

Per row, each build runs in its own freshly spawned process on the same unit-norm .npy data:
faissq's Engine with default IndexSettings (family auto: calibration, build, then autotune at
recall@10 >= 0.95), raw faiss IVF{nlist},Flat (the same nlist rule, training sample and k-means
seed) and raw IndexHNSWFlat(d, 32) (efConstruction 40, FAISS's default, as faissq's). Build
peak = VmHWM during the build minus VmRSS before it (the data is loaded before, in both).

Search: the raw indexes are serialised into the faissq process. Each raw index takes the
smallest nprobe / efSearch whose recall@10 on the benchmark's own queries is >= 0.95 (an oracle
choice faissq does not get: its autotune measures on perturbed stored vectors). Then single
queries run interleaved, rotating which goes first, on --search-threads OpenMP threads (1: a
lone query runs on one thread anyway); p50 is over all queries. Recall@10 is
against exact faiss.knn over the stored vectors. Data: benchmarks/family_data.py.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from family_data import synthetic, text_embeddings

from faissq.config import IndexSettings
from faissq.index.builder import train_sample
from faissq.index.engine import Engine
from faissq.index.policy import nlist_for

K = 10
TARGET = 0.95
NPROBES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
EFS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
PLOT = Path(__file__).resolve().parent.parent / "docs" / "img" / "family-recall-latency.png"


def _kib(field: str) -> int:
    """A Vm* line of /proc/self/status, in KiB."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")


def _build(side: str, xb: np.ndarray) -> tuple[Any, dict[str, Any]]:
    """Build one side; return the built object and its build figures."""
    n, d = xb.shape
    ids = np.arange(n, dtype=np.int64)
    before = _kib("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    info: dict[str, Any] = {}
    built: Any
    if side == "auto":
        built = Engine(d, IndexSettings())
        report = built.build(xb, ids)
        info.update({k: report[k] for k in ("family", "factory", "reason", "calibration")})
    elif side == "ivf_flat":
        cfg = IndexSettings()
        nlist, train = nlist_for(n, cfg)
        built = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        faiss.extract_index_ivf(built).cp.seed = cfg.seed
        built.train(train_sample(xb, train, cfg.seed))
        built.add_with_ids(xb, ids)
        info["factory"] = f"IVF{nlist},Flat"
    else:
        built = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        built.add(xb)
        info["factory"] = "HNSW32,Flat"
    info["build_s"] = time.perf_counter() - t0
    info["peak_mib"] = (_kib("VmHWM") - before) / 1024
    return built, info


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean recall@K."""
    return float(
        np.mean([np.intersect1d(f, t).size for f, t in zip(found, truth, strict=True)]) / K
    )


def _p50_ms(search: Any, xq: np.ndarray, limit: int) -> float:
    """Median single-query latency over the first `limit` queries."""
    times = []
    for i in range(min(limit, xq.shape[0])):
        t0 = time.perf_counter()
        search(xq[i : i + 1])
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _sweep(index: Any, kind: str, xq: np.ndarray, truth: np.ndarray) -> list[dict[str, Any]]:
    """Recall and p50 at each nprobe / efSearch of a raw index, up to the first >= 0.99."""
    rows = []
    ivf = faiss.extract_index_ivf(index) if kind == "ivf_flat" else None
    for value in NPROBES if ivf is not None else EFS:
        if ivf is not None:
            if value > ivf.nlist:
                break
            ivf.nprobe = value
        else:
            index.hnsw.efSearch = value
        rec = _recall(index.search(xq, K)[1], truth)
        ms = _p50_ms(lambda q: index.search(q, K), xq, 100)
        rows.append({"param": value, "recall": rec, "p50_ms": ms})
        if rec >= 0.99:
            break
    return rows


def _auto_curve(eng: Engine, xq: np.ndarray, truth: np.ndarray) -> list[dict[str, Any]]:
    """Recall and p50 on the benchmark's queries at each autotune row with k_factor 1."""
    rows = []
    for r in (eng.tuning_profile or {}).get("table", []):
        if r.get("k_factor", 1) != 1:
            continue
        kw = {k: r[k] for k in ("nprobe", "ef_search", "k_factor") if k in r}
        rec = _recall(eng.search(xq, K, **kw).ids, truth)
        ms = _p50_ms(lambda q, kw=kw: eng.search(q, K, **kw), xq, 100)
        rows.append({"param": kw.get("nprobe") or kw.get("ef_search"), "recall": rec, "p50_ms": ms})
    return rows


def _serve(side: str, conn: Connection, folder: str, threads: tuple[int, int]) -> None:
    """Worker process: build on request; the auto side also autotunes and searches."""
    faiss.omp_set_num_threads(threads[0])
    xb = np.load(Path(folder) / "xb.npy")
    xq = np.load(Path(folder) / "xq.npy")
    truth = np.load(Path(folder) / "truth.npy")
    built, info = _build(side, xb)
    if side != "auto":
        conn.send((info, faiss.serialize_index(built)))
        return
    t0 = time.perf_counter()
    built.autotune(target_recall=TARGET)
    info["autotune_s"] = time.perf_counter() - t0
    info["chosen"] = (built.tuning_profile or {}).get("chosen")
    faiss.omp_set_num_threads(threads[1])
    raws = {}
    for name in ("ivf_flat", "hnsw"):
        raw_info, blob = conn.recv()
        raws[name] = (raw_info, faiss.deserialize_index(blob))
    curves = {"auto": _auto_curve(built, xq, truth)}
    for name, (raw_info, index) in raws.items():
        curves[name] = _sweep(index, name, xq, truth)
        ok = [r for r in curves[name] if r["recall"] >= TARGET]
        raw_info["setting"] = ok[0]["param"] if ok else curves[name][-1]["param"]
        if name == "ivf_flat":
            faiss.extract_index_ivf(index).nprobe = raw_info["setting"]
        else:
            index.hnsw.efSearch = raw_info["setting"]
    searches = {
        "auto": lambda q: built.search(q, K).ids,
        "ivf_flat": lambda q: raws["ivf_flat"][1].search(q, K)[1],
        "hnsw": lambda q: raws["hnsw"][1].search(q, K)[1],
    }
    lat: dict[str, list[float]] = {k: [] for k in searches}
    labels = list(searches)
    for i in range(-10, xq.shape[0]):  # 10 warm-up queries
        for j in range(len(labels)):
            label = labels[(i + j) % len(labels)]
            t0 = time.perf_counter()
            searches[label](xq[i % xq.shape[0] : i % xq.shape[0] + 1])
            if i >= 0:
                lat[label].append(time.perf_counter() - t0)
    out = {"auto": info, **{k: v[0] for k, v in raws.items()}}
    for label in labels:
        out[label]["p50_ms"] = float(np.median(lat[label]) * 1e3)
        out[label]["recall"] = _recall(searches[label](xq), truth)
    conn.send((out, curves))


def run_row(kind: str, n: int, args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    """One (data set, size) row: data, three builds, interleaved search."""
    if kind == "text":
        xb, xq = text_embeddings(n, args.queries)
    else:
        xb, xq = synthetic(n, args.dim, args.queries)
    truth = faiss.knn(xq, xb, K, metric=faiss.METRIC_INNER_PRODUCT)[1]
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="faissq-family-") as tmp:
        for name, arr in (("xb", xb), ("xq", xq), ("truth", truth)):
            np.save(Path(tmp) / f"{name}.npy", arr)
        del xb
        pipes = {}
        for side in ("auto", "ivf_flat", "hnsw"):  # one build at a time: no shared cores
            mine, child = ctx.Pipe()
            proc = ctx.Process(
                target=_serve, args=(side, child, tmp, (args.threads, args.search_threads))
            )
            proc.start()
            pipes[side] = (mine, proc)
            if side != "auto":
                msg = mine.recv()
                proc.join()
                pipes["auto"][0].send(msg)
            print(f"  {kind} {n}: {side} built", flush=True)
        result, curves = pipes["auto"][0].recv()
        pipes["auto"][1].join()
    return result, curves


def _table(rows: list[tuple[str, int, dict[str, Any]]]) -> None:
    """Print the markdown table and the verdicts."""
    print("\n| data | n | auto family | build s | autotune s | recall@10 | p50 ms | raw IVF-Flat "
          "build s / p50 ms (nprobe) | raw HNSW32 build s / p50 ms (ef) | p50 auto/best raw "
          "| peak auto/raw same family |")  # fmt: skip
    print("|---|---:|---|---:|---:|---:|---:|---|---|---:|---:|")
    for kind, n, r in rows:
        a, ivf, hn = r["auto"], r["ivf_flat"], r["hnsw"]
        best = (
            min(x["p50_ms"] for x in (ivf, hn) if x["recall"] >= TARGET)
            if any(x["recall"] >= TARGET for x in (ivf, hn))
            else float("nan")
        )
        same = {"ivf_flat": ivf, "hnsw": hn}.get(a["family"])
        peak = f"{a['peak_mib'] / same['peak_mib']:.2f}×" if same else "n/a"
        print(f"| {kind} | {n} | {a['family']} | {a['build_s']:.1f} | {a['autotune_s']:.1f} "
              f"| {a['recall']:.3f} | {a['p50_ms']:.3f} | {ivf['build_s']:.1f} / "
              f"{ivf['p50_ms']:.3f} ({ivf['setting']}) | {hn['build_s']:.1f} / "
              f"{hn['p50_ms']:.3f} ({hn['setting']}) | {a['p50_ms'] / best:.2f}× "
              f"| {peak} |")  # fmt: skip
    print("\ntargets:")
    for kind, n, r in rows:
        a, ivf, hn = r["auto"], r["ivf_flat"], r["hnsw"]
        ok = [x["p50_ms"] for x in (ivf, hn) if x["recall"] >= TARGET]
        p50 = a["p50_ms"] / min(ok) if ok else float("nan")
        line = f"  {kind} {n}: recall {a['recall']:.3f} (>= {TARGET}), p50 {p50:.2f}× best raw"
        if kind == "synthetic":
            build = (a["build_s"] + a["autotune_s"]) / ivf["build_s"]
            line += f", build+autotune {build:.2f}× raw IVF-Flat train+add (<= 2)"
        met = a["recall"] >= TARGET and p50 <= 1.3
        print(line + f" -> {'met' if met else 'NOT met'}")
        print(f"    auto setting: {a['chosen']}; build peak MiB auto {a['peak_mib']:.0f}, "
              f"raw IVF-Flat {ivf['peak_mib']:.0f}, raw HNSW32 {hn['peak_mib']:.0f}")  # fmt: skip
        print(f"    reason: {a['reason']}")


def _plot(curves: dict[tuple[str, int], Any], path: Path) -> None:
    """Recall-latency curves, one panel per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(curves)
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for name, rows in curves[key].items():
            if rows:
                ax.plot([r["recall"] for r in rows], [r["p50_ms"] for r in rows], "o-",
                        label=name, markersize=3)  # fmt: skip
        ax.axvline(TARGET, color="grey", linestyle=":")
        ax.set_yscale("log")
        ax.set_title(f"{key[0]} {key[1]}")
        ax.set_xlabel("recall@10")
    axes[0][0].set_ylabel("single-query p50, ms")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"plot: {path}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--synthetic", default="20000,50000,100000", help="sizes, comma-separated")
    p.add_argument("--text", default="5000,10000,20000", help="sizes of the text data set")
    p.add_argument("--dim", type=int, default=384, help="synthetic dimension (MiniLM's 384)")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="build threads")
    p.add_argument("--search-threads", type=int, default=1, help="OpenMP threads when searching")
    p.add_argument("--plot", default=str(PLOT), help="where the recall-latency PNG goes")
    p.add_argument("--quick", action="store_true", help="5k synthetic and 5k text only")
    args = p.parse_args(argv)
    if args.quick:
        args.synthetic, args.text, args.queries = "5000", "5000", 300
    faiss.omp_set_num_threads(args.threads)
    rows, curves = [], {}
    for kind, sizes in (("synthetic", args.synthetic), ("text", args.text)):
        for n in (int(s) for s in sizes.split(",") if s):
            result, curve = run_row(kind, n, args)
            rows.append((kind, n, result))
            curves[(kind, n)] = curve
    print(f"\nfaiss {faiss.__version__}, {platform.machine()}, {os.cpu_count()} cpu, "
          f"build threads {args.threads}, search threads {args.search_threads}, "
          f"queries {args.queries}, k {K}")  # fmt: skip
    _table(rows)
    _plot(curves, Path(args.plot))


if __name__ == "__main__":
    main()
