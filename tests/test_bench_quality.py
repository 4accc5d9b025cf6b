"""``qsurgeon bench quality --quick``: the report's structure, and every method hits its density."""

import json

import pytest
from PIL import Image

from qsurgeon.client.cli import main
from qsurgeon.server.bench.quality import BENCH_METHODS, QUICK_CURVE_EPOCHS, QUICK_DENSITIES, QUICK_MINILM_INCLUDE
from test_evaluate import make_tiny_causal_lm


@pytest.mark.slow
def test_quick_bench_writes_a_complete_report(tmp_path, capsys):
    lm = make_tiny_causal_lm(tmp_path / "lm", "llama")
    out = tmp_path / "report"
    assert main(["bench", "quality", "--quick", "--out", str(out), "--lm", str(lm)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["models"]) == {"minilm", "lm"}
    # --quick says plainly what it pruned: MiniLM's cosine near 1 is one tensor's, not the model's
    minilm, lm_entry = results["models"]["minilm"], results["models"]["lm"]
    assert minilm["pruned_tensors"] == [f"{name}.weight" for name in QUICK_MINILM_INCLUDE]
    assert minilm["prunable_tensors"] == 36
    assert len(lm_entry["pruned_tensors"]) == lm_entry["prunable_tensors"] == 14  # 2 llama layers × 7 linears
    printed = capsys.readouterr().out
    assert "minilm: pruned 1 of 36 prunable tensors (encoder.layer.0.attention.self.query.weight)" in printed
    assert "lm: pruned all 14 prunable tensors" in printed and "not quality" in printed
    expected_rows = {(method, str(density)) for method in BENCH_METHODS for density in QUICK_DENSITIES}
    for key, entry in results["models"].items():
        metric = entry["metric"]
        assert metric == ("cosine" if key == "minilm" else "perplexity")
        assert {(row["method"], str(row["density_spec"])) for row in entry["rows"]} == expected_rows
        for row in entry["rows"] + entry["curve"]:
            assert row["density_ok"], (key, row)
            target = 0.5 if row["density_spec"] in (0.5, "2:4") else row["density_spec"]
            assert abs(row["density"] - target) < 1e-9
            assert row[metric] > 0 and row["prune_seconds"] >= 0
        assert [(row["epochs"], row["refit"]) for row in entry["curve"]] == [
            (epochs, refit) for refit in (False, True) for epochs in QUICK_CURVE_EPOCHS
        ]
        # the curve's first point is Wanda itself: same mask, same metric
        wanda = next(r for r in entry["rows"] if r["method"] == "wanda" and r["density_spec"] == QUICK_DENSITIES[0])
        assert entry["curve"][0][metric] == pytest.approx(wanda[metric], rel=1e-6)
    markdown = (out / "results.md").read_text()
    assert "| method | 0.5 | 2:4 | prune seconds |" in markdown
    assert "Every method achieved its density exactly: yes." in markdown
    assert "Pruned 1 of 36 prunable tensors" in markdown and "these numbers are not the model's quality" in markdown
    for method in BENCH_METHODS:
        assert f"| {method} |" in markdown
    for name in ("minilm_quality_vs_density.png", "minilm_icbs_vs_seconds.png", "lm_quality_vs_density.png",
                 "lm_icbs_vs_seconds.png"):
        assert f"]({name})" in markdown
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] > 100
    _verdict_reads_the_run(out, results)


def _verdict_reads_the_run(out, results):
    """benchmarks/quality_verdict.py: the docs' verdict tables, from the run's own figures."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "quality_verdict.py"
    done = subprocess.run([sys.executable, str(script), str(out / "results.json"), "--json", str(out / "v.json")],
                          capture_output=True, text=True, check=True)
    verdict = json.loads((out / "v.json").read_text())
    rows = {(row["method"], str(row["density_spec"])): row for row in results["models"]["minilm"]["rows"]}
    assert [row["density"] for row in verdict["minilm"]] == ["0.5", "2:4"]  # the quick run's densities
    for row in verdict["minilm"]:
        assert row["preset"] == rows[("icbs-quality", row["density"])]["cosine"]
        assert row["difference"] == pytest.approx(row["preset"] - rows[("alps", row["density"])]["cosine"])
    lm_rows = {(row["method"], str(row["density_spec"])): row for row in results["models"]["lm"]["rows"]}
    for row in verdict["lm"]:
        anchors = [lm_rows[(name, row["density"])]["perplexity"] for name in ("alps", "wanda+refit", "sparsegpt")]
        assert row["margin"] == pytest.approx(row["preset"] - min(anchors))
    assert "| `--preset quality` |" in done.stdout and "| best anchor |" in done.stdout


@pytest.mark.slow
def test_quick_bench_trains_the_lm_in_process_once_then_reuses_it(tmp_path, capsys):
    """Without --lm, --quick trains a small LM into --cache (seconds), and the next run reuses it."""
    cache = tmp_path / "cache"
    arguments = ["bench", "quality", "--quick", "--models", "lm", "--methods", "magnitude", "--densities", "0.5",
                 "--curve-epochs", "0", "--cache", str(cache)]
    assert main([*arguments, "--out", str(tmp_path / "first")]) == 0
    folder = cache / "tiny-gpt2-quick"
    report = json.loads((folder / "train_report.json").read_text())
    assert report["recipe"]["name"] == "quick" and report["steps"] == report["recipe"]["steps"]
    assert report["heldout_perplexity"] < 0.6 * report["recipe"]["vocab_size"]  # it learned something
    results = json.loads((tmp_path / "first" / "results.json").read_text())
    assert results["models"]["lm"]["reference"] == str(folder)
    assert "training the quick benchmark LM" in capsys.readouterr().err
    trained_at = (folder / "model.safetensors").stat().st_mtime_ns
    assert main([*arguments, "--out", str(tmp_path / "second")]) == 0
    assert "reusing the quick benchmark LM" in capsys.readouterr().err
    assert (folder / "model.safetensors").stat().st_mtime_ns == trained_at


def test_bad_bench_options_exit_2(tmp_path, capsys):
    cases = [
        (["--methods", "icbs,nope"], "unknown method"),
        (["--models", "resnet"], "unknown model"),
        (["--densities", "1.5"], "density"),
        (["--densities", "2:x"], "N:M"),
        (["--curve-epochs", "a"], "--curve-epochs"),
        (["--lm", str(tmp_path / "missing")], "--lm"),
        (["--cache", str(tmp_path / "a-file")], "--cache"),
    ]
    (tmp_path / "a-file").write_text("not a folder")
    for extra, fragment in cases:
        assert main(["bench", "quality", "--quick", "--out", str(tmp_path / "o"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and fragment in err, (extra, err)


def test_presets_are_defaults_that_explicit_options_override():
    from qsurgeon.client.errors import UsageError
    from qsurgeon.client.options import PRESETS, PruneOptions, build_options, preset_values

    assert preset_values("quality") == PRESETS["quality"]
    merged = build_options({"model": "m", "epochs": 4, "density": 0.3}, "quality")
    assert merged.epochs == 4 and merged.density == 0.3 and merged.init == PRESETS["quality"]["init"]
    assert preset_values(None) == {}
    fast = preset_values("fast")
    assert fast["method"] == "icbs" and fast["init"] == "wanda" and not fast["refit"]
    for name in PRESETS:  # every preset is a valid set of prune options
        PruneOptions(model="builtin:minilm", **preset_values(name))
    with pytest.raises(UsageError, match="unknown preset"):
        preset_values("best")


def test_the_benchmark_runs_exactly_the_preset_and_levers_beside_it():
    from qsurgeon.client.options import PRESETS
    from qsurgeon.server.bench.quality import bench_overrides

    assert bench_overrides("icbs-quality") == PRESETS["quality"]
    assert bench_overrides("wanda") == {"method": "wanda"}
    block_output = bench_overrides("icbs-quality+block-output")
    assert block_output == {**PRESETS["quality"], "block_output": True}
    block_output["epochs"] = 9  # a copy: the benchmark may change it without changing the table
    assert bench_overrides("icbs-quality+block-output")["epochs"] == PRESETS["quality"]["epochs"]
