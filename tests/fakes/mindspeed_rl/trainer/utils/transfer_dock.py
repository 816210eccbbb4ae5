"""Fake ``mindspeed_rl/trainer/utils/transfer_dock.py`` at 05a90d77 (rewritten, same rules).

``GRPOTransferDock`` keeps its fixed column and consumer lists plus ``addition_columns``; ``put_experience`` and
``get_experience`` raise ``ValueError`` for a column outside them with upstream's messages. Rows are stored
unpadded (``put_experience`` removes the padding ``padding_dict_to_tensor_dict`` added; int64 becomes int32) and
handed out padded again. Deviation: upstream waits for a row that is not ready yet; the fake raises
``TimeoutError`` instead of hanging a test. ``GRPOTransferDock`` is an in-process stand-in for the Ray actor
(``.remote(...)`` builds it, ``.method.remote(...)`` calls it; tests make ``ray.get`` return plain values).

``pack_experience_columns`` / ``unpack_pad_experience`` are the dispatch's wire steps: rows concatenated per column
with their lengths, then right-padded to the longest rounded up to ``multiple`` (ints with ``pad_id``, floats with 0).
"""

import copy

import torch
from torch.nn.utils.rnn import pad_sequence

from mindspeed_rl.utils.metrics import Metric
from mindspeed_rl.utils.pad_process import padding_dict_to_tensor_dict, remove_padding_tensor_dict_to_dict
from tests.inline_actors import inline_remote


class TransferDock:
    def __init__(self, prompts_num, n_samples_per_prompt, experience_columns, timeout=None, timeout_interval=None):
        self.prompts_num = prompts_num
        self.n_samples_per_prompt = n_samples_per_prompt
        self.max_len = prompts_num * n_samples_per_prompt
        self.experience_columns = experience_columns or []
        self._clear_experience_data_and_status()

    def _put(self, experience_columns, experience, indexes=None):
        for column in experience_columns:
            if column not in self.experience_columns:
                raise ValueError(
                    f"put experience ERROR: {column} not in TD experience_column {self.experience_columns}"
                )
        if not indexes:
            raise ValueError("put experience into TD without indexes, indexes must be provided")
        for c, column in enumerate(experience_columns):
            for i, idx in enumerate(indexes):
                if idx >= 0:
                    self.experience_data[column][idx] = experience[c][i]
                    self.experience_data_status[column][idx] = 1

    def _get(self, experience_columns, indexes):
        out = []
        for column in experience_columns:
            missing = [i for i in indexes if self.experience_data_status[column][i] != 1]
            if missing:
                raise TimeoutError(f"TD column {column} not ready for rows {missing}")
            out.append([self.experience_data[column][i] for i in indexes])
        return out

    def _clear_experience_data_and_status(self, indexes=None):
        self.experience_data = {k: [None] * self.max_len for k in self.experience_columns}
        self.experience_data_status = {k: torch.zeros(self.max_len, dtype=torch.int32) for k in self.experience_columns}


class _GRPOTransferDock(TransferDock):
    def __init__(
        self,
        prompts_num,
        n_samples_per_prompt,
        metrics=None,
        max_age=1,
        GBS_train=0,
        addition_columns=None,
        addition_consumers=None,
        timeout=None,
        timeout_interval=None,
    ):
        self.experience_columns = [
            "prompts", "prompt_length", "responses", "response_length", "attention_mask", "labels", "input_ids",
            "input_ids_length", "actor_rollout", "rm_scores", "token_level_rewards", "old_log_prob", "ref_log_prob",
            "advantages", "returns",
        ]  # fmt: skip
        self.experience_consumers = [
            "trainer", "actor_rollout", "actor_image_embeds", "actor_log_prob", "ref_log_prob", "actor_train",
            "compute_advantage", "rule_reward", "reward_scores", "grpo_metrics",
        ]  # fmt: skip
        for column in addition_columns or []:
            if column not in self.experience_columns:
                self.experience_columns.append(column)
        for consumer in addition_consumers or []:
            if consumer not in self.experience_consumers:
                self.experience_consumers.append(consumer)
        super().__init__(prompts_num, n_samples_per_prompt, self.experience_columns, timeout, timeout_interval)
        self.experience_consumer_status = {
            k: torch.zeros(self.max_len, dtype=torch.int32) for k in self.experience_consumers
        }
        self.max_age = max_age
        self.GBS_train = GBS_train
        self.enable_partial_rollout = max_age > 1
        self.rollout_completed = torch.zeros(self.max_len, dtype=torch.int32)
        self.metrics = metrics if metrics is not None else Metric()

    def get_metrics(self):
        return copy.deepcopy(self.metrics)

    def update_metrics(self, key="", value=None, cumulate=False):
        self.metrics.update(key, value, cumulate=cumulate)

    def all_consumed(self, consumer, get_n_samples=True):
        return bool(self.experience_consumer_status[consumer].sum() == self.max_len)

    def get_experience(
        self,
        consumer,
        experience_columns,
        experience_count=None,
        dp_size=1,
        indexes=None,
        get_n_samples=True,
        use_batch_seqlen_balance=False,
        allow_partial_ready_data=False,
    ):
        if consumer not in self.experience_consumers:
            raise ValueError(
                f"get experience ERROR: {consumer} not in TD experience_consumers {self.experience_consumers}"
            )
        for column in experience_columns:
            if column not in self.experience_columns:
                raise ValueError(
                    f"get experience ERROR: {column} not in TD experience_column {self.experience_columns}"
                )
        if indexes is None:
            ready = torch.ones(self.max_len, dtype=torch.bool)
            for column in experience_columns:
                ready &= self.experience_data_status[column] == 1
            ready &= self.experience_consumer_status[consumer] == 0
            indexes = ready.nonzero().flatten().tolist()[:experience_count]
            if not indexes:
                return None, None
        self.experience_consumer_status[consumer][indexes] = 1
        experience = self._get(experience_columns, indexes)
        return padding_dict_to_tensor_dict(dict(zip(experience_columns, experience, strict=True))), indexes

    def put_experience(self, data_dict, indexes=None, is_prompt=False):
        if not indexes:
            raise ValueError("put experience into TD without indexes, indexes must be provided")
        data_dict = remove_padding_tensor_dict_to_dict(data_dict)
        columns, experience = trans_input_to_experience(data_dict)
        if "rollout_completed" in columns:
            c = columns.index("rollout_completed")
            completed = experience.pop(c)
            columns.pop(c)
            for i, idx in enumerate(indexes):
                if idx >= 0 and int(completed[i][0]) == 1:
                    self.rollout_completed[idx] = 1
        self._put(columns, experience, indexes)
        if self.enable_partial_rollout and is_prompt:
            for i in indexes:
                self.experience_data["responses"][i] = torch.tensor([-1], dtype=torch.int32)
                self.experience_data["response_length"][i] = torch.tensor([0], dtype=torch.int32)
                self.experience_data_status["responses"][i] = 1
                self.experience_data_status["response_length"][i] = 1

    def clear(self, consumer="actor_train"):
        self.experience_consumer_status = {
            k: torch.zeros(self.max_len, dtype=torch.int32) for k in self.experience_consumers
        }
        self._clear_experience_data_and_status()
        self.metrics.reset()


GRPOTransferDock = inline_remote(_GRPOTransferDock)


def trans_input_to_experience(experience_dict):
    columns, values = [], []
    for key, value in experience_dict.items():
        if value is None:
            continue
        columns.append(key)
        if isinstance(value, torch.Tensor):
            value = list(torch.unbind(value.to(torch.int32) if value.dtype == torch.int64 else value, dim=0))
        elif isinstance(value, list):
            value = [v.to(torch.int32) if v.dtype == torch.int64 else v for v in value]
        else:
            raise ValueError(f"value type {type(value)} not supported")
        values.append(value)
    return columns, values


def pack_experience_columns(experience_consumer_stage, experience_dict, experience_count, enable_partial_rollout=False):
    if not experience_dict:
        raise ValueError("ERROR: when pack, get an empty experience_dict")
    batch_data, batch_data_length = {}, {}
    for key, rows in experience_dict.items():
        if (
            not (enable_partial_rollout and experience_consumer_stage == "actor_rollout")
            and len(rows) != experience_count
        ):
            raise ValueError(
                f"ERROR: when pack, experience '{key}' number={len(rows)} does not match {experience_count=}"
            )
        if rows[0].dim() > 1:
            if any(r.shape[0] != rows[0].shape[0] for r in rows):
                raise ValueError("ERROR: when pack 2D tensor, first dimension must be the same for all experiences")
            batch_data[key] = torch.cat(list(rows), dim=1)
            batch_data_length[key] = torch.tensor([r.shape[1] for r in rows], dtype=torch.int32)
        else:
            batch_data[key] = torch.cat(list(rows)).to(rows[0].dtype)
            batch_data_length[key] = torch.tensor([len(r) for r in rows], dtype=torch.int32)
    return batch_data, batch_data_length


def unpack_pad_experience(batch_data, batch_data_length, pad_id, multiple):
    if not batch_data:
        raise ValueError("ERROR: empty batch_data")
    if set(batch_data) != set(batch_data_length):
        raise ValueError("ERROR: when unpack, keys from batch_data and batch_data_length dictionaries do not match")
    out = {}
    for key, lengths in batch_data_length.items():
        data = batch_data[key]
        if key in ("prompt_length", "response_length", "age"):
            out[key] = data.view(-1, 1)
            continue
        longest = int(lengths.max())
        width = -(-longest // multiple) * multiple if multiple > 1 else longest
        fill = 0.0 if data.is_floating_point() else pad_id
        rows = torch.split(data, lengths.tolist(), dim=-1)
        padded = torch.full((len(rows), *data.shape[:-1], width), fill, dtype=data.dtype)
        for i, row in enumerate(rows):
            padded[i, ..., : row.shape[-1]] = row
        out[key] = padded
    return out


def put_prompts_experience(
    batch, n_samples_per_prompt, dataset_additional_keys=None, indexes=None, add_another_batch=False
):
    prompts = [copy.deepcopy(p) for p in batch["prompts"] for _ in range(n_samples_per_prompt)]
    prompt_length = [torch.tensor([len(p)]) for p in prompts]
    extra = {}
    for key in dataset_additional_keys or []:
        if key in batch:
            extra[key] = [v for v in batch[key] for _ in range(n_samples_per_prompt)]
    count = len(prompts)
    if add_another_batch:
        indexes = [count + i for i in range(count)]
    elif indexes is None:
        indexes = list(range(count))
    return padding_dict_to_tensor_dict({"prompt_length": prompt_length, "prompts": prompts, **extra}), indexes


def pad_experience(experience_batch, pad_id, multiple=1):
    out = {}
    for key, rows in experience_batch.items():
        if key in ("prompt_length", "response_length", "age"):
            out[key] = torch.cat(rows).reshape(-1, 1)
        else:
            out[key] = pad_sequence(
                rows, batch_first=True, padding_value=0.0 if rows[0].is_floating_point() else pad_id
            )
    return out
