"""``--match-dense``: the target that turns the dense output's error into the layer error, the
groups a block is pruned in, the statistics of the two streams, and a run that fits the
dense model's outputs better than one that fits each layer's own."""

from __future__ import annotations

import copy

import pytest
import torch

from qsurgeon.client.options import PruneOptions
from qsurgeon.server.engine.run import run_prune
from qsurgeon.server.models.calibration import builtin_texts, tokenize_texts
from qsurgeon.server.models.capture import capture_first_block_inputs, collect_stats, run_block
from qsurgeon.server.models.dense_match import collect_matched_stats, input_groups
from qsurgeon.server.models.loading import load_adapter
from qsurgeon.server.pruning.refit import dense_targets
from test_adapters import save_tiny_model


def _streams(seed: int = 0, tokens: int = 400, width: int = 24, out: int = 10):
    generator = torch.Generator().manual_seed(seed)
    dense = torch.randn(tokens, width, generator=generator, dtype=torch.float64)
    pruned = dense + 0.3 * torch.randn(tokens, width, generator=generator, dtype=torch.float64)  # upstream error
    weight0 = torch.randn(out, width, generator=generator, dtype=torch.float64)
    return pruned, dense, weight0, generator


def test_the_target_turns_the_dense_output_error_into_the_layer_error():
    """||A Wᵀ − Ā W0ᵀ||² − ||A (W − W0')ᵀ||² is the same for every W (undamped), so minimising the
    layer error towards W0' minimises the error against the dense model's output."""
    pruned, dense, weight0, generator = _streams()
    target, = dense_targets([weight0], pruned.T @ pruned, pruned.T @ dense, damp=0.0)
    gaps = []
    for _ in range(5):
        weight = torch.randn(weight0.shape, generator=generator, dtype=torch.float64)
        to_dense = (pruned @ weight.T - dense @ weight0.T).pow(2).sum()
        layer = (pruned @ (weight - target).T).pow(2).sum()
        gaps.append(float(to_dense - layer))
    assert max(gaps) - min(gaps) < 1e-6 * abs(gaps[0])
    assert gaps[0] > 0  # what no W on the pruned inputs can reach
    # and W0' itself beats W0 against the dense output
    assert (pruned @ target.T - dense @ weight0.T).norm() < (pruned @ weight0.T - dense @ weight0.T).norm()
    # layers that read the same input share one factorisation and get what each would alone
    other = 2.0 * weight0[:3].flip(1)
    together = dense_targets([weight0, other], pruned.T @ pruned, pruned.T @ dense, damp=0.0)
    torch.testing.assert_close(together[0], target)
    torch.testing.assert_close(together[1], dense_targets([other], pruned.T @ pruned, pruned.T @ dense, damp=0.0)[0])


def test_the_target_is_the_original_weight_where_the_streams_agree():
    pruned, _, weight0, _ = _streams(seed=1)
    gram = pruned.T @ pruned
    torch.testing.assert_close(dense_targets([weight0], gram, gram.clone(), damp=0.01)[0], weight0)
    assert dense_targets([weight0.float()], gram, gram, damp=0.01)[0].dtype == torch.float32


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense-match")
    return {kind: save_tiny_model(kind, root / kind, layers=2) for kind in ("bert", "llama")}


def _data(folder, samples: int = 12):
    from transformers import AutoTokenizer

    return tokenize_texts(AutoTokenizer.from_pretrained(folder), builtin_texts(samples), seq_len=32)


@pytest.mark.parametrize("kind, expected", [
    ("bert", [["attention.self.query", "attention.self.key", "attention.self.value"], ["attention.output.dense"],
              ["intermediate.dense"], ["output.dense"]]),
    ("llama", [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
               ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]),
])
def test_groups_follow_the_call_order_and_the_shared_inputs(folders, kind, expected):
    adapter = load_adapter(str(folders[kind]))
    inputs = capture_first_block_inputs(adapter, _data(folders[kind]), batch_size=4)
    groups = input_groups(adapter.blocks()[0], adapter.targets(0), inputs)
    names = [[layer.name.split(".0.", 1)[1] for layer in group] for group in groups]
    assert names == expected


def test_on_the_first_block_the_cross_gram_is_the_gram_and_the_dense_stream_is_the_block_output(folders):
    adapter = load_adapter(str(folders["bert"]))
    inputs = capture_first_block_inputs(adapter, _data(folders["bert"]), batch_size=5)
    block, targets = adapter.blocks()[0], adapter.targets(0)
    plain = collect_stats(block, targets, inputs)
    groups = input_groups(block, targets, inputs)
    stats, following = collect_matched_stats(block, groups[-1], inputs, inputs, [], outputs=True)
    name = groups[-1][0].parameter_name
    torch.testing.assert_close(stats[name].gram, plain[name].gram, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats[name].cross, stats[name].gram, rtol=1e-5, atol=1e-5)
    assert stats[name].tokens == plain[name].tokens
    for ours, theirs in zip(following.args, run_block(block, inputs).args):
        torch.testing.assert_close(ours[0], theirs[0])


def test_the_dense_pass_sees_original_weights_and_leaves_the_pruned_ones(folders):
    adapter = load_adapter(str(folders["bert"]))
    inputs = capture_first_block_inputs(adapter, _data(folders["bert"]), batch_size=5)
    block, targets = adapter.blocks()[0], adapter.targets(0)
    groups = input_groups(block, targets, inputs)
    expected = run_block(block, inputs)  # the dense block's outputs
    originals = [(layer, layer.weight().detach().clone()) for layer in groups[0]]
    for layer in groups[0]:  # q, k, v "pruned": zeroed
        layer.set_weight(torch.zeros_like(layer.weight()))
    shifted = run_block(block, inputs)  # what the pruned stream gets from here
    stats, following = collect_matched_stats(block, groups[-1], shifted, inputs, originals, outputs=True)
    for ours, theirs in zip(following.args, expected.args):
        torch.testing.assert_close(ours[0], theirs[0])  # the dense pass ran with q, k, v restored
    assert all(float(layer.weight().abs().sum()) == 0.0 for layer in groups[0])  # and put them back
    name = groups[-1][0].parameter_name
    assert not torch.allclose(stats[name].cross, stats[name].gram)  # the two streams differ now


def _output_error(dense, pruned, data) -> float:
    with torch.no_grad():
        batch = {"input_ids": data.input_ids, "attention_mask": data.attention_mask}
        reference = dense.forward(batch).last_hidden_state
        ours = pruned.forward(batch).last_hidden_state
    mask = data.attention_mask.bool()
    return float((reference[mask] - ours[mask]).pow(2).sum() / reference[mask].pow(2).sum())


@pytest.mark.parametrize("method", ["wanda", "alps"])
def test_a_run_that_matches_the_dense_model_is_closer_to_it(folders, method, tmp_path):
    dense = load_adapter(str(folders["bert"]))
    data = _data(folders["bert"], samples=24)
    errors, reports = {}, {}
    for match in (False, True):
        options = PruneOptions(model=str(folders["bert"]), density=0.5, method=method, refit=method == "wanda",
                               match_dense=match, samples=24, seq_len=32, out=str(tmp_path / f"out-{match}"))
        result = run_prune(options, adapter=copy.deepcopy(dense), calibration=data)
        errors[match], reports[match] = _output_error(dense, result.adapter, data), result.report
        densities = [tensor["density"] for tensor in result.report["tensors"].values()]
        assert all(abs(value - 0.5) < 1e-9 for value in densities)
    assert errors[True] < errors[False]
    groups = [block["groups"] for block in reports[True]["transformer_blocks"]]
    assert [len(block) for block in groups] == [4, 4]
    assert "groups" not in reports[False]["transformer_blocks"][0]
    assert "the dense model's output of each layer" in (tmp_path / "out-True" / "README.md").read_text()
    assert "own output on the inputs of the pruned model" in (tmp_path / "out-False" / "README.md").read_text()


class _Crash(Exception):
    pass


def test_a_resumed_run_matches_an_uninterrupted_one(tmp_path):
    """GPT-2 (Conv1D linears) pruned by iCBS with --match-dense, crashed in block 1 and resumed:
    block 0 comes back from the checkpoint (its weights too: they are the target's, not the
    original's), the dense stream runs through it again, and masks and weights equal the
    uninterrupted run's."""
    from qsurgeon.server.engine.checkpoint import DirectoryCheckpoint

    folder = save_tiny_model("gpt2", tmp_path / "gpt2", layers=2)
    data = _data(folder, samples=16)
    options = PruneOptions(model=str(folder), method="icbs", match_dense=True, refit=True, samples=16, seq_len=32,
                           block_size=16, seed=1)
    reference = run_prune(options, adapter=load_adapter(str(folder)), calibration=data)
    assert [len(block["groups"]) for block in reference.report["transformer_blocks"]] == [4, 4]
    checkpoint = DirectoryCheckpoint(tmp_path / "ckpt")

    def crash_in_block_1(event):
        if event["event"] == "round" and event["block"] == 1:
            raise _Crash

    with pytest.raises(_Crash):
        run_prune(options, checkpoint=checkpoint, progress=crash_in_block_1, adapter=load_adapter(str(folder)),
                  calibration=data)
    assert len(checkpoint.load()["finished"]) == 1
    resumed = run_prune(options, checkpoint=checkpoint, adapter=load_adapter(str(folder)), calibration=data)
    for name, mask in reference.masks.items():
        assert torch.equal(resumed.masks[name], mask), name
    for ours, theirs in zip(resumed.adapter.all_targets(), reference.adapter.all_targets()):
        torch.testing.assert_close(ours.weight(), theirs.weight())
