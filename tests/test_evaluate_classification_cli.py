"""`qsurgeon evaluate` on image classifiers: top-1/top-5, agreement and pruned densities."""

from __future__ import annotations

import json

import pytest
import torch

from qsurgeon.client.cli import main
from qsurgeon.server.evaluate.classification import evaluate_classification
from test_vision import _labelled_folder, _save_classifier


@pytest.mark.parametrize("task_args", [["--task", "classification"], []])  # explicit, or chosen from the model
def test_evaluate_cli_reports_classification_and_densities(tmp_path, capsys, task_args):
    from qsurgeon.server.models.loading import load_adapter

    dense = _save_classifier(tmp_path / "dense", "ViTForImageClassification", seed=3)
    adapter = load_adapter(str(dense))
    target = adapter.all_targets()[0]
    name = target.parameter_name
    target.apply_mask(torch.arange(target.weight().numel()).reshape(target.weight().shape) % 2 == 1)
    pruned = tmp_path / "pruned"
    adapter.save(pruned)
    _labelled_folder(tmp_path / "data")

    code = main(["evaluate", str(dense), str(pruned), *task_args, "--data", str(tmp_path / "data"), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    expected = evaluate_classification(dense, pruned, tmp_path / "data")
    assert result["task"] == "classification"
    assert result["dense"] == expected["dense"] and result["pruned"] == expected["pruned"]
    assert result["densities"][name] == pytest.approx(0.5)
    assert all(d == 1.0 for n, d in result["densities"].items() if n != name)


def test_classification_task_on_a_text_model_exits_2(tmp_path, capsys):
    from test_adapters import save_tiny_model

    text_model = save_tiny_model("bert", tmp_path / "bert")
    image_model = _save_classifier(tmp_path / "vit", "ViTForImageClassification")
    _labelled_folder(tmp_path / "data")
    code = main(["evaluate", str(image_model), str(text_model), "--task", "classification",
                 "--data", str(tmp_path / "data")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "not an image classifier" in err and len(err.splitlines()) == 1
