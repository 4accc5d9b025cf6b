"""Model adapters: loading rules, block discovery, target selection, Conv1D views.

Also home of the tiny-model builders the other pipeline tests import: random BERT,
GPT-2 and Llama configs saved as safetensors folders (with MiniLM's tokenizer, so text
calibration works offline).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from qsurgeon.client.errors import UsageError
from qsurgeon.server.models.base import find_blocks, matches
from qsurgeon.server.models.folders import builtin_model_folder, check_model_folder
from qsurgeon.server.models.loading import load_adapter
from qsurgeon.server.models.text import HFTextAdapter, TorchModuleAdapter

MINILM = builtin_model_folder("minilm")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def save_tiny_model(kind: str, folder: Path, *, layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    """A random tiny Hugging Face model of ``kind`` (bert, gpt2, llama) saved as safetensors."""
    from transformers import (
        AutoModel, AutoModelForCausalLM, BertConfig, GPT2Config, LlamaConfig,
    )

    torch.manual_seed(seed)
    vocab = 30522  # MiniLM's tokenizer
    if kind == "bert":
        config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                            intermediate_size=2 * hidden, max_position_embeddings=64)
        model = AutoModel.from_config(config)
    elif kind == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=2, n_positions=64)
        model = AutoModelForCausalLM.from_config(config)
    elif kind == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                             num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=64)
        model = AutoModelForCausalLM.from_config(config)
    else:
        raise ValueError(kind)
    model.save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(MINILM / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {kind: save_tiny_model(kind, root / kind) for kind in ("bert", "gpt2", "llama")}


def test_bert_blocks_and_targets(tiny_models):
    adapter = load_adapter(str(tiny_models["bert"]))
    assert adapter.kind == "encoder"
    assert adapter.blocks_prefix == "encoder.layer"
    assert len(adapter.blocks()) == 2
    names = [layer.name.removeprefix("encoder.layer.1.") for layer in adapter.targets(1)]
    assert names == ["attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense", "intermediate.dense", "output.dense"]
    assert all(layer.parameter_name.endswith(".weight") for layer in adapter.all_targets())


def test_gpt2_conv1d_targets_are_transposed_views(tiny_models):
    adapter = load_adapter(str(tiny_models["gpt2"]))
    assert adapter.kind == "causal-lm"
    assert adapter.blocks_prefix == "transformer.h"
    targets = {layer.name.removeprefix("transformer.h.0."): layer for layer in adapter.targets(0)}
    assert set(targets) == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
    c_fc = targets["mlp.c_fc"]
    assert c_fc.transposed and c_fc.shape == (4 * 32, 32)  # (out, in) although stored (in, out)
    mask = torch.zeros(c_fc.shape, dtype=torch.bool)
    mask[5, 7] = True
    c_fc.apply_mask(mask)
    assert c_fc.module.weight[7, 5] == 0  # the stored parameter changed, at the transposed place
    assert int((c_fc.module.weight == 0).sum()) == 1


def test_llama_blocks_exclude_lm_head(tiny_models):
    adapter = load_adapter(str(tiny_models["llama"]))
    assert adapter.blocks_prefix == "model.layers"
    names = [layer.name for layer in adapter.all_targets()]
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert not any("lm_head" in name for name in names)


def test_include_exclude_patterns(tiny_models):
    only_attention = load_adapter(str(tiny_models["bert"]), include=["*.attention.*"])
    assert {layer.name.split(".")[-2] for layer in only_attention.all_targets()} == {"self", "output"}
    assert len(only_attention.all_targets()) == 2 * 4
    no_query = load_adapter(str(tiny_models["bert"]), exclude=["query", "encoder.layer.1.*"])
    names = [layer.name for layer in no_query.all_targets()]
    assert len(names) == 5 and not any(name.endswith("query") or ".layer.1." in name for name in names)
    assert matches("encoder.layer.0.output.dense", ["encoder.layer.0.output.dense.weight"])
    assert not matches("encoder.layer.0.output.dense", ["dens"])
    with pytest.raises(UsageError, match="no prunable tensors"):
        load_adapter(str(tiny_models["bert"]), include=["nothing-matches"])


def test_refuses_folders_it_must_not_load(tmp_path, tiny_models):
    with pytest.raises(UsageError, match="does not exist"):
        check_model_folder(tmp_path / "missing")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tiny_models["bert"] / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded anyway")
    with pytest.raises(UsageError, match="no .safetensors weights.*pytorch_model.bin"):
        load_adapter(str(pickled))
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    shutil.copy(tiny_models["bert"] / "model.safetensors", no_config / "model.safetensors")
    with pytest.raises(UsageError, match="no config.json"):
        load_adapter(str(no_config))
    with pytest.raises(UsageError, match="unknown built-in model"):
        load_adapter("builtin:nothing")


def test_builtin_minilm_folder_is_the_package_model():
    folder = builtin_model_folder("minilm")
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()


class _Stack(nn.Module):
    """A plain module with a block list: what TorchModuleAdapter users bring."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3))
        self.head = nn.Linear(8, 2)

    def forward(self, input):  # noqa: A002 - the batch key
        hidden = self.embed(input)
        for layer in self.layers:
            hidden = layer(hidden)
        return self.head(hidden)


def test_torch_module_adapter_blocks_loss_and_weights(tmp_path):
    torch.manual_seed(0)
    model = _Stack()
    adapter = TorchModuleAdapter(model, loss_fn=lambda out, batch: out.pow(2).mean(), exclude=["head"])
    assert adapter.blocks_prefix == "layers" and len(adapter.blocks()) == 3
    assert [layer.name for layer in adapter.all_targets()] == ["layers.0.0", "layers.1.0", "layers.2.0"]
    batch = {"input_ids": torch.randn(5, 4)}
    loss = adapter.loss(adapter.forward(batch), batch)
    assert loss.ndim == 0 and float(loss.detach()) > 0
    adapter.save(tmp_path)
    from safetensors.torch import load_file

    copy = _Stack()
    copy.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    assert torch.equal(copy.layers[1][0].weight, model.layers[1][0].weight)


def test_find_blocks_needs_a_module_list():
    with pytest.raises(UsageError, match="transformer blocks"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_encoder_adapter_has_no_loss(tiny_models):
    adapter = HFTextAdapter.from_folder(tiny_models["bert"])
    with pytest.raises(UsageError, match="no loss"):
        adapter.loss(None, {})


def test_model_kind_reads_the_config_without_loading(tiny_models, tmp_path):
    from qsurgeon.server.models.loading import model_kind

    assert model_kind(str(tiny_models["bert"])) == "encoder"
    assert model_kind("builtin:minilm") == "encoder"
    assert model_kind(str(tiny_models["gpt2"])) == "causal-lm"
    assert model_kind(str(tiny_models["llama"])) == "causal-lm"
    assert model_kind(str(tmp_path / "missing")) is None
    assert model_kind("builtin:nothing") is None
