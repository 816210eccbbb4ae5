"""Fake ``RLConfig`` (the fields the driver reads; unknown keys raise like upstream)."""

from mindspeed_rl.config_cls.base_config import BaseConfig


class RLConfig(BaseConfig):
    def __init__(self, config_dict):
        self.runtime_env_path = "configs/envs/runtime_env.yaml"
        self.is_multimodal = False
        self.hccl_buffersize = 256
        self.n_samples_per_prompt = 1
        self.use_integrated_worker = True
        self.update(config_dict)
