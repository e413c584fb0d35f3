"""faissq's Engine against raw FAISS: same data, factory string, training sample and nprobe.

    python benchmarks/engine.py --n 1000000 --dim 128 --nprobe 16 --build-rounds 2
    python benchmarks/engine.py --quick          # ~30 s smoke run

Data: datasets.clustered (cosine), held-out datasets.queries_like, exact faiss.knn ground truth.
Raw FAISS: faiss.index_factory(d, plan.factory, metric), IndexIDMap when not IVF (as
builder.new_index), trained on builder.train_sample(x, plan.train_size, seed) with the same k-means
seed, one add_with_ids, nprobe set on the index; faiss.normalize_L2 is timed on both sides.

Builds: each side builds in its own freshly spawned process loading the same .npy files, so
neither sees the other's heap; --build-rounds > 1 alternates them (faissq, raw, raw, faissq, ...)
and reports median times. Build peak = VmHWM during the build (reset via /proc/self/clear_refs,
Linux only) minus VmRSS before it; held = VmRSS after minus before (faissq keeps a raw copy of the
vectors for refine and rebuild); build CPU = user + system seconds, all threads.

Search: the raw index is serialised into the faissq process and the variants are interleaved
there to cancel other load: batch-1 query by query (rotating which goes first), batch-256 pass by
pass. Each round gives p50/p99 over all queries and QPS; the table shows medians over rounds.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from faissq.cli.demo_data import clustered, queries_like
from faissq.config import IndexSettings
from faissq.index.builder import metric_type, train_sample
from faissq.index.engine import Engine

K = 10
BATCH = 256
MIN_BATCH_SECONDS = 0.5  # per variant and round: repeat the batched pass at least this long
RAW = "raw FAISS"
FQ1 = "faissq, k_factor=1"
Search = Callable[[np.ndarray], np.ndarray]


def _status_kib(field: str) -> int:
    """A Vm* line of /proc/self/status, in KiB."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")


def _cpu_seconds() -> float:
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def _settings(opts: Opts) -> IndexSettings:
    """The index settings of the engine (the raw side takes its k-means seed)."""
    extra: dict[str, Any] = {"opq": not opts["no_opq"]}
    if opts["train_ppc"]:
        extra["train_points_per_centroid"] = opts["train_ppc"]
    return IndexSettings(**extra)


Opts = dict[str, Any]
Marks = dict[str, float]  # perf_counter() at the start of the train and add phases and their ends


def _build_faissq(xb: np.ndarray, ids: np.ndarray, opts: Opts, _plan: Opts, m: Marks) -> Any:
    def progress(phase: str, done: int, total: int) -> None:
        if done in (0, total):
            m[phase if done == 0 else phase + "_end"] = time.perf_counter()

    eng = Engine(xb.shape[1], _settings(opts))
    eng.build(xb, ids, family=opts["family"], progress=progress)
    return eng


def _build_raw(xb: np.ndarray, ids: np.ndarray, opts: Opts, plan: Opts, m: Marks) -> Any:
    cfg = _settings(opts)
    if plan["metric"] == "cosine":
        faiss.normalize_L2(xb)
    index = faiss.index_factory(xb.shape[1], plan["factory"], metric_type(plan["metric"]))
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
        if not isinstance(faiss.downcast_index(index), faiss.IndexIDMap | faiss.IndexIDMap2):
            index = faiss.IndexIDMap(index)
    if not index.is_trained:
        if ivf is not None:
            ivf.cp.seed = cfg.seed
        sample = train_sample(xb, plan["train_size"], cfg.seed)
        m["train"] = time.perf_counter()
        index.train(sample)
        m["train_end"] = time.perf_counter()
    m["add"] = time.perf_counter()
    index.add_with_ids(xb, ids)
    m["add_end"] = time.perf_counter()
    if ivf is not None:
        ivf.nprobe = opts["nprobe"]
    return index


def _searches(eng: Engine, raw: Any, opts: Opts) -> dict[str, Search]:
    """The compared variants: raw FAISS, faissq without refine, faissq with its default refine."""
    nprobe, cosine = opts["nprobe"], eng.metric == "cosine"

    def raw_search(q: np.ndarray) -> np.ndarray:
        q = np.array(q, dtype=np.float32)
        if cosine:
            faiss.normalize_L2(q)
        return np.asarray(raw.search(q, K)[1])

    def engine(k_factor: int) -> Search:
        return lambda q: eng.search(q, K, nprobe=nprobe, k_factor=k_factor).ids

    out = {RAW: raw_search, FQ1: engine(1)}
    primary = eng.state.primary
    if primary is not None and primary.plan.refine:
        out[f"faissq + refine, k_factor={eng.cfg.k_factor}"] = engine(eng.cfg.k_factor)
    return out


def _round(searches: dict[str, Search], xq: np.ndarray) -> dict[str, Any]:
    """One search round: per-query latencies, batch-256 QPS and the found ids per variant."""
    labels, nq = list(searches), xq.shape[0]
    lat: dict[str, list[float]] = {label: [] for label in labels}
    for i in range(-10, nq):  # 10 warm-up queries
        for j in range(len(labels)):
            label = labels[(i + j) % len(labels)]
            t0 = time.perf_counter()
            searches[label](xq[i % nq : i % nq + 1])
            if i >= 0:
                lat[label].append(time.perf_counter() - t0)
    spent = dict.fromkeys(labels, 0.0)
    found: dict[str, np.ndarray] = {}
    passes = 0
    while passes == 0 or sum(spent.values()) < MIN_BATCH_SECONDS * len(labels):
        for j in range(len(labels)):
            label = labels[(passes + j) % len(labels)]
            t0 = time.perf_counter()
            parts = [searches[label](xq[s : s + BATCH]) for s in range(0, nq, BATCH)]
            spent[label] += time.perf_counter() - t0
            found[label] = np.concatenate(parts)
        passes += 1
    return {"lat": lat, "qps": {k: passes * nq / v for k, v in spent.items()}, "found": found}


def _serve(side: str, conn: Connection, opts: Opts) -> None:
    """Worker process: load the data, then build, hand over or search on request."""
    faiss.omp_set_num_threads(opts["threads"])
    xb = np.load(Path(opts["dir"]) / "xb.npy")
    xq = np.load(Path(opts["dir"]) / "xq.npy")
    ids = np.arange(xb.shape[0], dtype=np.int64)
    built: Any = None
    searches: dict[str, Search] = {}
    while True:
        cmd, arg = conn.recv()
        if cmd == "build":
            built = None
            before, cpu = _status_kib("VmRSS"), _cpu_seconds()
            _reset_peak()
            m = {"start": time.perf_counter()}
            built = (_build_faissq if side == "faissq" else _build_raw)(xb, ids, opts, arg, m)
            seconds, cpu = time.perf_counter() - m["start"], _cpu_seconds() - cpu
            train = m.get("train", m["add"])
            phases = {
                "prep": train - m["start"],
                "train": m.get("train_end", train) - train,
                "add": m["add_end"] - m["add"],
            }
            phases["other"] = seconds - sum(phases.values())
            peak, held = _status_kib("VmHWM") - before, _status_kib("VmRSS") - before
            plan = built.state.primary.plan.to_dict() if side == "faissq" else arg
            mib = {"peak": peak / 1024, "held": held / 1024}
            conn.send({"seconds": seconds, "cpu": cpu, **mib, "plan": plan, "phases": phases})
        elif cmd == "export":
            conn.send(faiss.serialize_index(built))
        elif cmd == "adopt":
            searches = _searches(built, faiss.deserialize_index(arg), opts)
            _reset_peak()
            conn.send(_status_kib("VmRSS"))
        elif cmd == "round":
            conn.send(_round(searches, xq))
        elif cmd == "search_peak":
            conn.send((_status_kib("VmHWM") - arg) / 1024)
        else:
            conn.send(None)
            return


class Side:
    """One worker process, called synchronously."""

    def __init__(self, side: str, opts: Opts) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(side, child, opts), daemon=True)
        self.proc.start()

    def ask(self, cmd: str, arg: Any = None) -> Any:
        self.conn.send((cmd, arg))
        return self.conn.recv()

    def close(self) -> None:
        self.ask("stop")
        self.proc.join()


def _data(args: argparse.Namespace, out: Path) -> np.ndarray:
    """Write xb.npy and xq.npy; return the exact top-K ids of each query."""
    kw = {"clusters": max(8, int(np.sqrt(args.n))), "spread": args.spread, "seed": args.seed}
    xb = clustered(args.n, args.dim, **kw)
    xq = queries_like(args.n, args.dim, nq=args.queries, **kw)
    np.save(out / "xb.npy", xb)
    np.save(out / "xq.npy", xq)
    faiss.normalize_L2(xb)
    faiss.normalize_L2(xq)
    return np.asarray(faiss.knn(xq, xb, K, metric=faiss.METRIC_INNER_PRODUCT)[1])


def run(args: argparse.Namespace) -> None:
    """Generate the data, build on both sides alternately, search interleaved, print the table."""
    faiss.omp_set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="faissq-bench-") as tmp:
        t0 = time.perf_counter()
        truth = _data(args, Path(tmp))
        print(f"data + ground truth: {time.perf_counter() - t0:.1f} s", flush=True)
        opts = {**vars(args), "dir": tmp}
        sides = {"faissq": Side("faissq", opts), "raw": Side("raw", opts)}
        builds: dict[str, list[dict[str, Any]]] = {"faissq": [], "raw": []}
        plan: dict[str, Any] = {}
        for r in range(args.build_rounds):  # faissq first (it makes the plan), then ABBA
            for name in ("raw", "faissq") if r % 2 else ("faissq", "raw"):
                result = sides[name].ask("build", plan)
                plan = result["plan"]
                builds[name].append(result)
                print(f"{name} build {r + 1}: {result['seconds']:.1f} s", flush=True)
        blob = sides["raw"].ask("export")
        sides.pop("raw").close()
        base = sides["faissq"].ask("adopt", blob)
        rounds = [sides["faissq"].ask("round") for _ in range(args.rounds)]
        search_peak = max(0.0, sides["faissq"].ask("search_peak", base))
        sides["faissq"].close()
    print(f"\nn={args.n} dim={args.dim} cosine {plan['factory']} train_size={plan['train_size']}")
    print(
        f"nprobe={args.nprobe} queries={args.queries} threads={args.threads} rounds={args.rounds}"
    )
    print(f"faiss {faiss.__version__}, {platform.machine()}, {os.cpu_count()} cpu\n")
    _table(builds, rounds, truth, search_peak)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean recall@K of found rows against the exact rows."""
    return float(np.mean([np.isin(f, t).sum() for f, t in zip(found, truth, strict=True)]) / K)


def _table(builds: dict[str, Any], rounds: list[Any], truth: np.ndarray, peak: float) -> None:
    """Print the markdown table, the faissq/raw ratios and the verdict on the targets."""

    def med(values: Any) -> float:
        return float(statistics.median(values))

    rows: dict[str, dict[str, float]] = {}
    for label in rounds[0]["lat"]:
        side = builds["raw" if label == RAW else "faissq"]
        rows[label] = {
            "build": med(b["seconds"] for b in side),
            "cpu": med(b["cpu"] for b in side),
            "peak": side[0]["peak"],
            "held": side[0]["held"],
            "p50": med(np.percentile(r["lat"][label], 50) * 1e3 for r in rounds),
            "p99": med(np.percentile(r["lat"][label], 99) * 1e3 for r in rounds),
            "qps": med(r["qps"][label] for r in rounds),
            "recall": _recall(rounds[-1]["found"][label], truth),
        }
    cols = "build s | build CPU s | build peak MiB | held MiB | b=1 p50 ms | b=1 p99 ms"
    print(f"| | {cols} | b=256 QPS | recall@10 |\n|---|" + "---:|" * 8)
    for label, r in rows.items():
        build = f"{r['build']:.1f} | {r['cpu']:.1f} | {r['peak']:.0f} | {r['held']:.0f} |"
        build = build if label in (RAW, FQ1) else "same build | | | |"
        print(f"| {label} | {build} {r['p50']:.3f} | {r['p99']:.3f} | {r['qps']:.0f} ", end="")
        print(f"| {r['recall']:.3f} |")
    ratio = {key: rows[FQ1][key] / rows[RAW][key] for key in rows[RAW]}
    print("| faissq/raw (k_factor=1) | " + " | ".join(f"{v:.2f}×" for v in ratio.values()) + " |")
    print(f"\nsearch-phase peak (faissq process, all variants): {peak:.0f} MiB")
    print("build phases, median s (prep before training | train | add | rest):")
    for name, side in builds.items():
        phases = {k: med(b["phases"][k] for b in side) for k in side[0]["phases"]}
        print(f"  {name}: " + " | ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    print("targets (faissq time / raw time, k_factor=1, same nprobe; <= 1.10 meets):")
    for name, value in (
        ("build wall", ratio["build"]),
        ("build CPU", ratio["cpu"]),
        ("batch-1 p50", ratio["p50"]),
        ("batch-1 p99", ratio["p99"]),
        ("batch-256 time per query", 1 / ratio["qps"]),
    ):
        print(f"  {name}: {value:.2f}× -> {'met' if value <= 1.10 else 'NOT met'}")
    print("spread over rounds (b=1 p50 ms min..max; b=256 QPS min..max):")
    for label in rows:
        p50s = [np.percentile(r["lat"][label], 50) * 1e3 for r in rounds]
        qps = [r["qps"][label] for r in rounds]
        print(f"  {label}: {min(p50s):.3f}..{max(p50s):.3f}; {min(qps):.0f}..{max(qps):.0f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000, help="stored vectors")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--nprobe", type=int, default=16, help="same nprobe on both sides")
    p.add_argument("--queries", type=int, default=1024, help="held-out queries")
    p.add_argument("--family", default="auto", help="faissq family or factory string")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="FAISS OpenMP")
    p.add_argument("--rounds", type=int, default=7, help="interleaved search rounds")
    p.add_argument("--build-rounds", type=int, default=1, help="alternating builds per side")
    p.add_argument("--train-ppc", type=int, default=None, help="train_points_per_centroid")
    p.add_argument("--no-opq", action="store_true", help="IndexSettings(opq=False)")
    p.add_argument("--spread", type=float, default=1.0, help="datasets.clustered spread")
    p.add_argument("--seed", type=int, default=0, help="data seed")
    p.add_argument("--quick", action="store_true", help="30 s smoke run (60k x 32, no OPQ)")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.dim, args.queries, args.rounds, args.no_opq = 60_000, 32, 256, 3, True
    run(args)


if __name__ == "__main__":
    main()
