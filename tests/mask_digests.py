"""Digests of the masks that ``qsurgeon prune`` writes for a fixed set of commands.

The renovation of the code base must not change behaviour: the same command and seed
write the same masks, byte for byte. ``tests/data/mask_digests.json`` holds the digests
recorded before the renovation; ``test_mask_digests.py`` recomputes them. Run this file
as a script to record them again after an intended change of behaviour.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

DIGESTS_FILE = Path(__file__).parent / "data" / "mask_digests.json"
COMMON = ["--samples", "16", "--seq-len", "24", "--block-size", "16", "--seed", "3", "--quiet"]
#: case name -> (tiny model kind, extra prune arguments)
CASES: dict[str, tuple[str, list[str]]] = {
    "icbs": ("bert", ["--method", "icbs", "--density", "0.4"]),
    "wanda": ("bert", ["--method", "wanda", "--density", "0.4"]),
    "sparsegpt": ("bert", ["--method", "sparsegpt", "--density", "0.4"]),
    "icbs-2:4": ("bert", ["--method", "icbs", "--pattern", "2:4"]),
    "preset-quality-encoder": ("bert", ["--preset", "quality", "--density", "0.5"]),
    "preset-quality-causal-lm": ("llama", ["--preset", "quality", "--density", "0.5"]),
    "icbs-swap-tabu-column": ("gpt2", ["--method", "icbs", "--solver", "swap-tabu", "--granularity", "column"]),
}


def mask_digest(masks_file: Path) -> str:
    """sha256 over every mask's name, shape and bytes, in name order."""
    from safetensors.torch import load_file

    digest = hashlib.sha256()
    for name, mask in sorted(load_file(str(masks_file)).items()):
        digest.update(name.encode())
        digest.update(str(tuple(mask.shape)).encode())
        digest.update(mask.contiguous().numpy().tobytes())
    return digest.hexdigest()


def run_case(case: str, models: dict[str, Path], out: Path) -> str:
    from qsurgeon.client.cli import main

    kind, extra = CASES[case]
    code = main(["prune", str(models[kind]), "--out", str(out), *COMMON, *extra])
    assert code == 0, f"{case}: exit {code}"
    return mask_digest(out / "masks.safetensors")


def tiny_models(root: Path) -> dict[str, Path]:
    sys.path.insert(0, str(Path(__file__).parent))
    from test_adapters import save_tiny_model

    return {kind: save_tiny_model(kind, root / kind) for kind in ("bert", "gpt2", "llama")}


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        models = tiny_models(Path(tmp) / "models")
        digests = {case: run_case(case, models, Path(tmp) / case.replace(":", "-")) for case in CASES}
    DIGESTS_FILE.write_text(json.dumps(digests, indent=2) + "\n")
    print(json.dumps(digests, indent=2))
