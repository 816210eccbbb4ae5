"""Training side of the ``routed_experts`` column: from the padded batch the TransferDock dispatch hands a worker to
the per-sample traces of one micro-batch, checked against the tokens they will be replayed on.

The dispatch right-pads every row to the batch's longest (rounded up to ``tp*cp``, or ``2*tp*cp``) with the pad
token id, so payloads are decoded with trailing padding allowed (each header states its own length). A GRPO group
stored with prompt dedupe (``r3.group_dedupe``) needs its leader in the same batch: :func:`expand_group_payloads`
rewrites such a dispatch batch into standalone payloads once, before MindSpeed-RL splits it into mini- and
micro-batches in any order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from mindspeed_rl_r3.routing.codec import decode, decode_group, encode, is_group_follower
from mindspeed_rl_r3.routing.trace import MoEModelSpec, RoutingError, RoutingTrace, validate_trace


def _rows(column: torch.Tensor) -> torch.Tensor:
    if not isinstance(column, torch.Tensor) or column.dim() != 2:
        found = tuple(column.shape) if isinstance(column, torch.Tensor) else type(column).__name__
        raise RoutingError(f"routed_experts must reach the worker as a padded [samples, words] tensor, got {found}")
    return column.detach().to("cpu", torch.int32).contiguous()


def expand_group_payloads(column: torch.Tensor, pad_value: int = 0) -> torch.Tensor | None:
    """Standalone payloads for a dispatch batch holding group-deduplicated ones, or ``None`` if it holds none.

    Raises naming the sample when a follower's leader is not in the batch (the dispatch split a GRPO group).
    """
    rows = _rows(column)
    if not any(is_group_follower(row) for row in rows):
        return None
    try:
        traces = decode_group(list(rows), allow_trailing_padding=True)
    except RoutingError as err:
        raise RoutingError(
            f"{err}. r3.group_dedupe needs whole GRPO groups in every dispatch: set rl_config.guarantee_order: true "
            "with dispatch sizes that are multiples of n_samples_per_prompt, or set r3.group_dedupe: false"
        ) from None
    payloads = [encode(t) for t in traces]
    width = max(p.numel() for p in payloads)
    out = torch.full((len(payloads), width), pad_value, dtype=torch.int32)
    for i, p in enumerate(payloads):
        out[i, : p.numel()] = p
    return out


def micro_batch_traces(
    column: torch.Tensor,
    prompt_length: torch.Tensor,
    response_length: torch.Tensor,
    *,
    spec: MoEModelSpec | None = None,
    input_ids: torch.Tensor | None = None,
) -> list[RoutingTrace]:
    """Decode and check one micro-batch's traces, in micro-batch order.

    Each must have ``prompt + response - 1`` rows, the model's (layers, top-k, experts), and, when the rollout
    recorded it, the fingerprint of the sample's training tokens ``input_ids[b, :prompt + response]``.
    """
    rows = _rows(column)
    prompts = prompt_length.reshape(-1).tolist()
    responses = response_length.reshape(-1).tolist()
    if not len(prompts) == len(responses) == rows.shape[0]:
        raise RoutingError(
            f"micro-batch has {rows.shape[0]} routed_experts rows for {len(prompts)} prompt and {len(responses)} "
            "response lengths"
        )
    tokens = None if input_ids is None else input_ids.detach().cpu()
    traces = []
    for b, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        trace = decode(rows[b], spec=spec, sample_index=b, allow_trailing_padding=True)
        ids = None if tokens is None else tokens[b, : int(p) + int(r)]
        validate_trace(trace, spec, sample_index=b, prompt_len=int(p), response_len=int(r), token_ids=ids)
        traces.append(trace)
    return traces


def parse_noop_layers(value: str | Iterable[int] | None) -> tuple[int, ...]:
    """MindSpeed-LLM ``--noop-layers`` ("5,95" or a list of 0-based global layer ids)."""
    if value is None or value == "":
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        return tuple(sorted({int(str(x).strip()) for x in items if str(x).strip()}))
    except ValueError:
        raise RoutingError(f"noop_layers must be comma-separated layer ids, got {value!r}") from None


def spec_from_megatron(
    num_layers: int,
    num_experts: int,
    topk: int,
    *,
    noop_layers: Sequence[int] = (),
    moe_layer_freq: int | Sequence[int] = 1,
    first_k_dense_replace: int | None = None,
) -> MoEModelSpec:
    """The routing spec of the model Megatron builds, in HF/vLLM layer numbering (noop layers removed).

    ``moe_layer_freq`` is Megatron's: an int ``k`` (every k-th layer is MoE, starting with layer 0) or a 0/1 list
    over all layers; ``first_k_dense_replace`` (MindSpeed-LLM) makes the first k layers dense.
    """
    real = num_layers - len(noop_layers)
    if real < 1:
        raise RoutingError(f"num_layers {num_layers} minus {len(noop_layers)} noop layers leaves no layer")
    if isinstance(moe_layer_freq, int):
        pattern = [1 if i % moe_layer_freq == 0 else 0 for i in range(real)]
    else:
        pattern = [int(x) for x in moe_layer_freq]
        if len(pattern) == num_layers and len(noop_layers):
            pattern = [x for i, x in enumerate(pattern) if i not in set(noop_layers)]
        if len(pattern) != real:
            raise RoutingError(f"moe_layer_freq has {len(pattern)} entries for {real} layers")
    dense = first_k_dense_replace or 0
    moe = tuple(i for i, x in enumerate(pattern) if x and i >= dense)
    return MoEModelSpec(num_layers=real, topk=topk, num_experts=num_experts, moe_layers=moe)
