"""`qsurgeon demo` (what `make demo` runs): the front door's main job, end to end on real MiniLM."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel

from qsurgeon.client.cli import main
from qsurgeon.server.engine.outputs import load_masks


@pytest.mark.slow
def test_demo_prunes_minilm_and_beats_wanda(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--json", "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tensors"] == 36 and result["density"] == pytest.approx(0.5, abs=1e-6)
    assert result["icbs"]["cosine"] > result["wanda"]["cosine"]
    assert result["icbs"]["relative_layer_error"] < result["wanda"]["relative_layer_error"]
    model = AutoModel.from_pretrained(out)
    masks = load_masks(out / "masks.safetensors")
    assert len(masks) == 36
    for name, mask in masks.items():
        weight = model.get_parameter(name)
        assert torch.equal(weight == 0, mask), name
        assert torch.all(mask.sum(dim=1) == mask.shape[1] // 2), name  # exactly half of every row pruned
