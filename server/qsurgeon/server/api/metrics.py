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

from typing import Iterator, Sequence

from prometheus_client import CollectorRegistry, Histogram
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
    ("qsurgeon_messages_reclaimed_total", "messages_reclaimed",
     "Messages taken over from a dead or stalled worker after the visibility timeout."),
)

#: bucket bounds (s) of one block's solve time and of one round's wall time
BLOCK_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0)
ROUND_BUCKETS = (0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 1800.0)


class Instruments:
    """What this orchestrator measures itself (prometheus_client histograms, exact by
    construction): each block's solve seconds as its worker reported them, and each round's
    wall time from enqueue to collection. Registered on one app's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.block_seconds = Histogram("qsurgeon_block_solve_seconds", "Seconds a worker spent on one block.",
                                       buckets=BLOCK_BUCKETS, registry=registry)
        self.round_seconds = Histogram("qsurgeon_round_seconds", "Seconds from a round's enqueue to its collection.",
                                       buckets=ROUND_BUCKETS, registry=registry)

    def observe_round(self, seconds: float, solutions: Sequence) -> None:
        self.round_seconds.observe(seconds)
        for solution in solutions:
            if solution is not None:
                self.block_seconds.observe(float(getattr(solution, "seconds", 0.0) or 0.0))


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
        by_solver = GaugeMetricFamily("qsurgeon_workers_by_solver", "Live workers serving each solver.",
                                      labels=["solver"])
        for solver, count in sorted(self.control.workers_by_solver().items()):
            by_solver.add_metric([solver], count)
        yield by_solver
        depth = GaugeMetricFamily("qsurgeon_queue_messages", "Messages in a solver's stream.", labels=["solver"])
        pending = GaugeMetricFamily("qsurgeon_queue_pending", "Messages delivered to a worker, not yet answered.",
                                    labels=["solver"])
        lag = GaugeMetricFamily("qsurgeon_queue_lag", "Messages no worker has taken yet (consumer lag).",
                                labels=["solver"])
        for solver in self.control.streams():
            numbers = self.control.queue_depth(solver)
            depth.add_metric([solver], numbers["length"])
            pending.add_metric([solver], numbers["pending"])
            lag.add_metric([solver], numbers["lag"])
        yield depth
        yield pending
        yield lag
        yield GaugeMetricFamily("qsurgeon_dead_letters", "Entries in the dead-letter stream.",
                                value=self.control.dead_letter_count())
        yield GaugeMetricFamily("qsurgeon_jobs_running_here", "Job threads of this orchestrator.",
                                value=self.manager.running())


def metrics_registry() -> tuple[CollectorRegistry, Instruments]:
    """A registry of one app's metrics and its histograms; :func:`add_service_collector`
    adds what is read from Redis at scrape time (not described at registration: that would
    read Redis)."""
    registry = CollectorRegistry(auto_describe=False)
    return registry, Instruments(registry)


def add_service_collector(registry: CollectorRegistry, store: JobStore, control: QueueControl,
                          manager: JobManager) -> CollectorRegistry:
    registry.register(ServiceCollector(store, control, manager))
    return registry
