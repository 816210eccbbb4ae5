"""The rollout side against fakes (MindSpeed-RL's actor worker, vLLM engine; vllm-ascend): partial-rollout joins,
and the worker tests/test_integration_pipeline.py builds. Not yet migrated to the real modules. Against the real
modules: token prompts, capture, log-probs and the dispatch in tests/upstream/test_rollout_engine.py and
test_workers.py, AQN after each weight sync in tests/upstream/test_rollout_aqn.py, refusals at initialize in
tests/upstream/test_defects.py."""


import torch

from mindspeed_rl_r3.integration.settings import ROLLOUT_LOG_PROBS, ROUTED_EXPERTS
from mindspeed_rl_r3.routing import decode, token_fingerprint
from tests.fake_llm import IM_START, FakeLLM, TinyMoE, Tokenizer
from tests.integration_support import (  # noqa: F401  (fixtures)
    OneRank,
    fakes,
    generate_config,
    integration,
    megatron_config,
    rl_config,
)

LAYERS, EXPERTS, TOPK = 3, 8, 2
HF_CONFIG = {"num_hidden_layers": LAYERS, "num_experts": EXPERTS, "num_experts_per_tok": TOPK}
PROMPTS = [torch.tensor([IM_START, 11, 12, 13, 14]), torch.tensor([IM_START, 21, 22, 23])]


def expected_routing(model, tokens):
    """Top-k sets the model routes ``tokens`` to, ``[len, layers, k]`` sorted, recomputed without capture."""
    h = model.embed_tokens[tokens]
    out = []
    for layer in model.layers:
        x = layer.post_attention_layernorm(h)
        logits = x @ layer.gate
        out.append(torch.softmax(logits, -1).topk(TOPK, dim=-1).indices.sort(-1).values)
        h = h + layer.experts(x, logits)
    return torch.stack(out, dim=1)


def build_worker(*, partial=False, n=2, **rl_overrides):
    from mindspeed_rl.models.actor_rollout_hybrid import ActorRolloutHybrid
    from mindspeed_rl.models.rollout.vllm_engine import VLLMInferEngine
    from mindspeed_rl.workers.actor_hybrid_worker import ActorHybridWorkerBase
    from mindspeed_rl.workers.resharding.megatron_sharding_manager import MegatronShardingManager

    tokenizer = Tokenizer(64)
    model = TinyMoE(LAYERS, EXPERTS, TOPK)
    llm = FakeLLM(model, tokenizer)
    engine = VLLMInferEngine(
        sampling_config={"num_completions": n, "max_tokens": 6, "logprobs": 1}, llm=llm, hf_config=HF_CONFIG,
        tokenizer=tokenizer,
    )  # fmt: skip
    trained = {name: p.detach().clone() for name, p in model.named_parameters()}
    reference = TinyMoE(LAYERS, EXPERTS, TOPK)  # the same weights; the engine's are offloaded between rollouts
    manager = MegatronShardingManager(engine, weight_source=lambda: {k: v.clone() for k, v in trained.items()})
    rl = rl_config(n_samples_per_prompt=n, partial_rollout_max_split=2 if partial else 1, **rl_overrides)
    mc = megatron_config(num_layers=LAYERS)
    train_model = [torch.nn.Linear(2, 2)]
    worker = ActorHybridWorkerBase(
        mc, rl, generate_config(sampling_config={"max_tokens": 6, "logprobs": 1}), None, lambda config: None,
        tokenizer=tokenizer, get_megatron_module=lambda: {"parallel_state": OneRank()}, model=train_model,
        inference_model=engine, sharding_manager=manager,
        actor_hybrid=ActorRolloutHybrid(train_model, inference_model=engine, sharding_manager=manager),
    )  # fmt: skip
    return worker, reference, trained


def dock(worker, partial=False):
    from mindspeed_rl.trainer.utils.transfer_dock import GRPOTransferDock, put_prompts_experience
    from mindspeed_rl.utils.pad_process import padding_dict_to_tensor_dict

    n = worker.rl_config.n_samples_per_prompt
    td = GRPOTransferDock.remote(
        prompts_num=len(PROMPTS), n_samples_per_prompt=n, max_age=2 if partial else 1, GBS_train=len(PROMPTS),
        addition_columns=[ROUTED_EXPERTS, ROLLOUT_LOG_PROBS],
    )  # fmt: skip
    worker.init_transfer_dock(td)
    batch = {"prompts": PROMPTS}
    if partial:  # what the trainer patch's prompt put adds
        batch |= {
            ROUTED_EXPERTS: [torch.tensor([-1], dtype=torch.int32)] * 2,
            ROLLOUT_LOG_PROBS: [torch.tensor([-1.0])] * 2,
        }
    data, indexes = put_prompts_experience(batch, n, [ROUTED_EXPERTS, ROLLOUT_LOG_PROBS] if partial else [])
    if partial:
        data = padding_dict_to_tensor_dict(
            {k: [row[: int(n)] for row, n in zip(v, data["original_length"][i * len(v) :], strict=False)]
             for i, (k, v) in enumerate(data.items()) if k != "original_length"}
        )  # fmt: skip
    td.put_experience.remote(data, indexes=indexes, is_prompt=True)
    return td.instance


def test_partial_rollout_joins_segments_like_tokens(fakes, integration):  # noqa: F811
    integration()
    worker, model, _ = build_worker(partial=True, n=1)
    worker.initialize()
    td = dock(worker, partial=True)
    worker.generate_sequences()
    first = [decode(td.experience_data[ROUTED_EXPERTS][i]) for i in range(2)]
    first_lp = [td.experience_data[ROLLOUT_LOG_PROBS][i].clone() for i in range(2)]
    assert all(td.experience_data["response_length"][i].item() == 3 for i in range(2))
    td.experience_consumer_status["actor_rollout"].zero_()  # the dock hands unfinished samples out again
    worker.generate_sequences()
    for i in range(2):
        ids = td.experience_data["input_ids"][i].long()
        trace = decode(td.experience_data[ROUTED_EXPERTS][i])
        assert ids.numel() == PROMPTS[i].numel() + 6 and trace.rows == ids.numel() - 1
        assert torch.equal(trace.ids[: first[i].rows], first[i].ids)
        assert torch.equal(trace.ids.long().sort(-1).values, expected_routing(model, ids[:-1]))
        assert torch.equal(td.experience_data[ROLLOUT_LOG_PROBS][i][:3], first_lp[i])
        assert trace.token_hash == token_fingerprint(ids)
