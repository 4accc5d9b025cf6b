"""CLI for the service: ``qsurgeon submit|status|watch|download|cancel|purge --url --api-key``.

Base install only: these commands talk HTTP through :mod:`qsurgeon.client.sdk`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from qsurgeon.client.cli.arguments import add_option_arguments, typed_request_options
from qsurgeon.client.options import REQUEST_FIELDS

DEFAULT_URL = "http://127.0.0.1:8000"


def _client(args: argparse.Namespace):
    from qsurgeon.client.sdk import Client

    return Client(args.url, api_key=args.api_key)


def _job_line(job) -> str:
    progress = job.progress
    parts = [job.id, job.state.value, f"{100 * progress.fraction:.0f}%"]
    if progress.stage:
        parts.append(progress.stage)
    if progress.round:
        parts.append(f"round {progress.round}")
    if job.error:
        parts.append(f"error: {job.error}")
    return "  ".join(parts)


def run_submit(args: argparse.Namespace) -> int:
    options = typed_request_options(args)
    with _client(args) as client:
        job = client.submit_prune(args.model, calibration=args.calibration, **options)
        if args.wait:
            job = client.wait(job, raise_on_failure=False)
    print(job.model_dump_json(indent=2) if args.json else _job_line(job))
    return 0 if job.state.value != "failed" else 1


def run_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        jobs = [client.get(args.job)] if args.job else client.list()
    if args.json:
        print(json.dumps([job.model_dump(mode="json") for job in jobs], indent=2))
    else:
        for job in jobs:
            print(_job_line(job))
    return 0


def run_watch(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for event in client.events(args.job):
            if args.json:
                print(event.model_dump_json(), flush=True)
            elif event.type != "end":
                details = " ".join(f"{key}={value}" for key, value in event.data.items() if value is not None)
                print(f"{event.type:<10} {details}", flush=True)
        job = client.get(args.job)
    print(_job_line(job), file=sys.stderr)
    return 0 if job.state.value == "succeeded" else 1


def run_download(args: argparse.Namespace) -> int:
    with _client(args) as client:
        paths = client.download(args.job, args.dest, names=args.name or None)
    for path in paths:
        print(path)
    return 0


def run_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.cancel(args.job)
    print(_job_line(job))
    return 0


def run_purge(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for job_id in args.job:
            job = client.purge(job_id)
            print(f"{job.id}  purged ({job.state.value})")
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("QSURGEON_URL", DEFAULT_URL),
                        help=f"server URL (default: $QSURGEON_URL or {DEFAULT_URL})")
    parser.add_argument("--api-key", default=os.environ.get("QSURGEON_API_KEY"),
                        help="API key (default: $QSURGEON_API_KEY)")
    parser.add_argument("--json", action="store_true", help="print JSON")


def register(subparsers: argparse._SubParsersAction) -> None:
    submit = subparsers.add_parser("submit", help="submit a prune job to a qsurgeon server")
    submit.add_argument("model", help="builtin:minilm, a model name on the server, or a local folder/archive to upload")
    submit.add_argument("--calibration", default="builtin", help="builtin, or a local text file to upload")
    submit.add_argument("--wait", action="store_true", help="wait for the job to finish")
    _common(submit)
    add_option_arguments(submit, REQUEST_FIELDS)  # every option a request may set, as `qsurgeon prune` has it
    submit.set_defaults(func=run_submit)

    status = subparsers.add_parser("status", help="show a job (or list jobs) on a qsurgeon server")
    status.add_argument("job", nargs="?")
    _common(status)
    status.set_defaults(func=run_status)

    watch = subparsers.add_parser("watch", help="follow a job's events until it finishes")
    watch.add_argument("job")
    _common(watch)
    watch.set_defaults(func=run_watch)

    download = subparsers.add_parser("download", help="download a job's artifacts")
    download.add_argument("job")
    download.add_argument("dest", help="folder to write into")
    download.add_argument("--name", action="append", help="only this artifact (repeatable)")
    _common(download)
    download.set_defaults(func=run_download)

    cancel = subparsers.add_parser("cancel", help="cancel a job")
    cancel.add_argument("job")
    _common(cancel)
    cancel.set_defaults(func=run_cancel)

    purge = subparsers.add_parser("purge", help="delete finished jobs' records, events and files on the server")
    purge.add_argument("job", nargs="+")
    _common(purge)
    purge.set_defaults(func=run_purge)
