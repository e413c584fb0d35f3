"""Operator actions on shared storage: `faissq snapshot ls / verify / restore` and
`faissq log verify / quarantine / resolve`."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from faissq.config import Settings
from faissq.errors import FaissqError, InvalidParameter, LogCorrupt
from faissq.storage import quarantine
from faissq.storage.durable import DurableStore
from faissq.storage.log import LogEntry


def ls(settings: Settings, index: str) -> list[dict[str, Any]]:
    """List an index's complete snapshot versions, oldest first, and which one is CURRENT."""
    return [asdict(info) for info in DurableStore(settings).snapshots(index).ls()]


def verify(settings: Settings, index: str, version: str | None = None) -> dict[str, str]:
    """Check every file of one version (None: all); map each version to "ok" or its error."""
    store = DurableStore(settings).snapshots(index)
    versions = [version] if version else store.versions()
    report = {}
    for v in versions:
        try:
            store.verify(v)
            report[v] = "ok"
        except FaissqError as exc:
            report[v] = f"{exc.code}: {exc}"
    return report


def restore(settings: Settings, index: str, version: str) -> dict[str, Any]:
    """Point CURRENT at an older verified version (a rollback of later builds and merges).

    Mutations logged after that version are replayed at the next start, so none is lost; the
    log must still hold them, else the restore is refused. Restart the index's worker after it.
    """
    durable = DurableStore(settings)
    store = durable.snapshots(index)
    manifest = store.verify(version)
    upto = durable.log(index).truncation().upto
    if int(manifest["seq"]) < upto:
        raise InvalidParameter(
            f"cannot restore {version} of {index!r}: it covers seq {manifest['seq']} but the log "
            f"was truncated up to {upto}, so acknowledged mutations would be lost"
        )
    previous = store.current_version()
    store.set_current(version)
    return {"index": index, "current": version, "previous": previous, "seq": manifest["seq"]}


# -- the update log (`faissq log verify / quarantine / resolve`) -------------------------------


def log_verify(settings: Settings, index: str) -> dict[str, Any]:
    """Check every log entry's checksum; list damaged, missing and quarantined seqs.

    `problems` counts what needs an operator: damaged or missing entries and quarantined entries
    not yet resolved.
    """
    ulog = DurableStore(settings).log(index)
    upto = ulog.truncation().upto
    moved = ulog.quarantined()
    present = [s for s in ulog.entry_seqs() if s > upto and s not in moved]
    rows: list[dict[str, Any]] = []
    expected = upto + 1
    for seq in present:
        rows.extend(_row(gap, "missing") for gap in range(expected, seq) if gap not in moved)
        expected = seq + 1
        try:
            rows.append(_row(seq, "ok", ulog.read_entry(seq)))
        except LogCorrupt as exc:
            rows.append(_row(seq, f"damaged: {exc}"))
    quarantined = [asdict(q) for _, q in sorted(moved.items())]
    problems = sum(r["verdict"] != "ok" for r in rows)
    problems += sum(q["resolved_at"] is None for q in quarantined)
    return {
        "index": index,
        "truncated_upto": upto,
        "entries": rows,
        "quarantined": quarantined,
        "problems": problems,
    }


def _row(seq: int, verdict: str, entry: LogEntry | None = None) -> dict[str, Any]:
    """One line of `log_verify`: what the entry holds (None when unreadable) and its verdict."""
    if entry is None:
        return {"seq": seq, "batch_id": None, "op": None, "n": None, "verdict": verdict}
    return {"seq": seq, "batch_id": entry.batch_id, "op": entry.op, "n": len(entry.ids),
            "verdict": verdict}  # fmt: skip


def log_quarantine(
    settings: Settings, index: str, seq: int, *, force: bool = False
) -> dict[str, Any]:
    """Move entry `seq` into log/quarantine/ (kept, never deleted): an explicit, recorded gap.

    A good entry is refused unless `force`: its batch would no longer be replayed. Reload the
    index's worker afterwards; it then serves without that batch and reports `degraded`.
    """
    ulog = DurableStore(settings).log(index)
    upto = ulog.truncation().upto
    if seq <= upto:
        raise InvalidParameter(f"log entry {seq} of {index!r} is covered by a snapshot (<= {upto})")
    if seq in ulog.quarantined() and seq not in ulog.entry_seqs():
        raise InvalidParameter(f"log entry {seq} of {index!r} is already quarantined")
    try:
        ulog.read_entry(seq)
    except LogCorrupt as exc:
        reason = str(exc)
    else:
        if not force:
            raise InvalidParameter(
                f"log entry {seq} of {index!r} verifies: quarantining it drops its batch from "
                "the index (pass --force to do so anyway)"
            )
        reason = "a good entry quarantined by an operator (--force)"
    return asdict(ulog.quarantine(seq, reason))


def log_resolve(settings: Settings, index: str, seq: int, resolution: str) -> dict[str, Any]:
    """Record that a quarantined entry was dealt with; the entry file stays in quarantine."""
    ulog = DurableStore(settings).log(index)
    return asdict(quarantine.resolve(ulog.storage, ulog.folder, seq, resolution))
