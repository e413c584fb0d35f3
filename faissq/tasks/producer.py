"""JobClient: how an upstream service enqueues faissq jobs (each call returns a Celery AsyncResult).

Services that do not import faissq send the same messages with ``send_task`` (docs/tasks.md).
"""

from __future__ import annotations

import hashlib
import io
import uuid
from typing import Any

import fsspec
import numpy as np
import numpy.typing as npt
from celery.result import AsyncResult

from faissq import codec, keys
from faissq.config import Settings
from faissq.errors import StorageUnavailable, permission_denied, refused
from faissq.storage import incoming
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
    data = buf.getvalue()
    rel = f"{INCOMING}/{name or uuid.uuid4().hex}.npy"
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
    return {"path": rel, "shape": list(arr.shape), "sha256": hashlib.sha256(data).hexdigest()}


class JobClient:
    """Enqueue faissq jobs on the right index queue; every method returns an AsyncResult."""

    def __init__(self, settings: Settings) -> None:
        """settings: where Redis and the shared storage are (and the inline size cap)."""
        self.settings = settings
        self.app = make_celery_app(settings)

    def send(self, task: str, index: str, **kwargs: Any) -> AsyncResult:
        """Send one job by name to the index's queue (None-valued kwargs are left out)."""
        body = {"index": index, **{k: v for k, v in kwargs.items() if v is not None}}
        try:
            return self.app.send_task(
                task,
                kwargs=body,
                queue=keys.task_queue(index),
                kwargsrepr=repr(_summary(body)),  # events and Flower show sizes, not raw bytes
            )
        except Exception as exc:  # kombu wraps Redis errors in its own OperationalError
            message = refused(exc)
            if message is None:
                raise
            raise permission_denied(message, "producer") from exc

    def vectors_kwargs(self, vectors: npt.ArrayLike, by_reference: bool | None) -> dict[str, Any]:
        """Inline below the cap (or when asked), else a .npy reference on shared storage."""
        arr = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
        if by_reference is None:
            by_reference = arr.nbytes > self.settings.worker.inline_max_bytes
        if by_reference:
            return {"vectors_ref": put_vectors(self.settings, arr)}
        return {"vectors": codec.pack_array(arr)}

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
    ) -> AsyncResult:
        """Replace the index with a fresh build (ids default to 0..n-1).

        force: swap it in even when the recall gate refuses it.
        """
        return self.send(
            "faissq.build",
            index,
            **self.vectors_kwargs(vectors, by_reference),
            ids=_ids(ids) if ids is not None else None,
            family=family,
            time_limit_s=time_limit_s,
            force=force,
        )

    def upsert(
        self,
        index: str,
        ids: npt.ArrayLike,
        vectors: npt.ArrayLike,
        *,
        batch_id: str | None = None,
        by_reference: bool | None = None,
    ) -> AsyncResult:
        """Insert or replace vectors by id; `batch_id` (default: task id) makes it idempotent."""
        return self.send(
            "faissq.upsert",
            index,
            ids=_ids(ids),
            **self.vectors_kwargs(vectors, by_reference),
            batch_id=batch_id,
        )

    def delete(self, index: str, ids: npt.ArrayLike, *, batch_id: str | None = None) -> AsyncResult:
        """Delete vectors by id."""
        return self.send("faissq.delete", index, ids=_ids(ids), batch_id=batch_id)

    def merge(self, index: str, *, time_limit_s: float | None = None) -> AsyncResult:
        """Fold delta and tombstones into the primary."""
        return self.send("faissq.merge", index, time_limit_s=time_limit_s)

    def rebuild(
        self,
        index: str,
        *,
        family: str | None = None,
        time_limit_s: float | None = None,
        force: bool | None = None,
    ) -> AsyncResult:
        """Retrain the primary from the raw vectors (optionally into another family).

        force: swap it in even when the recall gate refuses it.
        """
        return self.send("faissq.rebuild", index, family=family, time_limit_s=time_limit_s,
                         force=force)  # fmt: skip

    def save(self, index: str) -> AsyncResult:
        """Snapshot the index to shared storage."""
        return self.send("faissq.save", index)

    def reload(self, index: str) -> AsyncResult:
        """Reload the index from shared storage."""
        return self.send("faissq.reload", index)

    def autotune(
        self,
        index: str,
        *,
        target_recall: float | None = None,
        time_limit_s: float | None = None,
    ) -> AsyncResult:
        """Tune search parameters for a target recall."""
        return self.send(
            "faissq.autotune", index, target_recall=target_recall, time_limit_s=time_limit_s
        )

    def stats(self, index: str) -> AsyncResult:
        """Ask the worker for the index's state and sizes."""
        return self.send("faissq.stats", index)

    def close(self) -> None:
        """Release broker and backend connections."""
        self.app.close()


def _ids(ids: npt.ArrayLike) -> dict[str, Any]:
    """Frame ids as raw little-endian int64 bytes."""
    return codec.pack_array(np.ascontiguousarray(np.asarray(ids, dtype=np.int64)))


def _summary(kwargs: dict[str, Any]) -> dict[str, Any]:
    """kwargs with inline arrays replaced by their dtype and shape."""
    return {
        k: {"dtype": v["dtype"], "shape": v["shape"]} if isinstance(v, dict) and "data" in v else v
        for k, v in kwargs.items()
    }
