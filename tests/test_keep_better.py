"""``--keep-better`` (engine/methods.py ``_keep_better``, engine/icbs/block_output.py ``LayerError``):
after the guard every tensor's calibration layer error is at most the lower of iCBS's and the
initial method's own, the density stays exact in every row / N:M group / tensor, and
report.json records the choice.

The models have one transformer block, so separate runs see the same calibration Grams and
their per-tensor errors can be compared directly.
"""

from __future__ import annotations

import json

import pytest
import torch

from qsurgeon.client.options import PruneOptions
from qsurgeon.server.engine.icbs.block_output import LayerError, choose_rows
from qsurgeon.server.engine.run import run_prune
from qsurgeon.server.pruning.masks import check_mask
from qsurgeon.server.pruning.sparsity import Sparsity
from test_adapters import save_tiny_model

FAST = {"samples": 16, "seq_len": 32, "block_size": 16, "epochs": 1}
SPECS = [{"density": 0.5}, {"pattern": "2:4"}, {"density": 0.4, "granularity": "tensor"}]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("keep-better-models")
    return {kind: save_tiny_model(kind, root / kind, layers=1) for kind in ("bert", "llama")}


def _errors(result, key):
    return {name: entry[key] for name, entry in result.report["tensors"].items()}


def _close_below(value, bound):
    return value <= bound * (1 + 1e-4) + 1e-7


def test_choose_rows_takes_the_lower_row_error_of_each_candidate():
    torch.manual_seed(0)
    w0 = torch.randn(6, 8)
    activations = torch.randn(8, 40)
    gram = activations @ activations.T
    sparsity = Sparsity(0.5)
    masks = [torch.rand(6, 8).argsort(dim=1) < 4 for _ in range(2)]  # 4 of 8 pruned in every row
    candidates = [(mask, w0 * ~mask) for mask in masks]
    judge = LayerError({"t": w0}, {"t": gram})
    mask, weight, index = choose_rows(judge, "t", candidates)
    check_mask(mask, sparsity, "t")
    rows = [judge.rows("t", candidate_weight) for _, candidate_weight in candidates]
    assert torch.allclose(judge.rows("t", weight), torch.minimum(rows[0], rows[1]))
    assert torch.equal(mask, torch.where(index[:, None] == 1, masks[1], masks[0]))
    assert judge.tensor("t", weight) <= min(judge.tensor("t", w) for _, w in candidates) + 1e-12


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("spec", SPECS, ids=["row", "2:4", "tensor"])
def test_keep_better_from_alps_is_never_worse_than_alps_or_icbs_per_tensor(models, kind, spec, tmp_path):
    sparsity = Sparsity.parse(spec.get("density"), spec.get("pattern"), spec.get("granularity", "row"))
    common = {"model": str(models[kind]), **spec, **FAST}
    alps = run_prune(PruneOptions(method="alps", **common))
    searched = run_prune(PruneOptions(method="icbs", init="alps", refit=True, **common))
    guarded = run_prune(PruneOptions(method="icbs", init="alps", refit=True, keep_better=True,
                                     out=str(tmp_path / "out"), **common))
    alps_errors, icbs_errors = _errors(alps, "error_weights"), _errors(searched, "error_weights")
    for name, error in _errors(guarded, "error_weights").items():
        assert _close_below(error, min(alps_errors[name], icbs_errors[name])), name
    for name, mask in guarded.masks.items():
        check_mask(mask, sparsity, name)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    (block,) = report["transformer_blocks"]
    facts = block["keep_better"]
    assert set(facts) == set(guarded.masks)
    for name, fact in facts.items():
        assert fact["by"] == ("tensor" if spec.get("granularity") == "tensor" else "row")
        assert _close_below(fact["error_final"], min(fact["error_icbs"], fact["error_initial"]))
        assert 0 <= fact["rows_initial"] <= fact["rows"]
        # the guard's own measurements agree with the separate runs'
        assert fact["error_initial"] == pytest.approx(alps_errors[name], rel=1e-3, abs=1e-7)
        assert fact["error_icbs"] == pytest.approx(icbs_errors[name], rel=1e-3, abs=1e-7)


def test_keep_better_without_refit_guards_the_masks_alone(models):
    common = {"model": str(models["bert"]), "density": 0.5, **FAST}
    wanda = run_prune(PruneOptions(method="wanda", **common))
    searched = run_prune(PruneOptions(method="icbs", init="wanda", **common))
    guarded = run_prune(PruneOptions(method="icbs", init="wanda", keep_better=True, **common))
    assert "error_weights" not in next(iter(guarded.report["tensors"].values()))
    initial, final = _errors(wanda, "error_final"), _errors(searched, "error_final")
    for name, error in _errors(guarded, "error_final").items():
        assert _close_below(error, min(initial[name], final[name])), name
        check_mask(guarded.masks[name], Sparsity(0.5), name)


def test_keep_better_with_block_output_judges_the_guarded_result(models):
    result = run_prune(PruneOptions(model=str(models["llama"]), method="icbs", init="alps", refit=True,
                                    keep_better=True, block_output=True, density=0.5, **FAST))
    (block,) = result.report["transformer_blocks"]
    assert "keep_better" in block and block["block_output_error_final"] <= block["block_output_error_icbs"]
    for name, mask in result.masks.items():
        check_mask(mask, Sparsity(0.5), name)


# --search-on refit (pruning/refit.refit_search_terms, the linear terms of pruning/qubo.py)

def _random_layer(rows=5, width=16, seed=1):
    generator = torch.Generator().manual_seed(seed)
    w0 = torch.randn(rows, width, generator=generator, dtype=torch.float64)
    activations = torch.randn(width, 64, generator=generator, dtype=torch.float64)
    mask = torch.rand(rows, width, generator=generator).argsort(dim=1) < width // 2
    return w0, activations @ activations.T, mask


def test_refit_search_terms_are_exact_at_the_start_and_bound_the_refit_error_elsewhere():
    from qsurgeon.server.pruning.qubo import row_errors
    from qsurgeon.server.pruning.refit import refit_rows, refit_search_terms, weight_row_errors

    w0, gram, mask = _random_layer()
    values, linear, constant, refit = refit_search_terms(w0, gram, mask, damp=0.0)
    start = row_errors(values, gram, mask, linear, constant)
    assert torch.allclose(start, weight_row_errors(w0, refit, gram), rtol=1e-9, atol=1e-9)
    generator = torch.Generator().manual_seed(2)
    for _ in range(20):
        other = torch.rand(mask.shape, generator=generator).argsort(dim=1) < mask.shape[1] // 2
        bound = row_errors(values, gram, other, linear, constant)
        after_refit = weight_row_errors(w0, refit_rows(w0, gram, other, 0.0, "exact"), gram)
        assert bool((after_refit <= bound * (1 + 1e-9) + 1e-9).all())


def test_layerwise_blocks_with_a_linear_term_have_the_row_errors_as_energies():
    from qsurgeon.server.pruning.qubo import layerwise_arrays, row_errors
    from qsurgeon.server.pruning.refit import refit_search_terms

    w0, gram, mask = _random_layer()
    values, linear, constant, _ = refit_search_terms(w0, gram, mask, damp=0.01)
    rows = torch.arange(w0.shape[0])
    cols = torch.stack([torch.randperm(w0.shape[1], generator=torch.Generator().manual_seed(r))[:8] for r in range(5)])
    current = row_errors(values, gram, mask, linear, constant)
    for row_error in (None, current):
        Q, x0, offsets = layerwise_arrays(values, gram, mask, rows, cols, linear=linear, constant=constant,
                                          row_error=row_error)
        generator = torch.Generator().manual_seed(3)
        for _ in range(10):
            proposal = torch.from_numpy(x0.copy()).to(torch.float64)
            for block in range(len(rows)):
                proposal[block] = proposal[block][torch.randperm(8, generator=generator)]
            energies = torch.einsum("na,nab,nb->n", proposal, torch.from_numpy(Q).to(torch.float64), proposal)
            energies = energies + torch.from_numpy(offsets)
            changed = mask.clone()
            changed[rows[:, None], cols] = proposal.to(torch.bool)
            expected = row_errors(values, gram, changed, linear, constant)
            assert torch.allclose(energies, expected, rtol=1e-5, atol=1e-4 * float(current.abs().max()))


@pytest.mark.parametrize("spec", SPECS[:2], ids=["row", "2:4"])
def test_search_on_refit_starts_at_the_initial_refit_error_and_never_raises_it(models, spec):
    common = {"model": str(models["llama"]), **spec, **FAST}
    alps = run_prune(PruneOptions(method="alps", **common))
    searched = run_prune(PruneOptions(method="icbs", init="alps", refit=True, search_on="refit", **common))
    (block,) = searched.report["transformer_blocks"]
    absolute = sum(entry["error_weights"] * entry["error_dense_norm"] for entry in alps.report["tensors"].values())
    assert block["surrogate_initial"] == pytest.approx(absolute, rel=1e-4)
    assert block["surrogate_final"] <= block["surrogate_initial"] * (1 + 1e-6)
    final = sum(entry["error_weights"] * entry["error_dense_norm"] for entry in searched.report["tensors"].values())
    assert final <= block["surrogate_final"] * (1 + 1e-3)  # the refit only lowers the bound (up to damping)


def test_search_on_refit_needs_the_layerwise_objective(models):
    from qsurgeon.client.errors import UsageError

    with pytest.raises(UsageError, match="search-on refit"):
        run_prune(PruneOptions(model=str(models["llama"]), method="icbs", objective="fisher", search_on="refit",
                               density=0.5, **FAST))
