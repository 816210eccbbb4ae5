"""Fake ``mindspeed_rl/models/loss/base_loss_func.py`` at 05a90d77 (rewritten, reduced).

``compute_log_probs(output, batch, skip_entropy=True, **kwargs)`` returns ``(log_probs [B, R], entropy)``: the
log-prob of each next token (``labels``) under the logits, unpacked from the remove-padding layout when
``use_remove_padding``, cut to the response positions ``prompt_len - 1 .. prompt_len + response_len - 2`` and
right-padded to ``responses``' width. No TP or CP gather (one rank).
"""

import torch


class BaseLossFunc:
    def add_loss_meta_info(self, meta_info):
        pass

    def compute_loss(self, output, batch, forward_only=False, non_loss_data=True, **kwargs):
        raise NotImplementedError

    def compute_log_probs(self, output, batch, skip_entropy=True, **kwargs):
        labels = batch["labels"]
        token_logp = torch.log_softmax(output.float(), dim=-1).gather(-1, labels.unsqueeze(-1).long()).squeeze(-1)
        prompt = batch["prompt_length"].reshape(-1)
        response = batch["response_length"].reshape(-1)
        width = batch["responses"].shape[-1]
        out = torch.zeros(len(prompt), width, dtype=token_logp.dtype)
        cu = kwargs.get("cu_seqlens_padded")
        for i in range(len(prompt)):
            start = int(prompt[i]) - 1
            row = token_logp[0, int(cu[i]) :] if kwargs.get("use_remove_padding") else token_logp[i]
            out[i, : int(response[i])] = row[start : start + int(response[i])]
        return out, torch.zeros_like(out)


class GRPOActorLossFunc(BaseLossFunc):
    """The log-probs for ``forward_only``; else ``-mean(advantages * log_probs)`` over response tokens."""

    def compute_loss(self, output, batch, forward_only=False, non_loss_data=True, **kwargs):
        log_probs, _ = super().compute_log_probs(output=output, batch=batch, **kwargs)
        if forward_only:
            return log_probs
        mask = torch.arange(log_probs.shape[1]).unsqueeze(0) < batch["response_length"].reshape(-1, 1)
        loss = -(batch["advantages"][:, : log_probs.shape[1]] * log_probs * mask).sum() / mask.sum().clamp(min=1)
        return loss, {"actor/pg_loss": float(loss.detach())}


class ReferenceLossFunc(BaseLossFunc):
    def compute_loss(self, output, batch, forward_only=False, non_loss_data=True, **kwargs):
        log_probs, _ = super().compute_log_probs(output=output, batch=batch, **kwargs)
        return log_probs if forward_only else None
