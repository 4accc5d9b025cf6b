"""Shared test set-up: quiet OpenMP threads and a per-test Redis namespace."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede any torch import
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
