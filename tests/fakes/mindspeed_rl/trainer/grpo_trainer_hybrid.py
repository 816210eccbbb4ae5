"""Fake ``mindspeed_rl/trainer/grpo_trainer_hybrid.py::RayGRPOTrainer`` at 05a90d77 (rewritten, reduced).

Kept: ``put_prompts_experience`` and ``metrics_post_processing`` are bound in this module by name;
``transfer_dock_init`` builds the dock through ``DataStrategy.build_grpo(..., addition_columns=dataset keys)`` and
hands it to the workers; ``fit`` runs upstream's stage order for each step (prompts, rollout, advantages,
reference, old log-probs unless skipped, update, metrics, clear). Rewards and advantages are zeros.
"""

import torch

from mindspeed_rl.trainer.utils.data_strategy import DataStrategy
from mindspeed_rl.trainer.utils.transfer_dock import put_prompts_experience
from mindspeed_rl.utils.metrics import Metric
from mindspeed_rl.utils.utils import metrics_post_processing


class RayGRPOTrainer:
    def __init__(
        self,
        actor_worker,
        ref_worker,
        reward_list,
        vit_worker=None,
        train_iters=1,
        save_interval=1,
        kl_ctrl_type="fixed",
        adv_estimator="group_norm",
        kl_horizon=1000,
        kl_target=100.0,
        init_kl_coef=0.01,
        global_batch_size=1,
        micro_batch_size=1,
        n_samples_per_prompt=1,
        tokenizer=None,
        dataset_additional_keys=None,
        blocking=False,
        guarantee_order=False,
        num_cpus_for_local_task=1,
        partial_rollout_max_split=1,
        **kwargs,
    ):
        self.actor_worker = actor_worker
        self.ref_worker = ref_worker
        self.reward_list = reward_list
        self.train_iters = train_iters
        self.global_batch_size = global_batch_size
        self.n_samples_per_prompt = n_samples_per_prompt
        self.dataset_additional_keys = dataset_additional_keys or []
        self.partial_rollout_max_split = partial_rollout_max_split
        self.enable_partial_rollout = partial_rollout_max_split > 1
        self.metrics = Metric()
        self.data_strategy = DataStrategy(actor_worker.rl_config)
        self.td_max_len = global_batch_size * 2 if self.enable_partial_rollout else global_batch_size
        self.transfer_dock = None
        self.transfer_dock_init()
        self.skip_actor_log_prob = False
        self.history = []

    def transfer_dock_init(self):
        self.data_strategy.build_grpo(
            prompts_num=self.td_max_len,
            n_samples_per_prompt=self.n_samples_per_prompt,
            metrics=self.metrics,
            max_age=self.partial_rollout_max_split,
            gbs_train=self.global_batch_size,
            addition_columns=self.dataset_additional_keys,
            reuse_image_embeds=False,
            dataset_additional_keys=self.dataset_additional_keys,
        )
        self.transfer_dock = self.data_strategy.td
        self.actor_worker.init_transfer_dock(self.transfer_dock)
        if self.ref_worker is not self.actor_worker:
            self.ref_worker.init_transfer_dock(self.transfer_dock)

    def _zero_advantages(self):
        td = self.transfer_dock.instance
        rows = [i for i in range(td.max_len) if td.experience_data_status["responses"][i] == 1]
        advantages = [torch.zeros(len(td.experience_data["responses"][i])) for i in rows]
        td.put_experience({"advantages": advantages}, indexes=rows)

    def fit(self, batches):
        for batch in batches:
            data, indexes = put_prompts_experience(batch, self.n_samples_per_prompt, self.dataset_additional_keys)
            self.data_strategy.put_experience(data, indexes, is_prompt=True)
            self.actor_worker.generate_sequences()
            self._zero_advantages()
            self.ref_worker.compute_ref_log_prob()
            if not self.skip_actor_log_prob:
                self.actor_worker.compute_log_prob()
            self.actor_worker.update(None, self.skip_actor_log_prob)
            self.history.append(metrics_post_processing(self.data_strategy.get_metrics()))
            self.data_strategy.clear_main()
        return self.history
