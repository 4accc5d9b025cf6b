"""ExportingQueue writes every block of a run; ``qsurgeon solve DIR`` re-solves them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from blocks_for_backends import fisher_like, layerwise_like
from qsurgeon.client.cli import main
from qsurgeon.client.errors import UsageError
from qsurgeon.worker import BlockProblem, solve
from qsurgeon.worker.queue.export import MANIFEST_NAME, ExportingQueue, read_manifest
from qsurgeon.worker.queue.base import RoundRequest
from qsurgeon.worker.queue.inprocess import InProcessQueue


def round_problems(seed: int) -> list[BlockProblem]:
    dense = layerwise_like(10, seed)
    grouped = layerwise_like(12, seed + 1, groups_of=4)
    factored = fisher_like(8, seed + 2)
    return [
        BlockProblem.dense(dense.Q, k=dense.k, x0=dense.x0, offset=dense.offset, id="../../evil/id"),
        grouped,
        BlockProblem.factored(factored.F, factored.c, k=factored.k, id="fisher block"),  # no x0
    ]


def test_rounds_are_exported_with_a_manifest(tmp_path):
    inner = InProcessQueue()
    queue = ExportingQueue(inner, tmp_path / "blocks")
    rounds = {"r0": round_problems(0), "r1": round_problems(10)}
    results = {name: queue.run_round(RoundRequest("job-7", name, problems, "exhaustive")) for name, problems in rounds.items()}

    manifest = read_manifest(tmp_path / "blocks")
    entries = manifest["blocks"]
    assert len(entries) == 6
    assert sorted(p.name for p in (tmp_path / "blocks").iterdir() if p.suffix == ".npz" and ".solution" not in p.name) \
        == sorted(entry["file"] for entry in entries)
    flat = [(name, problem, solution) for name in rounds for problem, solution in zip(rounds[name], results[name].solutions)]
    for entry, (round_id, problem, solution) in zip(entries, flat):
        assert "/" not in entry["file"] and entry["file"].endswith(".npz")
        assert (entry["job"], entry["round"], entry["problem_id"]) == ("job-7", round_id, problem.id)
        assert (entry["B"], entry["k"], entry["groups"]) == (problem.num_variables, problem.k, problem.num_groups)
        assert entry["solver"] == "exhaustive" and entry["factored"] == problem.is_factored
        loaded = BlockProblem.load_npz(tmp_path / "blocks" / entry["file"])
        assert loaded.id == problem.id and np.array_equal(loaded.counts, problem.counts)
        assert np.array_equal(loaded.dense_Q(), problem.dense_Q())
        if problem.x0 is None:
            assert entry["current_energy"] is None
        else:
            assert entry["current_energy"] == problem.energy(problem.x0)
        assert entry["answer_energy"] == solution.energy == solve(problem, "exhaustive").energy
        with np.load(tmp_path / "blocks" / entry["solution_file"]) as stored:
            assert float(stored["energy"]) == solution.energy
            assert np.array_equal(stored["x"], solution.x)


def test_failed_blocks_are_recorded_without_a_solution(tmp_path):
    queue = ExportingQueue(InProcessQueue(), tmp_path)
    problems = [layerwise_like(8, 0), layerwise_like(21, 1, with_x0=False)]  # exact-dimod takes ≤ 20
    result = queue.run_round(RoundRequest("job", "r0", problems, "exact-dimod"))
    assert result.solutions[0] is not None and result.solutions[1] is None
    failed = read_manifest(tmp_path)["blocks"][1]
    assert failed["solution_file"] is None and failed["answer_energy"] is None
    assert "at most 20" in failed["failure"]


def test_an_existing_export_is_extended(tmp_path):
    ExportingQueue(InProcessQueue(), tmp_path).run_round(RoundRequest("a", "r0", round_problems(0)[:1], "exhaustive"))
    again = ExportingQueue(InProcessQueue(), tmp_path)
    again.run_round(RoundRequest("b", "r0", round_problems(1)[:1], "exhaustive"))
    entries = read_manifest(tmp_path)["blocks"]
    assert [entry["job"] for entry in entries] == ["a", "b"]
    assert entries[0]["file"] != entries[1]["file"]


def test_composite_forwards_other_attributes(tmp_path):
    class ClosableQueue(InProcessQueue):
        closed = False

        def close(self):
            self.closed = True

    inner = ClosableQueue()
    queue = ExportingQueue(inner, tmp_path)
    queue.close()
    assert inner.closed


def test_solve_directory_re_solves_every_block(tmp_path, capsys):
    queue = ExportingQueue(InProcessQueue(), tmp_path)
    queue.run_round(RoundRequest("job", "r0", round_problems(3), "exhaustive"))
    assert main(["solve", str(tmp_path), "--solver", "tabu"]) == 0
    out = capsys.readouterr().out
    assert "tabu vs exported answers: 0 better, 3 equal, 0 worse" in out  # exhaustive answers are optimal
    for entry in read_manifest(tmp_path)["blocks"]:
        answer = tmp_path / entry["file"].replace(".npz", ".tabu.solution.npz")
        with np.load(answer) as stored:
            assert float(stored["energy"]) == pytest.approx(entry["answer_energy"], rel=1e-9)
        assert (tmp_path / entry["solution_file"]).is_file()  # the run's own answer is kept

    assert main(["solve", str(tmp_path), "--solver", "neal", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(records) == 3 and all("exported_answer_energy" in record for record in records)


def test_solve_single_files_still_works(tmp_path, capsys):
    path = tmp_path / "one.npz"
    layerwise_like(8, 2).save_npz(path)
    assert main(["solve", str(path), "--solver", "exhaustive"]) == 0
    assert (tmp_path / "one.solution.npz").is_file()


@pytest.mark.parametrize("bad_file", ["../outside.npz", "/etc/passwd", "", 5, "sub/dir.npz"])
def test_manifest_paths_must_stay_inside_the_directory(tmp_path, capsys, bad_file):
    layerwise_like(6, 0).save_npz(tmp_path / "outside.npz")
    export = tmp_path / "export"
    export.mkdir()
    (export / MANIFEST_NAME).write_text(json.dumps({"format": "qsurgeon-blocks", "version": 1, "blocks": [{"file": bad_file}]}))
    assert main(["solve", str(export), "--solver", "exhaustive"]) == 2
    assert "unsafe file" in capsys.readouterr().err


def test_directories_without_a_manifest_are_refused(tmp_path):
    with pytest.raises(UsageError, match="no manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{\"format\": \"other\"}")
    with pytest.raises(UsageError, match="not a qsurgeon block manifest"):
        read_manifest(tmp_path)
