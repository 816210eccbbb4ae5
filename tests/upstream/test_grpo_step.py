"""One GRPO step of MindSpeed-RL 05a90d77 on real code, with R3 active the way a Ray worker activates it: the patched
``RayGRPOTrainer`` builds the real ``GRPOTransferDock`` actor; the real ``ActorHybridWorkerBase`` rolls out on the
real vLLM 0.11 engine (capture on), then runs its real old-log-prob and update passes on the real ``Actor`` engine
with a megatron-core Qwen3-MoE holding the rollout's weights (Megatron DDP, optimizer and LR scheduler);
``ReferenceWorkerBase.compute_ref_log_prob`` and the trainer's ``compute_advantage`` Ray task fill the columns in
between; the trainer's patched ``metrics_post_processing`` reduces the step metrics.

Rollout and training run one policy (the Megatron weights converted for vLLM, both fp32), so every router of the
update forward must pick exactly the rollout's experts, and its native choice agrees with them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mindspeed_rl_r3.integration.settings import ROLLOUT_LOG_PROBS, ROUTED_EXPERTS
from mindspeed_rl_r3.routing import decode_group
from tests.upstream.builders import IM_START, LAYERS, PAD, TOPK, megatron_qwen3, rollout_worker, save_tiny_model
from tests.upstream.builders import vllm_engine as build_engine
from tests.upstream.test_training_engine import RouterTap
from tests.upstream.test_transfer_dock import build_trainer, package_rl_config, put_prompts

pytestmark = pytest.mark.megatron

N, MAX_TOKENS = 2, 6
PROMPTS = [[IM_START, 72, 101, 108, 108, 111], [IM_START, 87, 111, 114]]
ROWS = N * len(PROMPTS)
MICRO = 2  # micro-batch size of the training passes
REWARDS = [1.0, 0.0, 0.0, 1.0]  # what the reward stage puts: group-normalised advantages of +-0.71
PASSES = ("old_log_prob", "update")
MISMATCH = ("k3_kl", "max_abs_dlogp", "mean_abs_dlogp", "extreme_token_frac")
R3 = ("set_agreement", "mean_overlap", "min_layer_overlap", "fallback_fraction")


@pytest.fixture(scope="module")
def policy(tmp_path_factory, upstream_sources, megatron):
    """The megatron-core model and a vLLM engine loaded with its weights."""
    model, hf_state = megatron_qwen3(seed=3)
    path = str(tmp_path_factory.mktemp("policy"))
    save_tiny_model(path, hf_state)
    with build_engine(path, N, MAX_TOKENS) as engine:
        yield SimpleNamespace(model=model, engine=engine)


@pytest.fixture
def training(policy, monkeypatch):
    """Megatron's DDP wrapper, optimizer (torch SGD: no Apex / TE here; no clipping, whose norm asserts CUDA tensors)
    and LR scheduler around the model; MindSpeed-RL's parallel state and vocab-parallel cross entropy set the way
    ``BaseWorker.setup_distributed_rank`` sets them."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from mindspeed_rl.models.rollout.vllm_adapter import vllm_parallel_state
    from mindspeed_rl.utils import compute

    # what VLLMInferEngine.__init__'s initialize_parallel_state records for one rank: the rollout's DP groups
    monkeypatch.setattr(vllm_parallel_state, "_TP_GROUP_RANKS", [[0]])
    monkeypatch.setattr(compute, "_ParallelState", parallel_state)
    monkeypatch.setattr(compute, "_VocabParallel", vocab_parallel_cross_entropy)
    monkeypatch.setattr(MoEAuxLossAutoScaler, "main_loss_backward_scale", None)
    parallel_state.get_moe_layer_wise_logging_tracker().clear()
    model = policy.model
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    config = OptimizerConfig(optimizer="sgd", lr=1e-2, params_dtype=torch.float32, clip_grad=0.0)
    optimizer = get_megatron_optimizer(config, [ddp])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=1e-2, min_lr=1e-2, lr_warmup_steps=0, lr_decay_steps=10,
        lr_decay_style="constant", start_wd=0.0, end_wd=0.0, wd_incr_steps=10, wd_incr_style="constant",
    )  # fmt: skip
    yield SimpleNamespace(ddp=ddp, optimizer=optimizer, scheduler=scheduler, parallel_state=parallel_state)
    parallel_state.get_moe_layer_wise_logging_tracker().clear()


def actor_worker(engine, td, rl, training):
    """The rollout worker (:func:`tests.upstream.builders.rollout_worker`) with what ``initialize`` adds for the
    training passes: the model, optimizer and scheduler, the ``ActorRolloutHybrid`` built as ``initialize`` builds it,
    megatron-core's parallel state, Megatron's schedule, the reference engine on the shared backbone, ``args``."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from mindspeed.core.context_parallel.get_batch_utils import get_actual_seq_len, set_actual_seq_len
    from mindspeed.utils import set_position_ids
    from mindspeed_rl.models.actor_rollout_hybrid import ActorRolloutHybrid
    from mindspeed_rl.models.reference import Reference

    from tests.upstream.test_batch_utils import Parallel, megatron_config

    worker = rollout_worker(engine, td, n=N, max_tokens=MAX_TOKENS, dispatch_size=ROWS)
    worker.rl_config = rl
    mc = megatron_config(Parallel(dispatcher="allgather"), moe_token_dispatcher_type="allgather",
                         global_batch_size=ROWS, micro_batch_size=MICRO)  # fmt: skip
    worker.megatron_config = mc
    worker.parallel_state = training.parallel_state
    worker.model, worker.optimizer, worker.opt_param_scheduler = [training.ddp], training.optimizer, training.scheduler
    schedule = get_forward_backward_func()
    worker.actor_hybrid = ActorRolloutHybrid(
        worker.model, megatron_config=mc, optimizer=worker.optimizer, opt_param_scheduler=worker.opt_param_scheduler,
        inference_model=engine, sharding_manager=worker.sharding_manager, beta=rl.beta,
        mini_batch_size_per_dp=ROWS, epochs=1, shuffle_mini_batch=False, stage=mc.stage,
        forward_backward_func=schedule, clip_ratio=rl.clip_ratio, micro_batch_size=MICRO, entropy_coeff=0.0,
        kl_penalty=rl.kl_penalty, temperature=1.0, token_level_loss=rl.token_level_loss,
        use_remove_padding=False, use_dynamic_bsz=False, set_actual_seq_len=set_actual_seq_len,
        get_actual_seq_len=get_actual_seq_len, set_position_ids=set_position_ids, context_parallel_size=1,
    )  # fmt: skip
    worker.reference = Reference(worker.model, megatron_config=mc, stage=mc.stage, micro_batch_size=MICRO,
                                 forward_backward_func=schedule, temperature=1.0)  # fmt: skip
    shape = engine.hf_config
    worker.args = SimpleNamespace(
        curr_iteration=0, consumed_train_samples=0, kv_channels=shape.head_dim,
        num_attention_heads=shape.num_attention_heads, hidden_size=shape.hidden_size, num_layers=LAYERS,
        seq_length=128, group_query_attention=True, num_query_groups=shape.num_key_value_heads,
        num_experts=shape.num_experts, moe_router_topk=TOPK, swiglu=True, ffn_hidden_size=shape.moe_intermediate_size,
        padded_vocab_size=shape.vocab_size,
    )  # fmt: skip
    worker.num_floating_point_operations_so_far, worker.actor_profiler = 0, None
    return worker


def replayed_rows(tap: RouterTap, input_ids: list[torch.Tensor], traces: list) -> int:
    """Every router row of a rollout token routes exactly the rollout's experts. A micro-batch's ``[b, s]`` batch
    reaches the routers s-major; its samples are told apart by their tokens. Returns the rows checked."""
    checked = 0
    for m, fed in enumerate(tap.tokens):
        seq = fed.reshape(-1, MICRO)
        for col in range(MICRO):
            (sample,) = [i for i, ids in enumerate(input_ids) if torch.equal(seq[: ids.numel(), col], ids)]
            for pos in range(input_ids[sample].numel() - 1):
                for n in tap.choices:
                    want = traces[sample].ids[pos, n - 1].long().sort().values
                    assert torch.equal(tap.choices[n][m][pos * MICRO + col], want), (sample, pos, n)
                checked += 1
    return checked


def test_one_grpo_step_replays_the_rollout_experts_and_reports_metrics(policy, training, ray_cluster, integration):
    import ray
    from mindspeed_rl.trainer import grpo_trainer_hybrid
    from mindspeed_rl.trainer.utils.compute_utils import FixedKLController
    from mindspeed_rl.utils.pad_process import padding_dict_to_tensor_dict
    from mindspeed_rl.workers.reference_worker import ReferenceWorkerBase

    integration()
    rl = package_rl_config(
        n_samples_per_prompt=N, actor_rollout_dispatch_size=ROWS, actor_logprob_dispatch_size=ROWS,
        actor_update_dispatch_size=ROWS, ref_dispatch_size=ROWS, mini_batch_size=ROWS,
    )  # fmt: skip
    trainer = build_trainer(rl, len(PROMPTS))
    trainer.tokenizer, trainer.micro_batch_size = SimpleNamespace(pad=PAD, eod=PAD), ROWS
    td = trainer.transfer_dock
    try:
        put_prompts(trainer, [torch.tensor(p) for p in PROMPTS], [torch.tensor([1]), torch.tensor([2])])
        worker = actor_worker(policy.engine, td, rl, training)
        worker.generate_sequences()
        rm = padding_dict_to_tensor_dict({"rm_scores": [torch.tensor([r]) for r in REWARDS]})
        ray.get(td.put_experience.remote(data_dict=rm, indexes=list(range(ROWS))))
        trainer.compute_advantage(blocking=True, guarantee_order=True)
        ReferenceWorkerBase.compute_ref_log_prob(worker)
        worker.compute_log_prob()
        data = ray.get(td.get_experience_data.remote())
        input_ids = [data["input_ids"][i].long() for i in range(ROWS)]
        traces = decode_group([data[ROUTED_EXPERTS][i] for i in range(ROWS)])
        before = policy.model.decoder.layers[0].mlp.router.weight.detach().clone()
        tap = RouterTap(policy.model)
        try:
            worker.update(FixedKLController(rl.init_kl_coef))
        finally:
            tap.remove()
        metrics = grpo_trainer_hybrid.metrics_post_processing(trainer.data_strategy.get_metrics())
    finally:
        ray.kill(td)

    # the update forward replayed the rollout's experts on every row a rollout token has; the rest routed natively
    checked = replayed_rows(tap, input_ids, traces)
    assert checked == sum(ids.numel() - 1 for ids in input_ids) == sum(t.rows for t in traces)
    total = sum(fed.numel() for fed in tap.tokens)
    assert metrics["r3/update/fallback_fraction"] == pytest.approx(1 - checked / total)
    assert not torch.equal(policy.model.decoder.layers[0].mlp.router.weight, before)  # the step trained the router

    # the step's metric dict, reduced by the trainer: one policy on both sides, so the live routers agree with the
    # rollout's experts everywhere and Megatron's log-probs are vLLM's
    for stage in PASSES:
        for key in [f"mismatch/{stage}/{m}" for m in MISMATCH] + [f"r3/{stage}/{m}" for m in R3]:
            assert key in metrics and metrics[key] == metrics[key], key  # present, not NaN
        assert metrics[f"r3/{stage}/set_agreement"] == 1.0 and metrics[f"r3/{stage}/min_layer_overlap"] == 1.0
        assert metrics[f"mismatch/{stage}/k3_kl"] < 1e-8 and metrics[f"mismatch/{stage}/max_abs_dlogp"] < 1e-4
    assert not any("@" in key for key in metrics)  # the package's partial sums are all reduced
    assert {"actor/pg_loss", "actor/grad_norm", "actor/lr", "timing/rollout"} <= set(metrics)
    for i in range(ROWS):
        assert torch.allclose(data["old_log_prob"][i], data[ROLLOUT_LOG_PROBS][i], atol=1e-4)
        assert torch.equal(data["ref_log_prob"][i], data["old_log_prob"][i])  # reference: the same weights
