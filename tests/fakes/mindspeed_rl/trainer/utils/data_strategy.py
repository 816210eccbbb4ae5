"""Fake ``mindspeed_rl/trainer/utils/data_strategy.py::DataStrategy`` (TransferDock strategy ``td``; ``tq`` only
names itself). ``build_grpo`` creates the ``GRPOTransferDock`` with ``addition_columns``."""

from mindspeed_rl.trainer.utils.transfer_dock import GRPOTransferDock


class DataStrategy:
    def __init__(self, rl_config, strategy=None):
        self.rl_config = rl_config
        self.strategy = {"transfer_dock": "td", "transfer_queue": "tq"}.get(
            strategy or getattr(rl_config, "data_strategy", "td"), strategy or getattr(rl_config, "data_strategy", "td")
        )
        self.td = None
        self.mm_td = None

    def build_grpo(
        self,
        prompts_num,
        n_samples_per_prompt,
        metrics,
        max_age,
        gbs_train,
        addition_columns=None,
        reuse_image_embeds=False,
        dataset_additional_keys=None,
    ):
        self.td = GRPOTransferDock.remote(
            prompts_num=prompts_num,
            n_samples_per_prompt=n_samples_per_prompt,
            metrics=metrics,
            max_age=max_age,
            GBS_train=gbs_train,
            addition_columns=addition_columns,
        )
        return self

    def put_experience(self, data_dict, indexes, is_prompt=False):
        self.td.put_experience.remote(data_dict=data_dict, indexes=indexes, is_prompt=is_prompt)

    def get_metrics(self):
        return self.td.get_metrics.remote()

    def clear_main(self, consumer=None):
        self.td.clear.remote()
