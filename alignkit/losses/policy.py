"""Policy-gradient losses: clipped surrogate (PPO), clipped value loss, entropy bonus, KL term.

Every loss takes per-token tensors (B, A) and `weights` (B, A): the share of each token in the
loss, 0 on padding. The weights come from a row of `AGGREGATIONS` (token mean, per-sequence mean,
constant length) and are divided by `normaliser` (the number of loss units in the global batch, see
`engine.loop`), so micro-batches add up to the loss of the whole minibatch. Metrics are normalised
the same way, so their sum over micro-batches is the minibatch mean.
"""

from __future__ import annotations

from typing import Callable

import torch


def token_weights(mask: torch.Tensor, max_len: int) -> torch.Tensor:
    """Token-level mean (PPO; DAPO, Yu et al. 2025): every kept token counts once; unit = token."""
    return mask.float()


def sequence_weights(mask: torch.Tensor, max_len: int) -> torch.Tensor:
    """Per-sequence mean, then mean over sequences (original GRPO); unit = sequence."""
    mask = mask.float()
    return mask / mask.sum(-1, keepdim=True).clamp_min(1)


def constant_weights(mask: torch.Tensor, max_len: int) -> torch.Tensor:
    """Sum over tokens / max_new_tokens (Dr. GRPO: no length bias); unit = sequence."""
    return mask.float() / max_len


# name -> (weights(mask, max_len), loss unit: "token" = normalise by kept tokens, "sequence" = by responses)
AGGREGATIONS: dict[str, tuple[Callable, str]] = {
    "token": (token_weights, "token"),
    "sequence": (sequence_weights, "sequence"),
    "constant": (constant_weights, "sequence"),
}


def clipped_policy_loss(logps, old_logps, advantages, weights, normaliser: float, clip_low: float = 0.2,
                        clip_high: float | None = None) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate (Schulman et al. 2017), with DAPO's asymmetric "clip-higher" range:

        ratio_t = exp(log pi(a_t) - log pi_old(a_t))
        L = sum_t w_t * max(-A_t ratio_t, -A_t clip(ratio_t, 1 - clip_low, 1 + clip_high)) / normaliser

    logps, old_logps, advantages, weights: (B, A). Metrics: clipfrac (share of tokens where the clipped
    term is active) and approx_kl = (ratio - 1) - log ratio (k3 of pi_old against pi).
    """
    clip_high = clip_low if clip_high is None else clip_high
    log_ratio = logps - old_logps
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = (torch.maximum(unclipped, clipped) * weights).sum() / normaliser
    with torch.no_grad():
        metrics = {
            "clipfrac": ((clipped > unclipped).float() * weights).sum() / normaliser,
            "approx_kl": ((torch.expm1(log_ratio) - log_ratio) * weights).sum() / normaliser,
        }
    return loss, metrics


def clipped_value_loss(values, old_values, returns, weights, normaliser: float, clip: float = 0.2
                       ) -> tuple[torch.Tensor, dict]:
    """PPO's clipped value loss (Schulman et al. 2017, as in OpenAI baselines / Ziegler et al. 2019):

        V_clip = old_V + clip(V - old_V, -clip, clip)
        L_VF = 0.5 * sum_t w_t * max((V_t - R_t)^2, (V_clip_t - R_t)^2) / normaliser
    """
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    worst = torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2)
    loss = 0.5 * (worst * weights).sum() / normaliser
    with torch.no_grad():
        vf_clipfrac = (((v_clipped - returns) ** 2 > (values - returns) ** 2).float() * weights).sum() / normaliser
    return loss, {"value_clipfrac": vf_clipfrac}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H_t = logsumexp(z) - sum_v softmax(z)_v z_v, (B, A, V) -> (B, A), without a full log-softmax copy."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def entropy_loss(entropy, weights, normaliser: float) -> tuple[torch.Tensor, dict]:
    """L_ENT = -sum_t w_t H_t / normaliser: minimising it raises the entropy (Mnih et al. 2016)."""
    mean = (entropy * weights).sum() / normaliser
    return -mean, {"entropy": mean.detach()}


def kl_loss(kl, weights, normaliser: float) -> tuple[torch.Tensor, dict]:
    """The GRPO KL term (Shao et al. 2024): sum_t w_t kl_t / normaliser, kl_t from `ops.kl` (k3)."""
    mean = (kl * weights).sum() / normaliser
    return mean, {"kl_loss": mean.detach()}
