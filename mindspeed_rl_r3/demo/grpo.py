"""GRPO pieces: group-normalised advantages and the clipped policy loss with an optional k3 KL to the reference."""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """``(r - mean_group) / (std_group + eps)`` per sample; rewards are ordered group by group."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True, unbiased=False) if group_size > 1 else torch.zeros_like(mean)
    return ((grouped - mean) / (std + eps)).view(-1)


def token_log_probs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probability of ``tokens[:, t + 1]`` under ``logits[:, t]``: ``[B, S - 1]`` in fp32."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float = 0.2,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-mean clipped surrogate over response tokens (``mask``), plus ``kl_coef`` x k3 KL to the reference."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1)
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip, 1 + clip) * adv)
    m = mask.float()
    denom = m.sum().clamp(min=1.0)
    loss = -(surrogate * m).sum() / denom
    stats = {"clip_frac": float((((ratio - 1).abs() > clip).float() * m).sum() / denom)}
    if ref_logp is not None and kl_coef > 0:
        d = ref_logp - logp
        kl = ((torch.exp(d) - 1 - d) * m).sum() / denom
        loss = loss + kl_coef * kl
        stats["kl_ref"] = float(kl.detach())
    stats["loss"] = float(loss.detach())
    return loss, stats
