"""Fake ``mindspeed_rl/models/reference.py::Reference``: the training engine with ``role='reference'``."""

from mindspeed_rl.models.base.base_training_engine import BaseTrainingEngine


class Reference(BaseTrainingEngine):
    def __init__(self, model, **kwargs):
        super().__init__(model, role="reference", **kwargs)

    def compute_log_prob(self, data):
        return super().forward(data)
