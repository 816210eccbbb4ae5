"""Every MindSpeed-RL target the integration patches, checked against the pinned MindSpeed-RL source.

The source is ``../shared/upstream/MindSpeed-RL`` (or ``$MINDSPEED_RL_R3_UPSTREAM/MindSpeed-RL``), parsed, not
imported, so this runs in the main test environment; tests/upstream imports the same modules for real. Skipped only
where the upstream tree is absent (a user's clone); CI fails on such a skip.
"""

import ast
from pathlib import Path

import pytest

from mindspeed_rl_r3.autopatch import TARGET_MODULES
from mindspeed_rl_r3.patches import cpu_backend, mindspeed_rl_integration

ROOT = cpu_backend.upstream_root()
SRC = str(ROOT / "MindSpeed-RL") if ROOT is not None else ""
pytestmark = [
    pytest.mark.upstream,
    pytest.mark.skipif(ROOT is None, reason="../shared/upstream (the pinned upstream sources) is absent"),
]


def _module_tree(module: str) -> ast.Module:
    path = Path(SRC) / (module.replace(".", "/") + ".py")
    if not path.is_file():
        pytest.fail(f"{module}: {path} does not exist in the checkout")
    return ast.parse(path.read_text(encoding="utf-8"))


def _split(target: str) -> tuple[str, list[str]]:
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        if (Path(SRC) / ("/".join(parts[:cut]) + ".py")).is_file():
            return ".".join(parts[:cut]), parts[cut:]
    pytest.fail(f"no module file for {target} in {SRC}")


def _names_bound(tree: ast.Module) -> dict[str, ast.AST]:
    bound: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            bound[node.name] = node
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                bound[alias.asname or alias.name] = node
    return bound


def _parameters(node: ast.FunctionDef) -> tuple[str, ...]:
    args = node.args
    return tuple(a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs])


@pytest.mark.parametrize("target", mindspeed_rl_integration.TARGETS, ids=lambda t: t.path)
def test_target_exists_with_expected_parameters(target):
    module, attrs = _split(target.path)
    node = _names_bound(_module_tree(module)).get(attrs[0])
    assert node is not None, f"{target.path}: {attrs[0]} is not defined or imported in {module}"
    if isinstance(node, ast.ImportFrom):
        # A function bound by name (e.g. grpo_trainer_hybrid.put_prompts_experience): check where it is defined.
        node = _names_bound(_module_tree(node.module)).get(attrs[0])
        assert isinstance(node, ast.FunctionDef), f"{target.path}: imported {attrs[0]} is not a function"
    for attr in attrs[1:]:
        assert isinstance(node, ast.ClassDef), f"{target.path}: {attr} looked up on a non-class"
        methods = {n.name: n for n in node.body if isinstance(n, ast.FunctionDef)}
        assert attr in methods, f"{target.path}: {node.name} defines no {attr} (it must define it, not inherit it)"
        node = methods[attr]
    if target.parameters:
        found = _parameters(node)
        assert found[: len(target.parameters)] == target.parameters, f"{target.path}: parameters {found}"


def test_import_hook_covers_every_patched_module():
    assert sorted(TARGET_MODULES) == sorted(mindspeed_rl_integration.MODULE_PATCHES)
    for module in TARGET_MODULES:
        _module_tree(module)


def test_hard_coded_stage_columns_are_what_the_dispatch_patch_extends():
    source = (Path(SRC) / "mindspeed_rl/workers/actor_hybrid_worker.py").read_text(encoding="utf-8")
    for consumer in ("'actor_rollout'", "'actor_log_prob'", "'actor_train'"):
        assert f"experience_consumer_stage = {consumer}" in source
    assert "experience_columns = ['input_ids', 'responses', 'response_length', 'prompt_length']" in source


def test_engine_still_decodes_prompts_to_text():
    """The reason for the token-prompt replacement; if upstream sends token ids again, it can go."""
    source = (Path(SRC) / "mindspeed_rl/models/rollout/vllm_engine.py").read_text(encoding="utf-8")
    assert "decode(p, skip_special_tokens=True)" in source
