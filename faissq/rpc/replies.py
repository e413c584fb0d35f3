"""Search RPC replies (docs/protocol.md, Reply): encoded by the worker, decoded by the clients.

Three result shapes share one map: top-k (`scores`, `ids` of shape [n, k]), range (`lims`,
then flat `scores` and `ids`) and fetch (`ids`, `vectors`, `missing`, `attributes`); errors carry
`error`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from faissq import codec
from faissq.errors import InvalidParameter

VERSION = 1  # the "v" of every reply (protocol.VERSION)
F32 = frozenset({"<f4"})
I64 = frozenset({"<i8"})


@dataclass(frozen=True)
class Reply:
    """A decoded reply: results when ok, else the error code and message."""

    id: str
    ok: bool
    scores: npt.NDArray[np.float32] | None = None  # [n, k]; range: flat, rows cut by lims
    ids: npt.NDArray[np.int64] | None = None  # [n, k]; range: flat; fetch: the ids found
    version: int | None = None
    worker: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    target_met: bool | None = None  # only when the request gave target_recall
    code: str = ""
    message: str = ""
    lims: npt.NDArray[np.int64] | None = None  # range: query i's results are lims[i]:lims[i+1]
    truncated: bool = False  # range: results were cut at the worker's cap
    vectors: npt.NDArray[np.float32] | None = None  # fetch: one row per found id
    missing: npt.NDArray[np.int64] | None = None  # fetch: requested ids not live in the index
    attributes: dict[str, list[Any]] = field(default_factory=dict)  # fetch: field -> per id


def encode_result(
    request_id: str,
    scores: npt.NDArray[np.float32] | None,
    ids: npt.NDArray[np.int64],
    version: int,
    worker: str,
    timings: dict[str, float],
    target_met: bool | None = None,
    extra: dict[str, Any] | None = None,
) -> bytes:
    """Encode a successful reply (target_met: whether a requested target_recall is reachable;
    extra: the range or fetch fields, arrays packed as frames)."""
    msg: dict[str, Any] = {"v": VERSION, "id": request_id, "ok": True}
    if scores is not None:
        msg["scores"] = codec.pack_array(scores)
    msg["ids"] = codec.pack_array(ids)
    msg["version"] = int(version)
    msg["worker"] = worker
    msg["timings"] = timings
    if target_met is not None:
        msg["target_met"] = target_met
    for name, value in (extra or {}).items():
        msg[name] = codec.pack_array(value) if isinstance(value, np.ndarray) else value
    return codec.dumps(msg)


def encode_error(request_id: str, code: str, message: str, worker: str = "") -> bytes:
    """Encode an error reply with its stable code."""
    return codec.dumps(
        {
            "v": VERSION,
            "id": request_id,
            "ok": False,
            "error": {"code": code, "message": message[:1000]},
            "worker": worker,
        }
    )


def decode_reply(raw: bytes) -> Reply:
    """Decode a reply of any kind; a malformed one raises InvalidParameter."""
    msg = codec.loads(raw)
    if not isinstance(msg, dict) or not isinstance(msg.get("ok"), bool):
        raise InvalidParameter("reply must be a map with a boolean 'ok'")
    rid = msg.get("id") if isinstance(msg.get("id"), str) else ""
    worker = msg.get("worker") if isinstance(msg.get("worker"), str) else ""
    if not msg["ok"]:
        err = msg.get("error")
        err = err if isinstance(err, dict) else {}
        code, message = err.get("code"), err.get("message")
        return Reply(
            id=str(rid),
            ok=False,
            worker=str(worker),
            code=code if isinstance(code, str) else "error",
            message=message if isinstance(message, str) else "",
        )
    version = msg.get("version")
    timings = msg.get("timings")
    met = msg.get("target_met")
    common: dict[str, Any] = {
        "id": str(rid),
        "ok": True,
        "version": version if isinstance(version, int) else None,
        "worker": str(worker),
        "timings": timings if isinstance(timings, dict) else {},
        "target_met": met if isinstance(met, bool) else None,
    }
    if "lims" in msg:
        return Reply(**common, **_range_fields(msg))
    if "vectors" in msg:
        return Reply(**common, **_fetch_fields(msg))
    scores = codec.unpack_array(msg.get("scores"), field="scores", dtypes=F32, ndim=2)
    ids = codec.unpack_array(msg.get("ids"), field="ids", dtypes=I64, ndim=2)
    if scores.shape != ids.shape:
        raise InvalidParameter(f"reply scores {scores.shape} and ids {ids.shape} differ")
    return Reply(**common, scores=scores, ids=ids)


def _range_fields(msg: dict[str, Any]) -> dict[str, Any]:
    """lims, scores, ids and truncated of a range reply, checked against each other."""
    lims = codec.unpack_array(msg.get("lims"), field="lims", dtypes=I64, ndim=1)
    scores = codec.unpack_array(msg.get("scores"), field="scores", dtypes=F32, ndim=1)
    ids = codec.unpack_array(msg.get("ids"), field="ids", dtypes=I64, ndim=1)
    if (
        lims.size == 0
        or lims[0] != 0
        or bool((np.diff(lims) < 0).any())
        or lims[-1] != ids.size
        or scores.size != ids.size
    ):
        raise InvalidParameter(f"range reply lims do not cut {ids.size} results into rows")
    return {"lims": lims, "scores": scores, "ids": ids, "truncated": msg.get("truncated") is True}


def _fetch_fields(msg: dict[str, Any]) -> dict[str, Any]:
    """ids, vectors, missing and attributes of a fetch reply, checked against each other."""
    ids = codec.unpack_array(msg.get("ids"), field="ids", dtypes=I64, ndim=1)
    vectors = codec.unpack_array(msg.get("vectors"), field="vectors", dtypes=F32, ndim=2)
    missing = codec.unpack_array(msg.get("missing"), field="missing", dtypes=I64, ndim=1)
    if vectors.shape[0] != ids.size:
        raise InvalidParameter(f"fetch reply has {ids.size} ids and {vectors.shape[0]} vectors")
    attrs = msg.get("attributes") or {}
    if not isinstance(attrs, dict) or any(
        not isinstance(col, list) or len(col) != ids.size for col in attrs.values()
    ):
        raise InvalidParameter(f"fetch reply attributes are not one list of {ids.size} per field")
    return {"ids": ids, "vectors": vectors, "missing": missing, "attributes": attrs}
