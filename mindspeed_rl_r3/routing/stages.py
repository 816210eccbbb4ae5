"""Which MoE layers a pipeline stage holds, and which trace layer each Megatron router binds to.

Megatron numbers decoder layers globally from 1 (``layer_number = offset + local index + 1`` with the offset of
``get_transformer_layer_offset``, core 0.12.1). MindSpeed-LLM's ``--noop-layers`` (0-based global ids, counted in
``num_layers``) become ``NoopTransformerLayer``s without a router. A trace's layer ``j`` is HF/vLLM decoder layer
``spec.moe_layers[j]``, and HF index = ``layer_number - 1`` minus the noop layers before it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from mindspeed_rl_r3.routing.trace import MoEModelSpec, RoutingError


@dataclass(frozen=True)
class PipelineSplit:
    """Megatron's pipeline layer split (the arguments of ``get_transformer_layer_offset``)."""

    num_layers: int
    pp_size: int = 1
    vpp_size: int | None = None
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None
    account_for_embedding: bool = False
    account_for_loss: bool = False

    def __post_init__(self) -> None:
        uneven = self.first_stage_layers is not None or self.last_stage_layers is not None
        if uneven and (self.account_for_embedding or self.account_for_loss):
            raise RoutingError("uneven first/last stage layers cannot be combined with embedding/loss accounting")
        vp = self.vpp_size or 1
        if not uneven:
            total = self.num_layers + self.account_for_embedding + self.account_for_loss
            if total % (self.pp_size * vp):
                raise RoutingError(
                    f"{total} layers (embedding/loss accounting included) do not split over pp={self.pp_size} "
                    f"x vpp={vp}"
                )

    def _uneven_counts(self) -> tuple[int, int, int, int]:
        first = self.first_stage_layers or 0
        last = self.last_stage_layers or 0
        middle_stages = self.pp_size - (self.first_stage_layers is not None) - (self.last_stage_layers is not None)
        middle = self.num_layers - first - last
        if (
            middle_stages < 0
            or middle < 0
            or (middle_stages and middle % middle_stages)
            or (not middle_stages and middle)
        ):
            raise RoutingError(
                f"{self.num_layers} layers do not split into first={self.first_stage_layers}, "
                f"last={self.last_stage_layers} and {max(middle_stages, 0)} middle stages"
            )
        return first, last, middle, middle_stages

    def layer_numbers(self, pp_rank: int, vpp_rank: int = 0) -> list[int]:
        """Global 1-based layer numbers of the decoder layers built on one (virtual) pipeline stage."""
        if not 0 <= pp_rank < self.pp_size:
            raise RoutingError(f"pp rank {pp_rank} outside pipeline of size {self.pp_size}")
        vp = self.vpp_size or 1
        if not 0 <= vpp_rank < vp:
            raise RoutingError(f"virtual pipeline rank {vpp_rank} outside {vp} chunks")
        if self.pp_size == 1:  # Megatron ignores virtual chunks without pipelining
            return list(range(1, self.num_layers + 1))
        is_first, is_last = pp_rank == 0, pp_rank == self.pp_size - 1
        if self.first_stage_layers is not None or self.last_stage_layers is not None:
            first, last, middle, middle_stages = self._uneven_counts()
            per_middle = middle // middle_stages if middle_stages else 0
            if self.vpp_size is None:
                offset = 0 if is_first else (pp_rank - (self.first_stage_layers is not None)) * per_middle + first
            else:
                chunk_first, chunk_last, chunk_mid = first // vp, last // vp, middle // vp
                per_chunk_mid = chunk_mid // middle_stages if middle_stages else 0
                offset = vpp_rank * (chunk_first + chunk_mid + chunk_last)
                if not is_first:
                    offset += chunk_first + (pp_rank - 1) * per_chunk_mid
            if is_first and self.first_stage_layers is not None:
                count = first // vp
            elif is_last and self.last_stage_layers is not None:
                count = last // vp
            else:
                count = per_middle // vp
        else:
            total = self.num_layers + self.account_for_embedding + self.account_for_loss
            per_stage = total // self.pp_size
            if self.vpp_size is None:
                offset = pp_rank * per_stage
            else:
                offset = vpp_rank * (total // vp) + pp_rank * (per_stage // vp)
            count = per_stage // vp
            # The embedding / loss "layer" takes a slot on the first / last stage (first / last chunk with VPP).
            if self.account_for_embedding:
                if pp_rank > 0 or vpp_rank > 0:
                    offset -= 1
                if is_first and vpp_rank == 0:
                    count -= 1
            if self.account_for_loss and is_last and vpp_rank == vp - 1:
                count -= 1
        return list(range(offset + 1, offset + count + 1))


def moe_layers_on_stage(
    spec: MoEModelSpec,
    layer_numbers: Iterable[int],
    noop_layers: Iterable[int] = (),
) -> tuple[list[int], list[int]]:
    """``(trace_layers, megatron_layer_numbers)`` of the routers among ``layer_numbers``.

    ``noop_layers`` are MindSpeed-LLM's 0-based global ids; ``spec.num_layers`` counts real (non-noop) layers.
    """
    noop = sorted({int(x) for x in noop_layers})
    moe_index = {hf: j for j, hf in enumerate(spec.moe_layers)}
    trace_layers, numbers = [], []
    for number in layer_numbers:
        g = int(number) - 1
        if g in noop:
            continue
        hf = g - sum(1 for x in noop if x < g)
        if hf >= spec.num_layers:
            raise RoutingError(
                f"Megatron layer {number} maps to HF layer {hf}, past the model's {spec.num_layers} layers "
                f"(noop layers {noop})"
            )
        if hf in moe_index:
            trace_layers.append(moe_index[hf])
            numbers.append(int(number))
    return trace_layers, numbers
