"""Durable state on shared storage: the update log, snapshots, and recovery.

fs.py          the fsspec seam: atomic replace, exclusive create, errors -> StorageUnavailable
log.py         the write-ahead update log: one checksummed file per batch, gap-free seqs
quarantine.py  damaged log entries moved aside (kept): explicit, recorded gaps
files.py       streamed, hashed snapshot files (.npy, FAISS index through callback IO)
snapshots.py   versioned snapshots: save, manifest, CURRENT pointer, retention
snapshot_load.py  list, verify, load the newest good version, fall back (never writes)
recovery.py    load the newest good snapshot, replay the log after it (the writer quarantines)
store.py       DurableStore: what the worker runtime calls (recover, append, save)
admin.py       operator actions: snapshot ls / verify / restore, log verify / quarantine / resolve
incoming.py    the incoming/ folder of vectors by reference, swept by age after snapshots
faults.py      faultfs://, a local folder that fails on command (fault tests and drills)
"""

import fsspec

# by class path: faults.py is imported only when a faultfs:// URL is opened
fsspec.register_implementation("faultfs", "faissq.storage.faults.FaultFS", clobber=True)
