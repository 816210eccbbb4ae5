"""Fake ``mindspeed_rl/workers/resharding/megatron_sharding_manager.py::MegatronShardingManager`` (reduced).

``enter_infer_mode`` builds fresh inference buffers from the training model (``weight_source()``, the role of the
weight container's ``get_infer_params``) and hands them to ``inference_engine.sync_model_weights`` (which rebinds,
no copy); ``exit_infer_mode`` offloads the inference weights.
"""


class MegatronShardingManager:
    def __init__(self, inference_engine, optimizer=None, weight_source=None, **kwargs):
        self.inference_engine = inference_engine
        self.optimizer = optimizer
        self.weight_source = weight_source
        self.syncs = 0

    def enter_infer_mode(self):
        self.inference_engine.sync_model_weights(self.weight_source(), load_format="megatron")
        self.syncs += 1

    def exit_infer_mode(self):
        self.inference_engine.offload_model_weights()

    def enter_forward_mode(self):
        pass

    def exit_forward_mode(self):
        pass

    def enter_train_mode(self):
        pass

    def exit_train_mode(self):
        pass
