"""Fake ``mindspeed_rl/workers/actor_hybrid_worker.py::ActorHybridWorkerBase`` at 05a90d77 (rewritten, reduced).

Kept from upstream: the stage methods' hard-coded column lists and consumer names; ``generate_sequences`` enters
infer mode (weight sync), dispatches ``actor_rollout`` rows (``prompts, prompt_length``, plus ``responses,
response_length`` with partial rollout) and runs ``sync_generate_process``, which sends one prompt per GRPO group to
the engine (prompt ⊕ response so far with partial rollout), cuts the responses at the first pad, builds
``input_ids = prompt ⊕ response`` and puts ``responses, input_ids, response_length`` (and ``rollout_completed``);
``compute_log_prob`` writes ``old_log_prob`` cut to each response length; ``update`` trains on ``actor_train`` rows
and advances ``iteration``. ``initialize`` here wires pre-built parts passed as keyword arguments (``model``,
``inference_model``, ``sharding_manager``, ``actor_hybrid``) after ``setup_distributed_rank``.
"""

import copy

import torch

from mindspeed_rl.utils.pad_process import remove_padding_and_split_to_list, truncate_rows
from mindspeed_rl.workers.base_worker import BaseWorker


class ActorHybridWorkerBase(BaseWorker):
    def __init__(
        self,
        megatron_config,
        rl_config,
        generate_config,
        model_provider,
        initialize_func,
        tokenizer=None,
        get_megatron_module=None,
        profiler_config=None,
        msprobe_config=None,
        **kwargs,
    ):
        super().__init__(
            megatron_config, rl_config, generate_config, model_provider=model_provider,
            initialize_func=initialize_func, tokenizer=tokenizer, get_megatron_module=get_megatron_module,
        )  # fmt: skip
        self.parts = kwargs
        self.iteration = 0
        self.actor_hybrid = None
        self.enable_partial_rollout = rl_config.partial_rollout_max_split > 1

    def initialize(self):
        self.setup_distributed_rank()
        self.model = self.parts["model"]
        self.inference_model = self.parts["inference_model"]
        self.sharding_manager = self.parts["sharding_manager"]
        self.actor_hybrid = self.parts["actor_hybrid"]

    def init_transfer_dock(self, td, mm_td=None, sampling_transfer_dock=None, mm_sampling_transfer_dock=None):
        self.td = td

    def generate_sequences(self):
        self.sharding_manager.enter_infer_mode()
        columns = ["prompts", "prompt_length"]
        if self.enable_partial_rollout:
            columns.extend(["responses", "response_length"])
        count = self.rl_config.actor_rollout_dispatch_size
        pad_token_id = self.tokenizer.pad if self.tokenizer.pad else self.tokenizer.eod
        while True:
            batch_data, index = self.dispatch_transfer_dock_data(
                "actor_rollout", columns, count, use_vllm=True, get_n_samples=not self.enable_partial_rollout,
                enable_partial_rollout=self.enable_partial_rollout, is_generate=True,
            )  # fmt: skip
            if not index:
                break
            self.sync_generate_process(batch_data, count, index, pad_token_id)
        self.sharding_manager.exit_infer_mode()

    def sync_generate_process(self, batch_data, experience_count, index, pad_token_id):
        n = self.rl_config.n_samples_per_prompt
        if not self.enable_partial_rollout:
            rows = list(range(0, len(index), n))
            prompts = truncate_rows(batch_data["prompts"][rows], batch_data["prompt_length"][rows])
            prompts_list = [p.tolist() for p in prompts]
            responses_pad_right = self.actor_hybrid.generate_sequences(
                copy.deepcopy(prompts_list), extra_info=batch_data
            )
        else:
            prompt_length_data = batch_data["prompt_length"]
            responses_partial = truncate_rows(batch_data["responses"], batch_data["response_length"])
            prompts = truncate_rows(batch_data["prompts"], prompt_length_data)
            prompts_list = [torch.cat((p, r)).tolist() for p, r in zip(prompts, responses_partial, strict=True)]
            max_tokens = self.generate_config.sampling_config["max_tokens"] // self.rl_config.partial_rollout_max_split
            responses_pad_right = self.actor_hybrid.generate_sequences(
                copy.deepcopy(prompts_list), max_tokens=max_tokens, n=1, extra_info=batch_data
            )
        responses = remove_padding_and_split_to_list(responses_pad_right, self.tokenizer.eod, pad_token_id)
        if self.enable_partial_rollout:
            responses = [torch.cat((old, new)) for old, new in zip(responses_partial, responses, strict=True)]
        else:
            prompts = [copy.deepcopy(p) for p in prompts for _ in range(n)]
        lengths = [torch.tensor([len(r)]) for r in responses]
        outputs = {
            "responses": responses,
            "input_ids": [torch.cat((p, r)) for p, r in zip(prompts, responses, strict=True)],
            "response_length": lengths,
        }
        if self.enable_partial_rollout:
            done = []
            for r in responses:
                finished = (len(r) and r[-1] == self.tokenizer.eod) or len(r) >= self.generate_config.sampling_config[
                    "max_tokens"
                ]
                done.append(torch.tensor([1 if finished else 0]))
            outputs["rollout_completed"] = done
        self.collect_transfer_dock_data(outputs, index, use_vllm=True, is_generate=True)

    def async_generate_process(self, batch_data, index, pad_token_id):
        raise NotImplementedError("the fake covers the synchronous rollout only")

    def _stage_batches(self, consumer, columns, count):
        while True:
            batch, index = self.dispatch_transfer_dock_data(
                consumer, columns, count, self.megatron_config.tensor_model_parallel_size,
                self.megatron_config.context_parallel_size, self.megatron_config.context_parallel_algo,
                get_n_samples=self.enable_partial_rollout,
            )  # fmt: skip
            if not index:
                return
            yield batch, index

    def compute_log_prob(self):
        columns = ["input_ids", "responses", "response_length", "prompt_length"]
        for batch, index in self._stage_batches("actor_log_prob", columns, self.rl_config.actor_logprob_dispatch_size):
            output, batch = self.actor_hybrid.compute_log_prob(batch)
            log_probs = torch.cat(output, dim=0).to(torch.float32)
            self.collect_transfer_dock_data({"old_log_prob": truncate_rows(log_probs, batch["response_length"])}, index)

    def update(self, kl_ctrl=None, skip_actor_log_prob=False):
        columns = [
            "responses",
            "advantages",
            "old_log_prob",
            "ref_log_prob",
            "input_ids",
            "response_length",
            "prompt_length",
        ]
        if skip_actor_log_prob:
            columns.remove("old_log_prob")
        for batch, _ in self._stage_batches("actor_train", columns, self.rl_config.actor_update_dispatch_size):
            self.actor_hybrid.update_actor(batch, kl_ctrl)
        self.iteration += 1
