import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def megatron():
    """megatron-core on CPU: one gloo process, model-parallel sizes 1, seeded RNG trackers."""
    pytest.importorskip("megatron.core")
    from mindspeed_rl_r3.patches import megatron_router
    from mindspeed_rl_r3.patches.megatron_cpu import megatron_cpu_session

    with megatron_cpu_session(seed=1234):
        megatron_router.apply()
        yield megatron_router
        megatron_router.undo()
