"""CLI ``qsurgeon serve``: the orchestrator (REST API + job runner) under uvicorn."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os

from qsurgeon.client.errors import UsageError

# The service needs the [server] extra. Fail the import of this module without it (found,
# not imported: building the parser for `qsurgeon prune` must not load fastapi), so the CLI
# frame shows `serve` as needing that extra and exits 2.
for _package in ("fastapi", "uvicorn", "prometheus_client"):
    if importlib.util.find_spec(_package) is None:
        raise ImportError(f"No module named {_package!r}", name=_package)


def run_serve(args: argparse.Namespace) -> int:
    import redis
    import uvicorn

    from qsurgeon.server.api import ServiceConfig, create_app, load_api_keys
    from qsurgeon.worker.queue.settings import QueueSettings, connect

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        connect(args.redis).ping()
    except redis.ConnectionError as error:
        raise UsageError(f"cannot reach Redis at {args.redis}: {error}") from None
    if args.max_upload_mb <= 0:
        raise UsageError("--max-upload-mb must be positive")
    if min(args.retention_days, args.job_deadline_hours, args.no_worker_timeout) <= 0:
        raise UsageError("--retention-days, --job-deadline-hours and --no-worker-timeout must be positive")
    admin_keys = load_api_keys(args.admin_keys_file, env=os.environ.get("QSURGEON_ADMIN_KEYS", ""))
    config = ServiceConfig(
        data_dir=args.data,
        redis_url=args.redis,
        models_dir=args.models,
        api_keys=load_api_keys(args.api_keys_file),
        admin_keys=admin_keys,
        retention_seconds=args.retention_days * 24 * 3600,
        job_deadline_seconds=args.job_deadline_hours * 3600,
        no_worker_timeout=args.no_worker_timeout,
        queue=QueueSettings(prefix=args.prefix, visibility_timeout=args.visibility_timeout,
                            max_attempts=args.max_attempts),
        max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
        max_running_jobs=args.max_jobs,
    )
    app = create_app(config)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning",
                timeout_graceful_shutdown=10)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="run the orchestrator: REST API and job runner")
    serve.add_argument("--redis", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
                       help="Redis URL (default: $REDIS_URL or redis://127.0.0.1:6379/0)")
    serve.add_argument("--data", required=True, help="folder for job inputs, checkpoints and artifacts")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--models", help="folder of model folders that jobs may name")
    serve.add_argument("--api-keys-file", help="file with one API key a line (also: $QSURGEON_API_KEYS)")
    serve.add_argument("--prefix", default=os.environ.get("QSURGEON_REDIS_PREFIX", "qsurgeon"),
                       help="Redis key prefix (default: $QSURGEON_REDIS_PREFIX or qsurgeon)")
    serve.add_argument("--visibility-timeout", type=float, default=60.0)
    serve.add_argument("--max-attempts", type=int, default=3)
    serve.add_argument("--max-upload-mb", type=float, default=512.0, help="largest request body")
    serve.add_argument("--max-jobs", type=int, default=2, help="jobs run at once; more wait queued")
    serve.add_argument("--admin-keys-file",
                       help="file of admin keys, which see and cancel every key's jobs (also: $QSURGEON_ADMIN_KEYS)")
    serve.add_argument("--retention-days", type=float, default=7.0,
                       help="finished jobs (records, events, files) are deleted after this many days (default 7)")
    serve.add_argument("--job-deadline-hours", type=float, default=48.0,
                       help="a job not finished this long after submission fails (default 48)")
    serve.add_argument("--no-worker-timeout", type=float, default=600.0,
                       help="seconds a job waits with no live worker for its solver before it fails (default 600)")
    serve.add_argument("--verbose", action="store_true")
    serve.set_defaults(func=run_serve)
