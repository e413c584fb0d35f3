"""The incoming/ folder where producers drop vectors by reference: old files are swept away.

A reference must outlive every delivery of its job (a redelivered job reads it again), so files
are deleted by age, not when a job ends: `storage.incoming_ttl_s` after they were written.
"""

from __future__ import annotations

import logging
import time

from faissq.storage.fs import Storage

log = logging.getLogger(__name__)

FOLDER = "incoming"  # under the storage root; client.put_vectors writes here


def sweep(storage: Storage, max_age_s: float, *, now: float | None = None) -> int:
    """Delete files under incoming/ last written more than `max_age_s` ago; return how many.

    max_age_s 0 keeps everything. Temp files that crashed writers left go the same way.
    """
    if max_age_s <= 0:
        return 0
    folder = storage.path(FOLDER)
    now = time.time() if now is None else now
    removed = 0
    for name, written in storage.files_modified(folder):  # one listing, no stat per file
        path = f"{folder}/{name}"
        if written is None:
            written = storage.modified(path)
        if written is not None and now - written > max_age_s:
            storage.remove(path)
            removed += 1
    if removed:
        log.info("incoming: removed %d file(s) older than %.0fs", removed, max_age_s)
    return removed
