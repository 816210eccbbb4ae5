"""Fake ``GenerateConfig`` (the fields the driver reads; unknown keys raise like upstream)."""

from mindspeed_rl.config_cls.base_config import BaseConfig


class GenerateConfig(BaseConfig):
    def __init__(self, config_dict):
        self.enable_expert_parallel = False
        self.infer_expert_parallel_size = 1
        self.infer_tensor_parallel_size = 1
        self.update(config_dict)
