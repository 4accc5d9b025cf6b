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
from qsurgeon.client.errors import SolverUnavailableError
from qsurgeon.worker import solve
from qsurgeon.worker.solvers import registry
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
