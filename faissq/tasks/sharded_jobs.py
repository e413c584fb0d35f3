"""Jobs on a sharded index: one job per shard sent as one Celery group, and its one result."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
from celery import Celery, group
from celery.result import GroupResult

from faissq import keys, shards
from faissq.errors import EmptyBuild, InvalidAttributes, InvalidIds, InvalidVectors

# one shard's part of a batch: (shard, ids, vectors, attribute columns, batch_id)
Part = tuple[int, npt.NDArray[np.int64], npt.NDArray[np.float32] | None,
             dict[str, list[Any]] | None, str | None]  # fmt: skip
# per-shard results whose figures add up over the shards; `seconds` is the slowest shard's
SUMMED = ("applied", "ntotal")


class ShardedResult:
    """The one result of a job sent to every shard of an index (or to those a batch touches).

    `get()` waits for every shard job (the batch is acknowledged when all of them are) and
    returns `shards` (each shard's own result), `seqs` (each shard's update-log seq: the
    `min_seq` of a read-your-writes search) and the totals.
    """

    def __init__(self, result: GroupResult, names: list[str]) -> None:
        """result: the Celery group's result; names: the shard index of each of its children."""
        self.group = result
        self.names = names

    @property
    def id(self) -> str:
        """The group's id."""
        return str(self.group.id)

    def ready(self) -> bool:
        """Whether every shard job has finished."""
        return bool(self.group.ready())

    def successful(self) -> bool:
        """Whether every shard job has finished and succeeded."""
        return bool(self.group.successful())

    @property
    def state(self) -> str:
        """One Celery state for the group: FAILURE if a shard job failed, SUCCESS when all
        succeeded, else the furthest along of PROGRESS, STARTED, RETRY, PENDING."""
        states = {str(r.state) for r in self.group.results}
        if states == {"SUCCESS"}:
            return "SUCCESS"
        for state in ("FAILURE", "REVOKED", "PROGRESS", "STARTED", "RETRY"):
            if state in states:
                return state
        return "PENDING"

    @property
    def info(self) -> Any:
        """While shards report progress: their `done` and `total` summed (the first shard's
        phase); else the first failure's error, or None."""
        infos = [r.info for r in self.group.results if r.state == "PROGRESS"]
        infos = [i for i in infos if isinstance(i, dict)]
        if infos:
            return {"phase": infos[0].get("phase"),
                    "done": sum(int(i.get("done") or 0) for i in infos),
                    "total": sum(int(i.get("total") or 0) for i in infos)}  # fmt: skip
        failed = [r.info for r in self.group.results if r.state == "FAILURE"]
        return failed[0] if failed else None

    def revoke(self, terminate: bool = False) -> None:
        """Revoke every shard job (Celery's revoke; a started one runs on unless terminated)."""
        self.group.revoke(terminate=terminate)

    def get(self, timeout: float | None = None, propagate: bool = True) -> dict[str, Any]:
        """Wait for every shard job; the first failure is raised (propagate) as its own error."""
        results = self.group.get(timeout=timeout, propagate=propagate)
        return summary(dict(zip(self.names, results, strict=True)))


def summary(per_shard: dict[str, Any]) -> dict[str, Any]:
    """Totals of per-shard results: applied and ntotal summed, duplicate when all were."""
    out: dict[str, Any] = {"shards": per_shard}
    maps = [r for r in per_shard.values() if isinstance(r, dict)]
    if len(maps) != len(per_shard):
        return out
    out["seqs"] = {n: r["seq"] for n, r in per_shard.items() if r.get("seq") is not None}
    for name in SUMMED:
        if all(isinstance(r.get(name), int) for r in maps):
            out[name] = sum(r[name] for r in maps)
    if all("duplicate" in r for r in maps):
        out["duplicate"] = all(r["duplicate"] for r in maps)
    if all(isinstance(r.get("seconds"), int | float) for r in maps):
        out["seconds"] = max(r["seconds"] for r in maps)
    return out


def send_group(
    app: Celery, task: str, jobs: list[tuple[str, dict[str, Any]]], reprs: Callable[..., Any]
) -> ShardedResult:
    """Send one job per (shard index, kwargs) as one Celery group, each on its shard's queue."""
    sigs = [
        app.signature(
            task,
            kwargs={"index": name, **body},
            queue=keys.task_queue(name),
            kwargsrepr=repr(reprs({"index": name, **body})),
        )
        for name, body in jobs
    ]
    return ShardedResult(group(sigs).apply_async(), [name for name, _ in jobs])


def split_batch(
    shard_map: shards.ShardMap,
    ids: npt.ArrayLike,
    vectors: npt.ArrayLike | None,
    batch_id: str | None,
    *,
    every_shard: bool = False,
    attributes: dict[str, list[Any]] | None = None,
) -> list[Part]:
    """(shard, its ids, its vectors, its attribute columns, its batch_id) for each shard the
    batch touches; attribute columns are cut by the same rows as the ids.

    every_shard: a build, where each shard must get rows (EmptyBuild otherwise).
    """
    id_arr = np.ascontiguousarray(np.asarray(ids, dtype=np.int64)).reshape(-1)
    vec = None if vectors is None else np.asarray(vectors, dtype=np.float32)
    if vec is not None and (vec.ndim != 2 or vec.shape[0] != id_arr.shape[0]):
        raise InvalidVectors(f"vectors {vec.shape} do not match {id_arr.shape[0]} ids")
    cols = {} if attributes is None else attributes
    short = [k for k, v in cols.items() if len(v) != id_arr.shape[0]]
    if short:
        raise InvalidAttributes(f"attribute column(s) {short} do not have {id_arr.shape[0]} values")
    if np.unique(id_arr).size != id_arr.size:
        raise InvalidIds("ids must be unique within a batch")
    out = []
    for s, rows in enumerate(shards.split_rows(id_arr, shard_map.shards)):
        if rows.size == 0:
            if every_shard:
                raise EmptyBuild(f"shard {s} of {shard_map.name!r} gets no vectors from this build")
            continue
        bid = None if batch_id is None else shards.shard_batch_id(batch_id, s, shard_map.shards)
        part = None if attributes is None else {k: [v[i] for i in rows.tolist()]
                                                for k, v in cols.items()}  # fmt: skip
        out.append((s, id_arr[rows], None if vec is None else vec[rows], part, bid))
    return out
