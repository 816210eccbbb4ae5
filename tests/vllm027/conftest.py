"""The independent oracle: vLLM 0.27's own routed-experts return against the package's capture, in the oracle
environment (``ci/vllm027/install.sh``). Collected only where vLLM 0.27 is installed (``tests/conftest.py`` ignores
this folder elsewhere; this file keeps it so when it is named on the command line)."""

from __future__ import annotations

import os

import pytest

from tests.conftest import installed_vllm

if not (installed_vllm() or "").startswith("0.27"):
    collect_ignore_glob = ["test_*.py"]


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.oracle)  # a skip here fails the run (tests/conftest.py)
