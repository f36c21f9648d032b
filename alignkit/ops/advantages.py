"""Advantage estimators: GAE for PPO, and the critic-free baselines (group-normalised, leave-one-out,
moving average). Shapes: B responses, A response tokens; `group` (B,) holds the prompt index of each
response, so the k samples of one prompt share a group id.
"""

from __future__ import annotations

import math

import torch


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous Control
    Using Generalized Advantage Estimation"), over right-padded responses.

        delta_t = r_t + gamma * V_{t+1} - V_t            (V_{t+1} = 0 after the last kept token)
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                              (the value target)

    rewards, values, mask: (B, A) -> advantages (B, A), returns (B, A); 0 where masked.
    """
    mask = mask.to(rewards.dtype)
    rewards, values = rewards * mask, values * mask
    b, a = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(b, dtype=rewards.dtype, device=rewards.device)
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(a)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # delta_t
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]  # A_t
        next_value = values[:, t]
        advantages[:, t] = next_adv
    return advantages, (advantages + values) * mask


def _group_stats(scores: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per response: (its group's mean score, group size, unbiased group std).

    A group whose scores are all equal gets exactly that score as its mean, hence std 0 and advantage 0: a float32
    sum divided by the count can miss it by a rounding error (e.g. three scores of 0.7717 give a mean 6e-8 off),
    which the std division of GRPO would then blow up into a same-sign advantage for the whole group.
    """
    if scores.shape != group.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and group {tuple(group.shape)} must have one shape")
    if not scores.numel():
        return scores, scores, scores
    _, index = torch.unique(group, return_inverse=True)
    n = int(index.max()) + 1
    count = torch.zeros(n, dtype=scores.dtype, device=scores.device).index_add_(0, index, torch.ones_like(scores))
    total = torch.zeros_like(count).index_add_(0, index, scores)
    high = torch.full_like(count, -math.inf).scatter_reduce(0, index, scores, "amax")
    low = torch.full_like(count, math.inf).scatter_reduce(0, index, scores, "amin")
    mean = torch.where(high == low, high, total / count)
    sq = torch.zeros_like(count).index_add_(0, index, (scores - mean[index]) ** 2)
    std = (sq / (count - 1).clamp_min(1)).sqrt()
    return mean[index], count[index], std[index]


def group_normalised(scores: torch.Tensor, group: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GRPO (Shao et al. 2024, DeepSeekMath): A_i = (s_i - mean_g(s)) / (std_g(s) + eps), std unbiased."""
    mean, _, std = _group_stats(scores, group)
    return (scores - mean) / (std + eps)


def group_centred(scores: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): A_i = s_i - mean_g(s); no std
    division, which up-weights prompts that are too easy or too hard."""
    mean, _, _ = _group_stats(scores, group)
    return scores - mean


def leave_one_out(scores: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024): A_i = s_i - (1 / (k - 1)) sum_{j != i} s_j,
    computed as the equal k / (k - 1) (s_i - mean_g(s)) (exactly 0 for a group of equal scores)."""
    mean, count, _ = _group_stats(scores, group)
    return count / (count - 1).clamp_min(1) * (scores - mean)


def equal_groups(scores: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """(B,) bool: True where every response of the group got the same score (DAPO's dynamic sampling
    drops these: their group-relative advantage is 0 and only adds noise to the normaliser)."""
    _, _, std = _group_stats(scores, group)
    return std == 0


class MovingAverage:
    """The REINFORCE baseline b (Williams 1992): A_i = s_i - b, then b <- m b + (1 - m) mean(s).

    The first batch sets b to its mean (no bias from an arbitrary start at 0)."""

    def __init__(self, momentum: float = 0.9):
        self.momentum, self.value = momentum, None

    def advantages(self, scores: torch.Tensor) -> torch.Tensor:
        baseline = scores.mean() if self.value is None else torch.tensor(self.value, dtype=scores.dtype)
        return scores - baseline

    def update(self, scores: torch.Tensor) -> None:
        mean = float(scores.mean())
        self.value = mean if self.value is None else self.momentum * self.value + (1 - self.momentum) * mean
