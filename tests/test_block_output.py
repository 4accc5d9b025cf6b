"""The block-output objective (engine/icbs/block_output.py) and ``--method alps`` / ``--init alps``
end to end on tiny models: exact densities, a block-output error never above iCBS's own."""

from __future__ import annotations

import pytest
import torch

from qsurgeon.client.options import PruneOptions
from qsurgeon.server.engine.icbs.block_output import choose_by_block_output
from qsurgeon.server.engine.run import run_prune
from qsurgeon.server.pruning.masks import check_mask
from qsurgeon.server.pruning.sparsity import Sparsity
from test_adapters import save_tiny_model

FAST = {"samples": 16, "seq_len": 32, "block_size": 16, "epochs": 1}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("block-output-models")
    return {kind: save_tiny_model(kind, root / kind) for kind in ("bert", "llama")}


def test_greedy_choice_keeps_a_candidate_only_when_the_error_falls():
    names = ["a", "b", "c"]
    mask = torch.zeros(1, 1, dtype=torch.bool)
    # the error is a sum of per-tensor costs: candidate 1 is better for a and c, worse for b
    cost = {"a": [3.0, 1.0], "b": [1.0, 2.0], "c": [5.0, 4.0]}
    candidates = {name: [(mask, torch.tensor(float(i))) for i in range(2)] for name in names}

    def error(weights):
        return sum(cost[name][int(weights[name])] for name in names)

    choice, history = choose_by_block_output(error, names, candidates)
    assert choice == {"a": 1, "b": 0, "c": 1}
    assert history[0] == 9.0 and min(history) == 6.0


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("refit", [False, True])
def test_block_output_never_worse_than_icbs_on_the_block_and_densities_exact(models, kind, refit):
    options = PruneOptions(model=str(models[kind]), method="icbs", density=0.5, block_output=True, refit=refit,
                           **FAST)
    result = run_prune(options)
    for name, mask in result.masks.items():
        check_mask(mask, Sparsity(0.5), name)
    blocks = [info for info in result.report["transformer_blocks"] if "block_output_error_icbs" in info]
    assert len(blocks) == 2  # both transformer blocks were judged
    for info in blocks:
        assert info["block_output_error_final"] <= info["block_output_error_icbs"]


def test_block_output_off_by_default_gives_the_same_masks_as_before(models):
    plain = run_prune(PruneOptions(model=str(models["bert"]), method="icbs", density=0.5, **FAST))
    explicit = run_prune(PruneOptions(model=str(models["bert"]), method="icbs", density=0.5, block_output=False,
                                      **FAST))
    assert all(torch.equal(plain.masks[name], explicit.masks[name]) for name in plain.masks)


@pytest.mark.parametrize("spec", [{"density": 0.4}, {"pattern": "2:4"}, {"density": 0.5, "granularity": "tensor"}])
def test_alps_method_and_init_end_to_end(models, spec):
    sparsity = Sparsity.parse(spec.get("density"), spec.get("pattern"), spec.get("granularity", "row"))
    for overrides in ({"method": "alps"}, {"method": "icbs", "init": "alps", "refit": True}):
        result = run_prune(PruneOptions(model=str(models["llama"]), **spec, **overrides, **FAST))
        for name, mask in result.masks.items():
            check_mask(mask, sparsity, name)
        assert result.report["summary"]["relative_error_final"] >= 0
