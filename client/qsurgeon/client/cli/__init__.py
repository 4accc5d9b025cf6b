"""The ``qsurgeon`` command line.

The commands live beside the code they drive: the service commands here in the client,
``solve``/``solvers``/``worker`` in the worker portion, ``prune``/``serve``/``evaluate``/
``bench`` in the server portion. Each of those modules has ``register(subparsers)``.
A portion whose optional dependencies are missing still shows its commands, and running
one says which extra to install. Expected errors print one line and exit with code 2; a
closed stdout (``qsurgeon … | head``) ends the command quietly with code 0.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable, Sequence

from qsurgeon.client.errors import QsurgeonError

#: command modules, with the commands they add and the extra that installs their needs
COMMAND_MODULES: list[tuple[str, tuple[str, ...], str]] = [
    ("qsurgeon.server.cli.prune", ("prune", "demo"), "engine"),
    ("qsurgeon.server.cli.evaluate", ("evaluate",), "engine"),
    ("qsurgeon.server.cli.plan", ("plan",), "engine"),
    ("qsurgeon.server.cli.bench", ("bench",), "engine"),
    ("qsurgeon.server.cli.experiment", ("experiment",), "engine"),
    ("qsurgeon.worker.cli.solve", ("solve", "solvers"), "worker"),
    ("qsurgeon.worker.cli.worker", ("worker",), "worker"),
    ("qsurgeon.server.cli.serve", ("serve",), "server"),
    ("qsurgeon.client.cli.jobs", ("submit", "status", "watch", "download", "cancel", "purge"), ""),
]

EXIT_USAGE = 2


def _missing_extra(command: str, extra: str, error: ImportError) -> Callable[[argparse.Namespace], int]:
    def run(_: argparse.Namespace) -> int:
        print(
            f"qsurgeon {command}: needs the [{extra}] extra ({error.name or error} is not installed): "
            f"pip install 'qsurgeon[{extra}]'",
            file=sys.stderr,
        )
        return EXIT_USAGE

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qsurgeon",
        description="Prune neural networks with iCBS; solve block QUBOs with any solver.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module_name, commands, extra in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            if error.name == module_name:
                continue  # this command module is not part of this build
            for command in commands:
                stub = subparsers.add_parser(command, help=f"(needs qsurgeon[{extra}])", add_help=False)
                stub.set_defaults(func=_missing_extra(command, extra, error), accepts_any_arguments=True)
            continue
        module.register(subparsers)
    return parser


def _stdout_open() -> bool:
    """Whether stdout still has a reader: tells a closed ``| head`` from another broken pipe (a socket).

    A failed write empties Python's buffer, so a second flush would succeed either way; the
    pipe itself says it: its write end polls POLLERR once no reader is left.
    """
    try:
        import select

        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return not any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows) or no descriptor: take it as ours
        return False


def _stdout_closed() -> int:
    """The reader of our output went away (``qsurgeon plan … | head``): stop quietly, exit 0.

    What was printed was all the reader wanted; a traceback would be noise. stdout is
    pointed at /dev/null so the interpreter's final flush cannot raise again.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout without a file descriptor (captured): nothing to flush
        pass
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see docs/solvers.md
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "accepts_any_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows up here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        if _stdout_open():  # another pipe broke (a socket): a real error
            raise
        return _stdout_closed()
    except QsurgeonError as error:
        print(f"qsurgeon {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"qsurgeon {args.command}: interrupted", file=sys.stderr)
        return 130


