"""Fake ``mindspeed_rl/workers/base_worker.py::BaseWorker`` at 05a90d77 (rewritten, one rank per group).

``dispatch_transfer_dock_data`` asks the TransferDock for ``experience_columns`` (the dock raises for unknown ones),
removes the dock's padding, packs the columns (``pack_experience_columns``) and unpacks them right-padded with the
pad token to a multiple of ``2*tp*cp`` for ``megatron_cp_algo`` (else ``tp*cp``): the HCCL path; the broadcasts over
TP / CP / PP are the identity with one rank. It returns ``(None, None)`` when the dock has nothing ready.
``collect_transfer_dock_data`` pads the output columns (``padding_dict_to_tensor_dict``) and puts them.
``setup_distributed_rank`` calls ``initialize_func(config=...)`` (``initialize_megatron``, which installs MindSpeed's
patches) and stores ``get_megatron_module()``'s entries as attributes.
"""

import copy

import ray

from mindspeed_rl.trainer.utils.transfer_dock import pack_experience_columns, unpack_pad_experience
from mindspeed_rl.utils.compute import set_parallel_state
from mindspeed_rl.utils.pad_process import padding_dict_to_tensor_dict, remove_padding_tensor_dict_to_dict


class BaseWorker:
    def __init__(
        self,
        megatron_config=None,
        rl_config=None,
        generate_config=None,
        model_provider=None,
        initialize_func=None,
        get_megatron_module=None,
        tokenizer=None,
        profiler_config=None,
        msprobe_config=None,
        **kwargs,
    ):
        self.rl_config = rl_config
        self.megatron_config = megatron_config
        self.generate_config = generate_config
        self.model_provider = model_provider
        self.initialize_func = initialize_func
        self.get_megatron_module = get_megatron_module
        self.tokenizer = tokenizer
        self.inference_model = None
        self.sharding_manager = None
        self.model = None
        self.td = None
        self.sampling_transfer_dock = None

    def setup_distributed_rank(self):
        config = copy.deepcopy(self.megatron_config)
        self.initialize_func(config=config)
        for key, value in self.get_megatron_module().items():
            setattr(self, key, value)
        set_parallel_state(self.parallel_state)

    def dispatch_transfer_dock_data(
        self,
        experience_consumer_stage,
        experience_columns,
        experience_count,
        tp_size=1,
        cp_size=1,
        cp_algo=None,
        use_vllm=False,
        indexes=None,
        get_n_samples=True,
        enable_partial_rollout=False,
        is_generate=False,
    ):
        pad_id = self.tokenizer.pad if self.tokenizer.pad else self.tokenizer.eod
        batch_data, index = ray.get(
            self.td.get_experience.remote(
                experience_consumer_stage, experience_columns, experience_count, indexes=indexes,
                get_n_samples=get_n_samples,
            )
        )  # fmt: skip
        if not index:
            return None, None
        batch_data = remove_padding_tensor_dict_to_dict(batch_data)
        batch_data, batch_data_length = pack_experience_columns(
            experience_consumer_stage, batch_data, len(index), enable_partial_rollout=enable_partial_rollout
        )
        multiple = 2 * tp_size * cp_size if cp_algo == "megatron_cp_algo" else tp_size * cp_size
        return unpack_pad_experience(batch_data, batch_data_length, pad_id, multiple), index

    def collect_transfer_dock_data(self, output, index, use_vllm=False, is_generate=False, sync=False):
        output = {k: v.cpu() if not isinstance(v, list) else v for k, v in output.items()}
        ray.get(self.td.put_experience.remote(data_dict=padding_dict_to_tensor_dict(output), indexes=index))
