"""JobClient: how an upstream service enqueues faissq jobs (each call returns a Celery result).

Services that do not import faissq send the same messages with ``send_task`` (docs/tasks.md).
"""

from __future__ import annotations

import hashlib
import io
import uuid
from collections.abc import Mapping
from typing import Any, TypeAlias

import fsspec
import msgpack
import numpy as np
import numpy.typing as npt
from celery.result import AsyncResult

from faissq import codec, keys, shards
from faissq.config import Settings
from faissq.errors import (
    InvalidAttributes,
    InvalidParameter,
    StorageUnavailable,
    permission_denied,
    refused,
)
from faissq.index.builder import train_centroids
from faissq.storage import incoming
from faissq.tasks.sharded_jobs import ShardedResult, send_group, split_batch
from faissq.tasks.sharded_tune import ShardedTune
from faissq.worker.app import make_celery_app

INCOMING = incoming.FOLDER  # under the storage root: where clients drop .npy batches


def put_vectors(
    settings: Settings, array: npt.ArrayLike, *, name: str | None = None
) -> dict[str, Any]:
    """Write an array as .npy under ``<storage root>/incoming/`` and return its reference.

    The reference ``{"path", "shape", "sha256"}`` is what ``vectors_ref``/``ids_ref`` expect; the
    file is written to a temp name and renamed, so a worker never reads half a file.
    """
    arr = np.ascontiguousarray(np.asarray(array))
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return {**_put(settings, buf.getvalue(), f"{name or uuid.uuid4().hex}.npy"),
            "shape": list(arr.shape)}  # fmt: skip


def put_attributes(settings: Settings, columns: Mapping[str, Any]) -> dict[str, Any]:
    """Write attribute columns as a msgpack map under ``incoming/``; the ``attributes_ref``."""
    data = msgpack.packb(attribute_columns(columns), use_bin_type=True)
    return _put(settings, data, f"{uuid.uuid4().hex}.msgpack")


def attribute_columns(columns: Mapping[str, Any]) -> dict[str, list[Any]]:
    """Columns as plain lists (numpy arrays included; None stays null) for msgpack."""
    if not isinstance(columns, Mapping):
        raise InvalidAttributes("attributes must map field names to columns of values")
    return {str(k): (v.tolist() if isinstance(v, np.ndarray) else list(v))
            for k, v in columns.items()}  # fmt: skip


def _put(settings: Settings, data: bytes, name: str) -> dict[str, Any]:
    """Write bytes atomically (temp name, rename) as incoming/<name>; {"path", "sha256"}."""
    rel = f"{INCOMING}/{name}"
    fs, root = fsspec.core.url_to_fs(settings.storage.url)
    full = f"{str(root).rstrip('/')}/{rel}"
    tmp = f"{str(root).rstrip('/')}/{INCOMING}/.tmp-{uuid.uuid4().hex}"
    try:
        fs.makedirs(f"{str(root).rstrip('/')}/{INCOMING}", exist_ok=True)
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, full)
    except OSError as exc:
        raise StorageUnavailable(f"cannot write {full}: {exc}") from exc
    return {"path": rel, "sha256": hashlib.sha256(data).hexdigest()}


Job: TypeAlias = (
    AsyncResult | ShardedResult | ShardedTune
)  # a sharded index's jobs return one result for all shards


class JobClient:
    """Enqueue faissq jobs on the right index queue; every method returns an AsyncResult, or a
    ShardedResult (one Celery group over the shards) for an index declared sharded (autotune:
    a ShardedTune)."""

    def __init__(self, settings: Settings) -> None:
        """settings: where Redis and the shared storage are (and the inline size cap)."""
        self.settings = settings
        self.app = make_celery_app(settings)
        self._maps: dict[str, shards.ShardMap | None] = {}  # read once per name: S is fixed
        self._client: Any = None

    def declare_sharded(
        self, name: str, shard_count: int, metric: str = "cosine"
    ) -> shards.ShardMap:
        """Record `name` as an index of `shard_count` shards (fixed; IndexExists if declared
        otherwise); its shards are the indexes `<name>.s<s>of<S>` that workers serve."""
        shard_map = shards.ShardMap(name, shard_count, metric)  # type: ignore[arg-type]
        self._maps[name] = self._guard(lambda: shards.declare(self._redis(), shard_map))
        return shard_map

    def shard_map(self, index: str) -> shards.ShardMap | None:
        """The index's shard definition (None: an ordinary index), read from Redis once."""
        if index not in self._maps:
            self._maps[index] = self._guard(lambda: shards.lookup(self._redis(), index))
        return self._maps[index]

    def _redis(self) -> Any:
        """A client for the definition records, kept with the search keys (rpc.url, else the
        broker; a cluster client under rpc.cluster), made once."""
        from faissq.rpc.nodes import record_client

        if not (self.settings.rpc.url or self.settings.redis.url):
            raise InvalidParameter("settings.redis.url is unset: JobClient needs the broker")
        if self._client is None:
            self._client = record_client(self.settings)
        return self._client

    def send(self, task: str, index: str, **kwargs: Any) -> Job:
        """Send one job by name to the index's queue (None-valued kwargs are left out); on a
        sharded index, the same job to every shard as one group."""
        body = {k: v for k, v in kwargs.items() if v is not None}
        shard_map = self.shard_map(index)
        if shard_map is not None:
            return self._send_each(task, [(n, body) for n in shard_map.names])
        body = {"index": index, **body}
        return self._guard(
            lambda: self.app.send_task(
                task,
                kwargs=body,
                queue=keys.task_queue(index),
                kwargsrepr=repr(_summary(body)),  # events and Flower show sizes, not raw bytes
            )
        )

    def _send_each(self, task: str, jobs: list[tuple[str, dict[str, Any]]]) -> ShardedResult:
        """Send one job per (index, kwargs), each on its index's queue, as one Celery group."""
        return self._guard(lambda: send_group(self.app, task, jobs, _summary))  # type: ignore[no-any-return]

    @staticmethod
    def _guard(call: Any) -> Any:
        """Run a Redis or broker call; a NOPERM refusal becomes PermissionDenied."""
        try:
            return call()
        except Exception as exc:  # kombu wraps Redis errors in its own OperationalError
            message = refused(exc)
            if message is None:
                raise
            raise permission_denied(message, "producer") from exc

    def _split(
        self,
        task: str,
        shard_map: shards.ShardMap,
        ids: npt.ArrayLike,
        vectors: npt.ArrayLike | None,
        batch_id: str | None,
        by_reference: bool | None,
        attributes: Mapping[str, Any] | None = None,
        **rest: Any,
    ) -> ShardedResult:
        """A batch cut by shard: one job per shard it touches, sent as one group."""
        jobs = []
        cols = None if attributes is None else attribute_columns(attributes)
        parts = split_batch(shard_map, ids, vectors, batch_id, every_shard=task == "faissq.build",
                            attributes=cols)  # fmt: skip
        for s, part_ids, part_vecs, part_cols, bid in parts:
            body = {"ids": _ids(part_ids), "batch_id": bid, **rest}
            if part_vecs is not None:
                body.update(self.vectors_kwargs(part_vecs, by_reference))
                body.update(self.attributes_kwargs(part_cols, "vectors_ref" in body, by_reference))
            body = {k: v for k, v in body.items() if v is not None}
            jobs.append((shard_map.names[s], body))
        return self._send_each(task, jobs)

    def vectors_kwargs(self, vectors: npt.ArrayLike, by_reference: bool | None) -> dict[str, Any]:
        """Inline below the cap (or when asked), else a .npy reference on shared storage."""
        arr = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
        if by_reference is None:
            by_reference = arr.nbytes > self.settings.worker.inline_max_bytes
        if by_reference:
            return {"vectors_ref": put_vectors(self.settings, arr)}
        return {"vectors": codec.pack_array(arr)}

    def attributes_kwargs(
        self, columns: Mapping[str, Any] | None, vectors_by_ref: bool, by_reference: bool | None
    ) -> dict[str, Any]:
        """Attribute columns inline, or by reference (`attributes_ref`) when asked, when the
        vectors went by reference, or when they pass the inline cap themselves."""
        if columns is None:
            return {}
        cols = attribute_columns(columns)
        if by_reference is None:
            by_reference = vectors_by_ref or (
                len(msgpack.packb(cols, use_bin_type=True)) > self.settings.worker.inline_max_bytes
            )
        if by_reference:
            return {"attributes_ref": put_attributes(self.settings, cols)}
        return {"attributes": cols}

    def build(
        self,
        index: str,
        vectors: npt.ArrayLike,
        ids: npt.ArrayLike | None = None,
        *,
        family: str | None = None,
        time_limit_s: float | None = None,
        by_reference: bool | None = None,
        force: bool | None = None,
        centroids: npt.ArrayLike | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> Job:
        """Replace the index with a fresh build (ids default to 0..n-1); a sharded index builds
        its shards in parallel, each from its own rows (every shard must get some).

        force: swap it in even when the recall gate refuses it. centroids: an IVF family's
        coarse centroids (nlist x dim) used instead of training them; a sharded ivf_flat build
        (or ivf_pq with index.opq off) trains them here on a sample of the whole corpus, so
        every shard has the same lists. attributes: {field: values per row} (None: null),
        sent by reference with the vectors.
        """
        shard_map = self.shard_map(index)
        if shard_map is not None:
            arr = np.asarray(vectors, dtype=np.float32)
            all_ids = np.arange(arr.shape[0]) if ids is None else ids
            if centroids is None and shares_quantizer(family, self.settings, shard_map.shards):
                centroids = train_centroids(arr, self.settings.index, shard_map.metric)
            return self._split("faissq.build", shard_map, all_ids, arr, None, by_reference,
                               attributes, family=family, time_limit_s=time_limit_s, force=force,
                               centroids_ref=self._centroids_ref(centroids))  # fmt: skip
        vecs = self.vectors_kwargs(vectors, by_reference)
        return self.send(
            "faissq.build",
            index,
            **vecs,
            **self.attributes_kwargs(attributes, "vectors_ref" in vecs, by_reference),
            ids=_ids(ids) if ids is not None else None,
            family=family,
            time_limit_s=time_limit_s,
            force=force,
            centroids_ref=self._centroids_ref(centroids),
        )

    def _centroids_ref(self, centroids: npt.ArrayLike | None) -> dict[str, Any] | None:
        """Centroids written once to shared storage (every shard job reads the same file)."""
        if centroids is None:
            return None
        return put_vectors(self.settings, np.asarray(centroids, dtype=np.float32))

    def upsert(
        self,
        index: str,
        ids: npt.ArrayLike,
        vectors: npt.ArrayLike,
        *,
        batch_id: str | None = None,
        by_reference: bool | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> Job:
        """Insert or replace vectors by id; `batch_id` (default: task id) makes it idempotent.
        On a sharded index each shard's job gets `<batch_id>.s<s>of<S>`. attributes: {field:
        values per row} (None: null; fields left out are null), replacing the ids' old values."""
        shard_map = self.shard_map(index)
        if shard_map is not None:
            return self._split("faissq.upsert", shard_map, ids, vectors, batch_id, by_reference,
                               attributes)  # fmt: skip
        vecs = self.vectors_kwargs(vectors, by_reference)
        return self.send(
            "faissq.upsert",
            index,
            ids=_ids(ids),
            **vecs,
            **self.attributes_kwargs(attributes, "vectors_ref" in vecs, by_reference),
            batch_id=batch_id,
        )

    def delete(self, index: str, ids: npt.ArrayLike, *, batch_id: str | None = None) -> Job:
        """Delete vectors by id (on a sharded index, each id on its shard)."""
        shard_map = self.shard_map(index)
        if shard_map is not None:
            return self._split("faissq.delete", shard_map, ids, None, batch_id, None)
        return self.send("faissq.delete", index, ids=_ids(ids), batch_id=batch_id)

    def merge(self, index: str, *, time_limit_s: float | None = None) -> Job:
        """Fold delta and tombstones into the primary."""
        return self.send("faissq.merge", index, time_limit_s=time_limit_s)

    def rebuild(
        self,
        index: str,
        *,
        family: str | None = None,
        time_limit_s: float | None = None,
        force: bool | None = None,
    ) -> Job:
        """Retrain the primary from the raw vectors (optionally into another family); the
        worker saves a snapshot of it once swapped in (its result's `snapshot`).

        force: swap it in even when the recall gate refuses it.
        """
        return self.send("faissq.rebuild", index, family=family, time_limit_s=time_limit_s,
                         force=force)  # fmt: skip

    def save(self, index: str) -> Job:
        """Snapshot the index to shared storage."""
        return self.send("faissq.save", index)

    def reload(self, index: str) -> Job:
        """Reload the index from shared storage."""
        return self.send("faissq.reload", index)

    def autotune(
        self,
        index: str,
        *,
        target_recall: float | None = None,
        time_limit_s: float | None = None,
    ) -> Job:
        """Tune search parameters for a target recall. A sharded index is tuned as a whole:
        recall measured on the shards' merged results, one profile installed on every shard
        (a ShardedTune; docs/tasks.md)."""
        shard_map = self.shard_map(index)
        if shard_map is not None:
            return ShardedTune(self, shard_map, target_recall, time_limit_s)
        return self.send(
            "faissq.autotune", index, target_recall=target_recall, time_limit_s=time_limit_s
        )

    def stats(self, index: str) -> Job:
        """Ask the worker for the index's state and sizes."""
        return self.send("faissq.stats", index)

    def close(self) -> None:
        """Release broker and backend connections."""
        if self._client is not None:
            self._client.close()
        self.app.close()


def shares_quantizer(family: str | None, settings: Settings, shard_count: int) -> bool:
    """Whether a sharded build of this family gets one coarse quantizer trained client-side:
    IVF families whose quantizer works on the raw vectors (no OPQ rotation before it), over
    more than one shard (one shard's own quantizer is already the whole corpus's)."""
    wanted = family or settings.index.family
    ivf = wanted == "ivf_flat" or (wanted.startswith("ivf_pq") and not settings.index.opq)
    return ivf and shard_count > 1


def _ids(ids: npt.ArrayLike) -> dict[str, Any]:
    """Frame ids as raw little-endian int64 bytes."""
    return codec.pack_array(np.ascontiguousarray(np.asarray(ids, dtype=np.int64)))


def _summary(kwargs: dict[str, Any]) -> dict[str, Any]:
    """kwargs with inline arrays replaced by their dtype and shape."""
    return {
        k: {"dtype": v["dtype"], "shape": v["shape"]} if isinstance(v, dict) and "data" in v else v
        for k, v in kwargs.items()
    }
