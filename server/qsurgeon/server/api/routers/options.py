"""``/v1/options``: every prune option a job may set, with its type, bounds, default and help.

Derived from the JSON schema of :data:`~qsurgeon.client.options.JobOptions` (the same schema
``/openapi.json`` shows and requests are validated with), so a client reads the bounds the
server enforces instead of a copy that could drift.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from qsurgeon.server.api.openapi import errors

from qsurgeon.client.options import JobOptions

router = APIRouter(tags=["options"])


def describe_option(schema: dict[str, Any]) -> dict[str, Any]:
    """One option's JSON-schema property, flattened for reading: an optional value's
    ``anyOf: [{...bounds}, {"type": "null"}]`` becomes those bounds plus ``"nullable": true``;
    the title (the field name again) is left out."""
    described = {key: value for key, value in schema.items() if key not in ("title", "anyOf")}
    variants = schema.get("anyOf", [])
    values = [variant for variant in variants if variant != {"type": "null"}]
    if len(values) == 1:
        described.update(values[0])
    elif values:
        described["anyOf"] = values
    if len(values) < len(variants):
        described["nullable"] = True
    return described


def option_catalogue() -> dict[str, dict[str, Any]]:
    """Option name → its description (``default``, ``description``, ``type``, bounds such as
    ``minimum``/``maximum``/``exclusiveMinimum``/``maxLength``/``maxItems``, ``enum``, ``presets``)."""
    properties = JobOptions.model_json_schema()["properties"]
    return {name: describe_option(schema) for name, schema in properties.items()}


@router.get("/options", response_model=dict[str, dict[str, Any]],
            responses=errors(), summary="Prune options a job may set, with their defaults and bounds")
def prune_options() -> dict[str, dict[str, Any]]:
    return option_catalogue()
