"""Fake ``mindspeed_rl/models/actor.py::Actor``: the training engine with ``role='actor'``."""

from mindspeed_rl.models.base.base_training_engine import BaseTrainingEngine


class Actor(BaseTrainingEngine):
    def __init__(self, model, optimizer=None, opt_param_scheduler=None, **kwargs):
        super().__init__(model, optimizer, opt_param_scheduler, role="actor", **kwargs)

    def compute_log_prob(self, data):
        return super().forward(data)

    def update_actor(self, data, kl_ctrl=None):
        return super().update(data, kl_ctrl)
