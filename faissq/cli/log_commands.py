"""`faissq log verify / quarantine / resolve`: inspect and repair an index's update log by hand."""

from __future__ import annotations

import argparse
import json
from typing import Any

from faissq.config import Settings


def run_log(args: argparse.Namespace, settings: Settings) -> int:
    """Log operations on shared storage (FAISSQ_STORAGE__URL); no worker or Redis needed."""
    from faissq.storage import admin

    if args.action == "verify":
        report = admin.log_verify(settings, args.index)
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print_verify(report)
        return 1 if report["problems"] else 0
    if args.action == "quarantine":
        done = admin.log_quarantine(settings, args.index, args.seq, force=args.force)
        print(f"{args.index}: log entry {done['seq']} moved to log/quarantine/ ({done['reason']})")
        print(f"now run `faissq reload --index {args.index}` or restart the index's worker")
        return 0
    done = admin.log_resolve(settings, args.index, args.seq, args.note)
    print(f"{args.index}: quarantined log entry {done['seq']} resolved at {done['resolved_at']}")
    print(f"now run `faissq reload --index {args.index}` or restart the index's worker")
    return 0


def print_verify(report: dict[str, Any]) -> None:
    """The entries as a table, then the quarantined ones, then one verdict line."""
    entries, quarantined = report["entries"], report["quarantined"]
    print(f"log of {report['index']}: truncated up to seq {report['truncated_upto']}")
    print(f"{'seq':>8} {'batch_id':<36} {'op':<7} {'n':>8}  verdict")
    for r in entries:
        batch, op = r["batch_id"] or "?", r["op"] or "?"
        n = "?" if r["n"] is None else r["n"]
        print(f"{r['seq']:>8} {batch:<36} {op:<7} {n:>8}  {r['verdict']}")
    for q in quarantined:
        state = f"resolved {q['resolved_at']}: {q['resolution']}" if q["resolved_at"] else "open"
        print(f"{q['seq']:>8} {q['batch_id'] or '?':<36} quarantined {q['moved_at']} ({state}): "
              f"{q['reason']}")  # fmt: skip
    if not entries and not quarantined:
        print("(no log entries after the truncation point)")
    problems = report["problems"]
    print("ok" if not problems else f"{problems} problem(s): see docs/operations.md")
