"""``qsurgeon experiment report DIR``: the table and plots of a shadow or routed run (docs/quantum.md)."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(subparsers: Any) -> None:
    experiment = subparsers.add_parser("experiment", help="quantum experiments on iCBS blocks: report a run")
    commands = experiment.add_subparsers(dest="experiment_command", metavar="COMMAND", required=True)
    report = commands.add_parser(
        "report", help="table and plots of experiment.jsonl: gap to the reference by block size, time and cost "
        "per block, cumulative cost, final quality next to a classical run",
    )
    report.add_argument("directory", metavar="DIR", help="the --out folder of qsurgeon prune or qsurgeon solve")
    report.add_argument("--classical", metavar="DIR",
                        help="the --out folder of a classical-only prune of the same model and seed, to compare "
                             "the final layer errors")
    report.add_argument("--out", metavar="DIR", help="where the plots and tables go (default DIR/experiment-report)")
    report.add_argument("--no-plots", action="store_true", help="tables only")
    report.add_argument("--json", action="store_true", help="print the summary as JSON")
    report.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    from qsurgeon.server.experiment.report import experiment_report

    result = experiment_report(args.directory, classical=args.classical, out=args.out, plots=not args.no_plots)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "tables"}, indent=2))
        return 0
    print(result["tables"])
    for path in result["plots"]:
        print(f"plot: {path}")
    return 0
