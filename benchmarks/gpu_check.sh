#!/usr/bin/env bash
# GPU check of the `sa` annealer: CUDA tests, proposals/s over a round of blocks, a round
# end to end against the CPU kernel. One table; JSON to $OUT/gpu_check.json when OUT is set.
#
# Needs: Python ≥ 3.11 with numpy, numba, torch (CUDA build for the GPU rows; triton, which CUDA builds
# of torch bring, for the fused kernel), pytest, and
# qsurgeon importable: either `pip install -e .[worker]` (from this repository, no network
# needed beyond what that install already did) or just PYTHONPATH=client:worker:server,
# which this script sets itself when qsurgeon is not importable. No network, no downloads,
# no models. On a machine without CUDA the CUDA parts are skipped with a message and the
# rest still runs (that is how it is tested on CPU-only machines).
#
#   bash benchmarks/gpu_check.sh            # from the repository root; under 150 s on one H100 (tests ≤ 75 s, benchmark ≤ 70 s)
set -u
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
PY=${PYTHON:-python}
if ! $PY -c "import qsurgeon.worker" 2>/dev/null; then
  export PYTHONPATH="client:worker:server${PYTHONPATH:+:$PYTHONPATH}"
fi
$PY - <<'EOF' || exit 1
import importlib.util, sys
missing = [name for name in ("numpy", "numba", "torch", "pytest", "qsurgeon.worker") if importlib.util.find_spec(name) is None]
if missing:
    sys.exit(f"gpu_check: missing {', '.join(missing)} (see the top of benchmarks/gpu_check.sh)")
import torch
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = "not installed (the fused sa kernel needs it; its tests skip)"
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}; triton {triton_version}")
EOF

echo "== CUDA tests (and the CPU/torch agreement tests; the fused Triton kernel's tests) =="
if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  timeout 75 $PY -m pytest -q -p no:cacheprovider tests/test_sa.py -k "cuda or torch or triton" tests/test_sa_triton.py
  tests_rc=$?
else
  echo "no CUDA device: the CPU/torch agreement tests, the fused kernel in Triton's interpreter (the CUDA ones skip themselves)"
  timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_sa.py -k "torch or triton" tests/test_sa_triton.py
  tests_rc=$?
fi

echo "== throughput and a round end to end =="
timeout 70 $PY benchmarks/gpu_check.py
bench_rc=$?
echo "tests exit status: $tests_rc; benchmark exit status: $bench_rc"
exit $(( tests_rc != 0 || bench_rc != 0 ))
