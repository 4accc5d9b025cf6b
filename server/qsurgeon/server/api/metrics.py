"""Prometheus text exposition of the service's counters (no client library needed)."""

from __future__ import annotations

from typing import Any

from qsurgeon.worker.queue.control import QueueControl


def render_metrics(app: Any) -> str:
    store = app.state.store
    queue = QueueControl(app.state.redis, app.state.config.queue)
    stats = queue.stats()
    lines = [
        "# HELP qsurgeon_jobs Jobs by state.",
        "# TYPE qsurgeon_jobs gauge",
    ]
    for state, count in store.count_by_state().items():
        lines.append(f'qsurgeon_jobs{{state="{state}"}} {count}')
    counters = [
        ("qsurgeon_blocks_queued_total", "blocks_queued", "Block problems put on the queue."),
        ("qsurgeon_blocks_solved_total", "blocks_solved", "Block problems solved by workers."),
        ("qsurgeon_blocks_failed_total", "blocks_failed", "Block problems that failed (bad problem or solver error)."),
        ("qsurgeon_blocks_dead_total", "blocks_dead", "Block problems dead-lettered after too many attempts."),
        ("qsurgeon_solve_seconds_total", "solve_seconds", "Seconds workers spent solving."),
    ]
    for metric, field, help_text in counters:
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} counter", f"{metric} {stats.get(field, 0.0):g}"]
    lines += ["# HELP qsurgeon_workers Workers with a heartbeat in the last 30 s.", "# TYPE qsurgeon_workers gauge",
              f"qsurgeon_workers {len(queue.live_workers())}",
              "# HELP qsurgeon_jobs_running_here Job threads of this orchestrator.",
              "# TYPE qsurgeon_jobs_running_here gauge", f"qsurgeon_jobs_running_here {app.state.manager.running()}"]
    return "\n".join(lines) + "\n"
