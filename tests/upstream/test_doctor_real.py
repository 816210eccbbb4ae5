"""``doctor`` in import mode against the real upstream modules (MindSpeed-RL 05a90d77, MindSpeed ac9f0e74,
MindSpeed-LLM a2c0733, vllm-ascend v0.11.0-dev, megatron-core 0.12.1) on the CPU backend: every patch module's own
``check()`` imports its targets. The parse mode (``--upstream``) over the same trees runs in tests/test_doctor.py."""

from __future__ import annotations

from importlib import import_module

from mindspeed_rl_r3.patches import PATCH_MODULES
from tests.upstream.llm_modules import mindspeed_llm_modules

LORA_PROBE = (
    "mindspeed_rl.workers.resharding.weight_adaptor.Qwen3MoeMVWeightAdaptor names under LoRA (vLLM -> Megatron)"
)


def test_every_target_imports_and_matches_its_signature(upstream_sources):
    from mindspeed_rl_r3 import doctor
    from mindspeed_rl_r3.doctoring.versions import module_spec

    assert module_spec("torch_npu") is not None  # the CPU backend's stand-in is importable ...
    assert doctor.import_is_safe("mindspeed_rl")  # ... and loads no NPU library: importing is safe
    # MindSpeed-LLM's package __init__ would patch megatron for the whole session: its router module comes alone
    with mindspeed_llm_modules(upstream_sources, "mindspeed_llm.core.transformer.moe.router"):
        report = doctor.run_doctor(profile="npu", quiet=True)

    targets = [t for t in report["targets"] if t["kind"] == "target"]
    declared = {t.path for name in PATCH_MODULES for t in import_module(f"mindspeed_rl_r3.patches.{name}").TARGETS}
    names = {t["name"] for t in targets}
    assert names <= declared and {n for n in declared - names if not n.startswith("megatron.")} == set()
    assert "mindspeed_rl.workers.reference_worker.ReferenceWorkerBase.compute_ref_log_prob" in names
    for target in targets:
        assert target["found"] and target["compatible"] and target["source"] == "import", target
    assert {t["module"] for t in targets} == set(PATCH_MODULES)
    assert "vllm_capture" in PATCH_MODULES  # vLLM's own capture is checked too (the real vLLM 0.11 here)
    assert "vllm.model_executor.layers.fused_moe.layer.FusedMoE.forward_impl" in names
    assert report["ok"] and report["missing_required"] == [] and report["incompatible"] == []
    # the one diagnostic: upstream's weight adaptor maps LoRA names to parameters the LoRA model does not have
    # (what mindspeed_rl_lora fixes); doctor runs without the patches, so it is reported, not failing
    assert report["diagnostics_failed"] == [LORA_PROBE]
    probe = next(t for t in report["targets"] if t["name"] == LORA_PROBE)
    assert "not a parameter of the LoRA model" in probe["detail"]
    assert report["versions"]["vllm"].startswith("0.11.0") and report["versions"]["megatron"] == "0.12.1"
