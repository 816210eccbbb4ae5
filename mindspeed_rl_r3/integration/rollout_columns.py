"""What the rollout puts into the TransferDock beside MindSpeed-RL's own columns.

MindSpeed-RL cuts each vLLM completion at its first pad token and stores ``input_ids = prompt ⊕ response``. The
routing of a prefix is the prefix of the routing (the model is causal), so each sample's trace is cut to
``len(input_ids) - 1`` rows and its log-probs to ``len(response)``; the trace then carries the fingerprint of exactly
the ``input_ids`` the TransferDock holds, which training checks before it replays.

Partial rollout (``rl_config.partial_rollout_max_split > 1``) generates a sample in segments: each continuation
re-prefills ``prompt ⊕ response so far`` and decodes more. Like the tokens, the routing of the earlier segments is kept
and the continuation contributes only the rows of the positions it adds (:func:`join_partial`).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from mindspeed_rl_r3.routing.codec import decode, encode, encode_group
from mindspeed_rl_r3.routing.trace import RoutingError, RoutingTrace, token_fingerprint

# A partial-rollout sample that has no generated segment yet holds this one-word placeholder in both columns, so
# the TransferDock can hand the row out before the first segment exists (an empty row cannot be padded and stacked).
PLACEHOLDER_WORD = -1


def placeholder_routing() -> torch.Tensor:
    return torch.tensor([PLACEHOLDER_WORD], dtype=torch.int32)


def placeholder_log_probs() -> torch.Tensor:
    return torch.tensor([float(PLACEHOLDER_WORD)], dtype=torch.float32)


def child_request_id(parent_request_id: str, completion_index: int, n: int) -> str:
    """vLLM v1's id of the request behind completion ``completion_index`` of a prompt (``ParentRequest``)."""
    return parent_request_id if n == 1 else f"{completion_index}_{parent_request_id}"


# vLLM >= 0.12 (InputProcessor.assign_request_id) makes the engine's own id "{user id}-{8 hex of a uuid4}" unless
# VLLM_DISABLE_REQUEST_ID_RANDOMIZATION is set; ParentRequest.get_child_info then prefixes "{index}_" for n > 1.
_RANDOM_SUFFIX = re.compile(r"-[0-9a-f]{8}")


def runner_request_id(parent_request_id: str, completion_index: int, n: int, known_ids: Collection[str]) -> str:
    """The runner's id of completion ``completion_index`` of a prompt, among the ids the recorder holds.

    ``parent_request_id`` is the id vLLM hands back (``RequestOutput.request_id``, the user-visible one). The runner
    saw :func:`child_request_id` of it, followed on vLLM >= 0.12 by ``-`` and 8 random hex digits. Exactly one held id
    may fit; none or several (two live requests with the same user id) raise rather than pick one.
    """
    child = child_request_id(parent_request_id, completion_index, n)
    fits = sorted(
        rid
        for rid in known_ids
        if rid == child or (rid.startswith(child) and _RANDOM_SUFFIX.fullmatch(rid[len(child) :]))
    )
    if len(fits) == 1:
        return fits[0]
    if not fits:
        raise RoutingError(
            f"no routing was captured for completion {completion_index} of request {parent_request_id!r}: no runner "
            f"request id {child!r} (or {child!r}-<8 hex>, vLLM's randomised form) among {len(known_ids)} recorded"
        )
    raise RoutingError(
        f"completion {completion_index} of request {parent_request_id!r} fits several runner request ids {fits}: "
        "the same request id was submitted more than once while routing was recorded; give each prompt its own id"
    )


def completion_log_probs(token_ids: Sequence[int], logprobs: Sequence[dict] | None, where: str) -> torch.Tensor:
    """float32 ``[len(token_ids)]``: the log-prob vLLM gave each sampled token (``SamplingParams.logprobs >= 0``)."""
    if logprobs is None:
        raise RoutingError(
            f"{where}: vLLM returned no log-probs; the rollout_log_probs column needs "
            "generate_config.sampling_config.logprobs >= 0 (MindSpeed-RL's default is 1)"
        )
    if len(logprobs) < len(token_ids):
        raise RoutingError(f"{where}: {len(logprobs)} log-prob entries for {len(token_ids)} tokens")
    return torch.tensor([entry[t].logprob for entry, t in zip(logprobs, token_ids, strict=False)], dtype=torch.float32)


@dataclass
class GeneratedSample:
    """One vLLM completion as the rollout saw it: the routing of every fed token and the sampled log-probs."""

    trace: RoutingTrace | None
    log_probs: torch.Tensor


@dataclass
class PreviousSegments:
    """What earlier partial-rollout segments of a sample left in the TransferDock (``None`` before the first)."""

    trace: RoutingTrace | None
    log_probs: torch.Tensor | None


def is_placeholder(row: torch.Tensor) -> bool:
    return row.numel() == 0 or int(row.reshape(-1)[0]) == PLACEHOLDER_WORD


def previous_segments(
    routing_row: torch.Tensor | None, log_prob_row: torch.Tensor | None, response_len: int, sample_index: int
) -> PreviousSegments:
    """Decode a padded TransferDock row pair of a partial sample that already has ``response_len`` tokens."""
    if response_len == 0:
        return PreviousSegments(None, None)
    trace = None
    if routing_row is not None:
        if is_placeholder(routing_row):
            raise RoutingError(
                f"sample {sample_index}: {response_len} response tokens are stored but its routed_experts row is "
                "still the placeholder; the earlier segment was generated without routing capture"
            )
        trace = decode(routing_row.to(torch.int32).cpu(), sample_index=sample_index, allow_trailing_padding=True)
    log_probs = None
    if log_prob_row is not None:
        if log_prob_row.numel() < response_len:
            raise RoutingError(
                f"sample {sample_index}: rollout_log_probs row holds {log_prob_row.numel()} values for "
                f"{response_len} stored response tokens"
            )
        log_probs = log_prob_row.reshape(-1)[:response_len].float().cpu()
    return PreviousSegments(trace, log_probs)


def join_partial(previous: RoutingTrace | None, continuation: RoutingTrace) -> RoutingTrace:
    """Routing of a sample after one more partial-rollout segment.

    ``continuation`` was recorded for ``prompt ⊕ response so far ⊕ new tokens`` and so covers every position; the
    rows ``previous`` has (its positions were routed when their tokens were sampled) are kept, the rest appended.
    """
    if previous is None:
        return continuation
    if continuation.rows < previous.rows:
        raise RoutingError(
            f"partial-rollout continuation has {continuation.rows} routing rows, fewer than the {previous.rows} "
            "rows of the segments before it"
        )
    tail = RoutingTrace(continuation.ids[previous.rows :], continuation.num_experts, layout=continuation.layout)
    return previous.extend(tail)


def _cut(trace: RoutingTrace, input_ids: torch.Tensor, response_len: int, index: int) -> RoutingTrace:
    rows = input_ids.numel() - 1
    if trace.rows < rows:
        raise RoutingError(
            f"sample {index}: the rollout recorded {trace.rows} routing rows, the TransferDock sample has "
            f"{input_ids.numel()} tokens and needs {rows}"
        )
    prompt_len = input_ids.numel() - response_len
    return RoutingTrace(
        trace.ids[:rows].contiguous(), trace.num_experts, prompt_len, token_fingerprint(input_ids), trace.layout
    )


def _group_shares_prompt(input_ids: Sequence[torch.Tensor], responses: Sequence[torch.Tensor]) -> bool:
    p = input_ids[0].numel() - responses[0].numel()
    first = input_ids[0][:p]
    return all(
        x.numel() - r.numel() == p and torch.equal(x[:p], first) for x, r in zip(input_ids, responses, strict=True)
    )


def rollout_columns(
    samples: Sequence[GeneratedSample],
    input_ids: Sequence[torch.Tensor],
    responses: Sequence[torch.Tensor],
    *,
    routed_experts: bool,
    group_size: int = 1,
    group_dedupe: bool = False,
    previous: Sequence[PreviousSegments] | None = None,
) -> dict[str, list[torch.Tensor]]:
    """``{"routed_experts": [...], "rollout_log_probs": [...]}`` for the samples MindSpeed-RL is about to put.

    ``samples[i]`` is the generation behind ``input_ids[i]`` / ``responses[i]`` (the TransferDock's final values,
    responses cut at the first pad). With ``previous`` (partial rollout), routing and log-probs of earlier segments
    are joined in front. ``group_dedupe`` stores the shared prompt rows of each run of ``group_size`` samples once.
    """
    if not len(samples) == len(input_ids) == len(responses):
        raise RoutingError(
            f"rollout produced {len(samples)} generations for {len(input_ids)} TransferDock samples "
            f"({len(responses)} responses)"
        )
    prev = previous or [PreviousSegments(None, None)] * len(samples)
    traces: list[RoutingTrace] = []
    log_probs: list[torch.Tensor] = []
    for i, (sample, ids, resp) in enumerate(zip(samples, input_ids, responses, strict=True)):
        ids = ids.reshape(-1)
        r = resp.numel()
        lp = sample.log_probs if prev[i].log_probs is None else torch.cat([prev[i].log_probs, sample.log_probs])
        if lp.numel() < r:
            raise RoutingError(f"sample {i}: {lp.numel()} rollout log-probs for a response of {r} tokens")
        log_probs.append(lp[:r].to(torch.float32).contiguous())
        if routed_experts:
            if sample.trace is None:
                raise RoutingError(f"sample {i}: no routing was captured for its generation")
            traces.append(_cut(join_partial(prev[i].trace, sample.trace), ids, r, i))
    out = {"rollout_log_probs": log_probs}
    if routed_experts:
        out["routed_experts"] = _encode_all(traces, input_ids, responses, group_size, group_dedupe)
    return out


def _encode_all(
    traces: list[RoutingTrace],
    input_ids: Sequence[torch.Tensor],
    responses: Sequence[torch.Tensor],
    group_size: int,
    group_dedupe: bool,
) -> list[torch.Tensor]:
    if not group_dedupe or group_size <= 1 or len(traces) % group_size:
        return [encode(t) for t in traces]
    payloads: list[torch.Tensor] = []
    for start in range(0, len(traces), group_size):
        group = slice(start, start + group_size)
        if _group_shares_prompt(input_ids[group], responses[group]):
            payloads += encode_group(traces[group], prompt_len=int(traces[start].prompt_len or 0))
        else:
            payloads += [encode(t) for t in traces[group]]
    return payloads
