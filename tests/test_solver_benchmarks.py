"""The solver benchmarks behind auto's N:M route and budgets and swap-tabu's anneal default run and say what they measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_nm_route_compares_both_routes_with_autos_budgets(tmp_path):
    out = tmp_path / "nm_route.json"
    printed = _run("nm_route.py", "--sizes", "32,64", "--blocks", "2", "--run-seeds", "1", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert {(row["size"], row["route"]) for row in rows} == {(32, "swap-tabu"), (32, "sa"), (64, "swap-tabu"), (64, "sa")}
    for row in rows:  # the reference is the lowest energy seen, so no gap is negative; each block ran once
        assert 0.0 <= row["mean_gap"] <= row["worst_gap"] and row["runs"] == 2 and row["median_ms"] > 0
    assert printed.count("swap-tabu") == 2


def test_anneal_first_ranks_the_anneal_lengths_it_is_given(tmp_path):
    out = tmp_path / "anneal.json"
    _run("anneal_first.py", "--size", "48", "--blocks", "1", "--sweeps", "0,20", "--run-seeds", "1",
         "--families", "layerwise,causal", "--json", str(out))
    record = json.loads(out.read_text())
    assert record["size"] == 48
    assert {(row["anneal_sweeps"], row["family"]) for row in record["rows"]} == {
        (0, "layerwise"), (0, "causal"), (20, "layerwise"), (20, "causal")}
    by_family: dict[str, list[float]] = {}
    for row in record["rows"]:
        by_family.setdefault(row["family"], []).append(row["mean_gap"])
    assert all(min(gaps) == 0.0 and max(gaps) >= 0.0 for gaps in by_family.values())  # one setting is the reference


def test_budgets_compares_chain_budgets_against_cached_references(tmp_path):
    out, cache = tmp_path / "budgets.json", tmp_path / "references.json"
    args = ("--family", "nm", "--size", "32", "--first", "3", "--blocks", "2", "--run-seeds", "1,2",
            "--budgets", "1x20,2x200,auto,2x300+move=drop-add+stall=50", "--reference-iterations", "400",
            "--reference-sweeps", "200", "--json", str(out), "--cache", str(cache))
    printed = _run("budgets.py", *args)
    rows = json.loads(out.read_text())["rows"]
    assert [row["budget"] for row in rows] == ["1x20", "2x200", "auto", "2x300+move=drop-add+stall=50"]
    assert rows[1]["params"] == {"restarts": 2, "iterations": 200, "tenure": 4}  # N:M blocks: tenure 4
    assert rows[3]["params"] == {"restarts": 2, "iterations": 300, "move": "drop-add", "stall": 50, "tenure": 4}
    for row in rows:  # the reference is the lowest energy seen, so no gap is negative
        assert 0.0 <= row["mean_gap"] <= row["worst_gap"] and row["runs"] == 4 and 0.0 <= row["within_0.1%"] <= 1.0
    assert "2x200" in printed and "auto" in printed
    record = json.loads(cache.read_text())
    assert set(record["energies"]) == {"3", "4"} and all(energy > 0 for energy in record["energies"].values())
    record["energies"] = {seed: energy / 2 for seed, energy in record["energies"].items()}
    cache.write_text(json.dumps(record))
    _run("budgets.py", *args)  # a second run takes the cached references (here halved) instead of solving again
    assert all(row["mean_gap"] > 0.5 for row in json.loads(out.read_text())["rows"])
