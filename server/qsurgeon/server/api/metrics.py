"""The service's Prometheus metrics, read from Redis and the job threads when scraped.

Each app gets its own :class:`~prometheus_client.CollectorRegistry` (:func:`metrics_registry`),
never the library's global one: two apps in one process (tests, or two prefixes) would
otherwise report each other's numbers, and a second registration would fail. The values live
in Redis (workers count blocks into ``{prefix}:stats``), so a custom collector reads them at
scrape time instead of keeping counters in this process; every orchestrator reports the same
queue-wide totals. ``prometheus_client`` writes the numbers (``repr`` digits, so a count of
1234567 stays 1234567, which ``%g`` would have rounded to 1.23457e+06).
"""

from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from qsurgeon.server.api.jobs.manager import JobManager
from qsurgeon.server.api.jobs.store import JobStore
from qsurgeon.worker.queue.control import QueueControl

#: (metric name, field of the queue's stats hash, help): totals since the queue's keys were created
QUEUE_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("qsurgeon_blocks_queued_total", "blocks_queued", "Block problems put on the queue."),
    ("qsurgeon_blocks_solved_total", "blocks_solved", "Block problems solved by workers."),
    ("qsurgeon_blocks_failed_total", "blocks_failed", "Block problems that failed (bad problem or solver error)."),
    ("qsurgeon_blocks_dead_total", "blocks_dead", "Block problems dead-lettered after too many attempts."),
    ("qsurgeon_solve_seconds_total", "solve_seconds", "Seconds workers spent solving."),
)


class ServiceCollector(Collector):
    """Jobs by state, the queue's counters, live workers and this orchestrator's job threads."""

    def __init__(self, store: JobStore, control: QueueControl, manager: JobManager) -> None:
        self.store = store
        self.control = control
        self.manager = manager

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("qsurgeon_jobs", "Jobs by state.", labels=["state"])
        for state, count in self.store.count_by_state().items():
            jobs.add_metric([state], count)
        yield jobs
        stats = self.control.stats()
        for name, field, help_text in QUEUE_COUNTERS:
            yield CounterMetricFamily(name, help_text, value=stats.get(field, 0))
        yield GaugeMetricFamily("qsurgeon_workers", "Workers with a heartbeat in the last 30 s.",
                                value=len(self.control.live_workers()))
        yield GaugeMetricFamily("qsurgeon_jobs_running_here", "Job threads of this orchestrator.",
                                value=self.manager.running())


def metrics_registry(store: JobStore, control: QueueControl, manager: JobManager) -> CollectorRegistry:
    """A registry of one app's metrics (not described at registration: that would read Redis)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(store, control, manager))
    return registry
