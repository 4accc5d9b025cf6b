"""Train (once, cached) a small DeiT on scikit-learn's handwritten digits for the vision benchmarks.

Why this data: the digits ship inside scikit-learn (``sklearn.datasets.load_digits``), so
they install from PyPI and need no download at run time, yet they are real, labelled
images (1,797 scans of handwritten digits, 10 classes). They are 8×8 grey levels; we
upsample them to 32×32 and repeat them over 3 channels so that the model is an ordinary
RGB ``DeiTForImageClassification`` with a patch grid, a CLS and a distillation token —
the same code path as an ImageNet DeiT, at a size this shared 2-core CPU trains in minutes.

Outputs under ``benchmarks/cache/deit-digits/`` (git-ignored):

- ``model/``: the trained model as a Hugging Face folder (safetensors, config, image
  processor config) that ``from_pretrained`` and ``qsurgeon prune`` load;
- ``train.npz``, ``calibration.npz``, ``test.npz``: ``pixel_values`` (N×32×32×3 uint8) and
  ``labels``. The test split is held out: never trained on, never used for calibration.
  Calibration images are drawn from the training split.
- ``train.json``: seed, sizes, epochs, seconds, test top-1.

Run: ``.venv/bin/python benchmarks/train_vit.py [--force]``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (docs/solvers.md)

import numpy as np
import torch
from PIL import Image

CACHE = Path(__file__).resolve().parent / "cache" / "deit-digits"
IMAGE_SIZE = 32
SEED = 0
CALIBRATION_IMAGES = 128


def digits_rgb(size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 sklearn digits as uint8 N×size×size×3 (bilinear upsampling) and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    upsampled = [
        np.asarray(Image.fromarray(image, mode="L").resize((size, size), Image.BILINEAR).convert("RGB"))
        for image in grey
    ]
    return np.stack(upsampled), digits.target.astype(np.int64)


def split(images: np.ndarray, labels: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """qsurgeon's fixed digits split: train on its ``calibration`` part, test on ``heldout``.

    The same split backs ``--calibration builtin`` and ``qsurgeon evaluate --data builtin``
    for image models, so those stay held out from this model's test set too. The 128
    calibration images of the benchmark are drawn (seeded) from the training part.
    """
    from qsurgeon.server.models.vision import digits_split

    indices = digits_split()
    train_x, train_y = images[indices["calibration"]], labels[indices["calibration"]]
    rng = np.random.default_rng(SEED)
    calibration = rng.choice(len(train_x), size=CALIBRATION_IMAGES, replace=False)
    return {
        "train": (train_x, train_y),
        "calibration": (train_x[calibration], train_y[calibration]),
        "test": (images[indices["heldout"]], labels[indices["heldout"]]),
    }


def build_model_and_processor():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "torchvision missing: PIL backend" is expected here
    from transformers import DeiTConfig, DeiTForImageClassification, ViTImageProcessor

    config = DeiTConfig(
        image_size=IMAGE_SIZE,
        patch_size=4,
        num_channels=3,
        hidden_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=384,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=10,
        id2label={i: str(i) for i in range(10)},
        label2id={str(i): i for i in range(10)},
    )
    processor = ViTImageProcessor(
        do_resize=True,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_rescale=True,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    torch.manual_seed(SEED)
    return DeiTForImageClassification(config), processor


def to_pixels(processor, images: np.ndarray) -> torch.Tensor:
    """Preprocess with the saved processor itself, so training sees exactly what users feed."""
    return processor(images=list(images), return_tensors="pt")["pixel_values"]


def shift_batch(pixels: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels (background = the normalised 0 level)."""
    n, _, h, w = pixels.shape
    background = pixels.amin().item()
    padded = torch.nn.functional.pad(pixels, [max_shift] * 4, value=background)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    return torch.stack(
        [padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets.tolist())]
    )


@torch.no_grad()
def top1(model, pixels: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    logits = torch.cat([model(pixel_values=chunk).logits for chunk in pixels.split(256)])
    return float((logits.argmax(-1) == labels).float().mean())


def train(epochs: int, batch_size: int, lr: float) -> dict:
    torch.manual_seed(SEED)
    images, labels = digits_rgb()
    parts = split(images, labels)
    CACHE.mkdir(parents=True, exist_ok=True)
    for name, (x, y) in parts.items():
        np.savez_compressed(CACHE / f"{name}.npz", pixel_values=x, labels=y)

    model, processor = build_model_and_processor()
    train_pixels = to_pixels(processor, parts["train"][0])
    train_labels = torch.from_numpy(parts["train"][1])
    test_pixels = to_pixels(processor, parts["test"][0])
    test_labels = torch.from_numpy(parts["test"][1])

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps_per_epoch = (len(train_pixels) + batch_size - 1) // batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.1
    )
    generator = torch.Generator().manual_seed(SEED)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_pixels), generator=generator)
        total_loss = 0.0
        for batch in order.split(batch_size):
            pixels = shift_batch(train_pixels[batch], generator)
            loss = torch.nn.functional.cross_entropy(
                model(pixel_values=pixels).logits, train_labels[batch], label_smoothing=0.1
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(batch)
        if epoch % 5 == 4 or epoch == epochs - 1:
            print(
                f"epoch {epoch + 1:3d}  loss {total_loss / len(train_pixels):.4f}  "
                f"test top-1 {top1(model, test_pixels, test_labels):.4f}  "
                f"{time.perf_counter() - start:.0f} s",
                flush=True,
            )
    seconds = time.perf_counter() - start
    model.save_pretrained(CACHE / "model", safe_serialization=True)
    processor.save_pretrained(CACHE / "model")
    summary = {
        "seed": SEED,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "train_images": len(train_pixels),
        "calibration_images": CALIBRATION_IMAGES,
        "test_images": len(test_pixels),
        "seconds": round(seconds, 1),
        "test_top1": top1(model, test_pixels, test_labels),
        "train_top1": top1(model, train_pixels, train_labels),
    }
    (CACHE / "train.json").write_text(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="retrain even if the cached model exists")
    parser.add_argument("--epochs", type=int, default=35)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=7e-4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if (CACHE / "train.json").exists() and (CACHE / "model" / "model.safetensors").exists() and not args.force:
        print(f"cached: {CACHE} ({(CACHE / 'train.json').read_text().strip()})")
        return
    torch.set_num_threads(args.threads)
    print(json.dumps(train(args.epochs, args.batch_size, args.lr), indent=2))


if __name__ == "__main__":
    main()
