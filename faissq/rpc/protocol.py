"""The search RPC wire format (docs/protocol.md): msgpack maps, arrays as raw little-endian bytes.

A request is LPUSHed on ``faissq:<index>:rpc``; exactly one reply is LPUSHed on its reply key,
by a worker or by the submit script (no worker alive, queue full). Never pickle.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt

from faissq import codec
from faissq.errors import (
    FaissqError,
    InvalidIds,
    InvalidParameter,
    InvalidVectors,
    PayloadTooLarge,
    PermanentError,
)

log = logging.getLogger(__name__)

VERSION = 1  # the "v" field of every request and reply; bumped on any incompatible change

REQUIRED = frozenset({"v", "id", "reply", "deadline", "k", "queries"})
OPTIONAL = frozenset(
    {"nprobe", "ef_search", "k_factor", "target_recall", "allow_ids", "deny_ids", "sent"}
)
MAX_ID_CHARS = 128  # request ids are opaque strings; a uuid4 hex is 32
MAX_REPLY_KEY_CHARS = 512
PEEK_ENTRIES = 32  # map entries read from an oversized request while looking for its reply key

ALLOWED = REQUIRED | OPTIONAL

F32 = frozenset({"<f4"})
I64 = frozenset({"<i8"})

# Submit script: the whole client side of a request in one round trip. It answers on the reply
# key itself when no worker is alive or the list is at its bound, so a client pipelining its
# BRPOP right behind it is never left waiting. The alive key's value is the bound.
SUBMIT_SCRIPT = """\
local function answer(code, message)
  redis.call('LPUSH', KEYS[3], cmsgpack.pack({v = 1, id = ARGV[3], ok = false,
    error = {code = code, message = message}}))
  redis.call('EXPIRE', KEYS[3], ARGV[2])
  return code
end
local bound = redis.call('GET', KEYS[2])
if not bound then
  return answer('no_worker', 'no worker serves this index (no alive key)')
end
local n = redis.call('LLEN', KEYS[1])
if n >= tonumber(bound) then
  return answer('busy', 'request list holds ' .. n .. ' requests, bound ' .. bound)
end
return redis.call('LPUSH', KEYS[1], ARGV[1])
"""


@dataclass(frozen=True)
class Limits:
    """What a worker accepts: reply key namespace, message size, k, filter length, work caps."""

    reply_prefix: str
    max_bytes: int
    max_k: int
    max_filter_ids: int
    max_nprobe: int = 2048
    max_ef_search: int = 4096
    max_k_factor: int = 32
    max_candidates: int = 1 << 18  # rows x k x k_factor of one request
    default_k_factor: int = 4  # the index's k_factor: what a request that names none refines


@dataclass
class Request:
    """One decoded, checked search request."""

    id: str
    reply: str
    deadline: float
    k: int
    queries: npt.NDArray[np.float32]
    nprobe: int | None = None
    ef_search: int | None = None
    k_factor: int | None = None
    target_recall: float | None = None
    allow_ids: npt.NDArray[np.int64] | None = None
    deny_ids: npt.NDArray[np.int64] | None = None
    sent: float | None = None

    def params(self) -> tuple[Any, ...]:
        """The search parameters two requests must share to run in one batched call."""
        return (self.k, self.nprobe, self.ef_search, self.k_factor, self.target_recall)


@dataclass(frozen=True)
class Reply:
    """A decoded reply: results when ok, else the error code and message."""

    id: str
    ok: bool
    scores: npt.NDArray[np.float32] | None = None
    ids: npt.NDArray[np.int64] | None = None
    version: int | None = None
    worker: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    target_met: bool | None = None  # only when the request gave target_recall
    code: str = ""
    message: str = ""


class Unreadable(Exception):
    """Raised when a request has no usable reply key: it can only be dropped (and counted)."""


class BadRequest(Exception):
    """Raised when a request is malformed but can be answered on its reply key."""

    def __init__(self, reply: str, request_id: str, error: FaissqError) -> None:
        super().__init__(str(error))
        self.reply = reply
        self.request_id = request_id
        self.error = error


# -- requests --------------------------------------------------------------------------------


def encode_request(
    request_id: str,
    reply: str,
    deadline: float,
    k: int,
    queries: npt.NDArray[np.float32],
    **options: Any,
) -> bytes:
    """Encode a request; `options` are the optional fields (None values are left out)."""
    unknown = set(options) - OPTIONAL
    if unknown:
        raise InvalidParameter(f"unknown request field(s): {', '.join(sorted(unknown))}")
    msg: dict[str, Any] = {
        "v": VERSION,
        "id": request_id,
        "reply": reply,
        "deadline": float(deadline),
        "k": k,
        "queries": codec.pack_array(queries),
    }
    for name, value in options.items():
        if value is None:
            continue
        msg[name] = codec.pack_array(value) if name in ("allow_ids", "deny_ids") else value
    return codec.dumps(msg)


def decode_request(raw: bytes, limits: Limits) -> Request:
    """Decode and check a request: Unreadable without a reply key, else BadRequest or Request
    (nothing else escapes: whatever a message holds, it costs only its own answer)."""
    if len(raw) > limits.max_bytes:
        reply, rid = _peek(raw, limits)
        too_large = PayloadTooLarge(f"message holds {len(raw)} bytes, cap {limits.max_bytes}")
        raise BadRequest(reply, rid, too_large)
    try:
        msg = codec.loads(raw)
    except PermanentError as exc:  # answered when its reply key can still be read
        reply, rid = _peek(raw, limits)
        raise BadRequest(reply, rid, exc) from None
    if not isinstance(msg, dict):
        raise Unreadable(f"request must be a map, got {type(msg).__name__}")
    reply = _reply_key(msg.get("reply"), limits)
    rid = _request_id(msg.get("id"))
    try:
        return _check_request(msg, rid, reply, limits)
    except FaissqError as exc:
        raise BadRequest(reply, rid, exc) from None
    except Exception as exc:  # untrusted input met an unforeseen path: still this message's fault
        log.warning("malformed request %r not caught by its checks", rid, exc_info=True)
        bad = InvalidParameter(f"malformed request: {type(exc).__name__}: {exc}")
        raise BadRequest(reply, rid, bad) from None


def _reply_key(reply: Any, limits: Limits) -> str:
    """The request's reply key when it is one of this index's, else Unreadable."""
    if (
        not isinstance(reply, str)
        or not reply.startswith(limits.reply_prefix)
        or len(reply) > MAX_REPLY_KEY_CHARS
        or len(reply) == len(limits.reply_prefix)
    ):
        raise Unreadable(f"reply must be a key under {limits.reply_prefix!r}, got {reply!r:.80}")
    return reply


def _request_id(rid: Any) -> str:
    """The request id when it is a usable one, else "" (the reply then carries no id)."""
    return rid if isinstance(rid, str) and 0 < len(rid) <= MAX_ID_CHARS else ""


def _peek(raw: bytes, limits: Limits) -> tuple[str, str]:
    """The reply key and id of an oversized or undecodable request, its arrays left unread.

    The map's entries are walked in order; values other than "reply" and "id" are skipped, not
    built. Unreadable when the message is no map or has no usable reply key among its first
    PEEK_ENTRIES entries.
    """
    found: dict[str, Any] = {}
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=len(raw))
    unpacker.feed(raw)
    try:
        for _ in range(min(unpacker.read_map_header(), PEEK_ENTRIES)):
            name = unpacker.unpack()
            if name in ("reply", "id") and name not in found:
                found[name] = unpacker.unpack()
                if len(found) == 2:
                    break
            else:
                unpacker.skip()
    except Exception as exc:  # msgpack raises several unrelated types on malformed input
        raise Unreadable(f"message is not a readable map: {exc}") from None
    return _reply_key(found.get("reply"), limits), _request_id(found.get("id"))


def _check_request(msg: dict[str, Any], rid: str, reply: str, limits: Limits) -> Request:
    """Check every field of a request map whose reply key is known to be good."""
    if msg.get("v") != VERSION:
        raise InvalidParameter(f"protocol version {msg.get('v')!r} unsupported; this is {VERSION}")
    if not REQUIRED <= msg.keys() <= ALLOWED:  # one check on the usual path; details if not
        missing = REQUIRED - msg.keys()
        if missing:
            raise InvalidParameter(f"request lacks {', '.join(sorted(missing))}")
        unknown = msg.keys() - ALLOWED
        raise InvalidParameter(f"unknown request field(s): {', '.join(sorted(map(str, unknown)))}")
    if not rid:
        raise InvalidParameter(f"id must be a string of 1..{MAX_ID_CHARS} characters")
    deadline = _number("deadline", msg["deadline"])
    k = _int("k", msg["k"])
    if k is None or not 1 <= k <= limits.max_k:
        raise InvalidParameter(f"k must be in [1, {limits.max_k}], got {msg['k']!r}")
    queries = codec.unpack_array(
        msg["queries"],
        field="queries",
        dtypes=F32,
        ndim=2,
        max_bytes=limits.max_bytes,
        error=InvalidVectors,
    )
    rows = queries.shape[0]
    if rows == 0 or queries.shape[1] == 0:
        raise InvalidVectors(f"queries must hold at least one row and column, got {queries.shape}")
    # NaN and Inf are the engine's check (as_vectors, invalid_vectors): not scanned twice here
    req = Request(id=rid, reply=reply, deadline=deadline, k=k, queries=queries)
    if len(msg) == len(REQUIRED):  # no optional field: nothing more to read
        _check_work(rows, k, limits.default_k_factor, limits)
        return req
    recall = msg.get("target_recall")
    if recall is not None:
        recall = _number("target_recall", recall)
        if not 0 < recall <= 1:
            raise InvalidParameter(f"target_recall must be in (0, 1], got {recall}")
        req.target_recall = recall
    sent = msg.get("sent")
    req.sent = None if sent is None else _number("sent", sent)
    req.nprobe = _capped("nprobe", msg.get("nprobe"), limits.max_nprobe)
    req.ef_search = _capped("ef_search", msg.get("ef_search"), limits.max_ef_search)
    req.k_factor = _capped("k_factor", msg.get("k_factor"), limits.max_k_factor)
    _check_work(rows, k, req.k_factor or limits.default_k_factor, limits)
    req.allow_ids = _ids("allow_ids", msg.get("allow_ids"), limits.max_filter_ids)
    req.deny_ids = _ids("deny_ids", msg.get("deny_ids"), limits.max_filter_ids)
    return req


def _number(name: str, value: Any) -> float:
    """A finite int or float field."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidParameter(f"{name} must be a finite number, got {value!r:.40}")
    return float(value)


def _int(name: str, value: Any) -> int | None:
    """An optional integer field (bool is not an integer here)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameter(f"{name} must be an integer, got {value!r:.40}")
    return value


def _capped(name: str, value: Any, cap: int) -> int | None:
    """An optional integer field in [1, cap]."""
    out = _int(name, value)
    if out is not None and not 1 <= out <= cap:
        raise InvalidParameter(f"{name} must be in [1, {cap}], got {out}")
    return out


def _check_work(rows: int, k: int, k_factor: int, limits: Limits) -> None:
    """PayloadTooLarge when rows x k x k_factor (the candidates one search holds) is over cap."""
    candidates = rows * k * k_factor
    if candidates > limits.max_candidates:
        raise PayloadTooLarge(
            f"{rows} rows x k {k} x k_factor {k_factor} = {candidates} candidates, "
            f"cap {limits.max_candidates}"
        )


def _ids(name: str, value: Any, cap: int) -> npt.NDArray[np.int64] | None:
    """An optional 1-D int64 id frame no longer than `cap`, every id >= 0."""
    if value is None:
        return None
    arr = codec.unpack_array(
        value, field=name, dtypes=I64, ndim=1, max_bytes=max(8 * cap, 8), error=InvalidIds
    )
    if arr.size > cap:
        raise PayloadTooLarge(f"{name} holds {arr.size} ids, cap {cap}")
    if arr.size and int(arr.min()) < 0:
        raise InvalidIds(f"{name} must hold ids >= 0")
    return arr


# -- replies ---------------------------------------------------------------------------------


def encode_result(
    request_id: str,
    scores: npt.NDArray[np.float32],
    ids: npt.NDArray[np.int64],
    version: int,
    worker: str,
    timings: dict[str, float],
    target_met: bool | None = None,
) -> bytes:
    """Encode a successful reply (target_met: whether a requested target_recall is reachable)."""
    msg = {
        "v": VERSION,
        "id": request_id,
        "ok": True,
        "scores": codec.pack_array(scores),
        "ids": codec.pack_array(ids),
        "version": int(version),
        "worker": worker,
        "timings": timings,
    }
    if target_met is not None:
        msg["target_met"] = target_met
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
    """Decode a reply; a malformed one raises InvalidParameter."""
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
    scores = codec.unpack_array(msg.get("scores"), field="scores", dtypes=F32, ndim=2)
    ids = codec.unpack_array(msg.get("ids"), field="ids", dtypes=I64, ndim=2)
    if scores.shape != ids.shape:
        raise InvalidParameter(f"reply scores {scores.shape} and ids {ids.shape} differ")
    version = msg.get("version")
    timings = msg.get("timings")
    met = msg.get("target_met")
    return Reply(
        id=str(rid),
        ok=True,
        scores=scores,
        ids=ids,
        version=version if isinstance(version, int) else None,
        worker=str(worker),
        timings=timings if isinstance(timings, dict) else {},
        target_met=met if isinstance(met, bool) else None,
    )
