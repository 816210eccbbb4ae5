"""One GRPO step through fakes of MindSpeed-RL's trainer, TransferDock, actor worker and engines (05a90d77), with
the patches installed by the import hook as in a Ray worker: a tiny MoE rolls out through the vllm-ascend fakes with
capture and AQN, a real megatron-core MoE replays the captured routing in the old-log-prob and update passes, and the
trainer's metric dict reports mismatch, agreement and AQN."""

import pytest
import torch

from mindspeed_rl_r3.integration.settings import ROUTED_EXPERTS
from mindspeed_rl_r3.routing import decode
from tests.integration_support import fakes, integration, no_pipelining  # noqa: F401  (fixtures)
from tests.test_integration_rollout import LAYERS, PROMPTS, build_worker

pytestmark = pytest.mark.megatron


class CausalLM(torch.nn.Module):
    """Megatron's GPT model called as MindSpeed-RL calls it (``attention_mask=None``: MindSpeed's flash attention is
    causal by itself; on CPU the causal mask is built here)."""

    def __init__(self, model):
        super().__init__()
        self.module = model

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        s = input_ids.shape[1]
        mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)
        return self.module(input_ids, position_ids, mask)


def _worker_class():
    from mindspeed_rl.models.reference import Reference
    from mindspeed_rl.utils.pad_process import truncate_rows
    from mindspeed_rl.workers.actor_hybrid_worker import ActorHybridWorkerBase

    class Worker(ActorHybridWorkerBase):
        """The integrated worker's reference role on the shared backbone (reduced)."""

        def compute_ref_log_prob(self):
            reference = Reference(self.model, megatron_config=self.megatron_config, forward_backward_func=no_pipelining)
            columns = ["input_ids", "responses", "response_length", "prompt_length"]
            for batch, index in self._stage_batches("ref_log_prob", columns, self.rl_config.ref_dispatch_size):
                output, batch = reference.compute_log_prob(batch)
                log_probs = torch.cat(output, dim=0).float()
                self.collect_transfer_dock_data(
                    {"ref_log_prob": truncate_rows(log_probs, batch["response_length"])}, index
                )

    return Worker


def _moe_logging_tracker() -> dict:
    """Megatron's global layer-wise aux-loss tracker: in parallel_state on core 0.12, in moe_utils on 0.16."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe import moe_utils

    getter = getattr(parallel_state, "get_moe_layer_wise_logging_tracker", None)
    return (getter or moe_utils.get_moe_layer_wise_logging_tracker)()


def test_one_grpo_step_replays_rollout_routing_and_reports_metrics(megatron, fakes, integration):  # noqa: F811
    integration()
    from megatron.core import parallel_state
    from mindspeed_rl.models.actor_rollout_hybrid import ActorRolloutHybrid
    from mindspeed_rl.trainer.grpo_trainer_hybrid import RayGRPOTrainer

    from tests.megatron_models import capture_routing, gpt_model, map_to_ids, moe_config

    # Megatron's layer-wise aux-loss tracker is global and sized by the first MoE model that logs: other tests build
    # 2-layer models, this one has 3.
    _moe_logging_tracker().clear()
    torch.manual_seed(0)
    model = gpt_model(moe_config(LAYERS))
    chunk = CausalLM(model)
    worker, _, _ = build_worker()
    worker.__class__ = _worker_class()
    worker.get_megatron_module = lambda: {"parallel_state": parallel_state}
    worker.parts["model"] = [chunk]
    worker.parts["actor_hybrid"] = ActorRolloutHybrid(
        [chunk], inference_model=worker.parts["inference_model"], sharding_manager=worker.parts["sharding_manager"],
        megatron_config=worker.megatron_config, forward_backward_func=no_pipelining, micro_batch_size=1,
    )  # fmt: skip
    worker.initialize()
    maps, handles = capture_routing(model)
    trainer = RayGRPOTrainer(worker, worker, [], global_batch_size=len(PROMPTS), n_samples_per_prompt=2)
    td = trainer.transfer_dock.instance
    rows = {}

    def keep_last_row(original=td.clear):
        rows["input_ids"] = td.experience_data["input_ids"][3].long()
        rows["trace"] = decode(
            td.experience_data[ROUTED_EXPERTS][3], leader=decode(td.experience_data[ROUTED_EXPERTS][2])
        )
        original()

    td.clear = keep_last_row
    try:
        (metrics,) = trainer.fit([{"prompts": PROMPTS}])
    finally:
        for h in handles:
            h.remove()
        _moe_logging_tracker().clear()
    # The last router call was the update forward of the last sample: it routed what the rollout routed.
    trace, ids = rows["trace"], rows["input_ids"]
    for j, n in enumerate(sorted(maps)):
        routed = map_to_ids(maps[n])[: ids.numel() - 1]
        assert torch.equal(routed, trace.ids[:, j].long().sort(-1).values), n
    for key in (
        "mismatch/old_log_prob/k3_kl", "mismatch/update/max_abs_dlogp", "mismatch/update/extreme_token_frac",
        "r3/old_log_prob/set_agreement", "r3/update/fallback_fraction", "r3/update/min_layer_overlap", "aqn/sigma",
    ):  # fmt: skip
        assert key in metrics and metrics[key] == metrics[key], key  # present and not NaN
    assert not any("@" in key for key in metrics)
    assert 0.0 < metrics["r3/update/fallback_fraction"] < 0.5  # each sample's last position routes natively
    assert model.decoder.layers[0].mlp.router._r3_hook.state.consumption() == {}
