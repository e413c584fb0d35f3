"""A seeded generator of malformed search requests, each with the answer it must get.

Every case is a raw message as a client in any language could push it straight onto the
request list: its reply key when the worker can read one (None: it must be dropped), and the
exact wire code it must be answered with (None: any documented code).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from faissq import keys

# every code docs/protocol.md lists for a request the worker reads
DOCUMENTED = {
    "invalid_parameter",
    "invalid_vectors",
    "dimension_mismatch",
    "invalid_ids",
    "invalid_filter",
    "payload_too_large",
    "timeout",
}
HUGE_INTS = [0, -1, -(2**63), 2**63 - 1, 2**64 - 1, 2**62]
ODD_VALUES: list[Any] = [None, True, 1.5, math.nan, math.inf, "3", b"3", [1], {"a": 1}, -7]
NO_TYPE: list[Any] = [True, math.nan, math.inf, "3", b"3", [1], {"a": 1}]  # wrong in any field
SHAPES: list[Any] = [
    [2**62, 0],
    [0, 2**62],
    [2**64 - 1, 0],
    [2**40, 2**40],
    [-1, 16],
    [1],
    [1, 16, 1, 1, 1],
    "1x16",
    [True, 16],
    [1.0, 16],
    [],
    None,
    [0, 16],
]


@dataclass
class Case:
    """One raw message, the reply key it is answered on (None: dropped) and the code it needs."""

    raw: bytes
    reply: str | None
    code: str | None


class Fuzzer:
    """Makes malformed requests for one index of dimension `dim`, seeded."""

    def __init__(self, index: str, dim: int, seed: int, max_k: int = 1024) -> None:
        """index and dim: the served index; max_k: the worker's index.max_k."""
        self.index = index
        self.dim = dim
        self.rng = np.random.default_rng(seed)
        self.max_k = max_k
        self.count = 0
        self.kinds: list[Callable[[], Case]] = [
            self.garbage,
            self.not_a_map,
            self.bad_reply_key,
            self.bad_shape,
            self.bad_frame,
            self.dimension,
            self.not_finite,
            self.bad_k,
            self.bad_knob,
            self.too_much_work,
            self.bad_recall,
            self.bad_filter,
            self.bad_attribute_filter,
            self.bad_version,
            self.unknown_field,
            self.missing_field,
            self.bad_id,
            self.bad_deadline,
            self.truncated,
            self.odd_field,
        ]

    def request(self, **fields: Any) -> tuple[str, dict[str, Any]]:
        """A valid request map (one random query row) with `fields` replaced."""
        self.count += 1
        rid = f"fz{self.count}"
        q = self.rng.standard_normal((1, self.dim)).astype("<f4")
        msg: dict[str, Any] = {
            "v": 1,
            "id": rid,
            "reply": keys.reply_key(self.index, rid),
            "deadline": time.time() + 120,
            "k": 5,
            "queries": {"dtype": "<f4", "shape": [1, self.dim], "data": q.tobytes()},
        }
        msg.update(fields)
        return keys.reply_key(self.index, rid), msg

    def case(self, code: str | None, **fields: Any) -> Case:
        """A request with `fields` replaced that must be answered with `code`."""
        reply, msg = self.request(**fields)
        return Case(msgpack.packb(msg), reply, code)

    def pick(self, values: list[Any]) -> Any:
        """One of values."""
        return values[int(self.rng.integers(len(values)))]

    def next(self) -> Case:
        """The next malformed case, of a kind drawn at random."""
        return self.pick(self.kinds)()

    def garbage(self) -> Case:
        """Bytes that are no msgpack (0xc1 never is): dropped."""
        return Case(b"\xc1" + self.rng.bytes(int(self.rng.integers(0, 40))), None, None)

    def not_a_map(self) -> Case:
        """Valid msgpack that is no map: dropped."""
        return Case(msgpack.packb(self.pick([[1, 2], 7, "x", None, b"\0" * 9])), None, None)

    def bad_reply_key(self) -> Case:
        """A reply key outside the index's namespace, of another type, or missing: dropped."""
        _, msg = self.request()
        prefix = keys.reply_prefix(self.index)
        bad = self.pick(["other:key", prefix, prefix + "x" * 600, 5, None, b"x", ...])
        if bad is ...:
            del msg["reply"]
        else:
            msg["reply"] = bad
        return Case(msgpack.packb(msg), None, None)

    def bad_shape(self) -> Case:
        """A queries shape no array can take, or the wrong number of axes."""
        return self.case(
            "invalid_vectors", queries={"dtype": "<f4", "shape": self.pick(SHAPES), "data": b""}
        )

    def bad_frame(self) -> Case:
        """A queries frame with a wrong dtype, data size or type, or no frame at all."""
        good = {"dtype": "<f4", "shape": [1, self.dim], "data": b"\0" * (4 * self.dim)}
        bad = self.pick(
            [
                {**good, "dtype": "<f8"},
                {**good, "dtype": ">f4"},
                {**good, "dtype": 4},
                {**good, "data": b"\0" * 3},
                {**good, "data": "text"},
                {**good, "data": [0.0] * self.dim},
                {"dtype": "<f4"},
                [1.0],
                3,
            ]
        )
        return self.case("invalid_vectors", queries=bad)

    def dimension(self) -> Case:
        """Well-formed queries of another dimension."""
        d = self.pick([1, self.dim - 1, self.dim + 1, 4 * self.dim])
        data = self.rng.standard_normal((2, d)).astype("<f4").tobytes()
        return self.case(
            "dimension_mismatch", queries={"dtype": "<f4", "shape": [2, d], "data": data}
        )

    def not_finite(self) -> Case:
        """Queries holding NaN or Inf."""
        q = self.rng.standard_normal((1, self.dim)).astype("<f4")
        q[0, int(self.rng.integers(self.dim))] = self.pick([np.nan, np.inf, -np.inf])
        frame = {"dtype": "<f4", "shape": [1, self.dim], "data": q.tobytes()}
        return self.case("invalid_vectors", queries=frame)

    def bad_k(self) -> Case:
        """k out of [1, max_k] or not an integer."""
        return self.case(
            "invalid_parameter", k=self.pick([*HUGE_INTS, self.max_k + 1, *ODD_VALUES])
        )

    def bad_knob(self) -> Case:
        """nprobe, ef_search or k_factor out of [1, cap] or not an integer."""
        name = self.pick(["nprobe", "ef_search", "k_factor"])
        cap = {"nprobe": 2048, "ef_search": 4096, "k_factor": 32}[name]
        return self.case(
            "invalid_parameter",
            **{name: self.pick([*HUGE_INTS, cap + 1, 2 * cap, *ODD_VALUES[1:]])},
        )

    def too_much_work(self) -> Case:
        """rows x k x k_factor over rpc.max_candidates (2**18), every field valid alone."""
        rows = int(self.rng.integers(65, 200))
        data = self.rng.standard_normal((rows, self.dim)).astype("<f4").tobytes()
        frame = {"dtype": "<f4", "shape": [rows, self.dim], "data": data}
        return self.case("payload_too_large", k=1024, queries=frame)

    def bad_recall(self) -> Case:
        """target_recall outside (0, 1] or not a number."""
        return self.case(
            "invalid_parameter",
            target_recall=self.pick([0, -1, 1.5, math.nan, math.inf, "x", True]),
        )

    def bad_filter(self) -> Case:
        """allow_ids or deny_ids that are no 1-D int64 list of ids >= 0."""
        name = self.pick(["allow_ids", "deny_ids"])
        ids = np.array([3, -1, 5], "<i8")
        bad = self.pick(
            [
                {"dtype": "<i8", "shape": [3], "data": ids.tobytes()},
                {"dtype": "<f4", "shape": [3], "data": b"\0" * 12},
                {"dtype": "<i8", "shape": [1, 3], "data": b"\0" * 24},
                {"dtype": "<i8", "shape": [4], "data": b"\0" * 24},
                {"dtype": "<i8", "shape": [2**62, 0], "data": b""},
                [1, 2],
                "ids",
            ]
        )
        return self.case("invalid_ids", **{name: bad})

    def bad_attribute_filter(self) -> Case:
        """A filter that is no map, too deep, or names a field the index does not declare."""
        deep: dict[str, Any] = {"field": "tenant", "eq": 1}
        for _ in range(int(self.rng.integers(17, 500))):  # msgpack 1.0 packs at most 511 levels
            deep = {"not": deep}
        bad = self.pick([*NO_TYPE, deep, {"field": "tenant", "eq": 1}, {"and": []}])
        return self.case("invalid_filter", filter=bad)

    def bad_version(self) -> Case:
        """A protocol version this worker does not speak."""
        return self.case("invalid_parameter", v=self.pick([0, 2, "1", None, 1.5, 2**64 - 1]))

    def unknown_field(self) -> Case:
        """A field the protocol does not define."""
        return self.case("invalid_parameter", **{self.pick(["junk", "K", "query"]): 1})

    def missing_field(self) -> Case:
        """A required field left out (reply aside)."""
        reply, msg = self.request()
        del msg[self.pick(["v", "id", "deadline", "k", "queries"])]
        return Case(msgpack.packb(msg), reply, "invalid_parameter")

    def bad_id(self) -> Case:
        """An id that is no string of 1..128 characters: answered without it."""
        return self.case("invalid_parameter", id=self.pick(["", "x" * 129, 5, None, b"id"]))

    def bad_deadline(self) -> Case:
        """A deadline that is no finite number, or one already past (timeout)."""
        value = self.pick([math.nan, math.inf, "soon", None, time.time() - 5])
        code = (
            "timeout" if isinstance(value, float) and math.isfinite(value) else "invalid_parameter"
        )
        return self.case(code, deadline=value)

    def truncated(self) -> Case:
        """A request cut short after its reply key: answered as invalid msgpack."""
        reply, msg = self.request()
        ordered = {"reply": msg.pop("reply"), **msg}
        raw = msgpack.packb(ordered)
        return Case(raw[: len(raw) - int(self.rng.integers(1, 8))], reply, "invalid_parameter")

    def odd_field(self) -> Case:
        """An optional field holding a value of a type no field takes: some documented code."""
        name = self.pick(
            ["nprobe", "ef_search", "k_factor", "target_recall", "sent", "allow_ids", "deny_ids"]
        )
        return self.case(None, **{name: self.pick(NO_TYPE)})
