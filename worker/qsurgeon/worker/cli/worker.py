"""CLI ``qsurgeon worker``: consume block problems from Redis until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from qsurgeon.client.errors import UsageError


def run_worker(args: argparse.Namespace) -> int:
    import redis

    from qsurgeon.worker.queue.consumer import Worker
    from qsurgeon.worker.queue.settings import QueueSettings, connect
    from qsurgeon.worker.solvers.registry import solver_names

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    backends = [name.strip() for name in args.backends.split(",") if name.strip()] if args.backends else None
    if backends:
        unknown = sorted(set(backends) - set(solver_names()))
        if unknown:
            raise UsageError(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(solver_names())}")
    settings = QueueSettings(prefix=args.prefix, visibility_timeout=args.visibility_timeout,
                             max_attempts=args.max_attempts)
    client = connect(args.redis)
    try:
        client.ping()
    except redis.ConnectionError as error:
        raise UsageError(f"cannot reach Redis at {args.redis}: {error}") from None
    worker = Worker(client, settings=settings, backends=backends, concurrency=args.concurrency,
                    batch_size=args.batch_size, name=args.name)

    def on_signal(signum: int, _frame: object) -> None:
        # finish the batch in hand (its results are published and acknowledged), then leave
        worker.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"qsurgeon worker {worker.name}: backends {','.join(worker.backends)}, concurrency {args.concurrency}",
          file=sys.stderr, flush=True)
    stats = worker.run()
    print(f"qsurgeon worker {worker.name}: stopped after {stats.solved} solved, {stats.failed} failed",
          file=sys.stderr, flush=True)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    worker = subparsers.add_parser("worker", help="solve queued block problems from Redis")
    worker.add_argument("--redis", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
                        help="Redis URL (default: $REDIS_URL or redis://127.0.0.1:6379/0)")
    worker.add_argument("--backends", help="comma-separated solver names to serve (default: all)")
    worker.add_argument("--concurrency", type=int, default=1, help="consumer threads")
    worker.add_argument("--batch-size", type=int, default=32, help="messages taken and solved at once")
    worker.add_argument("--prefix", default=os.environ.get("QSURGEON_REDIS_PREFIX", "qsurgeon"),
                        help="Redis key prefix (default: $QSURGEON_REDIS_PREFIX or qsurgeon)")
    worker.add_argument("--visibility-timeout", type=float, default=60.0,
                        help="seconds before another worker reclaims an unacknowledged message")
    worker.add_argument("--max-attempts", type=int, default=3, help="deliveries before a block is dead-lettered")
    worker.add_argument("--name", help="worker name (default: host-pid-random)")
    worker.add_argument("--verbose", action="store_true")
    worker.set_defaults(func=run_worker)
