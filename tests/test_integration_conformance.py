"""Every MindSpeed-RL target the integration patches, checked against the pinned MindSpeed-RL source.

The source is ``../shared/upstream/MindSpeed-RL`` (or ``$MINDSPEED_RL_R3_UPSTREAM/MindSpeed-RL``), parsed, not
imported, so this runs in the main test environment; tests/upstream imports the same modules for real. Skipped only
where the upstream tree is absent (a user's clone); CI fails on such a skip.
"""

from pathlib import Path

import pytest

from mindspeed_rl_r3.autopatch import TARGET_MODULES
from mindspeed_rl_r3.doctoring.source_index import SourceIndex, parameters
from mindspeed_rl_r3.patches import cpu_backend, mindspeed_rl_integration

ROOT = cpu_backend.upstream_root()
SRC = str(ROOT / "MindSpeed-RL") if ROOT is not None else ""
INDEX = SourceIndex([Path(SRC)]) if ROOT is not None else None
pytestmark = [
    pytest.mark.upstream,
    pytest.mark.skipif(ROOT is None, reason="../shared/upstream (the pinned upstream sources) is absent"),
]


@pytest.mark.parametrize("target", mindspeed_rl_integration.TARGETS, ids=lambda t: t.path)
def test_target_exists_with_expected_parameters(target):
    # PatchSet patches the class that defines a method: an inherited one would not be found there
    found = INDEX.resolve(target.path, inherited=False)
    assert not isinstance(found, str), f"{target.path}: {found}"
    node, _path, is_method = found
    if target.parameters:
        found_params = parameters(node, is_method)
        assert found_params[: len(target.parameters)] == target.parameters, f"{target.path}: parameters {found_params}"


def test_source_index_refuses_inherited_methods():
    """What the check above relies on: IntegratedWorker inherits generate_sequences, so it is refused there."""
    inherited = "mindspeed_rl.workers.integrated_worker.IntegratedWorker.generate_sequences"
    assert not isinstance(INDEX.resolve(inherited), str)
    assert "does not define generate_sequences itself" in INDEX.resolve(inherited, inherited=False)


def test_import_hook_covers_every_patched_module():
    assert sorted(TARGET_MODULES) == sorted(mindspeed_rl_integration.MODULE_PATCHES)
    for module in TARGET_MODULES:
        assert INDEX.module_file(module) is not None, f"{module} is not in {SRC}"


def test_hard_coded_stage_columns_are_what_the_dispatch_patch_extends():
    source = (Path(SRC) / "mindspeed_rl/workers/actor_hybrid_worker.py").read_text(encoding="utf-8")
    for consumer in ("'actor_rollout'", "'actor_log_prob'", "'actor_train'"):
        assert f"experience_consumer_stage = {consumer}" in source
    assert "experience_columns = ['input_ids', 'responses', 'response_length', 'prompt_length']" in source


def test_engine_still_decodes_prompts_to_text():
    """The reason for the token-prompt replacement; if upstream sends token ids again, it can go."""
    source = (Path(SRC) / "mindspeed_rl/models/rollout/vllm_engine.py").read_text(encoding="utf-8")
    assert "decode(p, skip_special_tokens=True)" in source
