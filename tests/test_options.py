"""The prune options are declared once (qsurgeon.client.options) and every interface derives from it."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pytest

from qsurgeon.client.cli import build_parser
from qsurgeon.client.errors import UsageError
from qsurgeon.client.options import (
    PRESETS, REQUEST_FIELDS, JobOptions, PruneOptions, build_options, field_extra,
)

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _prune_flags() -> set[str]:
    parser = build_parser()
    prune = parser._subparsers._group_actions[0].choices["prune"]  # noqa: SLF001 - argparse has no public walk
    return {option for action in prune._actions for option in action.option_strings if option.startswith("--")}


def test_every_field_has_help_and_every_cli_field_a_flag():
    flags = _prune_flags()
    for name, info in PruneOptions.model_fields.items():
        assert info.description, name
        if field_extra(name).get("cli") is False:
            continue
        expected = "--" + name.replace("_", "-")
        assert expected.removesuffix("s") in flags or expected in flags, name


def test_every_prune_flag_is_documented_in_docs_prune_md():
    text = (DOCS / "prune.md").read_text()
    missing = sorted(flag for flag in _prune_flags() if flag not in ("--help",) and f"`{flag}" not in text
                     and f"{flag}`" not in text and f" {flag}" not in text)
    assert not missing, f"docs/prune.md does not mention {missing}"


def test_presets_are_gathered_from_the_fields():
    assert PRESETS["quality"] == {"method": "icbs", "init": "alps", "search_on": "refit", "keep_better": True,
                                  "match_dense": True,
                                  "epochs": 1, "samples": 256, "refit": True, "coverage": 1 / 6}
    assert PRESETS["fast"] == {"method": "icbs", "init": "wanda", "epochs": 1, "refit": False}
    for preset in PRESETS.values():
        PruneOptions(model="m", **preset)  # every preset value is a valid value of its field


def test_explicit_values_beat_the_preset_and_the_preset_is_recorded():
    options = build_options({"model": "m", "epochs": 3}, "quality")
    assert (options.preset, options.epochs, options.block_size, options.init, options.refit) == (
        "quality", 3, 128, "alps", True)


@pytest.mark.parametrize("values, words", [
    ({"density": 1}, "density: Input should be less than 1"),
    ({"pattern": "2:0"}, "pattern: 2:0 must keep between 1 and M - 1"),
    ({"pattern": "2:4", "density": 0.3}, "contradicts pattern 2:4"),
    ({"seed": -1}, "seed: Input should be greater than or equal to 0"),
    ({"seed": True}, "seed: must be a number, not a boolean"),
    ({"samples": 10**9}, "samples: Input should be less than or equal to 65536"),
    ({"block_size": 16, "k": 16}, "k must lie in 1..15"),
    ({"coverage": float("nan")}, "coverage"),
    ({"solver_params": {"not an identifier": 1}}, "is not an identifier"),
    ({"colour": "red"}, "colour: unknown option"),
])
def test_invalid_values_are_one_usage_error_naming_the_field(values, words):
    with pytest.raises(UsageError, match=words.replace("(", r"\(").replace(".", r"\.")):
        PruneOptions(model="m", **values)


def test_the_request_schema_is_the_options_minus_what_the_server_owns():
    schema = JobOptions.model_json_schema()
    assert set(schema["properties"]) == set(REQUEST_FIELDS)
    assert not {"model", "out", "calibration", "export_blocks"} & set(REQUEST_FIELDS)
    assert schema["properties"]["block_size"]["maximum"] == 4096
    density = [branch for branch in schema["properties"]["density"]["anyOf"] if branch.get("type") == "number"]
    assert density[0]["exclusiveMaximum"] == 1.0 and density[0]["exclusiveMinimum"] == 0.0
    assert schema["additionalProperties"] is False
    for name in REQUEST_FIELDS:  # same type, bounds and help as the declaration
        assert JobOptions.model_fields[name].annotation == PruneOptions.model_fields[name].annotation
        assert JobOptions.model_fields[name].metadata == PruneOptions.model_fields[name].metadata


def test_a_request_is_strictly_typed_and_names_server_owned_fields():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="epochs"):
        JobOptions.model_validate({"epochs": "2"})
    with pytest.raises(ValidationError, match="out are set by the server"):
        JobOptions.model_validate({"out": "/tmp/x"})
    assert JobOptions.model_validate({"coverage": 1}).coverage == 1.0


def test_icbs_settings_are_a_view_of_the_options():
    from qsurgeon.server.engine.options import ICBS_FIELDS, ICBSConfig, icbs_config

    options = PruneOptions(model="m", block_size=16, k=5, coverage=0.5, seed=7, solver_params={"sweeps": 3})
    config = icbs_config(options)
    assert {name: getattr(config, name) for name in ICBS_FIELDS} == {name: getattr(options, name) for name in ICBS_FIELDS}
    assert config.params()["sweeps"] == 3 and config.block_k(16) == 5
    for name in ICBS_FIELDS:
        assert ICBSConfig.model_fields[name].metadata == PruneOptions.model_fields[name].metadata
    with pytest.raises(UsageError, match="selection: unknown value 'sideways'"):
        ICBSConfig(selection="sideways")


def test_solver_params_are_checked_against_the_solvers_declaration():
    from qsurgeon.server.engine.options import check_engine_options

    check_engine_options(PruneOptions(model="m", solver_params={"sweeps": 8}))
    with pytest.raises(UsageError, match="bogus"):
        check_engine_options(PruneOptions(model="m", solver_params={"bogus": 1}))
    with pytest.raises(UsageError, match="sweeps"):
        check_engine_options(PruneOptions(model="m", solver_params={"sweeps": -1}))
    with pytest.raises(UsageError, match="unknown solver 'oracle'"):
        check_engine_options(PruneOptions(model="m", solver="oracle"))


def test_literal_choices_are_the_engines_registries():
    from qsurgeon.server.pruning.masks import SCORE_METHODS

    init = set(typing.get_args(PruneOptions.model_fields["init"].annotation))
    assert init == {*SCORE_METHODS, "sparsegpt", "alps"}


def test_report_records_the_preset_and_every_effective_option(tmp_path):
    from test_adapters import save_tiny_model

    from qsurgeon.client.cli import main

    model = save_tiny_model("bert", tmp_path / "bert")
    out = tmp_path / "out"
    assert main(["prune", str(model), "--preset", "fast", "--samples", "8", "--seq-len", "16", "--block-size", "16",
                 "--out", str(out), "--quiet"]) == 0
    recorded = json.loads((out / "report.json").read_text())["options"]
    assert recorded["preset"] == "fast"
    assert set(recorded) == set(PruneOptions.model_fields)
    assert (recorded["samples"], recorded["block_size"], recorded["init"]) == (8, 16, "wanda")
