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
    assert result["out"] == str(out)
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


@pytest.mark.slow
def test_demo_without_out_says_so_and_leaves_nothing_behind(tmp_path, capsys, monkeypatch):
    # the same demo on a sliver of the work (the full run is the test above): what is written is the point here
    from qsurgeon.server.cli import prune

    monkeypatch.setitem(prune.DEMO_SETTINGS, "samples", 8)
    monkeypatch.setitem(prune.DEMO_SETTINGS, "seq_len", 32)
    monkeypatch.setitem(prune.DEMO_SETTINGS, "coverage", 0.0)  # one QUBO per row and round: still iCBS, a sliver
    monkeypatch.setattr(prune, "DEMO_EVAL_TEXTS", 16)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr("tempfile.tempdir", None)  # let tempfile read TMPDIR again
    assert main(["demo"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == "all-MiniLM-L6-v2, 36 linears pruned to density 0.500"
    assert lines[-1] == "The pruned model was not saved (nothing written to disk); run qsurgeon demo --out DIR to keep it."
    assert "transformer block 6/6 done: " in captured.err and "QUBOs solved" in captured.err
    written = [path for path in tmp_path.rglob("*") if path.suffix in (".safetensors", ".json")]
    assert written == []  # no model, masks or report anywhere, temp folder included
