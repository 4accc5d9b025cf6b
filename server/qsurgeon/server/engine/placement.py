"""Where a prune runs: one transformer block at a time on the chosen device.

A 7B–70B decoder does not fit a GPU next to its calibration activations, Gram matrices
and block QUBOs, but one of its transformer blocks does. So the model stays in host
memory (as loaded: transformers maps safetensors files lazily) and :class:`BlockPlacement`
moves *one* block to the device for its capture, scoring and refit, then back. The
calibration activations passed from block to block live on the device when they fit in
a share of its free memory and in host memory otherwise (moved batch by batch), so
device memory is bounded by one block whatever the depth of the model.

On the CPU every function here is the identity: ``--device cpu`` (and ``auto`` on a
machine without CUDA) runs exactly the code path that produced the recorded masks
(tests/test_mask_digests.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from qsurgeon.client.errors import UsageError
from qsurgeon.server.models.capture import to_device
from qsurgeon.worker.queue.base import Queue, RoundRequest, RoundResult

#: the share of the device's free memory the block-to-block activations may take before
#: they are kept in host memory instead (the rest holds the block, its Grams, attention)
ACTIVATION_SHARE = 0.4


def cuda_available() -> bool:
    return bool(torch.cuda.is_available())


def resolve_device(spec: str | None) -> torch.device:
    """``auto`` → cuda when torch sees a CUDA device, else cpu; ``cuda[:N]`` refused without one."""
    spec = (spec or "auto").strip()
    if spec == "auto":
        return torch.device("cuda") if cuda_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not cuda_available():
            raise UsageError(f"--device {spec}: no CUDA device is available to torch {torch.__version__} on this "
                             "machine; use --device cpu (or auto)")
        device = torch.device(spec)
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {spec}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
        return device
    raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}")


def solver_device(spec: str | None) -> str | None:
    """The ``device`` parameter a block solver gets: None for auto (each worker decides for itself)."""
    if spec in (None, "auto"):
        return None
    return "cpu" if spec == "cpu" else "cuda"


class DeviceQueue:
    """A Queue that tells solvers declaring a ``device`` parameter (``sa``) where to run.

    Only an explicit ``--device`` is passed on; with ``auto`` every worker resolves its own
    device, so a job can mix GPU and CPU workers. A ``device`` in ``--solver-param`` wins.
    """

    def __init__(self, inner: Queue, device: str) -> None:
        self.inner = inner
        self.device = device
        self._declares: dict[str, bool] = {}

    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _has_device(self, solver: str) -> bool:
        if solver not in self._declares:
            try:
                from qsurgeon.worker.solvers.registry import solver_parameters

                self._declares[solver] = any(param.name == "device" for param in solver_parameters(solver))
            except Exception:  # an unknown solver fails where it is solved, with its own message
                self._declares[solver] = False
        return self._declares[solver]

    def run_round(self, request: RoundRequest) -> RoundResult:
        if "device" not in request.params and self._has_device(request.solver):
            request = RoundRequest(request.job_id, request.round_id, request.problems, request.solver,
                                   {**request.params, "device": self.device})
        return self.inner.run_round(request)


def tensor_bytes(value: Any) -> int:
    """Bytes of every distinct tensor inside ``value`` (shared ones counted once)."""
    seen: set[int] = set()

    def walk(item: Any) -> int:
        if isinstance(item, torch.Tensor):
            key = item.untyped_storage().data_ptr() if item.numel() else id(item)
            if key in seen:
                return 0
            seen.add(key)
            return item.untyped_storage().nbytes()
        if isinstance(item, (tuple, list)):
            return sum(walk(part) for part in item)
        if isinstance(item, dict):
            return sum(walk(part) for part in item.values())
        return 0

    return walk(value)


def module_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + \
        sum(b.numel() * b.element_size() for b in module.buffers())


def free_device_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device (None on the CPU: host memory is the limit there)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


class BlockPlacement:
    """Moves one transformer block to the device while it is worked on; the identity on the CPU.

    ``host`` is where the model lives (the CPU). ``activations_device(nbytes)`` says where
    the activations handed from block to block are kept: on the device while they take
    less than :data:`ACTIVATION_SHARE` of its free memory, else in host memory.
    """

    def __init__(self, device: torch.device, host: torch.device | None = None):
        self.device = device
        self.host = host or torch.device("cpu")
        self.offloaded = False  # set once activations had to stay in host memory

    @property
    def on_host(self) -> bool:
        return self.device == self.host

    @contextmanager
    def block(self, block: nn.Module) -> Iterator[nn.Module]:
        if self.on_host:
            yield block
            return
        block.to(self.device)
        try:
            yield block
        finally:
            block.to(self.host)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def enter(self, block: nn.Module) -> None:
        """Move ``block`` to the device (nothing on the CPU)."""
        if not self.on_host:
            block.to(self.device)

    def leave(self, block: nn.Module) -> None:
        """Move ``block`` back to host memory and free its device memory."""
        if not self.on_host:
            block.to(self.host)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def activations_device(self, nbytes: int) -> torch.device:
        if self.on_host:
            return self.host
        free = free_device_bytes(self.device)
        if free is not None and nbytes > ACTIVATION_SHARE * free:
            self.offloaded = True
            return self.host
        return self.device

    def facts(self) -> dict[str, Any]:
        """What the report says about placement."""
        facts: dict[str, Any] = {"device": str(self.device), "activations_offloaded": self.offloaded}
        if self.device.type == "cuda":
            facts["device_name"] = torch.cuda.get_device_name(self.device)
            facts["device_peak_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
        return facts


__all__ = [
    "ACTIVATION_SHARE", "BlockPlacement", "DeviceQueue", "cuda_available", "free_device_bytes", "module_bytes",
    "resolve_device", "solver_device", "tensor_bytes", "to_device",
]
