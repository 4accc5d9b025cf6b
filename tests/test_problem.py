"""The block problem format and the exhaustive solver, checked against direct computation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from qsurgeon.client.errors import InfeasibleSolutionError, InvalidProblemError, UsageError
from qsurgeon.worker.block import codec
from qsurgeon.worker.block.problem import BlockProblem, BlockSolution
from qsurgeon.worker.solve import solve


def _symmetric(rng: np.random.Generator, size: int) -> np.ndarray:
    A = rng.standard_normal((size, size))
    return ((A + A.T) / 2).astype(np.float32)


def _brute_force(Q: np.ndarray, feasible) -> tuple[float, tuple[int, ...]]:
    """Minimum of xᵀQx over all 0/1 vectors accepted by ``feasible``, by plain Python loops."""
    size = Q.shape[0]
    best = (np.inf, ())
    for bits in itertools.product((0, 1), repeat=size):
        if not feasible(bits):
            continue
        x = np.array(bits, dtype=np.float64)
        value = float(x @ Q.astype(np.float64) @ x)
        if value < best[0]:
            best = (value, bits)
    return best


# ---------------------------------------------------------------------- construction
def test_dense_with_k_builds_one_group():
    Q = _symmetric(np.random.default_rng(0), 6)
    problem = BlockProblem.dense(Q, k=2, offset=1.5, id="blk")
    assert problem.num_variables == 6 and problem.num_groups == 1 and problem.k == 2
    assert problem.Q.dtype == np.float32 and not problem.is_factored and problem.rank is None
    assert problem.offset == 1.5 and problem.id == "blk"


def test_factored_keeps_f_and_c_without_forming_q():
    rng = np.random.default_rng(1)
    F = rng.standard_normal((3, 7))
    c = rng.standard_normal(7)
    problem = BlockProblem.factored(F, c, k=3)
    assert problem.is_factored and problem.rank == 3 and problem.Q is None
    assert np.allclose(problem.dense_Q(), F.astype(np.float32).astype(np.float64).T @ F.astype(np.float32)
                       + np.diag(c.astype(np.float32)))


def test_groups_as_labels_and_as_index_rows_agree():
    Q = _symmetric(np.random.default_rng(2), 8)
    by_labels = BlockProblem.dense(Q, groups=np.arange(8) // 4, counts=[2, 1])
    by_rows = BlockProblem.dense(Q, groups=[[0, 1, 2, 3], [4, 5, 6, 7]], counts=[2, 1])
    assert np.array_equal(by_labels.group_of, by_rows.group_of)
    assert by_labels.k == 3
    assert [list(m) for m in by_labels.group_members()] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_nearly_symmetric_q_is_symmetrised_exactly():
    Q = _symmetric(np.random.default_rng(3), 5)
    Q[0, 1] += 1e-9
    problem = BlockProblem.dense(Q, k=2)
    assert np.array_equal(problem.Q, problem.Q.T)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda Q: BlockProblem.dense(Q[:, :3], k=1), "square"),
        (lambda Q: BlockProblem.dense(Q + np.triu(np.ones_like(Q), 1), k=1), "symmetric"),
        (lambda Q: BlockProblem.dense(Q, k=5), "k must lie"),
        (lambda Q: BlockProblem.dense(Q, k=-1), "k must lie"),
        (lambda Q: BlockProblem.dense(Q, groups=[[0, 1], [1, 2]], counts=[1, 1]), "overlap"),
        (lambda Q: BlockProblem.dense(Q, groups=[[0, 1], [2, 0]], counts=[1, 1]), "overlap"),
        (lambda Q: BlockProblem.dense(Q, groups=[[0, 1]], counts=[1]), "miss"),
        (lambda Q: BlockProblem.dense(Q, groups=[0, 0, 1, 1], counts=[3, 1]), "must hold 3 ones"),
        (lambda Q: BlockProblem.dense(np.where(np.eye(4, dtype=bool), np.nan, Q), k=1), "NaN"),
        (lambda Q: BlockProblem.dense(np.where(np.eye(4, dtype=bool), np.inf, Q), k=1), "NaN or infinite"),
        (lambda Q: BlockProblem.dense(Q, k=2, x0=[1, 0, 0, 0]), "x0"),
        (lambda Q: BlockProblem.dense(Q, k=2, x0=[1, 2, 0, 0]), "only 0 and 1"),
        (lambda Q: BlockProblem.dense(Q, k=2, offset=np.nan), "offset"),
        (lambda Q: BlockProblem.factored(np.ones((2, 4)), np.ones(3), k=1), "c must have"),
        (lambda Q: BlockProblem.dense(Q), "constraint is required"),
    ],
)
def test_bad_input_is_refused_with_a_reason(build, message):
    Q = _symmetric(np.random.default_rng(4), 4)
    with pytest.raises(InvalidProblemError, match=message):
        build(Q)


# ---------------------------------------------------------------------- serialisation
def _assert_same_problem(a: BlockProblem, b: BlockProblem) -> None:
    for name in ("group_of", "counts", "Q", "F", "c", "x0"):
        left, right = getattr(a, name), getattr(b, name)
        assert (left is None) == (right is None), name
        if left is not None:
            assert left.dtype == right.dtype and np.array_equal(left, right), name
    assert a.offset == b.offset and a.id == b.id and dict(a.meta) == dict(b.meta)


def _examples() -> list[BlockProblem]:
    rng = np.random.default_rng(5)
    Q = _symmetric(rng, 8)
    return [
        BlockProblem.dense(Q, k=3, offset=0.123456789012345, x0=[1, 1, 1, 0, 0, 0, 0, 0], id="d", meta={"row": 4}),
        BlockProblem.dense(Q, groups=np.arange(8) // 4, counts=[2, 2]),
        BlockProblem.factored(rng.standard_normal((3, 8)), rng.standard_normal(8), k=4, offset=-2.5, id="f"),
    ]


@pytest.mark.parametrize("index", range(3))
def test_bytes_round_trip_is_bit_exact(index):
    problem = _examples()[index]
    _assert_same_problem(problem, codec.decode_problem(codec.encode_problem(problem)))


@pytest.mark.parametrize("index", range(3))
def test_npz_round_trip_is_bit_exact(index, tmp_path):
    problem = _examples()[index]
    problem.save_npz(tmp_path / "p.npz")
    _assert_same_problem(problem, BlockProblem.load_npz(tmp_path / "p.npz"))


def test_solution_round_trips(tmp_path):
    solution = BlockSolution(x=np.array([1, 0, 1, 0], np.uint8), energy=1.0000000000000002, solver="sa",
                             seconds=0.25, sweeps=10, restarts=2, problem_id="p", metadata={"seed": 3})
    again = codec.decode_solution(codec.encode_solution(solution))
    assert np.array_equal(again.x, solution.x) and again.x.dtype == np.uint8
    assert (again.energy, again.solver, again.sweeps, again.restarts, again.problem_id) == (
        solution.energy, "sa", 10, 2, "p")
    assert dict(again.metadata) == {"seed": 3}
    solution.save_npz(tmp_path / "s.npz")
    with np.load(tmp_path / "s.npz", allow_pickle=False) as data:
        assert np.array_equal(data["x"], solution.x) and float(data["energy"]) == solution.energy


def test_corrupt_payload_is_refused():
    payload = codec.encode_problem(_examples()[0])
    with pytest.raises(InvalidProblemError, match="truncated"):
        codec.decode_problem(payload[:-3])
    with pytest.raises(InvalidProblemError, match="not a qsurgeon block problem"):
        codec.decode_problem(b"XXXX" + payload[4:])
    with pytest.raises(InvalidProblemError, match="trailing bytes"):
        codec.decode_problem(payload + b"x")


# ---------------------------------------------------------------------- the codec
def _codec_examples() -> list[BlockProblem]:
    """Every shape of problem the codec carries: dense/factored, k/groups, with and without x0."""
    rng = np.random.default_rng(12)
    Q = _symmetric(rng, 8)
    groups = np.arange(8) // 4
    return [
        *_examples(),
        BlockProblem.dense(Q, k=0),
        BlockProblem.factored(rng.standard_normal((2, 8)), rng.standard_normal(8), groups=groups, counts=[1, 3],
                              x0=[1, 0, 0, 0, 1, 1, 1, 0], offset=1e-300, id="fg", meta={"a": [1, 2]}),
    ]


@pytest.mark.parametrize("index", range(5))
def test_codec_round_trip_is_bit_exact(index):
    problem = _codec_examples()[index]
    payload = codec.encode_problem(problem)
    assert payload[:4] == codec.PROBLEM_MAGIC and payload[4] == codec.FORMAT_VERSION
    back = codec.decode_problem(payload)
    _assert_same_problem(problem, back)
    assert codec.encode_problem(back) == payload  # a second trip gives the same bytes


def test_codec_shared_arrays_travel_as_references():
    problem = _examples()[0]
    inline = codec.encode_problem(problem)
    referenced = codec.encode_problem(problem, {id(problem.Q): "h1"})
    assert len(referenced) == len(inline) - problem.Q.nbytes + len(',"ref":"h1"')
    stored = {"h1": problem.Q.tobytes()}
    _assert_same_problem(problem, codec.decode_problem(referenced, stored.get))
    with pytest.raises(InvalidProblemError, match="refers to stored array h1, which is gone"):
        codec.decode_problem(referenced, {}.get)
    with pytest.raises(InvalidProblemError, match="which is gone"):
        codec.decode_problem(referenced)


def test_codec_refuses_another_version_and_truncation_with_a_clear_message():
    payload = codec.encode_problem(_examples()[2])
    older = payload[:4] + bytes([1]) + payload[5:]
    with pytest.raises(UsageError, match=r"format version 1; this qsurgeon reads only version 2"):
        codec.decode_problem(older)
    for cut in (0, 3, 8, 20, len(payload) - 1):
        with pytest.raises(UsageError, match="truncated"):
            codec.decode_problem(payload[:cut])
    solution = codec.encode_solution(BlockSolution(x=np.array([1, 0], np.uint8), energy=0.5, solver="sa"))
    with pytest.raises(UsageError, match="not a qsurgeon block problem"):
        codec.decode_problem(solution)
    with pytest.raises(UsageError, match="block solution payload is format version 9"):
        codec.decode_solution(solution[:4] + bytes([9]) + solution[5:])
    with pytest.raises(UsageError, match="truncated"):
        codec.decode_solution(solution[:-1])


def test_codec_validates_what_it_decodes():
    problem = _examples()[0]
    asymmetric = np.array(problem.Q, copy=True)
    asymmetric[0, 1] += 1.0
    forged = BlockProblem(group_of=problem.group_of, counts=problem.counts, Q=asymmetric, x0=problem.x0)
    with pytest.raises(InvalidProblemError, match="symmetric"):
        codec.decode_problem(codec.encode_problem(forged))
    infeasible = BlockProblem(group_of=problem.group_of, counts=problem.counts, Q=problem.Q,
                              x0=np.ones(8, np.uint8))
    with pytest.raises(InvalidProblemError, match="x0 does not satisfy"):
        codec.decode_problem(codec.encode_problem(infeasible))


def test_codec_solution_and_result_round_trips_are_bit_exact():
    solution = BlockSolution(x=np.array([1, 0, 1, 1, 0], np.uint8), energy=-1.2345678901234567e-5, solver="tabu",
                             seconds=0.125, sweeps=7, restarts=3, problem_id="p9", metadata={"seed": 1, "t": [0.5]})
    for back in (codec.decode_solution(codec.encode_solution(solution)),
                 codec.decode_result(codec.encode_result(solution))[0]):
        assert np.array_equal(back.x, solution.x) and back.x.dtype == np.uint8 and back.x.flags.writeable
        assert (back.energy, back.solver, back.seconds, back.sweeps, back.restarts, back.problem_id) == (
            solution.energy, "tabu", 0.125, 7, 3, "p9")
        assert dict(back.metadata) == dict(solution.metadata)
    assert codec.decode_result(codec.encode_result(None, "too large")) == (None, "too large")
    with pytest.raises(UsageError, match="neither a solution nor a failure"):
        codec.decode_result(b"??")


# ---------------------------------------------------------------------- evaluation
def test_energy_equals_direct_quadratic_form():
    rng = np.random.default_rng(6)
    for problem in _examples():
        Q = problem.dense_Q()
        for _ in range(5):
            x = rng.integers(0, 2, problem.num_variables)
            direct = sum(Q[i, j] * x[i] * x[j] for i in range(len(x)) for j in range(len(x))) + problem.offset
            assert problem.energy(x) == pytest.approx(direct, rel=1e-12, abs=1e-12)


def test_check_feasible_names_the_wrong_group():
    problem = _examples()[1]
    assert problem.check_feasible([1, 1, 0, 0, 0, 0, 1, 1]).dtype == np.uint8
    with pytest.raises(InfeasibleSolutionError, match="group 1 has 3 ones"):
        problem.check_feasible([1, 1, 0, 0, 0, 1, 1, 1])


@pytest.mark.parametrize("seed", range(4))
def test_exhaustive_matches_brute_force_with_k(seed):
    rng = np.random.default_rng(seed)
    size, k = 9, int(rng.integers(0, 10))
    Q = _symmetric(rng, size)
    problem = BlockProblem.dense(Q, k=k, offset=0.5)
    answer = solve(problem, "exhaustive")
    expected, _ = _brute_force(problem.Q, lambda bits: sum(bits) == k)
    assert answer.energy == pytest.approx(expected + 0.5, rel=1e-9, abs=1e-9)
    assert int(answer.x.sum()) == k


@pytest.mark.parametrize("seed", range(3))
def test_exhaustive_matches_brute_force_with_groups(seed):
    rng = np.random.default_rng(10 + seed)
    groups = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 2])
    counts = [1, 2, 2]
    problem = BlockProblem.factored(rng.standard_normal((3, 10)), rng.standard_normal(10), groups=groups, counts=counts)
    answer = solve(problem, "exhaustive")

    def feasible(bits):
        return all(sum(b for b, g in zip(bits, groups) if g == group) == count for group, count in enumerate(counts))

    expected, _ = _brute_force(problem.dense_Q(), feasible)
    assert answer.energy == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert problem.is_feasible(answer.x)


def test_npz_files_refuse_a_factored_problem_without_its_diagonal(tmp_path):
    path = tmp_path / "f_only.npz"
    np.savez(path, F=np.ones((2, 4)), k=np.int64(2))
    with pytest.raises(InvalidProblemError, match="needs c beside F"):
        BlockProblem.load_npz(path)
    np.savez(path, F=np.ones((2, 4)), c=np.zeros(4), k=np.int64(2))  # explicit zeros are a choice
    assert BlockProblem.load_npz(path).num_variables == 4
    empty = tmp_path / "empty.npz"
    np.savez(empty)
    with pytest.raises(InvalidProblemError, match="neither Q nor F"):
        BlockProblem.load_npz(empty)
