"""JobClient.autotune on a sharded index: one profile for the whole index, on every shard.

Three rounds of shard jobs (docs/tasks.md, Autotune of a sharded index): `faissq.sweep` on the
first shard for calibration queries; `faissq.sweep` with those queries on every shard, as one
group; the profile merged here from their sweeps (faissq.index.merged_tuning: recall of the
merged top-k, what a fan-out search gets) sent as `faissq.autotune` with `profile` to every
shard, as one group. The result object moves to the next round whenever it is polled (ready,
state, info, get), as a Celery result is polled; it holds no thread of its own.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

from celery.exceptions import TimeoutError as CeleryTimeout

from faissq import codec, shards
from faissq.index.merged_tuning import merge_sweeps, unpack_sweep

if TYPE_CHECKING:
    from faissq.tasks.producer import JobClient
    from faissq.tasks.sharded_jobs import ShardedResult

ROUNDS = ("queries", "sweep", "install")  # the PROGRESS phases, one per round


class ShardedTune:
    """The result of an autotune of a sharded index: `get()` returns the merged profile
    (`shards`: the shard count, `installed`: each shard's snapshot), or raises the first
    failed shard job's error."""

    def __init__(
        self,
        jobs: JobClient,
        shard_map: shards.ShardMap,
        target_recall: float | None,
        time_limit_s: float | None,
    ) -> None:
        """Send the first round: calibration queries from the first shard."""
        self.jobs = jobs
        self.map = shard_map
        self.target = target_recall
        self.limits = {"time_limit_s": time_limit_s} if time_limit_s is not None else {}
        self.id = f"sharded-autotune-{uuid.uuid4().hex}"
        self.round = 0
        self.source = "synthetic"
        self.error: BaseException | None = None
        self.value: dict[str, Any] | None = None
        self.profile: dict[str, Any] = {}
        self.t0 = time.monotonic()
        first = [(shard_map.names[0], {**self.limits})]
        self.current: ShardedResult = jobs._send_each("faissq.sweep", first)

    def _advance(self, wait: float | None) -> None:
        """Collect each finished round and send the next; wait up to `wait` seconds for the
        current one (0: not at all, None: until it ends). A failed round ends the autotune."""
        deadline = None if wait is None else time.monotonic() + wait
        while self.value is None and self.error is None:
            if wait == 0 and not self.current.ready():
                return
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                out = self.current.get(timeout=left)
            except CeleryTimeout:
                return
            except Exception as exc:  # the shard job's own (typed) error
                self.error = exc
                return
            try:
                self._next(out)
            except Exception as exc:  # shards that cannot be tuned as one (merge_sweeps)
                self.error = exc

    def _next(self, out: dict[str, Any]) -> None:
        """Send the round after the one that returned `out`, or keep the final value."""
        per_shard: dict[str, Any] = out["shards"]
        if self.round == 0:
            got = per_shard[self.map.names[0]]
            queries = codec.unpack_array(got["queries"], field="queries")
            self.source = str(got["source"])
            sent = self.jobs.vectors_kwargs(queries, None)
            body = {"queries" if "vectors" in sent else "queries_ref": next(iter(sent.values())),
                    "k": int(got["k"]), "target_recall": self.target, **self.limits}  # fmt: skip
            body = {k: v for k, v in body.items() if v is not None}
            self.current = self.jobs._send_each("faissq.sweep",
                                               [(n, body) for n in self.map.names])  # fmt: skip
        elif self.round == 1:
            parts = {n: unpack_sweep(per_shard[n]) for n in self.map.names}
            self.profile = merge_sweeps(parts, self.map.higher_is_better, self.source,
                                        self.target)  # fmt: skip
            body = {"profile": self.profile, **self.limits}
            self.current = self.jobs._send_each("faissq.autotune",
                                               [(n, body) for n in self.map.names])  # fmt: skip
        else:
            installed = {n: r.get("snapshot") for n, r in per_shard.items()}
            self.value = {**self.profile, "installed": installed,
                          "seconds": round(time.monotonic() - self.t0, 3)}  # fmt: skip
        self.round += 1

    def ready(self) -> bool:
        """Whether the autotune has ended (installed on every shard, or failed)."""
        self._advance(0)
        return self.value is not None or self.error is not None

    def successful(self) -> bool:
        """Whether every shard holds the merged profile."""
        return self.ready() and self.value is not None

    def failed(self) -> bool:
        """Whether a round failed."""
        return self.ready() and self.error is not None

    @property
    def state(self) -> str:
        """SUCCESS, FAILURE, PENDING while the first round waits, else PROGRESS."""
        if self.ready():
            return "SUCCESS" if self.value is not None else "FAILURE"
        if self.round == 0 and self.current.state == "PENDING":
            return "PENDING"
        return "PROGRESS"

    @property
    def info(self) -> Any:
        """The error of a failed autotune; else the current round's progress (the sweep's
        settings done over the shards) or just its phase."""
        if self.error is not None:
            return self.error
        got = self.current.info if self.current.state == "PROGRESS" else None
        if isinstance(got, dict) and self.round == 1:
            return {**got, "phase": "sweep"}
        return {"phase": ROUNDS[min(self.round, 2)], "done": 0, "total": 1}

    def revoke(self, terminate: bool = False) -> None:
        """Revoke the current round's shard jobs (the later rounds are then never sent)."""
        self.current.revoke(terminate=terminate)

    def get(self, timeout: float | None = None, propagate: bool = True) -> Any:
        """Wait for the profile to be installed on every shard; CeleryTimeout past `timeout`."""
        self._advance(timeout)
        if self.error is not None:
            if propagate:
                raise self.error
            return self.error
        if self.value is None:
            raise CeleryTimeout(f"sharded autotune {self.id} not done within {timeout}s")
        return self.value
