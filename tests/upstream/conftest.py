"""Tests against the real MindSpeed-RL / MindSpeed / MindSpeed-LLM / vllm-ascend sources of ``../shared/upstream``
with the real vLLM 0.11.0, in the upstream test environment (``ci/upstream/install.sh``).

The whole session runs on :mod:`mindspeed_rl_r3.patches.cpu_backend`, the one documented stand-in layer
(``torch_npu`` / ``torchair`` / ``acl``, ``torch.npu`` on the CPU, megatron-core's CUDA redirections). Every test in
this folder is marked ``upstream``: it skips only when the upstream tree is absent (a user's clone); in CI any such
skip fails the run (see ``tests/conftest.py``).
"""

from __future__ import annotations

import os

import pytest

from mindspeed_rl_r3.patches import cpu_backend
from tests.upstream.support import integration, ray_cluster  # noqa: F401  (one definition each: one Ray session)

UPSTREAM = cpu_backend.upstream_root()


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.upstream)


@pytest.fixture(scope="session", autouse=True)
def upstream_sources():
    """The real upstream modules importable on this CPU machine (once per session)."""
    if UPSTREAM is None:
        pytest.skip("../shared/upstream (the pinned upstream sources) is absent: a user's clone")
    cpu_backend.install()
    cpu_backend.use_upstream(UPSTREAM)
    import mindspeed_rl  # noqa: F401  (its package __init__ imports every module once, ~9 s)

    return UPSTREAM
