"""The live-recall and drift metric families, and how they move (from a worker's summaries).

metric_families.make_metrics collects these with the others (`Metrics.recall`); the worker's
telemetry calls `update_recall_gauges` at every scrape with faissq.worker.recall_live's summary.
The `param` label is the setting a search ran with (e.g. "k=10 ef_search=32"): bounded by
`recall.max_params` per index, the rest reported as "other".
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter, Gauge
from prometheus_client.metrics import MetricWrapperBase

from faissq.telemetry.metric_updates import INDEX_LABELS, index_labels

IP = (*INDEX_LABELS, "param")


@dataclass
class RecallMetrics:
    """Live recall per index and setting, its cost, and IVF drift."""

    live: Gauge
    lower: Gauge
    samples: Gauge
    sampled_total: Counter
    evaluated_total: Counter
    cpu_seconds_total: Counter
    backlog: Gauge
    drift_ratio: Gauge
    rebuild_advised: Gauge
    _seen: dict[tuple[str, str], float] = field(default_factory=dict)
    _params: dict[str, set[str]] = field(default_factory=dict)

    def families(self) -> list[MetricWrapperBase]:
        """Every metric of the set (the scrape collector collects them)."""
        return [self.live, self.lower, self.samples, self.sampled_total, self.evaluated_total,
                self.cpu_seconds_total, self.backlog, self.drift_ratio,
                self.rebuild_advised]  # fmt: skip


def make_recall_metrics() -> RecallMetrics:
    """Create the families, registered nowhere: metric_families' collector collects them."""
    ix = INDEX_LABELS
    r = None
    return RecallMetrics(
        live=Gauge(
            "faissq_recall_live",
            "Recall@k of sampled real searches, checked by exact search (per setting).",
            IP,
            registry=r,
        ),
        lower=Gauge(
            "faissq_recall_live_lower",
            "One-sided 95% lower confidence bound of faissq_recall_live.",
            IP,
            registry=r,
        ),
        samples=Gauge(
            "faissq_recall_live_samples",
            "Checked sampled queries behind faissq_recall_live (the newest recall.ring_size).",
            IP,
            registry=r,
        ),
        sampled_total=Counter(
            "faissq_recall_sampled", "Served query vectors sampled for live recall.", ix, registry=r
        ),
        evaluated_total=Counter(
            "faissq_recall_evaluated", "Sampled queries checked by exact search.", ix, registry=r
        ),
        cpu_seconds_total=Counter(
            "faissq_recall_cpu_seconds",
            "CPU seconds the background exact search used (bounded by recall.cpu_fraction).",
            ix,
            registry=r,
        ),
        backlog=Gauge(
            "faissq_recall_backlog", "Sampled queries waiting for exact search.", ix, registry=r
        ),
        drift_ratio=Gauge(
            "faissq_index_drift_ratio",
            "IVF: mean distance of new vectors to their nearest centroid over training's.",
            ix,
            registry=r,
        ),
        rebuild_advised=Gauge(
            "faissq_index_rebuild_advised",
            "1 when drift or list imbalance advises a rebuild of the IVF index.",
            ix,
            registry=r,
        ),
    )


def update_recall_gauges(m: RecallMetrics, index: str, summary: Mapping[str, Any] | None) -> None:
    """Set the families of one index from recall_live's summary (None: nothing sampled here)."""
    if summary is None:
        return
    ix = index_labels(index)
    params = summary.get("params") or {}
    for label, row in params.items():
        m.live.labels(*ix, label).set(float(row["recall"]))
        m.lower.labels(*ix, label).set(float(row["recall_lo"]))
        m.samples.labels(*ix, label).set(int(row["samples"]))
    for gone in m._params.get(index, set()) - set(params):  # settings no longer in the window
        for g in (m.live, m.lower, m.samples):
            with contextlib.suppress(KeyError):
                g.remove(*ix, gone)
    m._params[index] = set(params)
    for name, counter in (("sampled", m.sampled_total), ("evaluated", m.evaluated_total),
                          ("cpu_seconds", m.cpu_seconds_total)):  # fmt: skip
        total = float(summary.get(name, 0.0))
        step = total - m._seen.get((index, name), 0.0)
        if step > 0:
            counter.labels(*ix).inc(step)
        m._seen[(index, name)] = total
    m.backlog.labels(*ix).set(int(summary.get("backlog", 0)))
    drift = summary.get("drift")
    if isinstance(drift, Mapping):
        if isinstance(drift.get("ratio"), int | float):
            m.drift_ratio.labels(*ix).set(float(drift["ratio"]))
        m.rebuild_advised.labels(*ix).set(1.0 if drift.get("advised") else 0.0)
