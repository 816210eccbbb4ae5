"""A CPU stand-in for ACL / CUDA graphs: capture a forward once per batch size, then replay only its tensor ops.

``torch.fx``'s ``make_fx`` records the aten operations a forward performs on example inputs. Replaying the recorded
graph runs those operations on new inputs and nothing else, which is what makes a captured device graph dangerous
for Python-side logic:

- Python conditions are evaluated once, at capture (a branch not taken then is absent from every replay);
- a tensor the forward reads or writes that is not an input (a recording buffer, a weight) is baked into the graph
  by identity: replays write into that very tensor, never into one created later;
- shapes, and slices derived from them, are fixed per captured batch size; steps are padded up to a captured size.

Steps larger than every captured size run eagerly, as vllm-ascend's runner does. Used by the graph-mode capture
tests and by ``bench capture``'s graph-replay overhead.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

import torch
from torch.fx.experimental.proxy_tensor import make_fx


class GraphReplay:
    """``forward(*tensors)`` whose leading dimension is the step's token count, captured per size in ``sizes``."""

    def __init__(self, forward: Callable[..., torch.Tensor], sizes: Sequence[int]) -> None:
        if not sizes or min(sizes) < 1:
            raise ValueError(f"graph sizes must be positive, got {list(sizes)}")
        self.forward = forward
        self.sizes = sorted(set(int(s) for s in sizes))
        self.graphs: dict[int, torch.fx.GraphModule] = {}
        self.replays = 0
        self.eager_runs = 0

    def padded_size(self, num_tokens: int) -> int | None:
        """The smallest captured size that holds ``num_tokens`` rows; ``None``: the step runs eagerly."""
        i = bisect.bisect_left(self.sizes, num_tokens)
        return self.sizes[i] if i < len(self.sizes) else None

    def capture(self, example: Callable[[int], tuple[torch.Tensor, ...]]) -> None:
        """Capture one graph per size, largest first (as vllm-ascend does), on ``example(size)`` inputs."""
        with torch.no_grad():
            for size in reversed(self.sizes):
                self.graphs[size] = make_fx(self.forward)(*example(size))

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Run a step whose inputs are already padded to a captured size (replay), or any size without a graph."""
        graph = self.graphs.get(int(inputs[0].shape[0]))
        with torch.no_grad():
            if graph is None:
                self.eager_runs += 1
                return self.forward(*inputs)
            self.replays += 1
            return graph(*inputs)
