"""Fake ``mindspeed_rl/utils/seqlen_balancing.py``: ``rearrange_micro_batches`` packs samples, longest first, into
micro-batches of at most ``max_token_len`` tokens (and ``dynamic_max_batch_size`` samples); upstream balances with
Karmarkar-Karp, which also reorders samples. ``get_reverse_idx`` inverts the concatenated order."""


def rearrange_micro_batches(seqlen_list, max_token_len, dynamic_max_batch_size=None):
    order = sorted(range(len(seqlen_list)), key=lambda i: (-seqlen_list[i], i))
    partitions, tokens = [], []
    for i in order:
        for p, part in enumerate(partitions):
            fits = tokens[p] + seqlen_list[i] <= max_token_len
            if fits and (dynamic_max_batch_size is None or len(part) < dynamic_max_batch_size):
                part.append(i)
                tokens[p] += seqlen_list[i]
                break
        else:
            partitions.append([i])
            tokens.append(seqlen_list[i])
    return partitions


def get_reverse_idx(idx_map):
    reverse = [0] * len(idx_map)
    for position, index in enumerate(idx_map):
        reverse[index] = position
    return reverse
