"""A pruned model folder keeps what the original needs besides its weights, and says how it was pruned."""

from __future__ import annotations

import json

import pytest
import torch

from qsurgeon.client.cli import main
from qsurgeon.server.models.folders import builtin_model_folder, copy_companion_files


def test_companion_files_skip_weights_hidden_files_and_what_the_save_wrote(tmp_path):
    source, dest = tmp_path / "src", tmp_path / "dest"
    (source / "1_Pooling").mkdir(parents=True)
    (source / "1_Pooling" / "config.json").write_text("{}")
    (source / "modules.json").write_text("[]")
    (source / "model.safetensors").write_bytes(b"weights")
    (source / "pytorch_model.bin").write_bytes(b"pickle")
    (source / "model.safetensors.index.json").write_text("{}")
    (source / ".gitattributes").write_text("*")
    (source / "config.json").write_text('{"original": true}')
    dest.mkdir()
    (dest / "config.json").write_text('{"pruned": true}')
    copied = copy_companion_files(source, dest)
    assert sorted(copied) == ["1_Pooling/config.json", "modules.json"]
    assert json.loads((dest / "config.json").read_text()) == {"pruned": True}
    assert not (dest / "pytorch_model.bin").exists() and not (dest / ".gitattributes").exists()


@pytest.mark.slow
def test_pruned_minilm_loads_in_sentence_transformers_as_the_original_does(tmp_path):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    out = tmp_path / "minilm"
    assert main(["prune", "builtin:minilm", "--method", "wanda", "--density", "0.5", "--samples", "16",
                 "--seq-len", "32", "--include", "encoder.layer.0.*", "--out", str(out), "--quiet"]) == 0
    original = builtin_model_folder("minilm")
    for name in ("modules.json", "1_Pooling/config.json", "config_sentence_transformers.json",
                 "sentence_bert_config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    sentences = ["A pruned model should still embed sentences.", "Weights were removed, meaning stays."]
    dense = sentence_transformers.SentenceTransformer(str(original), device="cpu").encode(sentences, convert_to_tensor=True)
    pruned = sentence_transformers.SentenceTransformer(str(out), device="cpu").encode(sentences, convert_to_tensor=True)
    assert pruned.shape == dense.shape == (2, 384)
    assert torch.allclose(pruned.norm(dim=1), torch.ones(2), atol=1e-4)  # the Normalize module came along
    assert torch.allclose(dense.norm(dim=1), torch.ones(2), atol=1e-4)
    assert not torch.allclose(pruned, dense)  # and it is the pruned model
    card = (out / "README.md").read_text()
    assert "## Pruned with qsurgeon" in card and "method: wanda" in card and "density 0.5 per row" in card
    assert "calibration: builtin, 16 samples" in card and "relative layer-wise reconstruction error" in card
    assert "## The original model card" in card
    original_card = (original / "README.md").read_text()
    if original_card.startswith("---\n"):  # the hub's metadata header stays first
        assert card.startswith(original_card.split("\n---", 1)[0])
