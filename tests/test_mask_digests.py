"""The masks of a fixed set of ``qsurgeon prune`` commands stay byte-identical (see mask_digests.py)."""

from __future__ import annotations

import json

import pytest

from mask_digests import CASES, DIGESTS_FILE, digests_by_machine, expected_digests, float_fingerprint, run_case, tiny_models

RECORDED = json.loads(DIGESTS_FILE.read_text())
EXPECTED = expected_digests()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(tmp_path_factory.mktemp("digest-models"))


def test_every_case_has_a_recorded_digest():
    assert set(RECORDED) == set(CASES)
    by_machine = digests_by_machine()
    assert by_machine and all(set(digests) <= set(CASES) and digests for digests in by_machine.values())


def test_the_float_fingerprint_is_stable_within_a_process():
    assert float_fingerprint() == float_fingerprint() and len(float_fingerprint()) == 16


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_masks_are_byte_identical_to_the_recorded_ones(case, models, tmp_path):
    assert run_case(case, models, tmp_path / "out") == EXPECTED[case], f"machine kind {float_fingerprint()}"
