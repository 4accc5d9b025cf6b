"""Command-line arguments derived from :class:`~qsurgeon.client.options.PruneOptions`.

Each field with a flag becomes ``--field-name``: its type picks the parser (a ``Literal``
gives choices, a bool a switch, a list a repeatable flag, ``solver_params`` repeatable
``NAME=VALUE``), its description and default the help, its presets a note in the help.
Every flag defaults to None, so :func:`explicit_values` can tell what the user gave;
the values are then validated by the model itself, exactly as a REST request is.
"""

from __future__ import annotations

import argparse
import json
import typing
from typing import Any, Iterable

from qsurgeon.client.errors import UsageError
from qsurgeon.client.options import REQUEST_FIELDS, PruneOptions, field_extra

#: ``--help`` section titles of the option groups
GROUP_TITLES: dict[str, str] = {"prune": "pruning", "search": "iCBS search (docs/icbs.md §3, §6)"}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _choices(annotation: Any) -> tuple[Any, ...] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(candidate) is typing.Literal:
            return typing.get_args(candidate)
    return None


def _base_type(annotation: Any) -> Any:
    """int, float, str, bool, list or dict: what the flag parses (None stripped from Optional)."""
    origin = typing.get_origin(annotation)
    if origin in (list, dict):
        return origin
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if origin is not None and args:
        return _base_type(args[0])
    return annotation


def parse_param(text: str) -> tuple[str, Any]:
    """``NAME=VALUE`` → (name, value), the value read as JSON where it parses (numbers, true/false)."""
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    if not isinstance(value, (int, float, str, bool)):
        value = raw
    return name, value


def _help(name: str) -> str:
    info = PruneOptions.model_fields[name]
    text = info.description or ""
    default = info.default
    if default not in (None, [], {}) and _base_type(info.annotation) is not bool:
        shown = f"{default:.4g}" if isinstance(default, float) else ",".join(default) if isinstance(default, list) else default
        text += f" (default {shown})"
    presets = field_extra(name).get("presets", {})
    if presets and name not in ("method",):
        text += "; " + ", ".join(f"preset {key.replace('@', ' for ')}: {value:.4g}" if isinstance(value, float)
                                 else f"preset {key.replace('@', ' for ')}: {value}" for key, value in presets.items())
    return text.replace("%", "%%")


def add_option_arguments(parser: argparse.ArgumentParser, names: Iterable[str] | None = None) -> None:
    """One flag per PruneOptions field that has one (or per field of ``names``), in the field's group."""
    groups: dict[str, Any] = {}
    wanted = set(PruneOptions.model_fields if names is None else names)
    for name, info in PruneOptions.model_fields.items():
        extra = field_extra(name)
        if extra.get("cli") is False or name not in wanted:
            continue
        group_name = extra.get("group", "prune")
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(GROUP_TITLES.get(group_name, group_name))
        target = groups[group_name]
        kind = _base_type(info.annotation)
        common: dict[str, Any] = {"dest": name, "default": None, "help": _help(name)}
        if "metavar" in extra:
            common["metavar"] = extra["metavar"]
        choices = _choices(info.annotation)
        if kind is bool:
            target.add_argument(flag(name), action=argparse.BooleanOptionalAction, **common)
        elif kind is dict:
            target.add_argument(flag(name).removesuffix("s"), action="append", type=parse_param, **common)
        elif kind is list:
            target.add_argument(flag(name), action="append", **common)
        elif choices is not None:  # checked by the model, like every value: one message, exit 2
            common.setdefault("metavar", "{" + ",".join(choices) + "}")
            target.add_argument(flag(name), type=str, **common)
        else:
            target.add_argument(flag(name), type=str, **common)


def explicit_values(args: argparse.Namespace) -> dict[str, Any]:
    """The options the user gave on the command line (flags left out are absent), as given."""
    values: dict[str, Any] = {}
    for name, info in PruneOptions.model_fields.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        if _base_type(info.annotation) is dict:
            params: dict[str, Any] = {}
            for key, item in value:
                if key in params:
                    raise UsageError(f"{flag(name).removesuffix('s')} {key} given twice")
                params[key] = item
            value = params
        values[name] = value
    return values




def typed_request_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options a ``qsurgeon submit`` user gave, typed by the model (``"0.5"`` → 0.5) for a JSON request.

    Checked with the same declaration as ``qsurgeon prune``; the server checks them again.
    """
    from qsurgeon.client.options import InvalidOptions

    given = {name: value for name, value in explicit_values(args).items() if name in REQUEST_FIELDS}
    try:
        typed = PruneOptions(model="request", **given)
    except InvalidOptions as error:
        raise UsageError(error.flags()) from None
    return typed.model_dump(mode="json", include=set(given))


__all__ = ["add_option_arguments", "explicit_values", "flag", "parse_param", "typed_request_options"]
