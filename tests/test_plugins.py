"""Backend plug-ins through the ``qsurgeon.backends`` entry-point group, for real:
a tiny installed distribution (a dist-info folder with entry_points.txt) on sys.path."""

from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import pytest

from blocks_for_backends import layerwise_like
from qsurgeon.client.cli import main
from qsurgeon.client.errors import SolverUnavailableError, UsageError
from qsurgeon.worker import solve
from qsurgeon.worker.solvers import registry
from qsurgeon.worker.solvers import sa as sa_solver
from qsurgeon.worker.solvers.dimod_backends import NealSolver

PLUGIN_MODULE = "qsurgeon_test_plugin_backend"
NEVER_IMPORTED = "qsurgeon_test_never_imported"

PLUGIN_SOURCE = '''
import numpy as np
from qsurgeon.worker.block.problem import BlockSolution
from qsurgeon.worker.solvers.base import Capabilities, Solver


class FirstOnesSolver(Solver):
    """Puts each group's ones on its first members: feasible, not good."""

    capabilities = Capabilities(name="first-ones", description="test plug-in", max_variables=64,
                                constraints="native", device="cpu", extra="")

    def sample(self, problem, **params):
        x = np.zeros(problem.num_variables, np.uint8)
        for group, members in enumerate(problem.group_members()):
            x[members[: problem.counts[group]]] = 1
        return BlockSolution(x=x, energy=0.0, solver=self.name)


def not_a_solver():
    return "nope"


class Hijack(FirstOnesSolver):
    pass
'''

ENTRY_POINTS = f"""
[qsurgeon.backends]
first-ones = {PLUGIN_MODULE}:FirstOnesSolver
broken = {PLUGIN_MODULE}:does_not_exist
not-a-solver = {PLUGIN_MODULE}:not_a_solver
neal = {PLUGIN_MODULE}:Hijack
"""


@pytest.fixture
def plugin_site(tmp_path, monkeypatch):
    """Install the plug-in distribution into a temporary site folder on sys.path."""
    (tmp_path / f"{PLUGIN_MODULE}.py").write_text(PLUGIN_SOURCE)
    (tmp_path / f"{NEVER_IMPORTED}.py").write_text("raise RuntimeError('a request imported me')\n")
    dist_info = tmp_path / "qsurgeon_test_plugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: qsurgeon-test-plugin\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(textwrap.dedent(ENTRY_POINTS))
    monkeypatch.syspath_prepend(str(tmp_path))
    registry._plugin_entry_points.cache_clear()
    yield tmp_path
    for name in ("first-ones", "broken", "not-a-solver"):
        registry.unregister(name)
    sys.modules.pop(PLUGIN_MODULE, None)
    monkeypatch.undo()
    registry._plugin_entry_points.cache_clear()


def test_plugin_is_listed_and_solves(plugin_site):
    assert "first-ones" in registry.solver_names()
    problem = layerwise_like(12, 0, groups_of=4)
    solution = solve(problem, "first-ones")
    assert problem.is_feasible(solution.x)
    assert solution.energy == problem.energy(solution.x)  # its claimed 0.0 was replaced
    assert solution.metadata["reported_energy"] == 0.0
    assert registry.capabilities("first-ones").description == "test plug-in"


def test_broken_plugins_fail_cleanly(plugin_site):
    with pytest.raises(SolverUnavailableError, match="'broken' failed to load"):
        registry.get_solver("broken")
    with pytest.raises(SolverUnavailableError, match="not a qsurgeon Solver"):
        registry.get_solver("not-a-solver")
    assert registry.capabilities("broken").installed is False


def test_plugin_cannot_take_a_builtin_name(plugin_site):
    registry.unregister("neal")
    assert isinstance(registry.get_solver("neal"), NealSolver)


def test_backends_are_chosen_by_registered_name_only(plugin_site):
    for request in (
        f"{PLUGIN_MODULE}:FirstOnesSolver", PLUGIN_MODULE, NEVER_IMPORTED, f"{NEVER_IMPORTED}:X",
        "qsurgeon.worker.solvers.exhaustive", "qsurgeon.worker.solvers.exhaustive:ExhaustiveSolver", "os.path",
    ):
        with pytest.raises(SolverUnavailableError, match="unknown solver"):
            registry.get_solver(request)
    assert NEVER_IMPORTED not in sys.modules


def test_missing_extra_says_what_to_install(tmp_path, monkeypatch, capsys):
    """A built-in entry whose module imports a dependency that is not installed."""
    (tmp_path / "qsurgeon_test_fake_quantum.py").write_text(
        "import qsurgeon_test_dependency_not_installed\n\nclass FakeQuantumSolver:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = registry._BuiltinSpec("qsurgeon_test_fake_quantum", "FakeQuantumSolver", "quantum", "fake quantum backend")
    monkeypatch.setitem(registry.BUILTIN_SOLVERS, "fake-quantum", spec)
    with pytest.raises(SolverUnavailableError, match=r"pip install 'qsurgeon\[quantum\]'") as error:
        registry.get_solver("fake-quantum")
    assert "qsurgeon_test_dependency_not_installed" in str(error.value)
    listed = registry.capabilities("fake-quantum")
    assert listed.installed is False and listed.extra == "quantum" and "qsurgeon[quantum]" in listed.missing

    block = tmp_path / "block.npz"
    layerwise_like(6, 0).save_npz(block)
    assert main(["solve", str(block), "--solver", "fake-quantum"]) == 2
    assert "qsurgeon[quantum]" in capsys.readouterr().err


def test_solvers_json_shows_capabilities(capsys):
    assert main(["solvers", "--json"]) == 0
    listed = {entry["name"]: entry for entry in json.loads(capsys.readouterr().out)}
    for name in ("neal", "tabu", "steepest", "exact-dimod", "qaoa"):
        entry = listed[name]
        assert entry["installed"] is True, entry["missing"]
        assert entry["constraints"] == "penalty"
        assert entry["needs_gpu"] is False
        assert {"max_variables", "deterministic", "extra", "exact", "device"} <= set(entry)
    assert listed["qaoa"]["extra"] == "quantum" and listed["qaoa"]["max_variables"] == 20
    assert listed["exact-dimod"]["exact"] is True and listed["exact-dimod"]["max_variables"] == 20
    assert listed["neal"]["max_variables"] == 2048 and listed["neal"]["extra"] == "worker"
    assert listed["tabu"]["deterministic"] is False and listed["neal"]["deterministic"] is True
    assert np.all([entry["max_variables"] > 0 for entry in listed.values() if entry["installed"]])


# ---------------------------------------------------------------------- parameter declarations
def test_solvers_json_lists_each_declared_parameter(capsys):
    assert main(["solvers", "--json"]) == 0
    listed = {entry["name"]: {p["name"]: p for p in entry["parameters"]} for entry in json.loads(capsys.readouterr().out)}
    assert listed["sa"]["sweeps"] == {"name": "sweeps", "type": "int", "default": None, "minimum": 0, "maximum": None,
                                      "above": None, "choices": [], "help": listed["sa"]["sweeps"]["help"]}
    assert "none: by size" in listed["sa"]["sweeps"]["help"]
    assert listed["sa"]["start"]["choices"] == ["auto", "x0", "random", "greedy"] and listed["sa"]["start"]["default"] == "auto"
    assert listed["swap-tabu"]["restarts"]["maximum"] == 4096 and listed["swap-tabu"]["tenure"]["default"] is None
    assert "2 for move best, 3 for move drop-add" in listed["swap-tabu"]["tenure"]["help"]  # the default, by move
    assert listed["swap-tabu"]["move"]["choices"] == ["best", "drop-add"] and listed["swap-tabu"]["move"]["default"] == "best"
    assert listed["neal"]["restarts"]["default"] == 16 and listed["neal"]["alpha"]["default"] == 0.5
    assert listed["tabu"]["time_limit"]["above"] == 0.0 and listed["exact-dimod"]["alpha"]["default"] == "hard"
    assert listed["qaoa"]["optimizer"]["choices"] == ["cobyla", "nelder-mead", "spsa"]
    assert set(listed["exhaustive"]) == {"seed"}
    assert all(param["help"] for params in listed.values() for param in params.values())


@pytest.mark.parametrize("solver, params, message", [
    ("sa", {"sweeps": -1}, r"sa: sweeps must be an integer ≥ 0, got -1"),
    ("sa", {"restarts": 2.5}, r"sa: restarts must be an integer ≥ 1"),
    ("sa", {"start": "middle"}, r"sa: start must be one of auto, x0, random, greedy, got 'middle'"),
    ("sa", {"time_limit": 0}, r"sa: time_limit must be a finite number > 0"),
    ("sa", {"iterations": 5}, r"sa: unknown parameter\(s\) iterations; it takes: beta_range, cuda_kernel, device, polish, "
                              r"restarts, scale_quantile, seed, start, sweeps, time_limit"),
    ("swap-tabu", {"restarts": 5000}, r"restarts must be an integer ≥ 1 and ≤ 4096"),
    ("neal", {"alpha": "soft"}, "alpha"),
    ("qaoa", {"optimizer": "adam"}, "optimizer must be one of cobyla, nelder-mead, spsa"),
    ("exhaustive", {"restarts": 2}, r"exhaustive: unknown parameter\(s\) restarts; it takes: seed"),
])
def test_check_solver_params_refuses_with_the_accepted_ones(solver, params, message):
    with pytest.raises(UsageError, match=message):
        registry.check_solver_params(solver, params)


def test_check_solver_params_types_values_and_knows_the_solvers():
    assert registry.check_solver_params("sa", {"sweeps": np.int64(7), "beta_range": [1, 2], "seed": None}) == {
        "sweeps": 7, "beta_range": (1.0, 2.0), "seed": None}
    assert registry.check_solver_params("neal", {"alpha": "hard", "restarts": 3}) == {"alpha": "hard", "restarts": 3}
    with pytest.raises(UsageError, match=r"unknown solver 'nope'; installed solvers: .*exhaustive.*sa"):
        registry.check_solver_params("nope", {})


def test_a_plugin_without_a_declaration_accepts_only_the_seed(plugin_site):
    assert registry.check_solver_params("first-ones", {"seed": 3}) == {"seed": 3}
    with pytest.raises(UsageError, match=r"first-ones: unknown parameter\(s\) sweeps; it takes: seed"):
        registry.check_solver_params("first-ones", {"sweeps": 10})


def test_cli_param_is_parsed_by_the_declaration(tmp_path, capsys):
    block = tmp_path / "block.npz"
    layerwise_like(8, 0).save_npz(block)
    assert main(["solve", str(block), "--solver", "sa", "--param", "sweeps=12", "--param", "beta_range=2,50",
                 "--param", "start=random", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["sweeps"] == 12 and record["metadata"]["start"] == "random"
    assert main(["solve", str(block), "--solver", "sa", "--param", "sweeps=many"]) == 2
    assert "sa: sweeps must be an integer ≥ 0, got 'many'" in capsys.readouterr().err
    assert main(["solve", str(block), "--solver", "sa", "--param", "tenure=2"]) == 2
    assert ("NAME one of beta_range, cuda_kernel, device, polish, restarts, scale_quantile, seed, start, sweeps, "
            "time_limit") in capsys.readouterr().err


def test_a_solve_uses_the_declared_defaults():
    problem = layerwise_like(8, 0)
    declared = {name: {p.name: p.default for p in registry.solver_parameters(name)} for name in ("sa", "swap-tabu")}
    sa = solve(problem, "sa", seed=1)
    assert declared["sa"]["sweeps"] is None  # by size
    assert (sa.restarts, sa.sweeps) == (declared["sa"]["restarts"], sa_solver.default_sweeps(problem.num_variables))
    tabu = solve(problem, "swap-tabu", seed=1)
    assert (tabu.restarts, tabu.sweeps) == (declared["swap-tabu"]["restarts"], declared["swap-tabu"]["iterations"])
    neal = solve(problem, "neal", seed=1)
    neal_declared = {p.name: p.default for p in registry.solver_parameters("neal")}
    assert neal.metadata["sampler_params"]["num_reads"] == neal_declared["restarts"]
    assert neal.metadata["sampler_params"]["num_sweeps"] == neal_declared["sweeps"] == neal.sweeps
