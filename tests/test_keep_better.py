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
