"""``plan`` and the run accept and refuse the same configs.

Every variant of tests/config_corpus.py goes through ``plan`` (plain hydra data) and through the run's two checks on
MindSpeed-RL's real config classes: the ``train`` driver's (:func:`mindspeed_rl_r3.train.check_config`, what
``prepare_job`` runs before Ray starts) and an actor worker's initialisation (the sections activated as in every
worker process, then the patched ``initialize``'s ``refuse_unsupported``). No Ray, no model.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from mindspeed_rl_r3 import train
from mindspeed_rl_r3.config import ConfigError
from mindspeed_rl_r3.integration import runtime
from mindspeed_rl_r3.plan import load_config, plan_config
from mindspeed_rl_r3.routing import RoutingError
from tests.config_corpus import CORPUS


def _worker_accepts(sections: dict[str, Any], upstream: tuple[Any, Any, Any]) -> bool:
    from mindspeed_rl_r3.patches.mindspeed_rl_worker import refuse_unsupported

    if not sections:
        return True  # no sections: the workers run MindSpeed-RL unchanged
    try:
        active = runtime.activate(sections)  # what autopatch does in every worker process
        rl, megatron, generate = upstream
        refuse_unsupported(SimpleNamespace(rl_config=rl, megatron_config=megatron, generate_config=generate), active)
    except (ConfigError, RoutingError):
        return False
    finally:
        runtime.deactivate()
    return True


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_plan_and_the_run_reach_the_same_verdict(case):
    name, overrides, runs = CORPUS[case]
    planned = plan_config(load_config(name, overrides))
    composed = train.compose_config(name, overrides=overrides)
    try:
        _, sections, upstream = train.check_config(composed)
    except ConfigError as err:
        assert planned["ok"] is False and runs is False, str(err)
        # the run's refusal is one of the reasons plan gives (section errors: the same one line)
        reasons = str(err).removeprefix("mindspeed_rl_r3 cannot run with: ")
        assert any(reasons.startswith(e) or e in reasons for e in planned["errors"]), (str(err), planned["errors"])
        return
    assert planned["ok"] is runs is True, planned["errors"]
    assert _worker_accepts(sections, upstream)


def test_the_worker_refuses_what_the_driver_refuses():
    """Sections the driver would refuse never reach a worker through our driver; a foreign driver's worker refuses
    them itself, with the same words."""
    for case in ("torchair_with_capture", "r2_through_mindspeed_rl", "group_dedupe_without_guarantee_order"):
        name, overrides, _ = CORPUS[case]
        composed = train.compose_config(name, overrides=overrides)
        msrl, sections = train.split_sections(composed)
        assert not _worker_accepts(sections, train.upstream_configs(msrl)), case
