"""scripts/peer_suites.py: the KNOWN patterns match Liger 0.8.5's real test ids, and nothing else.

The ids below are copied from ``pytest --collect-only`` of Liger's test/chunked_loss/test_grpo_loss.py
(parameters read delta-level-loss_type-refs-beta-eps_low-eps_high-T-bias-scalar-dtype-atol-rtol-B-T-H-V,
dtype0 = bf16). An earlier pattern (``luspo.*sequence.*bfloat16``) matched no id at all.
"""
import importlib.util
import os
import re

import pytest

_spec = importlib.util.spec_from_file_location(
    "peer_suites", os.path.join(os.path.dirname(__file__), "..", "scripts", "peer_suites.py"))
peer_suites = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peer_suites)


def _known(test_id):
    return any(re.fullmatch(p, test_id) for p in peer_suites.KNOWN)


@pytest.mark.parametrize("test_id,known", [
    ("test_correctness[None-sequence-luspo-True-True-True-0.1-0.2-0.2-1.0-True-1.0-dtype0-0.1-0.5-8-128-1024-4096]", True),
    ("test_correctness[2.0-sequence-luspo-False-False-True-0.0-0.1-0.1-2.0-False-1.0-dtype0-0.1-0.5-8-128-1024-4096]", True),
    # the small shape, fp32, token level and other loss types are not excused
    ("test_correctness[None-sequence-luspo-True-True-True-0.1-0.2-0.2-1.0-True-1.0-dtype0-0.1-0.5-3-47-31-123]", False),
    ("test_correctness[None-sequence-luspo-True-True-True-0.1-0.2-0.2-1.0-True-1.0-dtype1-2e-05-0.001-8-128-1024-4096]", False),
    ("test_correctness[2.0-sequence-grpo-False-False-True-0.0-0.1-0.1-2.0-False-1.0-dtype0-0.1-0.5-8-128-1024-4096]", False),
    ("test_sequence_level_rejects_unsupported_loss_types[cispo]", False),
])
def test_known_patterns_match_real_ids(test_id, known):
    assert _known(test_id) is known
