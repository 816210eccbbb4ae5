"""MindSpeed-RL's GRPO trainer side (05a90d77): its ``RuleReward`` actor scores GSM8K answers through the real dock,
and the step metrics (MindSpeed-RL's and the package's encoded partial sums) reduce through the patched
``metrics_post_processing``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mindspeed_rl_r3.data import gsm8k_reward, synthetic_gsm8k, to_mindspeed_rl_record
from mindspeed_rl_r3.integration.metrics import max_entry, mean_entry, merge_entries, min_entry
from tests.upstream.support import R3_SECTIONS, integration, ray_cluster  # noqa: F401  (fixtures)
from tests.upstream.test_transfer_dock import activated, build_trainer, package_rl_config, put_prompts

N, PROMPTS = 2, 2
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # pad, -, eos


def save_byte_tokenizer(path: str) -> None:
    """A byte-level HF tokenizer (every text round-trips) with Qwen's special tokens; nothing to download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab |= {s: 256 + i for i, s in enumerate(SPECIALS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIALS[2], pad_token=SPECIALS[0]).save_pretrained(path)


@pytest.fixture(scope="module")
def job(ray_cluster, tmp_path_factory):  # noqa: F811
    """A ``RuleReward`` actor started as ``cli/train_grpo.py`` starts it, and the patched trainer that hands it the
    dock (the package's rl_config: ``guarantee_order: true``, ``verifier_function: [math_17k_acc]``)."""
    import ray
    from mindspeed_rl.config_cls.megatron_config import MegatronConfig
    from mindspeed_rl.utils.tokenizer import get_tokenizer
    from mindspeed_rl.workers.rule_reward import RuleReward

    path = str(tmp_path_factory.mktemp("tokenizer"))
    save_byte_tokenizer(path)
    # validate_config sets reward_dispatch_size = global_batch_size * n / nodes when the yaml leaves it out
    rl = package_rl_config(n_samples_per_prompt=N, reward_dispatch_size=PROMPTS * N)
    reward_config = MegatronConfig(
        {"tokenizer_name_or_path": path, "dataset_additional_keys": ["labels"], "global_batch_size": PROMPTS}, {}
    )
    tokenizer = get_tokenizer(path)
    reward = RuleReward.remote()
    reward.initialize.remote(reward_config, rl, tokenizer, True, dp_rank=0)
    with activated(R3_SECTIONS):
        trainer = build_trainer(rl, PROMPTS, reward_list=[reward])
    yield SimpleNamespace(trainer=trainer, reward=reward, tokenizer=tokenizer, td=trainer.transfer_dock)
    ray.kill(reward)
    ray.kill(trainer.transfer_dock)


def encode(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer.tokenizer.encode(text, add_special_tokens=False))


def test_rule_reward_scores_gsm8k_answers_through_the_dock(job):
    """math_17k_acc: 1.0 when the last ``\\boxed{}`` grades equal to the label (mathruler), else 0.0. The package's
    own GSM8K reward also accepts an unboxed final number; MindSpeed-RL's does not."""
    import ray
    from mindspeed_rl.utils.pad_process import padding_dict_to_tensor_dict

    records = [to_mindspeed_rl_record(r["question"], r["answer"]) for r in synthetic_gsm8k(PROMPTS, seed=3)]
    first, second = (r["answer"] for r in records)
    prompts = [encode(job.tokenizer, r["problem"]) for r in records]
    put_prompts(job.trainer, prompts, [encode(job.tokenizer, r["answer"]) for r in records])
    answers = [
        f"{first} is the total, so the answer is \\boxed{{{first}}}.",
        f"The answer is \\boxed{{{int(first) + 1}}}.",
        f"The train travels {second} km.",  # right number, not boxed
        f"\\boxed{{{int(second):,}.0}}",  # thousands separator and a decimal point still grade equal
    ]
    responses = [torch.cat([encode(job.tokenizer, a), torch.tensor([job.tokenizer.eod])]) for a in answers]
    output = {"responses": responses, "response_length": [torch.tensor([len(r)]) for r in responses]}
    ray.get(job.td.put_experience.remote(data_dict=padding_dict_to_tensor_dict(output), indexes=[0, 1, 2, 3]))

    ray.get(job.reward.compute_rm_score.remote())
    scores, _ = ray.get(job.td.get_experience.remote("compute_advantage", ["rm_scores"], 4, indexes=[0, 1, 2, 3]))
    assert scores["rm_scores"].reshape(-1).tolist() == [1.0, 0.0, 0.0, 1.0]
    labels = [first, first, second, second]
    assert [gsm8k_reward(a, label) for a, label in zip(answers, labels, strict=True)] == [1.0, 0.0, 1.0, 1.0]
    metrics = ray.get(job.td.get_metrics.remote()).metric
    assert metrics["math_17k_acc_rewards/mean"] == [1.0, 0.0, 0.0, 1.0]


def test_encoded_metrics_reduce_through_the_patched_post_processing(job, integration):  # noqa: F811
    """Two ranks send the package's partial sums to the dock's ``Metric`` the way workers do; MindSpeed-RL's own
    metrics (the rule reward's, the learning rate, a timing pair) come out as MindSpeed-RL computes them."""
    import copy

    import ray
    from mindspeed_rl.trainer import grpo_trainer_hybrid
    from mindspeed_rl.utils.metrics import Metric
    from mindspeed_rl.utils.utils import metrics_post_processing

    integration()
    stage = "mismatch/actor_train"
    for mean, tokens, worst, agree in ((0.5, 10, 2.0, 0.9), (0.1, 30, 5.0, 0.6)):  # one entry per rank
        entries = merge_entries(
            mean_entry(f"{stage}/k3_kl", mean, tokens), max_entry(f"{stage}/max_abs_dlogp", worst),
            min_entry("r3/actor_train/min_layer_overlap", agree),
        )  # fmt: skip
        ray.get(job.td.update_metrics.remote(value=entries, cumulate=True))
        ray.get(job.td.update_metrics.remote("timing/update", value=[100.0 + tokens, 90.0 + mean], cumulate=True))
    ray.get(job.td.update_metrics.remote(key="actor/lr", value=1e-6))
    ray.get(job.td.update_metrics.remote(value=mean_entry("mismatch/actor_log_prob/k3_kl", 0.0, 0), cumulate=True))

    metrics = job.trainer.data_strategy.get_metrics()  # what fit() post-processes every step
    theirs = Metric()
    theirs.metric = {k: copy.deepcopy(v) for k, v in metrics.metric.items() if "@" not in k}
    assert {"math_17k_acc_rewards/mean", "timing/rule_reward", "actor/lr"} <= set(theirs.metric)
    naive = metrics_post_processing(copy.deepcopy(metrics))  # unpatched: a mean of per-rank sums and maxima
    assert naive[f"{stage}/k3_kl@sum"] == pytest.approx(4.0) and naive[f"{stage}/max_abs_dlogp@max"] == 3.5

    result = grpo_trainer_hybrid.metrics_post_processing(metrics)
    ours = {k: v for k, v in result.items() if k not in theirs.metric}
    assert set(ours) == {
        f"{stage}/k3_kl", f"{stage}/max_abs_dlogp", "r3/actor_train/min_layer_overlap", "mismatch/actor_log_prob/k3_kl",
    }  # fmt: skip
    assert ours[f"{stage}/k3_kl"] == pytest.approx(0.2) and ours[f"{stage}/max_abs_dlogp"] == 5.0
    assert ours["r3/actor_train/min_layer_overlap"] == 0.6
    assert ours["mismatch/actor_log_prob/k3_kl"] != ours["mismatch/actor_log_prob/k3_kl"]  # no tokens: NaN
    assert {k: v for k, v in result.items() if k in theirs.metric} == metrics_post_processing(theirs)
    assert result["timing/update"] == pytest.approx(130.0 - 90.1) and result["actor/lr"] == 1e-6
    assert result["math_17k_acc_rewards/mean"] == 0.5
