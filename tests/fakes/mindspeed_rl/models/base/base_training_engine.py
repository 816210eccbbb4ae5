"""Fake ``mindspeed_rl/models/base/base_training_engine.py::BaseTrainingEngine`` at 05a90d77 (rewritten, reduced).

Kept, as upstream: ``_split_batches`` (every tensor key split on dim 0) and ``_split_batches_with_dynamic_bsz``
(every tensor key indexed by each partition of ``rearrange_micro_batches``); ``_forward_backward_batch`` builds the
micro-batch iterator and a ``forward_step(batch_iter, model)`` closure that calls ``_get_forward_batch_info`` once
per micro-batch before the model call, then runs ``forward_backward_func``; with dynamic batch size the forward-only
outputs are put back in batch order. ``_get_forward_batch_info`` builds labels (input ids shifted left) and the
sequence mask, packs with ``preprocess_packed_seqs`` (multiple ``2*tp*cp`` for ``megatron_cp_algo``, else
``tp*cp``) under remove-padding, and slices for CP. ``forward`` / ``update`` move data to the model's device first.
Reduced: no PP, no multimodal, the loss from the fake ``LossFuncFactory``.
"""

import itertools
import random
from functools import partial

import torch

from mindspeed_rl.models.loss.loss_func_factory import LossFuncFactory
from mindspeed_rl.utils.compute import get_parallel_state
from mindspeed_rl.utils.context_parallel import get_batch_on_this_cp_rank
from mindspeed_rl.utils.remove_padding import preprocess_packed_seqs
from mindspeed_rl.utils.seqlen_balancing import get_reverse_idx, rearrange_micro_batches
from mindspeed_rl.utils.utils import generate_mask, generate_position_ids


class BaseTrainingEngine:
    def __init__(
        self,
        model,
        optimizer=None,
        opt_param_scheduler=None,
        megatron_config=None,
        beta=0,
        mini_batch_size_per_dp=1,
        epochs=1,
        shuffle_mini_batch=False,
        stage=None,
        kl_ctrl=0.0,
        clip_ratio=0.1,
        temperature=1.0,
        role=None,
        micro_batch_size=1,
        reuse_image_embeds=False,
        forward_backward_func=None,
        **kwargs,
    ):
        self.model = model
        self.optimizer = optimizer
        self.megatron_config = megatron_config
        self.mini_batch_size_per_dp = mini_batch_size_per_dp
        self.epochs = epochs
        self.shuffle_mini_batch = shuffle_mini_batch
        self.stage = stage
        self.role = role
        self.temperature = temperature
        self.micro_batch_size = micro_batch_size
        self.forward_backward_func = forward_backward_func
        self.loss_func = LossFuncFactory.get_instance(stage, role)
        self.use_remove_padding = kwargs.get("use_remove_padding", False)
        self.use_dynamic_bsz = kwargs.get("use_dynamic_bsz", False)
        self.max_packing_token_size = {"actor": kwargs.get("actor_max_packing_token_size"),
                                       "update": kwargs.get("update_max_packing_token_size")}  # fmt: skip
        self.dynamic_max_batch_size = {"actor": kwargs.get("actor_dynamic_max_batch_size"),
                                       "update": kwargs.get("update_dynamic_max_batch_size")}  # fmt: skip
        self._actual_seq_len = None  # mindspeed's set_actual_seq_len / get_actual_seq_len global
        self.set_actual_seq_len = kwargs.get(
            "set_actual_seq_len", lambda value: setattr(self, "_actual_seq_len", value)
        )
        self.get_actual_seq_len = kwargs.get("get_actual_seq_len", lambda: self._actual_seq_len)
        self.set_position_ids = kwargs.get("set_position_ids", lambda value: None)
        self.kl_ctrl = kl_ctrl

    @staticmethod
    def _split_batches(batch, batch_size, shuffle_mini_batch, dim=0, keep_list=False):
        batches = []
        for key, value in batch.items():
            for i, part in enumerate(torch.split(value, batch_size, dim)):
                if i >= len(batches):
                    batches.append({})
                batches[i][key] = part
        if shuffle_mini_batch:
            random.shuffle(batches)
        return batches

    @staticmethod
    def _split_batches_with_dynamic_bsz(batch, max_packing_token, dynamic_max_batch_size):
        lens = [int(p) + int(r) for p, r in zip(batch["prompt_length"], batch["response_length"], strict=True)]
        partitions = rearrange_micro_batches(lens, max_packing_token, dynamic_max_batch_size=dynamic_max_batch_size)
        batches = [{key: value[partition] for key, value in batch.items()} for partition in partitions]
        return batches, partitions

    def get_loss_meta_func(self):
        return {}

    def _forward_backward_batch(self, batch, forward_only=False):
        if self.use_dynamic_bsz:
            key = "actor" if forward_only else "update"
            batches, indices = self._split_batches_with_dynamic_bsz(
                batch, self.max_packing_token_size[key], self.dynamic_max_batch_size[key]
            )
        else:
            batches = self._split_batches(batch, self.micro_batch_size, self.shuffle_mini_batch)
        n_micro_batch = len(batches)
        batch_size = batch["input_ids"].shape[0]
        seq_len = batches[0]["input_ids"].shape[1]
        data_iter = iter(batches)
        self.loss_func.add_loss_meta_info(self.get_loss_meta_func())

        def forward_step(batch_iter, model):
            if self.use_remove_padding:
                input_ids, position_ids, process_batch, seqlens, cu_seqlens_padded, index = (
                    self._get_forward_batch_info(batch_iter)
                )
                output = model(input_ids=input_ids, attention_mask=None, position_ids=position_ids)
                output.div_(self.temperature)
                return output, partial(
                    self.loss_func.compute_loss, batch=process_batch, forward_only=forward_only,
                    use_remove_padding=True, seqlens_in_batch=seqlens, cu_seqlens_padded=cu_seqlens_padded,
                    seq_len=seq_len, use_dynamic_bsz=self.use_dynamic_bsz,
                    actual_micro_batch_size=batch_size / n_micro_batch, index=index,
                )  # fmt: skip
            input_ids, position_ids, process_batch, index = self._get_forward_batch_info(batch_iter)
            output = model(input_ids=input_ids, attention_mask=None, position_ids=position_ids)
            output.div_(self.temperature)
            return output, partial(
                self.loss_func.compute_loss, batch=process_batch, forward_only=forward_only,
                use_dynamic_bsz=self.use_dynamic_bsz, actual_micro_batch_size=batch_size / n_micro_batch, index=index,
            )  # fmt: skip

        losses = self.forward_backward_func(
            forward_step_func=forward_step,
            data_iterator=data_iter,
            model=self.model,
            num_microbatches=n_micro_batch,
            seq_length=seq_len,
            micro_batch_size=self.micro_batch_size,
            forward_only=forward_only,
            collect_non_loss_data=forward_only,
        )
        if self.use_dynamic_bsz and forward_only:
            flat = torch.cat(losses, dim=0)
            order = get_reverse_idx(list(itertools.chain.from_iterable(indices)))
            losses = [flat[[i]] for i in order]
        return losses

    def _get_batch_data_with_cp(self, batch, input_ids, position_ids, labels):
        batch_cp, index = get_batch_on_this_cp_rank(
            self.megatron_config,
            {"input_ids": input_ids, "position_ids": position_ids, "labels": labels},
            self.get_actual_seq_len(),
        )
        batch.update(batch_cp)
        return batch["input_ids"], batch["position_ids"], batch, index

    def _get_forward_batch_info(self, batch_iter):
        batch = next(batch_iter)
        input_ids = batch["input_ids"]
        labels = torch.cat([input_ids[:, 1:], torch.zeros_like(input_ids[:, :1])], dim=1)
        batch["labels"] = labels
        mask = generate_mask(input_ids, batch["prompt_length"] + batch["response_length"])
        state = get_parallel_state()
        cp = state.get_context_parallel_world_size()
        index = None
        if self.use_remove_padding:
            tp = state.get_tensor_model_parallel_world_size()
            multiple = 2 * tp * cp if self.megatron_config.context_parallel_algo == "megatron_cp_algo" else tp * cp
            input_ids, position_ids, labels, seqlens, cu = preprocess_packed_seqs(input_ids, labels, mask, multiple)
            batch["labels"] = labels
            self.set_actual_seq_len(cu)
            if cp > 1:
                input_ids, position_ids, batch, index = self._get_batch_data_with_cp(
                    batch, input_ids, position_ids, labels
                )
            return input_ids, position_ids, batch, seqlens, cu, index
        position_ids = torch.tensor(generate_position_ids(input_ids))
        if cp > 1:
            input_ids, position_ids, batch, index = self._get_batch_data_with_cp(batch, input_ids, position_ids, labels)
        return input_ids, position_ids, batch, index

    def post_process_forward_backward_output(self, output, batch):
        return output, batch

    def forward(self, data):
        device = next(self.model[0].parameters()).device
        data = {k: v.to(device) for k, v in data.items()}
        with torch.no_grad():
            output = self._forward_backward_batch(data, forward_only=True)
        return self.post_process_forward_backward_output(output=output, batch=data)

    def update(self, data, kl_ctrl=None):
        self.kl_ctrl = kl_ctrl
        device = next(self.model[0].parameters()).device
        data = {k: v.to(device) for k, v in data.items() if v is not None}
        metrics = {}
        for _ in range(self.epochs):
            for mini_batch in self._split_batches(data, self.mini_batch_size_per_dp, self.shuffle_mini_batch):
                for metric in self._forward_backward_batch(mini_batch):
                    for key, value in metric.items():
                        metrics.setdefault(key, []).append(value)
        return metrics
