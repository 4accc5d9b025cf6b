"""Image classifiers: adapter, image calibration, classification evaluation, pruning via the CLI.

Models are tiny random-weight ViT/DeiT configs built with ``from_config`` and saved to a
temporary folder with an image-processor config, so nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qsurgeon.client.errors import UsageError
from qsurgeon.server.evaluate.classification import evaluate_classification, format_classification, match_class_names
from qsurgeon.server.models.vision import (
    HFImageAdapter,
    ImageCalibrationData,
    builtin_digits,
    images_from_folder,
    is_image_model_folder,
    load_image_calibration,
    load_npz_images,
    to_mode,
)

IMAGE_SIZE = 16
NUM_LABELS = 6
LAYERS = 2
LINEARS_PER_LAYER = 6  # query, key, value, attention output, intermediate, output


def _save_classifier(folder: Path, architecture: str, seed: int = 0, num_channels: int = 3,
                     labels: list[str] | None = None) -> Path:
    import transformers
    from transformers import ViTImageProcessor

    labels = labels or [f"class_{i}" for i in range(NUM_LABELS)]
    config_class = transformers.DeiTConfig if architecture.startswith("DeiT") else transformers.ViTConfig
    config = config_class(
        image_size=IMAGE_SIZE, patch_size=4, num_channels=num_channels, hidden_size=32, num_hidden_layers=LAYERS,
        num_attention_heads=2, intermediate_size=64, num_labels=len(labels),
        id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
    )
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config)
    model.save_pretrained(folder, safe_serialization=True)
    ViTImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.5] * num_channels, image_std=[0.25] * num_channels,
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def deit_dir(tmp_path_factory) -> Path:
    return _save_classifier(tmp_path_factory.mktemp("deit"), "DeiTForImageClassificationWithTeacher")


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory) -> Path:
    return _save_classifier(tmp_path_factory.mktemp("vit"), "ViTForImageClassification", seed=1)


def _random_images(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8), "RGB") for _ in range(count)]


# ---------------------------------------------------------------------------- adapter
@pytest.mark.parametrize("fixture", ["deit_dir", "vit_dir"])
def test_adapter_targets_every_encoder_linear_and_no_head(fixture, request):
    folder = request.getfixturevalue(fixture)
    assert is_image_model_folder(folder)
    adapter = HFImageAdapter.from_folder(folder)
    names = [layer.parameter_name for layer in adapter.all_targets()]
    linears = [f"{name}.weight" for name, module in adapter.model.named_modules() if isinstance(module, torch.nn.Linear)]
    encoder_linears = [name for name in linears if name.startswith(adapter.blocks_prefix + ".")]
    assert adapter.blocks_prefix.endswith("layers") or adapter.blocks_prefix.endswith("layer")
    assert len(names) == LAYERS * LINEARS_PER_LAYER
    assert sorted(names) == sorted(encoder_linears)
    heads = set(linears) - set(names)
    assert heads and all("classifier" in name for name in heads)


def test_deit_with_teacher_keeps_both_heads(deit_dir):
    adapter = HFImageAdapter.from_folder(deit_dir)
    assert type(adapter.model).__name__ == "DeiTForImageClassificationWithTeacher"
    assert {"cls_classifier", "distillation_classifier"} <= {name for name, _ in adapter.model.named_children()}


# ---------------------------------------------------------------------------- images and calibration
def test_mixed_modes_and_sizes_are_converted(tmp_path, deit_dir):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(tmp_path / "grey.png")
    Image.fromarray(rng.integers(0, 256, (30, 20, 4), dtype=np.uint8), "RGBA").save(tmp_path / "alpha.png")
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), "RGB").convert("P").save(tmp_path / "palette.png")
    Image.fromarray(rng.integers(0, 60000, (12, 9), dtype=np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(rng.integers(0, 256, (17, 23, 3), dtype=np.uint8), "RGB").save(tmp_path / "photo.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    adapter = HFImageAdapter.from_folder(deit_dir)
    data = load_image_calibration(f"images:{tmp_path}", adapter)
    assert tuple(data.pixel_values.shape) == (5, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.isfinite(data.pixel_values).all()


def test_rgba_transparent_background_becomes_white():
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(to_mode(image, 3)).min() == 255
    assert to_mode(Image.new("RGB", (4, 4)), 1).mode == "L"


def test_folder_without_readable_image_is_a_usage_error(tmp_path, deit_dir):
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "readme.txt").write_text("hello")
    adapter = HFImageAdapter.from_folder(deit_dir)
    with pytest.raises(UsageError, match="no readable image"):
        images_from_folder(tmp_path, adapter.processor, 3)


def test_npz_uint8_layouts_match_the_processor(tmp_path, deit_dir):
    adapter = HFImageAdapter.from_folder(deit_dir)
    rng = np.random.default_rng(3)
    hwc = rng.integers(0, 256, (4, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    np.savez(tmp_path / "hwc.npz", pixel_values=hwc, labels=np.arange(4))
    np.savez(tmp_path / "chw.npz", pixel_values=hwc.transpose(0, 3, 1, 2))
    direct = adapter.processor(images=list(hwc), return_tensors="pt")["pixel_values"]
    from_hwc = load_npz_images(tmp_path / "hwc.npz", adapter.processor, 3)
    from_chw = load_npz_images(tmp_path / "chw.npz", adapter.processor, 3)
    torch.testing.assert_close(from_hwc.pixel_values, direct)
    torch.testing.assert_close(from_chw.pixel_values, direct)
    assert from_hwc.labels.tolist() == [0, 1, 2, 3]
    # float N×C×H×W is model-ready and used as is
    np.savez(tmp_path / "float.npz", pixel_values=direct.numpy())
    torch.testing.assert_close(load_npz_images(tmp_path / "float.npz", adapter.processor, 3).pixel_values, direct)
    np.savez(tmp_path / "wrong.npz", pixel_values=direct.numpy()[:, :1])
    with pytest.raises(UsageError, match="model-ready"):
        load_npz_images(tmp_path / "wrong.npz", adapter.processor, 3)
    np.savez(tmp_path / "nokey.npz", other=hwc)
    with pytest.raises(UsageError, match="pixel_values"):
        load_npz_images(tmp_path / "nokey.npz", adapter.processor, 3)


def test_builtin_digits_fit_the_model_and_hold_out_a_split(deit_dir):
    adapter = HFImageAdapter.from_folder(deit_dir)
    calibration = builtin_digits(adapter.processor, 3, samples=64)
    heldout = builtin_digits(adapter.processor, 3, split="heldout")
    assert tuple(calibration.pixel_values.shape) == (64, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert heldout.num_samples == 1797 - int(0.8 * 1797)
    assert set(calibration.labels.tolist()) <= set(range(10)) and len(set(heldout.labels.tolist())) == 10
    # grey digits replicated over RGB: the channels agree (same mean/std on every channel)
    torch.testing.assert_close(calibration.pixel_values[:, 0], calibration.pixel_values[:, 2])
    # no calibration image is in the held-out split
    distances = torch.cdist(calibration.pixel_values.flatten(1), heldout.pixel_values.flatten(1))
    assert distances.min() > 0
    # a one-channel model gets one-channel digits
    grey = builtin_digits(adapter.processor.__class__(size={"height": 8, "width": 8}, image_mean=[0.5], image_std=[0.5]),
                          1, samples=4)
    assert tuple(grey.pixel_values.shape) == (4, 1, 8, 8)


def test_calibration_batches_feed_the_model(deit_dir):
    adapter = HFImageAdapter.from_folder(deit_dir)
    data = ImageCalibrationData(torch.randn(5, 3, IMAGE_SIZE, IMAGE_SIZE))
    batches = list(data.batches(2))
    assert [b["pixel_values"].shape[0] for b in batches] == [2, 2, 1]
    logits = adapter.forward(batches[0]).logits
    assert logits.shape == (2, NUM_LABELS)


# ---------------------------------------------------------------------------- evaluation
def _labelled_folder(root: Path, per_class: int = 2) -> tuple[list[Image.Image], list[int]]:
    images, labels = [], []
    for label in range(NUM_LABELS):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True)
        for index, image in enumerate(_random_images(per_class, seed=10 * label)):
            image.save(folder / f"{index}.png")
            images.append(image)
            labels.append(label)
    return images, labels


def _direct_scores(folder: Path, images, labels) -> tuple[torch.Tensor, dict]:
    from transformers import AutoImageProcessor, DeiTForImageClassificationWithTeacher

    model = DeiTForImageClassificationWithTeacher.from_pretrained(folder).eval()
    pixels = AutoImageProcessor.from_pretrained(folder)(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
    target = torch.tensor(labels)
    top5 = logits.topk(5, dim=-1).indices
    return logits, {
        "top1": (logits.argmax(-1) == target).float().mean().item(),
        "top5": (top5 == target[:, None]).any(-1).float().mean().item(),
    }


def test_evaluate_classification_matches_direct_computation(tmp_path, deit_dir):
    other = _save_classifier(tmp_path / "other", "DeiTForImageClassificationWithTeacher", seed=7)
    images, labels = _labelled_folder(tmp_path / "data")
    report = evaluate_classification(deit_dir, other, tmp_path / "data")
    dense_logits, dense_expected = _direct_scores(deit_dir, images, labels)
    other_logits, other_expected = _direct_scores(other, images, labels)
    assert report["images"] == len(images)
    assert report["dense"]["top1"] == pytest.approx(dense_expected["top1"])
    assert report["dense"]["top5"] == pytest.approx(dense_expected["top5"])
    assert report["pruned"]["top1"] == pytest.approx(other_expected["top1"])
    assert report["pruned"]["top5"] == pytest.approx(other_expected["top5"])
    agreement = (dense_logits.argmax(-1) == other_logits.argmax(-1)).float().mean().item()
    assert report["agreement"] == pytest.approx(agreement)
    assert f"{dense_expected['top1']:.4f}" in format_classification(report)
    # the same model against itself agrees everywhere
    assert evaluate_classification(deit_dir, deit_dir, tmp_path / "data")["agreement"] == 1.0


def test_evaluate_classification_from_npz(tmp_path, deit_dir):
    images, labels = _labelled_folder(tmp_path / "data", per_class=1)
    array = np.stack([np.asarray(image) for image in images])
    np.savez(tmp_path / "eval.npz", pixel_values=array, labels=np.array(labels))
    from_npz = evaluate_classification(deit_dir, deit_dir, f"npz:{tmp_path / 'eval.npz'}")
    from_folder = evaluate_classification(deit_dir, deit_dir, tmp_path / "data")
    assert from_npz["dense"] == from_folder["dense"]
    np.savez(tmp_path / "unlabelled.npz", pixel_values=array)
    with pytest.raises(UsageError, match="labels"):
        evaluate_classification(deit_dir, deit_dir, tmp_path / "unlabelled.npz")


def test_evaluate_builtin_digits_on_a_grey_digit_classifier(tmp_path, deit_dir):
    from transformers import ViTForImageClassification

    from qsurgeon.server.models.vision import builtin_digits, load_image_processor

    folder = _save_classifier(tmp_path / "digits", "ViTForImageClassification", num_channels=1,
                              labels=[str(d) for d in range(10)])
    report = evaluate_classification(folder, folder, "builtin")
    heldout = builtin_digits(load_image_processor(folder), 1, split="heldout")
    with torch.no_grad():
        logits = ViTForImageClassification.from_pretrained(folder)(pixel_values=heldout.pixel_values).logits
    assert report["images"] == 360 and report["agreement"] == 1.0
    assert report["dense"]["top1"] == pytest.approx((logits.argmax(-1) == heldout.labels).float().mean().item())
    with pytest.raises(UsageError, match="match no label"):  # class_0..class_5 are not digits
        evaluate_classification(deit_dir, deit_dir, "builtin")


def test_class_names_must_match_labels():
    labels = {0: "cat", 1: "Dog", 2: "bird"}
    assert match_class_names(["cat", "dog", "2"], labels) == {"cat": 0, "dog": 1, "2": 2}
    with pytest.raises(UsageError, match="horse"):
        match_class_names(["cat", "horse"], labels)


# ---------------------------------------------------------------------------- pruning through the CLI
def _write_images(folder: Path, count: int = 12) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(_random_images(count, seed=5)):
        image.save(folder / f"{index}.png")
    return folder


@pytest.mark.parametrize(("method", "sparsity_args", "keep_per_row"), [
    ("icbs", ["--density", "0.4"], lambda width: round(0.4 * width)),
    ("wanda", ["--pattern", "2:4"], lambda width: width // 2),
])
def test_prune_cli_prunes_every_encoder_linear_exactly(tmp_path, deit_dir, method, sparsity_args, keep_per_row, capsys):
    from safetensors.torch import load_file
    from transformers import DeiTForImageClassificationWithTeacher

    from qsurgeon.client.cli import main

    images = _write_images(tmp_path / "calibration")
    out = tmp_path / "pruned"
    code = main(["prune", str(deit_dir), "--method", method, *sparsity_args, "--block-size", "16",
                 "--calibration", f"images:{images}", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    dense = DeiTForImageClassificationWithTeacher.from_pretrained(deit_dir).state_dict()
    pruned_model = DeiTForImageClassificationWithTeacher.from_pretrained(out)
    pruned = pruned_model.state_dict()
    masks = load_file(str(out / "masks.safetensors"))
    assert len(masks) == LAYERS * LINEARS_PER_LAYER
    for name, mask in masks.items():
        weight = pruned[name]
        kept = (~mask).sum(dim=1)
        assert torch.all(kept == keep_per_row(weight.shape[1])), name
        assert torch.all(weight[mask] == 0), name
        torch.testing.assert_close(weight[~mask], dense[name][~mask])
        if method == "wanda":  # 2:4 holds group by group
            assert torch.all((~mask).reshape(weight.shape[0], -1, 4).sum(-1) == 2)
    for name in ("cls_classifier.weight", "distillation_classifier.weight", "cls_classifier.bias"):
        assert torch.equal(pruned[name], dense[name]), f"{name} changed"
    assert (out / "preprocessor_config.json").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["samples"] == 12
    # the pruned folder evaluates against the dense one
    np.savez(tmp_path / "eval.npz", pixel_values=np.stack([np.asarray(i) for i in _random_images(6, 9)]),
             labels=np.arange(6))
    result = evaluate_classification(deit_dir, out, tmp_path / "eval.npz")
    assert 0.0 <= result["agreement"] <= 1.0 and result["images"] == 6


def _error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qsurgeon")]
    assert len(err) == 1
    return err[0]


def test_prune_cli_refuses_a_folder_without_readable_images(tmp_path, deit_dir, capsys):
    from qsurgeon.client.cli import main

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"\x89PNG broken")
    (bad / "b.jpg").write_text("text")
    out = tmp_path / "out"
    code = main(["prune", str(deit_dir), "--method", "wanda", "--calibration", f"images:{bad}", "--out", str(out), "--quiet"])
    assert code == 2
    assert "no readable image" in _error_line(capsys)
    assert not out.exists() or not any(out.iterdir())


def test_prune_cli_accepts_mixed_modes_and_sizes(tmp_path, vit_dir, capsys):
    from qsurgeon.client.cli import main

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (5, 7), dtype=np.uint8), "L").save(mixed / "grey.png")
    Image.fromarray(rng.integers(0, 256, (33, 21, 4), dtype=np.uint8), "RGBA").save(mixed / "alpha.png")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), "RGB").save(mixed / "rgb.jpg")
    code = main(["prune", str(vit_dir), "--method", "magnitude", "--calibration", f"images:{mixed}",
                 "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "report.json").read_text())["calibration"]["samples"] == 3


def test_text_model_given_image_calibration_exits_2(tmp_path, capsys):
    from transformers import BertConfig, BertModel

    from qsurgeon.client.cli import main

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertModel(config).save_pretrained(tmp_path / "bert", safe_serialization=True)
    images = _write_images(tmp_path / "images", 2)
    for spec in (f"images:{images}", f"npz:{tmp_path / 'x.npz'}"):
        code = main(["prune", str(tmp_path / "bert"), "--method", "wanda", "--calibration", spec,
                     "--out", str(tmp_path / "out"), "--quiet"])
        assert code == 2
        assert "not an image classifier" in _error_line(capsys)


def test_image_model_given_a_text_file_exits_2(tmp_path, deit_dir, capsys):
    from qsurgeon.client.cli import main

    (tmp_path / "text.txt").write_text("one sentence\n")
    code = main(["prune", str(deit_dir), "--method", "wanda", "--calibration", str(tmp_path / "text.txt"),
                 "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 2
    assert "images:DIR" in _error_line(capsys)


def test_image_model_without_safetensors_is_refused(tmp_path, deit_dir, capsys):
    import shutil

    from qsurgeon.client.cli import main

    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(deit_dir / "config.json", folder / "config.json")
    shutil.copy(deit_dir / "preprocessor_config.json", folder / "preprocessor_config.json")
    (folder / "pytorch_model.bin").write_bytes(b"never unpickled")
    code = main(["prune", str(folder), "--method", "wanda", "--calibration", "builtin",
                 "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 2
    assert "no .safetensors weights" in _error_line(capsys)
