"""``qsurgeon plan MODEL [prune options]``: the capacity plan of a prune, before it runs.

Takes the same options as ``qsurgeon prune`` (they declare the flags) and reads only the
model's config.json, so a folder without weights will do. Prints, per phase, the
estimated peak host and device memory and the time on this machine (from a short
measured probe) and, with ``--gpu NAME``, on that GPU class (docs/scale.md).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from qsurgeon.client.cli.arguments import add_option_arguments, explicit_values
from qsurgeon.client.errors import UsageError
from qsurgeon.client.options import PruneOptions, build_options

GPU_NAMES = ("h100", "h200", "a100", "l40s")


def register(subparsers: Any) -> None:
    plan = subparsers.add_parser(
        "plan",
        help="estimate memory and time of a prune, per phase, before running it",
        description="The capacity plan of `qsurgeon prune MODEL [options]`: per phase (load, calibrate, init, "
        "icbs, refit, report, save) the peak host and device memory and the time on this machine (short measured "
        "probe) and on a named GPU class. Reads only config.json: no weights needed.",
    )
    plan.add_argument("model", metavar="MODEL", help="a model folder (config.json is enough) or builtin:minilm")
    plan.add_argument("--gpu", action="append", default=None, choices=GPU_NAMES,
                      help="also plan for this GPU class from stated throughput assumptions (repeatable)")
    plan.add_argument("--no-probe", action="store_true",
                      help="skip the probe of this machine (only the --gpu plans)")
    plan.add_argument("--json", action="store_true", help="print the plans as JSON")
    add_option_arguments(plan)
    plan.set_defaults(func=run_plan_command)


def options_for_plan(args: argparse.Namespace) -> PruneOptions:
    explicit = {"model": args.model, **explicit_values(args)}
    preset = explicit.pop("preset", None)
    return build_options(explicit, preset, flag_style=True)


def run_plan_command(args: argparse.Namespace) -> int:
    from qsurgeon.server.engine.plan import GPU_CLASSES, estimate, measure_probe, model_shape, plan_table, \
        read_model_config

    options = options_for_plan(args)
    shape = model_shape(read_model_config(args.model))
    if args.no_probe and not args.gpu:
        raise UsageError("--no-probe leaves nothing to plan: name a --gpu")
    plans = []
    if not args.no_probe:
        if str(options.device).startswith("cuda"):
            from qsurgeon.server.engine.placement import resolve_device

            resolve_device(options.device)  # refused here as prune would refuse it
        plans.append(estimate(shape, options, probe=measure_probe(options.block_size, options, shape.model_type),
                                    model=args.model))
    for name in args.gpu or ():
        plans.append(estimate(shape, options, gpu=GPU_CLASSES[name], model=args.model))
    if args.json:
        print(json.dumps([plan.to_dict() for plan in plans], indent=2))
    else:
        print("\n\n".join(plan_table(plan) for plan in plans))
    return 0
