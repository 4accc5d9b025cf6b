"""``qsurgeon prune`` and ``qsurgeon demo`` from the command line: outputs, --json, bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from qsurgeon.client.cli import main
from qsurgeon.server.engine.outputs import load_masks
from test_adapters import save_tiny_model


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return save_tiny_model("bert", tmp_path_factory.mktemp("cli") / "bert")


def _prune(bert, out, *extra):
    return main(["prune", str(bert), "--samples", "8", "--seq-len", "24", "--block-size", "16",
                 "--out", str(out), "--quiet", *extra])


def test_prune_json_report_and_outputs(bert, tmp_path, capsys):
    out = tmp_path / "out"
    assert _prune(bert, out, "--method", "icbs", "--density", "0.3", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["options"]["density"] == 0.3 and report["options"]["method"] == "icbs"
    assert report["summary"]["density"] == pytest.approx(0.3, abs=0.02)
    written = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "masks.safetensors", "report.json", "tokenizer.json",
            "tokenizer_config.json", "README.md"} <= written
    companions = {p.name for p in bert.iterdir() if not p.name.endswith(".safetensors")}
    assert written == companions | {"model.safetensors", "masks.safetensors", "report.json", "README.md",
                                    "tokenizer.json", "tokenizer_config.json"}  # the original's other files too
    assert "method: icbs" in (out / "README.md").read_text()
    assert json.loads((out / "report.json").read_text())["summary"] == report["summary"]
    masks = load_masks(out / "masks.safetensors")
    assert all(mask.dtype == torch.bool for mask in masks.values())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_prune_plain_output_and_include(bert, tmp_path, capsys):
    assert _prune(bert, tmp_path / "out", "--method", "magnitude", "--include", "*.intermediate.*") == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("pruned 2 tensors to density 0.5 per row")


def _pickled_only_folder(bert, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(bert / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04N.")
    return folder


@pytest.mark.parametrize("case, message", [
    (["--density", "0"], "--density: Input should be greater than 0, got '0'"),
    (["--density", "1"], "--density: Input should be less than 1, got '1'"),
    (["--density", "1.5"], "--density"),
    (["--pattern", "2:0"], "--pattern: 2:0 must keep between 1 and M - 1 of every M"),
    (["--seed", "abc"], "--seed: Input should be a valid integer"),
    (["--samples", "1000000000"], "--samples: Input should be less than or equal to 65536"),
    (["--pattern", "2:24"], "multiple of 24"),
    (["--method", "prayer"], "--method: unknown value 'prayer'; choose one of: 'icbs', 'wanda'"),
    (["--solver", "oracle"], "unknown solver 'oracle'"),
    (["--objective", "vibes"], "--objective: unknown value 'vibes'"),
    (["MISSING"], "does not exist"),
    (["PICKLED"], "no .safetensors weights"),
    (["EMPTY-CALIBRATION"], "is empty"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(bert, tmp_path, capsys, case, message):
    model, extra = str(bert), list(case)
    if case == ["MISSING"]:
        model, extra = str(tmp_path / "no-such-model"), []
    elif case == ["PICKLED"]:
        model, extra = str(_pickled_only_folder(bert, tmp_path)), []
    elif case == ["EMPTY-CALIBRATION"]:
        (tmp_path / "empty.txt").write_text("\n\n")
        extra = ["--calibration", str(tmp_path / "empty.txt")]
    out = tmp_path / "out"
    code = main(["prune", model, "--samples", "8", "--seq-len", "24", "--out", str(out), "--quiet", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("qsurgeon prune: error: ") and message in err, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_refuses_a_non_empty_out_folder(bert, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert _prune(bert, out) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.slow
def test_prune_builtin_minilm_subprocess(tmp_path):
    """The installed console script on the real model, limited to block 0 to stay quick."""
    out = tmp_path / "minilm"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "qsurgeon.client.cli", "prune", "builtin:minilm", "--method", "icbs",
         "--include", "encoder.layer.0.*", "--samples", "32", "--seq-len", "64", "--out", str(out), "--json"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout)
    assert report["summary"]["tensors"] == 6
    assert report["summary"]["relative_error_final"] < report["summary"]["relative_error_initial"]
    from transformers import AutoModel

    model = AutoModel.from_pretrained(out, use_safetensors=True)
    masks = load_masks(out / "masks.safetensors")
    for name, mask in masks.items():
        assert torch.equal(model.get_parameter(name) == 0, mask)


def test_progress_bar_lines_when_not_a_terminal(bert, tmp_path, capsys):
    """Off a terminal (captured stderr here) progress is plain lines, one per update, that name the
    model's transformer blocks and iCBS's QUBOs apart and carry tqdm's elapsed time and ETA."""
    assert main(["prune", str(bert), "--samples", "8", "--seq-len", "24", "--block-size", "16",
                 "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    lines = err.splitlines()
    assert re.fullmatch(r"pruning 12 linears in 2 transformer blocks \(\d+ calibration tokens\)", lines[0])
    first_round = re.fullmatch(r"transformer block 1/2, epoch 1/1, round 1: (\d+) QUBOs, (\d+) accepted, "
                               r"energy \S+ \([-+]\d+\.\d%\) \[\d\d:\d\d elapsed, ETA \?\]", lines[1])
    assert first_round and int(first_round[2]) <= int(first_round[1])
    done = [re.fullmatch(r"transformer block (\d)/2 done: (\d+) rounds?, (\d+) QUBOs solved, mean relative "
                         r"error 0\.\d{4} \[\d\d:\d\d elapsed, ETA (\S+)\]", line) for line in lines if " done: " in line]
    assert [match[1] for match in done] == ["1", "2"]
    assert int(done[0][3]) >= int(first_round[1]) and int(done[0][2]) >= 1
    assert re.fullmatch(r"\d\d:\d\d", done[0][4]) and done[1][4] == "00:00"  # an ETA once a block is timed
    assert lines[-1].startswith("done in ")


def test_icbs_search_options_reach_the_loop(tmp_path):
    from qsurgeon.client.cli import build_parser
    from qsurgeon.server.cli.prune import options_from_args

    args = build_parser().parse_args([
        "prune", "m", "--out", str(tmp_path / "o"), "--k", "5", "--selection", "random", "--tabu-size", "3",
        "--fixed-pruned", "0.2", "--fixed-kept", "0.1", "--coverage", "0.5", "--gamma", "0.5", "--ridge", "0.01",
        "--fisher-weight", "2", "--block-size", "16",
    ])
    from qsurgeon.server.engine.options import icbs_config

    config = icbs_config(options_from_args(args))
    assert (config.k, config.selection, config.tabu_size, config.block_size) == (5, "random", 3, 16)
    assert (config.fixed_pruned, config.fixed_kept, config.coverage) == (0.2, 0.1, 0.5)
    assert (config.gamma, config.ridge, config.fisher_weight) == (0.5, 0.01, 2.0)


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--selection", "sideways", "selection"),
    ("--k", "40", "k must lie"),
    ("--fixed-kept", "1.5", "--fixed-kept: Input should be less than 1"),
    ("--tabu-size", "-1", "tabu"),
])
def test_bad_icbs_search_options_exit_2(tmp_path, capsys, flag, value, message):
    code = main(["prune", "builtin:minilm", "--out", str(tmp_path / "o"), "--block-size", "16", flag, value])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def _parsed_options(tmp_path, *extra):
    from qsurgeon.client.cli import build_parser
    from qsurgeon.server.cli.prune import options_from_args

    return options_from_args(build_parser().parse_args(["prune", "m", "--out", str(tmp_path / "o"), *extra]))


def test_presets_set_defaults_that_explicit_options_override(tmp_path):
    from qsurgeon.client.options import PruneOptions
    from qsurgeon.client.options import PRESETS

    plain = _parsed_options(tmp_path)
    assert plain.to_dict() == PruneOptions(model="m", out=str(tmp_path / "o")).to_dict()
    for preset, values in PRESETS.items():
        chosen = _parsed_options(tmp_path, "--preset", preset).to_dict()
        assert {name: chosen[name] for name in values} == values
    overridden = _parsed_options(tmp_path, "--preset", "quality", "--epochs", "7", "--init", "magnitude")
    assert (overridden.epochs, overridden.init) == (7, "magnitude")
    assert overridden.refit == PRESETS["quality"].get("refit", False)


def test_the_quality_preset_is_the_same_for_every_model_kind(tmp_path):
    from test_adapters import save_tiny_model

    from qsurgeon.client.cli import build_parser
    from qsurgeon.server.cli.prune import options_from_args
    from qsurgeon.client.options import PRESETS

    folder = save_tiny_model("llama", tmp_path / "llama")

    def parsed(model, *extra):
        return options_from_args(build_parser().parse_args(["prune", model, "--out", str(tmp_path / "o"), *extra]))

    causal = parsed(str(folder), "--preset", "quality").to_dict()
    encoder = parsed("builtin:minilm", "--preset", "quality").to_dict()
    for options in (causal, encoder):
        assert {name: options[name] for name in PRESETS["quality"]} == PRESETS["quality"]
    assert parsed(str(folder), "--preset", "quality", "--block-size", "64").block_size == 64


def test_unknown_preset_exits_2(tmp_path, capsys):
    code = main(["prune", "builtin:minilm", "--out", str(tmp_path / "o"), "--preset", "turbo"])
    err = capsys.readouterr().err
    assert code == 2 and "--preset: unknown value 'turbo'" in err and len(err.splitlines()) == 1
