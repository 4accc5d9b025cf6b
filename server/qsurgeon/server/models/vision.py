"""Image classifiers: the adapter, image loading and preprocessing, image calibration data.

Vision transformers (ViT, DeiT with its distillation token, and any Hugging Face
``*ForImageClassification`` whose encoder is a stack of identical transformer layers)
prune exactly like text encoders: the generic :class:`~qsurgeon.server.models.base.ModelAdapter`
finds the block stack (``vit.encoder.layer``, ``deit.encoder.layer``...) and its linears,
capture catches block 0's inputs from a forward pass on ``pixel_values``, and every
encoder linear is a target. The classifier head(s) sit outside the block stack, so they
stay dense unless the user names them with ``--include``.

Images are preprocessed with the model's own image-processor config (read from the
local folder), after converting each image to the mode the model expects (``RGB`` or
``L``): palette, grey, 16-bit, alpha and CMYK images are converted, not rejected, and
the processor resizes images of any size. Calibration sources:

- ``images:DIR``: every PNG/JPEG/... Pillow can read below DIR (sorted, recursive);
- ``npz:FILE``: ``pixel_values`` (or ``images``) — uint8 images N×H×W×C, N×C×H×W or N×H×W
  go through the processor; float arrays N×C×H×W are taken as model-ready pixel values;
  optional ``labels``;
- ``builtin``: scikit-learn's bundled handwritten digits (real scans, no download),
  converted to the model's channels and resized by its processor. They suit any image
  model as activation statistics of natural-ish images; for a digits model they are
  also its own domain.

Models load from safetensors only and never with ``trust_remote_code``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from qsurgeon.client.errors import UsageError
from qsurgeon.server.models.base import DEFAULT_EXCLUDE, ModelAdapter
from qsurgeon.server.models.folders import check_model_folder, copy_companion_files, read_config

#: architecture-name endings of the image classifiers this adapter loads
CLASSIFIER_SUFFIXES: tuple[str, ...] = ("ForImageClassification", "ForImageClassificationWithTeacher")
#: file endings tried as images in ``images:DIR`` (anything else is ignored)
IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})


# ---------------------------------------------------------------------------- detection
def is_image_classifier_config(config: Mapping[str, Any] | Any) -> bool:
    """True for a config whose architecture is an image classifier (dict or PretrainedConfig)."""
    architectures = (config.get("architectures") if isinstance(config, Mapping) else getattr(config, "architectures", None)) or []
    return any(str(name).endswith(CLASSIFIER_SUFFIXES) for name in architectures)


def is_image_model_folder(folder: str | Path) -> bool:
    """An image classifier folder: its config names an image-classification architecture."""
    return is_image_classifier_config(read_config(folder))


def _classifier_class(config: Any) -> type:
    """The transformers class to load: the config's own architecture when it is an image classifier.

    Only a name that ends with an image-classifier suffix and is a ``PreTrainedModel``
    exported by transformers is accepted (so ``DeiTForImageClassificationWithTeacher``
    keeps both heads); anything else falls back to ``AutoModelForImageClassification``.
    """
    import transformers
    from transformers import AutoModelForImageClassification, PreTrainedModel

    for name in getattr(config, "architectures", None) or []:
        if not str(name).endswith(CLASSIFIER_SUFFIXES):
            continue
        candidate = getattr(transformers, str(name), None)
        if isinstance(candidate, type) and issubclass(candidate, PreTrainedModel):
            return candidate
    return AutoModelForImageClassification


# ---------------------------------------------------------------------------- adapter
class HFImageAdapter(ModelAdapter):
    """A Hugging Face image classifier from a local folder; batches hold ``pixel_values``.

    The loss (gradient scores, Fisher objective) is cross-entropy against ``labels`` when
    the batch has them, else against the model's own current predictions.
    """

    kind = "image-classifier"

    def __init__(self, model: nn.Module, processor: Any, include: Sequence[str] = (),
                 exclude: Sequence[str] = DEFAULT_EXCLUDE):
        super().__init__(model, include, exclude)
        self.processor = processor
        self.kind = "image-classifier"

    @classmethod
    def from_folder(cls, folder: str | Path, include: Sequence[str] = (), exclude: Sequence[str] = DEFAULT_EXCLUDE,
                    dtype: torch.dtype = torch.float32) -> "HFImageAdapter":
        folder = check_model_folder(folder)
        adapter = cls(load_image_classifier(folder, dtype=dtype), load_image_processor(folder), include, exclude)
        adapter.source = folder
        return adapter

    @property
    def num_channels(self) -> int:
        return int(getattr(self.model.config, "num_channels", 3))

    @property
    def id2label(self) -> dict[int, str]:
        return {int(index): str(label) for index, label in (self.model.config.id2label or {}).items()}

    def run_to_first_block(self, batch: Mapping[str, torch.Tensor]) -> Any:
        return self.model(pixel_values=batch["pixel_values"])

    def forward(self, batch: Mapping[str, torch.Tensor]) -> Any:
        return self.run_to_first_block(batch)

    def token_mask(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        return None  # every patch token (and the CLS/distillation tokens) is real

    def loss(self, model_outputs: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        logits = model_outputs.logits
        labels = batch.get("labels")
        if labels is None:
            labels = logits.detach().argmax(-1)
        return nn.functional.cross_entropy(logits, labels)

    def save(self, folder: Path) -> None:
        self.model.save_pretrained(folder, safe_serialization=True)
        if self.processor is not None:
            self.processor.save_pretrained(folder)
        if self.source is not None:
            copy_companion_files(self.source, folder)


def load_image_classifier(folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load an image classifier from a checked local folder: safetensors only, no remote code."""
    from transformers import AutoConfig

    folder = check_model_folder(folder)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise UsageError(f"cannot read the model config in {folder}: {str(error).splitlines()[0]}") from None
    if not is_image_classifier_config(config):
        raise UsageError(f"{folder} is not an image classifier (architectures: {getattr(config, 'architectures', None)})")
    try:
        model = _classifier_class(config).from_pretrained(
            folder, config=config, use_safetensors=True, trust_remote_code=False, local_files_only=True, dtype=dtype
        )
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot load the model in {folder}: {str(error).splitlines()[0]}") from None
    return model.eval()


def load_image_processor(folder: str | Path) -> Any:
    """The model's own image processor, from ``preprocessor_config.json`` in the folder."""
    from transformers import AutoImageProcessor
    from transformers.utils import logging as hf_logging

    if not (Path(folder) / "preprocessor_config.json").is_file():
        raise UsageError(f"model folder {str(folder)!r} has no preprocessor_config.json (the image processor config)")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "torchvision missing, using the PIL backend" is not the user's concern
    try:
        return AutoImageProcessor.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise UsageError(f"cannot read the image processor in {folder}: {str(error).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)


# ---------------------------------------------------------------------------- images
def to_mode(image: Any, num_channels: int) -> Any:
    """Convert a PIL image to ``RGB`` (3 channels) or ``L`` (1 channel) whatever its mode.

    Transparent images are composited on white first, so a transparent background does
    not turn black; 16-bit and float grey images are rescaled to 8 bits.
    """
    from PIL import Image

    target = "L" if num_channels == 1 else "RGB"
    if num_channels not in (1, 3):
        raise UsageError(f"images with {num_channels} channels are not supported (1 or 3)")
    if image.mode == target:
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = array.max() if array.size and array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array * (255.0 / top), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert(target)


def list_image_files(folder: str | Path) -> list[Path]:
    """Candidate image files below ``folder`` (sorted, recursive, by file ending)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"image folder {str(folder)!r} does not exist")
    return sorted(path for path in folder.rglob("*") if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)


def read_images(paths: Sequence[Path]) -> tuple[list[Any], list[Path]]:
    """Open every readable image (fully decoded); unreadable files are skipped and returned."""
    from PIL import Image, UnidentifiedImageError

    images, unreadable = [], []
    for path in paths:
        try:
            with Image.open(path) as handle:
                handle.load()
                images.append(handle.copy())
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            unreadable.append(path)
    return images, unreadable


def preprocess(images: Sequence[Any], processor: Any, num_channels: int) -> torch.Tensor:
    """PIL images or uint8 arrays -> (N, C, H, W) float32 pixel values via the model's processor."""
    from PIL import Image

    pil_images = []
    for image in images:
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        pil_images.append(to_mode(image, num_channels))
    try:
        pixels = processor(images=pil_images, return_tensors="pt")["pixel_values"]
    except (ValueError, TypeError) as error:
        raise UsageError(f"the model's image processor cannot handle these images: {str(error).splitlines()[0]}") from None
    return pixels.to(torch.float32)


def _uint8_to_images(array: np.ndarray, num_channels: int) -> list[np.ndarray]:
    """uint8 N×H×W, N×H×W×C or N×C×H×W -> list of H×W(×C) arrays Pillow accepts."""
    if array.ndim == 3:
        return list(array)
    if array.ndim == 4:
        if array.shape[-1] in (1, 3, 4):
            images = array
        elif array.shape[1] in (1, 3, 4):
            images = array.transpose(0, 2, 3, 1)
        else:
            raise UsageError(f"cannot tell the channel axis of images shaped {array.shape}")
        return [image[..., 0] if image.shape[-1] == 1 else image for image in images]
    raise UsageError(f"images must be N×H×W, N×H×W×C or N×C×H×W, got shape {array.shape}")


# ---------------------------------------------------------------------------- calibration data
@dataclass
class ImageCalibrationData:
    """Pixel batches for capture: ``pixel_values`` (N, C, H, W) float32, optional labels."""

    pixel_values: torch.Tensor
    labels: torch.Tensor | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if self.pixel_values.ndim != 4:
            raise UsageError(f"pixel values must be (N, C, H, W), got shape {tuple(self.pixel_values.shape)}")
        if self.pixel_values.shape[0] == 0:
            raise UsageError("calibration data holds no images")
        if self.labels is not None and self.labels.shape != (self.pixel_values.shape[0],):
            raise UsageError(f"{self.labels.shape[0]} labels for {self.pixel_values.shape[0]} images")

    @property
    def num_samples(self) -> int:
        return int(self.pixel_values.shape[0])

    @property
    def num_tokens(self) -> int:
        """Images, the unit the statistics are taken over (each contributes all its patches)."""
        return self.num_samples

    def batches(self, batch_size: int, by_length: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """Batches in order; ``by_length`` is accepted for the text interface (every image has the same size)."""
        for start in range(0, self.num_samples, batch_size):
            batch = {"pixel_values": self.pixel_values[start:start + batch_size]}
            if self.labels is not None:
                batch["labels"] = self.labels[start:start + batch_size]
            yield batch

    def head(self, samples: int | None) -> "ImageCalibrationData":
        """The first ``samples`` images (all when None)."""
        if samples is None or samples >= self.num_samples:
            return self
        labels = None if self.labels is None else self.labels[:samples]
        return ImageCalibrationData(self.pixel_values[:samples], labels, self.source)


def images_from_folder(folder: str | Path, processor: Any, num_channels: int) -> ImageCalibrationData:
    """``images:DIR``: every readable image below DIR, preprocessed; none readable is an error."""
    paths = list_image_files(folder)
    images, unreadable = read_images(paths)
    if not images:
        detail = f"{len(unreadable)} file(s) could not be read as images" if unreadable else "no image files found"
        raise UsageError(f"image folder {str(folder)!r} holds no readable image ({detail})")
    return ImageCalibrationData(preprocess(images, processor, num_channels), source=f"images:{folder}")


def load_npz_images(path: str | Path, processor: Any, num_channels: int,
                    image_size: tuple[int, int] | None = None) -> ImageCalibrationData:
    """``npz:FILE``: uint8 images go through the processor; float N×C×H×W is used as is."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"npz file {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as archive:
            key = "pixel_values" if "pixel_values" in archive.files else "images" if "images" in archive.files else None
            if key is None:
                raise UsageError(f"{path} has no 'pixel_values' (or 'images') array; it holds {', '.join(archive.files) or 'nothing'}")
            array = archive[key]
            labels = archive["labels"] if "labels" in archive.files else None
    except (OSError, ValueError, EOFError) as error:
        raise UsageError(f"cannot read {str(path)!r} as an npz archive: {str(error).splitlines()[0]}") from None
    if array.shape[0] == 0:
        raise UsageError(f"{path} holds no images")
    if array.dtype == np.uint8:
        pixels = preprocess(_uint8_to_images(array, num_channels), processor, num_channels)
    elif np.issubdtype(array.dtype, np.floating):
        if array.ndim != 4 or array.shape[1] != num_channels:
            raise UsageError(
                f"float pixel values must be N×{num_channels}×H×W (model-ready), got shape {array.shape}; "
                "store raw images as uint8 to have them preprocessed"
            )
        if image_size is not None and tuple(array.shape[2:]) != tuple(image_size):
            raise UsageError(f"float pixel values are {array.shape[2]}×{array.shape[3]}, the model takes {image_size[0]}×{image_size[1]}")
        if not np.isfinite(array).all():
            raise UsageError(f"{path} holds non-finite pixel values")
        pixels = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    else:
        raise UsageError(f"pixel arrays must be uint8 images or float pixel values, got dtype {array.dtype}")
    label_tensor = None
    if labels is not None:
        if labels.shape != (array.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise UsageError(f"labels must be {array.shape[0]} integers, got shape {labels.shape} dtype {labels.dtype}")
        label_tensor = torch.from_numpy(labels.astype(np.int64))
    return ImageCalibrationData(pixels, label_tensor, source=f"npz:{path}")


#: the digits split is fixed (stratified 80/20, seed 0) so that ``heldout`` never meets calibration
DIGITS_SPLIT_SEED = 0
DIGITS_HELDOUT_FRACTION = 0.2


def digits_split() -> dict[str, np.ndarray]:
    """Indices of scikit-learn's digits: ``calibration`` (80 %) and ``heldout`` (20 %), stratified.

    ``benchmarks/train_vit.py`` trains on the same ``calibration`` part and tests on
    ``heldout``, so ``builtin`` evaluation of that model is a true held-out test.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    labels = load_digits().target
    calibration, heldout = train_test_split(
        np.arange(len(labels)), test_size=DIGITS_HELDOUT_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=labels
    )
    return {"calibration": calibration, "heldout": heldout}


def builtin_digits(processor: Any, num_channels: int, samples: int | None = None, seed: int = 0,
                   split: str = "calibration") -> ImageCalibrationData:
    """scikit-learn's handwritten digits (8×8 scans, 10 classes), in the model's format.

    ``samples`` images of the split, chosen by ``seed``; the split itself never changes.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    if split not in ("calibration", "heldout"):
        raise UsageError(f"digits split must be calibration or heldout, got {split!r}")
    digits = load_digits()
    chosen = digits_split()[split]
    if samples is not None:
        chosen = np.random.default_rng(seed).permutation(chosen)[:samples]
    grey = np.clip(digits.images[chosen] * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    images = [Image.fromarray(image, mode="L") for image in grey]
    labels = torch.from_numpy(digits.target[chosen].astype(np.int64))
    return ImageCalibrationData(preprocess(images, processor, num_channels), labels, source="builtin:digits")


def _image_size(config: Any) -> tuple[int, int] | None:
    size = getattr(config, "image_size", None)
    if isinstance(size, int):
        return (size, size)
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return (int(size[0]), int(size[1]))
    return None


def load_image_calibration(spec: str, adapter: HFImageAdapter, samples: int | None = None,
                           seed: int = 0) -> ImageCalibrationData:
    """Calibration for an image model from ``images:DIR``, ``npz:FILE`` or ``builtin``."""
    channels = adapter.num_channels
    if spec == "builtin":
        return builtin_digits(adapter.processor, channels, samples, seed)
    if spec.startswith("images:"):
        data = images_from_folder(spec.split(":", 1)[1], adapter.processor, channels)
    elif spec.startswith("npz:"):
        data = load_npz_images(spec.split(":", 1)[1], adapter.processor, channels, _image_size(adapter.model.config))
    else:
        raise UsageError(f"an image model needs --calibration images:DIR, npz:FILE or builtin, got {spec!r}")
    return data.head(samples)

