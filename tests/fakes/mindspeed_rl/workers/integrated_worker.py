"""Fake of ``mindspeed_rl/workers/integrated_worker.py`` at 05a90d77: ``IntegratedWorker`` is a Ray actor class
(``@ray.remote(resources={"NPU": 0.7})``) whose user class sits at ``__ray_actor_class__``. Its
``compute_ref_log_prob(self)`` runs the reference forward directly when the reference is a separate model and under
``self.ref_model[0].module.module.disable_adapter()`` when ``rl_config.share_backbone``; the forward itself is
``ReferenceWorkerBase.compute_ref_log_prob``, here a call of ``self.reference_forward(self.ref_model)`` whose result
is kept in ``self.ref_output`` (the real one writes log-probs to the TransferDock).
"""


class ReferenceWorkerBase:
    def compute_ref_log_prob(self):
        self.ref_output = self.reference_forward(self.ref_model)


class _IntegratedWorker(ReferenceWorkerBase):
    def __init__(
        self,
        megatron_config,
        rl_config,
        generate_config=None,
        model_provider=None,
        initialize_func=None,
        tokenizer=None,
        get_megatron_module=None,
        profiler_config=None,
        msprobe_config=None,
        **kwargs,
    ):
        self.megatron_config = megatron_config
        self.rl_config = rl_config
        self.ref_model = None
        self.reference_forward = None
        self.ref_output = None

    def compute_ref_log_prob(self):
        if not self.rl_config.share_backbone:
            ReferenceWorkerBase.compute_ref_log_prob(self)
        else:
            with self.ref_model[0].module.module.disable_adapter():
                ReferenceWorkerBase.compute_ref_log_prob(self)


def _ray_remote(cls):
    """What ``ray.remote`` returns for a class: an instance of a class derived from the user class (so methods are
    reachable, bound), with the user class itself at ``__ray_actor_class__``."""
    derived = type(f"ActorClass({cls.__name__})", (cls,), {"__ray_actor_class__": cls})
    return derived.__new__(derived)


IntegratedWorker = _ray_remote(_IntegratedWorker)
