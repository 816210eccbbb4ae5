"""Fake ``LossFuncFactory``: the loss of (stage, role)."""

from mindspeed_rl.models.loss.base_loss_func import GRPOActorLossFunc, ReferenceLossFunc


class LossFuncFactory:
    @staticmethod
    def get_instance(stage, role):
        return ReferenceLossFunc() if role == "reference" else GRPOActorLossFunc()
