"""Shadow and routing (the ``shadow`` composite), the experiment record and its report,
exports at hardware scale (estimate, sample) and the streaming, resumable ``qsurgeon solve``.

The quantum side runs on the SDKs' local testing devices: D-Wave's MockDWaveSampler
behind the clique embedding, registered under a name like any solver.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from blocks_for_backends import layerwise_like
from qsurgeon.client.cli import main
from qsurgeon.client.errors import UsageError
from qsurgeon.client.options import JobOptions, PruneOptions
from qsurgeon.worker.block.problem import BlockProblem
from qsurgeon.worker.experiment import RecordingQueue, RecordWriter, experiment_record, read_records
from qsurgeon.worker.queue.base import RoundRequest
from qsurgeon.worker.queue.export import ExportingQueue, read_manifest
from qsurgeon.worker.queue.inprocess import InProcessQueue
from qsurgeon.worker.solve import solve, solve_batch
from qsurgeon.worker.solvers.registry import register, unregister
from qsurgeon.worker.solvers.shadow import Route, block_identity

MOCK = "dwave-mock-test"


@pytest.fixture(scope="module")
def mock_qpu():
    from dwave.system.testing import MockDWaveSampler

    from qsurgeon.worker.solvers.cloud.dwave import DWaveQPUSolver

    solver = DWaveQPUSolver(MockDWaveSampler(), name=MOCK)
    register(solver)
    yield solver
    unregister(MOCK)


def icbs_block(tensor: str, row: int, size: int, seed: int, round_index: int = 0) -> BlockProblem:
    base = layerwise_like(size, seed)
    return BlockProblem.dense(base.Q, k=base.k, x0=base.x0, offset=base.offset, id=f"{tensor}:{row}:{round_index}")


# ---------------------------------------------------------------------- routing
def test_route_rules_parse_and_decide():
    small, large = icbs_block("layer.0.attn.q", 1, 8, 0), icbs_block("layer.0.mlp.fc1", 2, 20, 1)
    assert Route.parse(None).decide(large, 16) == (False, "B=20 > the solver's 16")  # what the hardware can take
    assert Route.parse("all").decide(small, 16)[0]
    rule = Route.parse("size<=10, tensor=*attn*")
    assert rule.decide(small, 100)[0] and not rule.decide(large, 100)[0]
    assert "tensor" in Route.parse("tensor=*mlp*").decide(small, 100)[1]
    assert Route.parse("tensor=*q,tensor=*fc1").decide(large, 100)[0]  # any of the globs
    blocks = [icbs_block("t", row, 6, row) for row in range(400)]
    sampled = [Route.parse("fraction=0.25").decide(block, 100)[0] for block in blocks]
    assert 60 < sum(sampled) < 140
    assert sampled == [Route.parse("fraction=0.25").decide(block, 100)[0] for block in blocks]  # deterministic
    for bad in ("size<=0", "fraction=2", "speed=3", "tensor=", "size<=x"):
        with pytest.raises(UsageError, match="route"):
            Route.parse(bad)
    assert block_identity("encoder.layer.0.output.dense.weight:17:3") == ("encoder.layer.0.output.dense.weight", 17, 3)
    assert block_identity("demo") == (None, None, None)


def test_shadow_merges_the_better_answer_or_the_quantum_one_alone(mock_qpu):
    blocks = [icbs_block(f"layer.{i}.fc", i, size, 10 + i) for i, size in enumerate([8, 12, 16, 14, 10, 16])]
    common = dict(quantum=MOCK, quantum_params={"num_reads": 20}, reference="sa", seed=3)
    best = solve_batch(blocks, "shadow", **common)
    alone = solve_batch(blocks, "shadow", merge="quantum", **common)
    for problem, merged, pure in zip(blocks, best, alone):
        shadow = merged.metadata["shadow"]
        assert shadow["route"] == "quantum" and shadow["reference_solver"] == "sa"
        assert merged.energy == pytest.approx(min(shadow["quantum_energy"], shadow["reference_energy"]), abs=1e-12)
        assert pure.energy == pytest.approx(pure.metadata["shadow"]["quantum_energy"], abs=1e-12)
        assert pure.metadata["shadow"]["chosen"] == "quantum"
        assert problem.is_feasible(merged.x) and problem.is_feasible(pure.x)
        if shadow["chosen"] == "quantum":  # the hardware's own metadata is the answer's
            assert merged.metadata["remote_task_id"] and merged.solver == MOCK
        else:
            assert shadow["quantum_metadata"]["remote_task_id"] and merged.solver == "sa"


def test_route_sends_the_rest_to_the_classical_solver(mock_qpu):
    blocks = [icbs_block("enc.attn.q", 0, 8, 1), icbs_block("enc.mlp.fc", 1, 8, 2), icbs_block("enc.attn.k", 2, 40, 3)]
    answers = solve_batch(blocks, "shadow", quantum=MOCK, quantum_params={"num_reads": 20}, route="tensor=*attn*",
                          seed=1)
    routes = [answer.metadata["shadow"]["route"] for answer in answers]
    assert routes == ["quantum", "classical", "quantum"]  # fc is kept off by its tensor
    assert [answer.solver for answer in answers] == [MOCK, "auto", "auto"]  # the default solver
    assert answers[0].metadata["shadow"]["reference_energy"] is None  # no reference: no shadow
    assert "not in *attn*" in answers[1].metadata["shadow"]["route_reason"]
    # B = 40 is past the mock's largest clique (16), known only once it is asked: the block
    # fails there, auto answers it, and the record says so
    assert "clique" in answers[2].metadata["shadow"]["quantum_failure"]
    record = experiment_record(blocks[2], answers[2])
    assert record["backend"] == "auto" and "clique" in record["quantum_failure"]
    solo = solve_batch(blocks[:1], "shadow", quantum=MOCK, quantum_params={"num_reads": 20}, route="size<=6", seed=1)
    assert solo[0].metadata["shadow"]["route_reason"] == "B=8 > size<=6"


def test_shadow_checks_its_nested_parameters_before_solving(mock_qpu):
    block = icbs_block("t", 0, 6, 0)
    with pytest.raises(UsageError, match="quantum"):
        solve(block, "shadow", reference="sa")
    with pytest.raises(UsageError, match="unknown parameter"):
        solve(block, "shadow", quantum=MOCK, quantum_params={"bogus": 1})
    with pytest.raises(UsageError, match="unknown solver"):
        solve(block, "shadow", quantum=MOCK, reference="no-such-solver")
    with pytest.raises(UsageError, match="route"):
        solve(block, "shadow", quantum=MOCK, route="speed=9")


# ---------------------------------------------------------------------- the record
def test_record_holds_the_block_and_the_backends_facts(mock_qpu):
    block = icbs_block("encoder.layer.1.output.dense.weight", 7, 12, 4, round_index=2)
    answer = solve(block, "shadow", quantum=MOCK, quantum_params={"num_reads": 30}, reference="exhaustive", seed=2)
    record = experiment_record(block, answer, round_id="r2", job="job-1")
    assert (record["tensor"], record["row"], record["round"]) == ("encoder.layer.1.output.dense.weight", 7, 2)
    assert record["B"] == 12 and record["k"] == block.k and record["backend"] == MOCK and record["remote"]
    assert record["reference"] == "exhaustive"
    assert record["gap"] == pytest.approx((record["energy"] - record["reference_energy"])
                                          / abs(record["reference_energy"]))
    assert record["gap"] >= -1e-12  # nothing beats the exact optimum
    assert 0.0 <= record["feasible_before_repair_fraction"] <= 1.0 and record["repair_flips"] >= 0
    assert record["chain_break_fraction"] is not None and record["remote_task_id"]
    assert "qpu_access_time_us" in record["timing"] and record["wall_seconds"] > 0
    json.dumps(record)
    plain = experiment_record(block, solve(block, "sa", seed=1))
    assert plain["backend"] == "sa" and plain["reference_energy"] is None and plain["route"] == "solver"
    failed = experiment_record(block, None, failure="too large")
    assert failed["failure"] == "too large" and failed["energy"] is None


def test_recording_queue_writes_and_emits_each_round(tmp_path, mock_qpu):
    events = []
    writer = RecordWriter(tmp_path / ".partial")
    queue = RecordingQueue(InProcessQueue(), writer, events.append)
    blocks = [icbs_block("t", row, 8, row) for row in range(3)]
    params = {"quantum": MOCK, "reference": "sa", "quantum_params": {"num_reads": 10}, "seed": 0}
    queue.run_round(RoundRequest("job", "r0", blocks, "shadow", params))
    queue.run_round(RoundRequest("job", "r0", blocks[:1], "shadow", params))  # a resumed run repeats a block
    assert [event["event"] for event in events] == ["experiment", "experiment"]
    assert [len(event["records"]) for event in events] == [3, 1]
    final = writer.finish(tmp_path / "experiment.jsonl")
    records = read_records(final)
    assert len(records) == 3 and sorted(r["row"] for r in records) == [0, 1, 2]  # the last record of each block
    assert not (tmp_path / ".partial").exists()


# ---------------------------------------------------------------------- options and the engine
def test_options_reach_the_request_and_the_engine():
    fields = JobOptions.model_fields
    assert {"reference", "merge", "route"} <= set(fields)  # a REST job / the SDK can set them
    assert "export_sample" not in fields  # the export folder is the server's
    options = PruneOptions(model="m", solver="dwave-qpu", reference="swap-tabu", route="size<=64", merge="quantum")
    from qsurgeon.server.engine.options import icbs_config

    solver, params = icbs_config(options).solver_request(5)
    assert solver == "shadow" and params["quantum"] == "dwave-qpu" and params["reference"] == "swap-tabu"
    assert params["reference_params"] == {"iterations": 50, "restarts": 1, "start": "x0"}  # iCBS's budget
    assert params["merge"] == "quantum" and params["route"] == "size<=64" and params["seed"] == 5
    plain = icbs_config(PruneOptions(model="m", solver="sa")).solver_request(5)
    assert plain == ("sa", {"sweeps": 32, "restarts": 2, "start": "x0", "seed": 5})  # unchanged without them
    with pytest.raises(UsageError, match="merge"):
        PruneOptions(model="m", merge="worst")


def test_engine_refuses_a_bad_route_before_running():
    from qsurgeon.server.engine.options import check_engine_options

    with pytest.raises(UsageError, match="route"):
        check_engine_options(PruneOptions(model="m", route="speed=3"))
    check_engine_options(PruneOptions(model="m", reference="swap-tabu", route="fraction=0.5"))


def test_prune_with_a_reference_writes_the_record_and_emits_it(tmp_path):
    from test_adapters import save_tiny_model

    from qsurgeon.server.engine.run import run_prune
    from qsurgeon.server.experiment.report import experiment_report

    model = save_tiny_model("bert", tmp_path / "bert")
    fast = {"samples": 8, "seq_len": 16, "block_size": 16, "epochs": 1, "seed": 3}
    events = []
    run_prune(PruneOptions(model=str(model), out=str(tmp_path / "shadow"), solver="swap-tabu", reference="sa",
                           route="fraction=0.5", **fast), progress=events.append)
    records = read_records(tmp_path / "shadow" / "experiment.jsonl")
    streamed = [record for event in events if event.get("event") == "experiment" for record in event["records"]]
    assert records and len(records) == len(streamed)
    assert {record["route"] for record in records} == {"quantum", "classical"}
    assert all(record["reference"] == "sa" and record["tensor"] for record in records)
    report = json.loads((tmp_path / "shadow" / "report.json").read_text())
    assert report["experiment"] == {"file": "experiment.jsonl", "records": len(records)}
    assert not list(tmp_path.glob(".shadow.*"))  # the partial file went into --out

    run_prune(PruneOptions(model=str(model), out=str(tmp_path / "classical"), **fast))
    assert not (tmp_path / "classical" / "experiment.jsonl").exists()  # not an experiment
    result = experiment_report(tmp_path / "shadow", classical=tmp_path / "classical", out=tmp_path / "report")
    assert result["quality"]["classical_error_final"] is not None
    assert all((tmp_path / "report" / name).is_file() for name in ("gap_vs_size.png", "quality.png",
                                                                    "cumulative_cost.png", "time_cost.png"))
    assert "| swap-tabu | quantum |" in result["tables"]


def test_report_refuses_runs_it_cannot_compare(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert main(["experiment", "report", str(tmp_path / "run")]) == 2
    assert "experiment.jsonl" in capsys.readouterr().err
    block = icbs_block("t", 0, 6, 0)
    (tmp_path / "run" / "experiment.jsonl").write_text(json.dumps(experiment_record(block, solve(block))) + "\n")
    (tmp_path / "run" / "report.json").write_text(json.dumps({"options": {"seed": 1}}))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "report.json").write_text(json.dumps({"options": {"seed": 2}}))
    assert main(["experiment", "report", str(tmp_path / "run"), "--classical", str(tmp_path / "other")]) == 2
    assert "same seed" in capsys.readouterr().err
    assert main(["experiment", "report", str(tmp_path / "run"), "--no-plots", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["blocks"] == 1


# ---------------------------------------------------------------------- exports at scale
def test_export_estimate_of_minilm_at_b128():
    from qsurgeon.server.experiment.record import export_estimate

    layer = [("q", (384, 384)), ("k", (384, 384)), ("v", (384, 384)), ("o", (384, 384)), ("fc1", (1536, 384)),
             ("fc2", (384, 1536))]
    full = export_estimate(PruneOptions(model="m"), [layer] * 6)
    assert full.blocks == full.written == 27_648 and full.tensors == 36
    assert 1.7e9 < full.bytes < 2.1e9  # the 2.0 GB
    assert "27,648 blocks" in full.line("blocks/") and "55,297 files" in full.line("blocks/")
    sampled = export_estimate(PruneOptions(model="m", export_sample=10), [layer] * 6)
    assert sampled.written == 10 * sampled.rounds < 1000
    per_tensor = export_estimate(PruneOptions(model="m", export_sample=10, export_sample_per="tensor"), [layer] * 6)
    assert per_tensor.written == 360


def test_export_samples_blocks_per_round_or_per_tensor(tmp_path):
    blocks = [icbs_block(f"t{row % 3}", row, 6, row) for row in range(12)]
    per_round = ExportingQueue(InProcessQueue(), tmp_path / "round", sample=4, seed=1)
    per_round.run_round(RoundRequest("job", "r0", blocks, "exhaustive"))
    per_round.run_round(RoundRequest("job", "r1", blocks, "exhaustive"))
    manifest = read_manifest(tmp_path / "round")
    assert len(manifest["blocks"]) == 8 and manifest["blocks_seen"] == 24
    assert manifest["sample"] == {"n": 4, "per": "round", "seed": 1}
    again = ExportingQueue(InProcessQueue(), tmp_path / "again", sample=4, seed=1)
    again.run_round(RoundRequest("job", "r0", blocks, "exhaustive"))
    assert [e["problem_id"] for e in read_manifest(tmp_path / "again")["blocks"]] == \
        [e["problem_id"] for e in manifest["blocks"][:4]]  # the same seed draws the same blocks
    per_tensor = ExportingQueue(InProcessQueue(), tmp_path / "tensor", sample=2, per="tensor")
    per_tensor.run_round(RoundRequest("job", "r0", blocks, "exhaustive"))
    per_tensor.run_round(RoundRequest("job", "r1", blocks, "exhaustive"))
    tensors = [entry["tensor"] for entry in read_manifest(tmp_path / "tensor")["blocks"]]
    assert sorted(tensors) == ["t0", "t0", "t1", "t1", "t2", "t2"]  # two of each over the run
    with pytest.raises(UsageError):
        ExportingQueue(InProcessQueue(), tmp_path / "bad", sample=0)


def test_prune_announces_the_export_before_writing(tmp_path, capsys):
    from test_adapters import save_tiny_model

    model = save_tiny_model("bert", tmp_path / "bert")
    code = main(["prune", str(model), "--samples", "8", "--seq-len", "16", "--block-size", "16", "--quiet",
                 "--export-blocks", str(tmp_path / "blocks"), "--export-sample", "3", "--out", str(tmp_path / "out")])
    assert code == 0
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("--export-blocks"))
    estimated = int(line.split("about ")[1].split(" blocks")[0].replace(",", ""))
    written = len(read_manifest(tmp_path / "blocks")["blocks"])
    assert written == estimated  # three per round, and the rounds were counted right


def _export(tmp_path, count=9):
    queue = ExportingQueue(InProcessQueue(), tmp_path)
    blocks = [icbs_block(f"layer.{row % 2}.fc", row, 10, row) for row in range(count)]
    queue.run_round(RoundRequest("job", "r0", blocks, "sa", {"sweeps": 2, "restarts": 1, "seed": 0}))
    return read_manifest(tmp_path)["blocks"]


def test_solve_directory_streams_and_resumes(tmp_path, capsys, monkeypatch):
    entries = _export(tmp_path)
    import importlib

    solve_module = importlib.import_module("qsurgeon.worker.solve")  # the package's `solve` is the function

    real = solve_module.solve_each_on_failure
    calls = []

    def interrupted_on_the_second_chunk(problems, solver, params):
        calls.append(len(problems))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(problems, solver, params)

    monkeypatch.setattr(solve_module, "solve_each_on_failure", interrupted_on_the_second_chunk)
    assert main(["solve", str(tmp_path), "--solver", "exhaustive", "--chunk", "4", "--quiet"]) == 130
    assert "run the same command again" in capsys.readouterr().err
    answers = sorted(tmp_path.glob("*.exhaustive.solution.npz"))
    assert len(answers) == 4 and not list(tmp_path.glob(".*.tmp"))  # the first chunk, whole files only
    answers[0].write_bytes(b"damaged")  # a damaged answer is solved again, not trusted
    monkeypatch.setattr(solve_module, "solve_each_on_failure", real)
    assert main(["solve", str(tmp_path), "--solver", "exhaustive", "--chunk", "4", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "9 blocks: 6 solved, 3 already answered (skipped), 0 failed" in out
    assert "exhaustive vs exported answers: " in out and " 0 worse" in out  # the optimum is never worse
    assert len(list(tmp_path.glob("*.exhaustive.solution.npz"))) == len(entries)
    assert main(["solve", str(tmp_path), "--solver", "exhaustive", "--quiet"]) == 0
    assert "0 solved, 9 already answered" in capsys.readouterr().out
    assert main(["solve", str(tmp_path), "--solver", "exhaustive", "--quiet", "--json"]) == 0
    printed = capsys.readouterr()  # no record on stdout for a skipped block, and a line on stderr saying so
    assert printed.out == "" and "9 of 9 blocks already answered (skipped; --fresh solves them again)" in printed.err


def test_solve_directory_with_a_reference_writes_the_record(tmp_path, capsys, mock_qpu):
    blocks_dir = tmp_path / "blocks"
    _export(blocks_dir, count=6)
    code = main(["solve", str(blocks_dir), "--solver", MOCK, "--param", "num_reads=20", "--reference", "exhaustive",
                 "--route", "tensor=layer.0.*", "--out", str(tmp_path / "exp"), "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert f"{MOCK} vs reference exhaustive: 0 better" in out  # nothing beats the exact optimum
    records = read_records(tmp_path / "exp" / "experiment.jsonl")
    assert len(records) == 6
    routed = [record for record in records if record["route"] == "quantum"]
    assert len(routed) == 3 and all(record["tensor"] == "layer.0.fc" for record in routed)
    assert all(record["stored_energy"] is not None and record["remote_task_id"] for record in routed)
    assert sorted(blocks_dir.glob(f"*.{MOCK}-exhaustive-r*.solution.npz"))  # this setup's own answer files
    with pytest.raises(SystemExit):
        main(["solve", str(blocks_dir), "--merge", "worst"])
    assert main(["solve", str(blocks_dir), "--solver", MOCK, "--route", "size<=x"]) == 2


def test_the_service_forwards_experiment_events_without_touching_progress():
    from qsurgeon.server.api.jobs.manager import ProgressSink

    class Store:
        def __init__(self):
            self.events, self.progress = [], None

        def get(self, job_id):
            return None

        def event(self, job_id, kind, data):
            self.events.append((kind, data))

        def update(self, job_id, progress):
            self.progress = progress

    store = Store()
    sink = ProgressSink(store, "job", min_interval=0.0)
    block = icbs_block("t", 0, 6, 0)
    record = experiment_record(block, solve(block, "exhaustive"), round_id="r0")
    sink({"event": "round", "epoch": 1, "energy": 1.0, "blocks": 1, "accepted": 1})
    sink({"event": "experiment", "request_round": "r0", "records": [record]})
    sink({"event": "round", "epoch": 1, "energy": 0.5, "blocks": 1, "accepted": 0})
    assert store.progress["round"] == 2 and store.progress["blocks_solved"] == 2
    kinds = [kind for kind, _ in store.events]
    assert kinds == ["round", "experiment", "round"]
    assert store.events[1][1]["records"][0]["problem_id"] == "t:0:0"
