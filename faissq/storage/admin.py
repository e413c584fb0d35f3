"""Operator actions on stored snapshots (`faissq snapshot ls / verify / restore`)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from faissq.config import Settings
from faissq.errors import FaissqError, InvalidParameter
from faissq.storage.store import DurableStore


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
