"""Autotune of a sharded index as a whole: the shards' sweeps merged, chosen on merged recall.

Every shard sweeps the same queries (tuning.sweep): its exact top-k and its top-k at each
setting of the autotune grid, with scores. Every true neighbour of the whole index is in its
own shard's exact top-k, so merging the shards' exact lists by score gives the whole index's
ground truth; a fan-out search at a setting answers the merge of the shards' top-k at that
setting (faissq.rpc.shard_plan), so merging their swept lists gives the recall searches get.
A setting costs what its slowest shard took (the shards answer in parallel). The profile is
chosen as for one index (tuning.choose: the cheapest setting whose lower confidence bound
meets the target) and installed on every shard (docs/tasks.md, Sharded autotune).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from faissq import codec
from faissq.errors import InvalidParameter
from faissq.index import tuning
from faissq.index.results import merge_topk

ARRAYS = ("scores", "ids")  # the arrays of one swept setting


def pack_sweep(part: dict[str, Any]) -> dict[str, Any]:
    """A shard's sweep with its arrays framed for a Celery result (codec.pack_array)."""
    found = [
        None if f is None else {**f, **{a: codec.pack_array(f[a]) for a in ARRAYS}}
        for f in part["found"]
    ]
    return {**part, "found": found, "truth_ids": codec.pack_array(part["truth_ids"]),
            "truth_scores": codec.pack_array(part["truth_scores"])}  # fmt: skip


def unpack_sweep(part: dict[str, Any]) -> dict[str, Any]:
    """The inverse of pack_sweep."""
    found = [
        None if f is None else {**f, **{a: codec.unpack_array(f[a], field=a) for a in ARRAYS}}
        for f in part["found"]
    ]
    truth = {a: codec.unpack_array(part[a], field=a) for a in ("truth_ids", "truth_scores")}
    return {**part, "found": found, **truth}


def key(point: Mapping[str, Any]) -> tuple[tuple[str, int], ...]:
    """A grid setting as a hashable key."""
    return tuple(sorted((str(k), int(v)) for k, v in point.items()))


def at(part: dict[str, Any], point: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """A shard's result at a setting, and whether it was measured there: a setting the shard
    skipped (past its curve top) takes its last one measured at the same k_factor."""
    grid = [key(p) for p in part["grid"]]
    i = grid.index(key(point))
    kf = point.get("k_factor", 1)
    for j in range(i, -1, -1):
        got = part["found"][j]
        if got is not None and part["grid"][j].get("k_factor", 1) == kf:
            return got, j == i
    raise InvalidParameter(f"the shard measured no setting with k_factor {kf} up to {point}")


def merge_sweeps(
    parts: Mapping[str, dict[str, Any]],
    higher_is_better: bool,
    source: str,
    target: float | None = None,
) -> dict[str, Any]:
    """The tuning profile of the whole sharded index from its shards' sweeps (by shard name).

    target: the recall to meet (default: the first shard's `target_recall`). InvalidParameter
    when the shards swept different families or queries, or share no setting.
    """
    if not parts:
        raise InvalidParameter("no shard sweeps to merge")
    names = list(parts)
    first = parts[names[0]]
    k, goal = int(first["k"]), float(target or first["target_recall"])
    for name, p in parts.items():
        if p["param"] != first["param"] or int(p["k"]) != k:
            raise InvalidParameter(
                f"shard {name} swept {p['param']} at k={p['k']}, shard {names[0]} "
                f"{first['param']} at k={k}: rebuild the shards alike (one family) first"
            )
        if p["truth_ids"].shape != first["truth_ids"].shape:
            raise InvalidParameter(f"shard {name} swept other queries than shard {names[0]}")
    shared = set.intersection(*({key(g) for g in p["grid"]} for p in parts.values()))
    grid = [g for g in first["grid"] if key(g) in shared]
    if not grid:
        raise InvalidParameter(f"the shards {names} share no search setting to tune")
    truth = merge_topk([(p["truth_scores"], p["truth_ids"]) for p in parts.values()], k,
                       higher_is_better)[1]  # fmt: skip
    table = []
    for point in grid:
        got = [at(p, point) for p in parts.values()]
        if not any(measured for _, measured in got):
            continue  # every shard was past its curve top here: nothing new to report
        found = merge_topk([(g["scores"], g["ids"]) for g, _ in got], k, higher_is_better)[1]
        ms = max(float(g["ms"]) for g, _ in got)
        table.append(tuning.row(dict(point), tuning.recall_per_query(found, truth), ms))
    return tuning.profile(
        table, goal, k, str(first["param"]), num_queries=int(truth.shape[0]),
        held_out=source == "synthetic", source=source,
        ntotal=int(sum(int(p["ntotal"]) for p in parts.values())), shards=len(names),
        versions={n: p.get("version") for n, p in parts.items()},
    )  # fmt: skip
