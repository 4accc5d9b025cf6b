"""Shared test set-up: quiet OpenMP threads and a per-test Redis namespace."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede any torch import
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if not os.path.exists("/dev/nvidiactl"):
    # No GPU: Triton kernels (sa's fused kernel) run in Triton's interpreter on the CPU. The
    # variable is read when triton is first imported, so it is set here, before any test
    # module (or torch, which may import triton) gets the chance.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def client():
    """The test Redis (skips by hand, fails under CI, when none answers)."""
    from redis_support import redis_client

    return redis_client()


@pytest.fixture
def prefix(request):
    """A fresh Redis key prefix named after the test module; its keys are deleted afterwards."""
    from redis_support import key_prefix, redis_client

    with key_prefix(redis_client(), request.module.__name__.removeprefix("test_")) as name:
        yield name
