"""Fake ``mindspeed_rl/models/actor_rollout_hybrid.py::ActorRolloutHybrid``: the rollout keeps only the token ids
the engine returns (``generate_sequences(...)[0]``), dropping its log-probs, as upstream."""

from mindspeed_rl.models.actor import Actor


class ActorRolloutHybrid:
    def __init__(
        self, model, optimizer=None, opt_param_scheduler=None, inference_model=None, sharding_manager=None, **kwargs
    ):
        self.train_actor = Actor(model, optimizer, opt_param_scheduler, **kwargs)
        self.inference_actor = inference_model
        self.sharding_manager = sharding_manager

    def generate_sequences(self, prompts_list, indexes=None, async_engine=False, stop_singal_func=None, **kwargs):
        return self.inference_actor.generate_sequences(prompts_list, **kwargs)[0]

    def compute_log_prob(self, data):
        return self.train_actor.compute_log_prob(data)

    def update_actor(self, data, kl_ctrl=None):
        return self.train_actor.update_actor(data, kl_ctrl)
