"""Digests of the masks that ``qsurgeon prune`` writes for a fixed set of commands.

The renovation of the code base must not change behaviour: the same command and seed
write the same masks, byte for byte. ``tests/data/mask_digests.json`` holds the digests
recorded before the renovation; ``test_mask_digests.py`` recomputes them. Run this file
as a script to record them again after an intended change of behaviour.

A mask can also depend on the CPU: the float kernels of torch and the BLAS differ in their
last bits between CPU families, and a method that iterates (ALPS's ADMM in the quality preset)
can turn those bits into a different weight at the density cut. Where a case's mask differs on
a kind of machine, ``tests/data/mask_digests_by_machine.json`` holds that machine kind's digest,
keyed by :func:`float_fingerprint`; everywhere else the recorded digest applies. Run this file
with ``--machine`` to record this machine's differing digests there.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

DIGESTS_FILE = Path(__file__).parent / "data" / "mask_digests.json"
MACHINE_DIGESTS_FILE = Path(__file__).parent / "data" / "mask_digests_by_machine.json"
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


def float_fingerprint() -> str:
    """16 hex digits of the bits of a few fixed float computations (torch matmul, softmax, layer
    norm, float64 Cholesky; numpy's BLAS), on one thread (a sum split over threads rounds
    differently): equal on machines whose float kernels agree."""
    import torch
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            generator = torch.Generator().manual_seed(0)
            a = torch.randn(96, 384, generator=generator)
            b = torch.randn(384, 160, generator=generator)
            gram = (a.T @ a).double() + torch.eye(384, dtype=torch.float64)
            results = [a @ b, torch.softmax(a[:, :64] @ a[:, :64].T, dim=-1),
                       torch.nn.functional.layer_norm(a, (384,)), torch.linalg.cholesky(gram)]
            results += [torch.from_numpy(a.numpy() @ b.numpy()), torch.from_numpy(gram.numpy() @ gram.numpy()[:, :32])]
    finally:
        torch.set_num_threads(threads)
    digest = hashlib.sha256()
    for tensor in results:
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def digests_by_machine() -> dict[str, dict[str, str]]:
    """machine kind -> {case: digest} for the cases whose masks differ there."""
    return json.loads(MACHINE_DIGESTS_FILE.read_text()) if MACHINE_DIGESTS_FILE.is_file() else {}


def expected_digests() -> dict[str, str]:
    """The recorded digest of every case, with this machine kind's own where it has one."""
    return json.loads(DIGESTS_FILE.read_text()) | digests_by_machine().get(float_fingerprint(), {})


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
    if "--machine" in sys.argv[1:]:
        recorded = json.loads(DIGESTS_FILE.read_text())
        by_machine = digests_by_machine()
        differing = {case: digest for case, digest in digests.items() if recorded.get(case) != digest}
        by_machine[float_fingerprint()] = differing
        MACHINE_DIGESTS_FILE.write_text(json.dumps(by_machine, indent=2, sort_keys=True) + "\n")
        print(json.dumps({float_fingerprint(): differing}, indent=2))
    else:
        DIGESTS_FILE.write_text(json.dumps(digests, indent=2) + "\n")
        print(json.dumps(digests, indent=2))
