"""Sequential capture: Grams equal direct computation, padding excluded, block l sees pruned blocks < l."""

from __future__ import annotations

import pytest
import torch

from qsurgeon.server.models.loading import load_adapter
from qsurgeon.server.models.calibration import builtin_texts, tokenize_texts
from qsurgeon.server.models.capture import (
    _real_rows,
    capture_first_block_inputs,
    collect_stats,
    iterate_blocks,
    relative_error,
    run_block,
)
from test_adapters import save_tiny_model


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    return save_tiny_model("bert", tmp_path_factory.mktemp("capture") / "bert", layers=3)


@pytest.fixture()
def adapter(bert_folder):
    return load_adapter(str(bert_folder))


@pytest.fixture(scope="module")
def data(bert_folder):
    from transformers import AutoTokenizer

    return tokenize_texts(AutoTokenizer.from_pretrained(bert_folder), builtin_texts(12), seq_len=32)


def _direct_gram(adapter, data, block_index: int) -> torch.Tensor:
    """Σ h hᵀ over real tokens of the hidden states entering block ``block_index``, from a full forward."""
    with torch.no_grad():
        hidden = adapter.model(input_ids=data.input_ids, attention_mask=data.attention_mask,
                               output_hidden_states=True).hidden_states[block_index]
    rows = hidden[data.attention_mask.bool()].double()
    return rows.T @ rows


def _query_stats(adapter, block_index, inputs):
    stats = collect_stats(adapter.blocks()[block_index], adapter.targets(block_index), inputs)
    return stats[f"encoder.layer.{block_index}.attention.self.query.weight"]


def test_gram_of_every_block_equals_direct_computation(adapter, data):
    for index, inputs in iterate_blocks(adapter, data, batch_size=5):
        stats = _query_stats(adapter, index, inputs)
        assert stats.tokens == data.num_tokens
        torch.testing.assert_close(stats.gram, _direct_gram(adapter, data, index), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats.input_norms(), stats.gram.diagonal().sqrt())


def test_padding_is_excluded(adapter, data):
    assert (data.attention_mask == 0).any()  # the batch really holds padding
    single = capture_first_block_inputs(adapter, data, batch_size=1)  # no padding left after trimming
    padded = capture_first_block_inputs(adapter, data, batch_size=12)
    gram_single = _query_stats(adapter, 0, single).gram
    gram_padded = _query_stats(adapter, 0, padded).gram
    # per-batch Grams are float32 sums (then float64 across batches): equal to ~1e-6 relative
    torch.testing.assert_close(gram_padded, gram_single, rtol=2e-5, atol=2e-5)
    # had padding been counted, the Gram would differ
    hidden = padded.args[0][0]
    everything = hidden.reshape(-1, hidden.shape[-1]).double()
    assert not torch.allclose(everything.T @ everything, gram_padded)


def test_capture_is_sequential(adapter, data):
    dense = {index: _query_stats(adapter, index, inputs).gram for index, inputs in iterate_blocks(adapter, data)}
    pruned_grams = {}
    for index, inputs in iterate_blocks(adapter, data):
        pruned_grams[index] = _query_stats(adapter, index, inputs).gram
        for layer in adapter.targets(index):  # prune block index before block index + 1 is captured
            weight = layer.weight()
            layer.apply_mask(weight.abs() < weight.abs().median())
    torch.testing.assert_close(pruned_grams[0], dense[0])  # nothing before block 0
    assert not torch.allclose(pruned_grams[1], dense[1], rtol=1e-3)  # block 1 saw pruned block 0
    # and it is exactly what the pruned model feeds block 1 (blocks 1.. are pruned too now, block 1's input is not)
    torch.testing.assert_close(pruned_grams[1], _direct_gram(adapter, data, 1), rtol=1e-5, atol=1e-5)


def test_run_block_matches_the_model(adapter, data):
    inputs = capture_first_block_inputs(adapter, data, batch_size=4)
    for block in adapter.blocks():
        inputs = run_block(block, inputs)
    with torch.no_grad():
        last = adapter.model(input_ids=data.input_ids, attention_mask=data.attention_mask).last_hidden_state
    last = last[data.sample_order(by_length=True)]  # the order the captured batches visit the samples
    start = 0
    for args, mask in zip(inputs.args, inputs.token_masks):
        hidden = args[0]
        expected = last[start:start + hidden.shape[0], :hidden.shape[1]]
        torch.testing.assert_close(hidden[mask], expected[mask], rtol=1e-5, atol=1e-5)
        start += hidden.shape[0]


def test_real_rows_shapes():
    inputs = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    assert torch.equal(_real_rows(inputs, mask), inputs[mask])
    assert torch.equal(_real_rows(inputs.reshape(6, 4), mask), inputs[mask])
    assert _real_rows(inputs, None).shape == (6, 4)


def test_relative_error_is_reconstruction_error():
    torch.manual_seed(1)
    weight = torch.randn(5, 7)
    activations = torch.randn(7, 40, dtype=torch.float64)
    gram = activations @ activations.T
    mask = torch.rand(5, 7) < 0.5
    error, reference = relative_error(weight, mask, gram)
    pruned = weight.double() * (~mask)
    direct = ((weight.double() - pruned) @ activations).pow(2).sum()
    assert error == pytest.approx(float(direct), rel=1e-10)
    assert reference == pytest.approx(float((weight.double() @ activations).pow(2).sum()), rel=1e-10)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_per_sample_gradients_equal_autograd_per_sample(tmp_path, kind):
    """vmap(grad) over length groups == one backward pass per unpadded sample (Conv1D transposed to (out, in))."""
    from qsurgeon.server.models.calibration import CalibrationData
    from qsurgeon.server.models.capture import dense_outputs, per_sample_gradients

    adapter = load_adapter(str(save_tiny_model(kind, tmp_path / kind)))
    ids = torch.randint(1000, 2000, (5, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[3, 4:] = 0
    data = CalibrationData(ids, mask)
    targets = adapter.targets(1)
    distill = None
    if kind == "bert":
        distill = [h + 0.1 for h in dense_outputs(adapter, data)]  # a target the current model misses
    gradients = per_sample_gradients(adapter, data, targets, distill_targets=distill, chunk_size=2)
    for sample in range(5):
        real = ids[sample][mask[sample].bool()][None]
        adapter.model.zero_grad()
        outputs = adapter.model(input_ids=real)
        if kind == "gpt2":
            loss = torch.nn.functional.cross_entropy(outputs.logits[0, :-1], real[0, 1:])
        else:
            loss = (outputs.last_hidden_state[0] - distill[sample]).pow(2).sum(dim=-1).mean()
        loss.backward()
        for layer in targets:
            expected = layer.module.weight.grad
            expected = expected.T if layer.transposed else expected
            assert gradients[layer.parameter_name].shape == (5, *layer.shape)
            torch.testing.assert_close(gradients[layer.parameter_name][sample], expected, rtol=1e-4, atol=1e-6)


def test_length_grouped_batches_cover_every_sample_once_with_less_padding(data):
    plain = list(data.batches(4))
    grouped = list(data.batches(4, by_length=True))
    real = [row[mask.bool()].tolist() for batch in grouped for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
    expected = [row[mask.bool()].tolist() for row, mask in zip(data.input_ids, data.attention_mask)]
    assert sorted(real) == sorted(expected)
    lengths = [int(batch["attention_mask"].sum(dim=1).max()) for batch in grouped]
    assert lengths == sorted(lengths, reverse=True)  # longest first
    assert sum(b["input_ids"].numel() for b in grouped) <= sum(b["input_ids"].numel() for b in plain)
    ordered = [row[mask.bool()].tolist() for batch in plain for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
    assert ordered == expected  # without by_length the samples' order is kept
