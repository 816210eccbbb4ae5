"""Fake ``mindspeed_rl/utils/pad_process.py`` at 05a90d77 (rewritten, same behaviour).

``padding_dict_to_tensor_dict`` right-pads every row of every column with 0 to the column's longest row, stacks
them, and appends ``original_length`` (all lengths, column after column); upstream wraps the result in a tensordict
``TensorDict``, a plain dict here. A ``[T, X]`` row pads its wrong dim and an ``[X, T]`` row fails to stack, as
upstream. ``remove_padding_tensor_dict_to_dict`` cuts each row back (a row of length 0 whose first value is -1
becomes empty). ``remove_padding_and_split_to_list`` cuts responses at the first pad token (keeping it when the pad
token is the eos token).
"""

import torch


def padding_dict_to_tensor_dict(experience_data):
    batch, lengths = {}, []
    for column, rows in experience_data.items():
        longest = max(len(row) for row in rows)
        batch[column] = torch.stack([torch.nn.functional.pad(row, (0, longest - len(row))) for row in rows])
        lengths += [torch.tensor(len(row)) for row in rows]
    batch["original_length"] = torch.stack(lengths)
    return batch


def truncate_rows(tensor, index_tensor, left_pad=False):
    out = []
    for i in range(tensor.shape[0]):
        n = int(index_tensor[i])
        if n == 0 and tensor.shape[1] and tensor[i, 0].item() == -1:
            out.append(torch.tensor([], dtype=torch.int32))
        else:
            out.append((tensor[i, -n:] if left_pad else tensor[i, :n]).cpu())
    return out


def remove_padding_tensor_dict_to_dict(data_dict):
    if data_dict is None:
        return {}
    if "original_length" not in data_dict:
        return data_dict
    lengths = data_dict["original_length"]
    out = {}
    for idx, (key, value) in enumerate(data_dict.items()):
        if key == "original_length":
            continue
        out[key] = truncate_rows(value, lengths[idx * len(value) : (idx + 1) * len(value)])
    return out


def remove_padding_and_split_to_list(responses, eos_token_id, pad_token_id, to_list=False):
    out = []
    for row in responses:
        pads = (row == pad_token_id).nonzero()
        first = int(pads[0][0]) if len(pads) else len(row)
        row = row[: first + 1] if pad_token_id == eos_token_id else row[:first]
        out.append(row[:-1].tolist() if to_list else row)
    return out
