"""The runtime's write-ahead steps: check a batch's attributes before it is logged, apply a logged
batch to the live engine, and reload from storage when applying fails (runtime.apply)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from faissq.errors import IndexNotReady, InvalidParameter
from faissq.index.attributes import check_batch, check_schema, columns_for
from faissq.worker.slots import IndexSlot, IndexState, install

if TYPE_CHECKING:
    from faissq.worker.runtime import IndexRuntime

log = logging.getLogger(__name__)


def checked_attributes(
    runtime: IndexRuntime, slot: IndexSlot, op: str, raw: Any, n: int
) -> dict[str, Any] | None:
    """A batch's attribute columns checked against the index's declared fields, before anything
    is logged (InvalidAttributes); only the fields sent, None when none were (all null)."""
    if raw is None:
        return None
    if op != "upsert":
        raise InvalidParameter("only an upsert carries attributes")
    schema = check_schema((slot.cfg or runtime.settings.index).attributes)
    batch = check_batch(schema, raw, n)
    return {k: v for k, v in batch.items() if k in raw} or None


def apply_batch(
    runtime: IndexRuntime,
    slot: IndexSlot,
    ids: npt.NDArray[np.int64],
    vectors: npt.NDArray[np.float32] | None,
    seq: int,
    attributes: Mapping[str, Any] | None = None,
) -> int:
    """Apply one logged batch (and its checked attribute columns) to the engine as version `seq`."""
    if vectors is not None:  # an upsert
        eng = slot.engine or runtime._new_engine(slot.name, int(vectors.shape[1]))
        cols = columns_for(eng.schema, attributes) if attributes else None
        applied = eng.upsert(ids, vectors, version=seq, attributes=cols)
        if slot.engine is None:  # published once it holds the batch
            slot.engine, slot.state = eng, IndexState.READY
    else:
        applied = slot.engine.delete(ids, version=seq) if slot.engine is not None else 0
    slot.seq = seq
    return int(applied)


def ensure_applied(runtime: IndexRuntime, slot: IndexSlot, seq: int) -> None:
    """Before answering for a logged seq, make sure the engine holds it."""
    if slot.seq < seq:
        recover_after(runtime, slot, seq, f"seq {seq} is logged but was not applied")


def recover_after(runtime: IndexRuntime, slot: IndexSlot, seq: int, why: str) -> None:
    """Reload snapshot + log (which hold seq) and swap in; FAILED when that fails too.

    Until the reload ends the index answers nothing (LOADING): serving a state without a
    batch that is logged, and may already be acknowledged, would be a silent loss.
    """
    slot.state, slot.reason = IndexState.LOADING, f"recovering: {why}"
    try:
        rec = runtime.store.recover(slot.name)
    except BaseException as exc:
        slot.state, slot.reason = IndexState.FAILED, f"{why}; recovery failed: {exc!r}"
        log.error("index %s FAILED: %s", slot.name, slot.reason)
        raise
    if rec.seq < seq or rec.engine is None:
        slot.state = IndexState.FAILED
        slot.reason = f"{why}; recovery reached only seq {rec.seq}"
        raise IndexNotReady(f"index {slot.name!r}: {slot.reason}")
    install(slot, rec)
    log.warning("index %s recovered from storage at seq %d after: %s", slot.name, rec.seq, why)
