"""The search RPC wire format (docs/protocol.md): msgpack maps, arrays as raw little-endian bytes.

A request is LPUSHed on ``faissq:{<index>}:rpc``; exactly one reply is LPUSHed on its reply key,
by a worker or by the submit script (no worker alive, queue full). Never pickle.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt

from faissq import codec
from faissq.errors import FaissqError, InvalidParameter, PayloadTooLarge, PermanentError
from faissq.rpc import fields, kinds

log = logging.getLogger(__name__)

VERSION = 1  # the "v" field of every request and reply; bumped on any incompatible change

REQUIRED = frozenset({"v", "id", "reply", "deadline", "k", "queries"})
OPTIONAL = frozenset(
    {"nprobe", "ef_search", "k_factor", "target_recall", "allow_ids", "deny_ids", "sent"}
    | {"offset", "min_seq", "op", "radius"}  # radius given (not nil): a range search (kinds.py)
    | {"filter"}  # a condition on attribute fields (faissq.index.filters)
)
FRAMES = frozenset({"allow_ids", "deny_ids", "ids"})  # fields whose values travel as frames
MAX_ID_CHARS = 128  # request ids are opaque strings; a uuid4 hex is 32
MAX_REPLY_KEY_CHARS = 512
PEEK_ENTRIES = 32  # map entries read from an oversized request while looking for its reply key

ALLOWED = REQUIRED | OPTIONAL

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
    max_candidates: int = 1 << 18  # rows x (offset + k) x k_factor of one request; range rows
    max_fetch_ids: int = 1000  # ids of one fetch request
    max_filter_bytes: int = 1 << 16  # a request's filter, packed as msgpack
    # the index's k_factor, counted for a request naming none (the search counts the tuned one
    # too: rpc/batch.py)
    default_k_factor: int = 4


@dataclass
class Request:
    """One decoded, checked request: a top-k search, a range search or a fetch (`kind`)."""

    id: str
    reply: str
    deadline: float
    k: int  # 0 for range and fetch
    queries: npt.NDArray[np.float32]  # empty for fetch
    nprobe: int | None = None
    ef_search: int | None = None
    k_factor: int | None = None
    target_recall: float | None = None
    allow_ids: npt.NDArray[np.int64] | None = None
    deny_ids: npt.NDArray[np.int64] | None = None
    sent: float | None = None
    offset: int = 0  # top-k: the reply holds ranks offset .. offset + k - 1
    min_seq: int | None = None  # answer only from an index state holding this update-log seq
    kind: str = "knn"  # "knn", "range" or "fetch"
    radius: float | None = None  # range: the score bound
    fetch_ids: npt.NDArray[np.int64] | None = None  # fetch: the ids whose vectors are asked
    filter: dict[str, Any] | None = None  # top-k and range: a map, checked against the fields

    def params(self) -> tuple[Any, ...]:
        """The search parameters two requests must share to run in one batched call."""
        return (self.k, self.offset, self.nprobe, self.ef_search, self.k_factor,
                self.target_recall)  # fmt: skip


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
    k: int | None,
    queries: npt.NDArray[np.float32] | None,
    **options: Any,
) -> bytes:
    """Encode a request; k and queries are left out when None (range: radius; fetch: ids),
    `options` are the other fields (None values are left out)."""
    unknown = set(options) - OPTIONAL - FRAMES
    if unknown:
        raise InvalidParameter(f"unknown request field(s): {', '.join(sorted(unknown))}")
    msg: dict[str, Any] = {"v": VERSION, "id": request_id, "reply": reply,
                           "deadline": float(deadline)}  # fmt: skip
    if k is not None:
        msg["k"] = k
    if queries is not None:
        msg["queries"] = codec.pack_array(queries)
    for name, value in options.items():
        if value is None:
            continue
        msg[name] = codec.pack_array(value) if name in FRAMES else value
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
    if not rid:
        raise InvalidParameter(f"id must be a string of 1..{MAX_ID_CHARS} characters")
    if msg.get("op") not in (None, "search") or msg.get("radius") is not None:
        return Request(id=rid, reply=reply, **kinds.check_kind(msg, limits))
    if not REQUIRED <= msg.keys() <= ALLOWED:  # one check on the usual path; details if not
        kinds.fail_fields(msg.keys(), REQUIRED, ALLOWED)
    deadline = fields.number("deadline", msg["deadline"])
    k = fields.integer("k", msg["k"])
    if k is None or not 1 <= k <= limits.max_k:
        raise InvalidParameter(f"k must be in [1, {limits.max_k}], got {msg['k']!r}")
    queries = fields.queries(msg["queries"], limits.max_bytes)
    rows = queries.shape[0]
    req = Request(id=rid, reply=reply, deadline=deadline, k=k, queries=queries)
    if len(msg) == len(REQUIRED):  # no optional field: nothing more to read
        fields.check_work(rows, k, limits.default_k_factor, limits.max_candidates)
        return req
    recall = msg.get("target_recall")
    if recall is not None:
        recall = fields.number("target_recall", recall)
        if not 0 < recall <= 1:
            raise InvalidParameter(f"target_recall must be in (0, 1], got {recall}")
        req.target_recall = recall
    sent = msg.get("sent")
    req.sent = None if sent is None else fields.number("sent", sent)
    req.nprobe = fields.capped("nprobe", msg.get("nprobe"), limits.max_nprobe)
    req.ef_search = fields.capped("ef_search", msg.get("ef_search"), limits.max_ef_search)
    req.k_factor = fields.capped("k_factor", msg.get("k_factor"), limits.max_k_factor)
    req.offset = kinds.offset(msg.get("offset"), k, limits.max_k)
    req.min_seq = fields.min_seq(msg.get("min_seq"))
    k_factor = req.k_factor or limits.default_k_factor
    fields.check_work(rows, k + req.offset, k_factor, limits.max_candidates)
    req.allow_ids = fields.id_frame("allow_ids", msg.get("allow_ids"), limits.max_filter_ids)
    req.deny_ids = fields.id_frame("deny_ids", msg.get("deny_ids"), limits.max_filter_ids)
    req.filter = fields.filter_expr(msg.get("filter"), limits.max_filter_bytes)
    return req
