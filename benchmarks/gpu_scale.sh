#!/usr/bin/env bash
# GPU scale check: a 1.24 B-parameter Llama (random init, bf16) pruned end to end with
# --device cuda (iCBS from Wanda, a short epoch, refit), every phase timed with its peak host
# and device memory; the saved folder reloaded; perplexity on the GPU; Wanda's masks on CPU
# vs GPU compared. Then the @pytest.mark.cuda tests of tests/test_scale.py. Under 4 minutes
# on one H100. One table on stdout; JSON to $OUT/gpu_scale.json when OUT is set.
#
# Needs: Python >= 3.11 (3.12 fine) with torch (a CUDA build for the GPU rows), transformers,
# safetensors, numpy, numba, pydantic, psutil (and pytest for the tests), and qsurgeon
# importable: `pip install -e .[engine]`, or just PYTHONPATH=client:worker:server, which this
# script sets itself when qsurgeon is not importable (no install). dimod is NOT needed. No
# network, no downloads: the model is built from a config with random weights.
#
#   bash benchmarks/gpu_scale.sh            # from the repository root, on a CUDA machine
#   bash benchmarks/gpu_scale.sh --tiny     # a 2-block hidden-128 model, any machine (the CPU test)
set -u
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-python}
if ! $PY -c "import qsurgeon.server" 2>/dev/null; then
  export PYTHONPATH="client:worker:server${PYTHONPATH:+:$PYTHONPATH}"
fi
$PY - <<'PYEOF' || exit 1
import importlib.util, sys
needed = ("numpy", "numba", "torch", "transformers", "safetensors", "pydantic", "psutil", "qsurgeon.server")
missing = [name for name in needed if importlib.util.find_spec(name) is None]
if missing:
    sys.exit(f"gpu_scale: missing {', '.join(missing)} (see the top of benchmarks/gpu_scale.sh)")
PYEOF
tiny=""
[ "${1:-}" = "--tiny" ] && tiny="--tiny"
timeout 420 $PY benchmarks/gpu_scale.py $tiny
bench_rc=$?
tests_rc=0
if [ -z "$tiny" ] && $PY -c "import torch, pytest, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "== CUDA tests =="
  timeout 200 $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_scale.py
  tests_rc=$?
fi
echo "benchmark exit status: $bench_rc; tests exit status: $tests_rc"
exit $(( bench_rc != 0 || tests_rc != 0 ))
