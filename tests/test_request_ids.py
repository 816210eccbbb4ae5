"""Completions map back to the runner's request ids, with vLLM >= 0.12's randomised ids and without (0.11)."""

from __future__ import annotations

import pytest

from mindspeed_rl_r3.integration.rollout_columns import runner_request_id
from mindspeed_rl_r3.routing.trace import RoutingError


def test_plain_ids_of_vllm_011_map_exactly():
    known = {"7", "0_8", "1_8"}
    assert runner_request_id("7", 0, 1, known) == "7"
    assert runner_request_id("8", 1, 2, known) == "1_8"


def test_randomised_ids_map_to_their_own_request():
    # "{index}_{user id}-{8 hex}" as vLLM 0.27 names children; "1" and "11" share a prefix, "0_1" and "0_11" too
    known = {"0_1-3fa9c0d2", "1_1-00ab12ff", "0_11-deadbeef", "1_11-0badf00d", "2-abcdef01"}
    assert runner_request_id("1", 0, 2, known) == "0_1-3fa9c0d2"
    assert runner_request_id("1", 1, 2, known) == "1_1-00ab12ff"
    assert runner_request_id("11", 1, 2, known) == "1_11-0badf00d"
    assert runner_request_id("2", 0, 1, known) == "2-abcdef01"


def test_missing_or_ambiguous_ids_are_refused():
    with pytest.raises(RoutingError, match="no routing was captured for completion 0 of request '3'"):
        runner_request_id("3", 0, 1, {"2-abcdef01", "3-xyz"})  # not vLLM's suffix: never matched loosely
    with pytest.raises(RoutingError, match="several runner request ids"):
        runner_request_id("5", 0, 2, {"0_5-11111111", "0_5-22222222"})  # the same user id submitted twice
    with pytest.raises(RoutingError, match="several runner request ids"):
        runner_request_id("5", 0, 1, {"5", "5-22222222"})
