"""KL control: the per-token KL penalty added to the reward, and the coefficient beta (fixed or adaptive).

    r_t = -beta * kl_t            for every response token t
    r_T = r_T + score             on the last response token T (Ziegler et al. 2019; Stiennon et al. 2020)
"""

from __future__ import annotations

import math

import torch

from alignkit.ops.kl import KL_ESTIMATORS


def kl_shaped_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                      beta: float, estimator: str = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (B, A) and the per-token KL (B, A) (0 where masked) from scores (B,)."""
    mask = mask.bool()
    kl = KL_ESTIMATORS[estimator](logps, ref_logps).masked_fill(~mask, 0.0)
    rewards = -beta * kl
    last = (mask.sum(-1) - 1).clamp_min(0)  # (B,) index of the last kept token
    rewards[torch.arange(len(scores)), last] += scores.to(rewards.dtype)
    return rewards, kl


class FixedKL:
    """beta stays at its initial value."""

    def __init__(self, beta: float, target: float | None = None, horizon: int = 10_000):
        self.beta = beta

    def update(self, kl: float, n_samples: int) -> None:
        pass


class AdaptiveKL:
    """Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", section 2.2:

        e = clip(KL / KL_target - 1, -0.2, 0.2)
        beta <- beta * (1 + e * n / horizon)          (n = samples in this rollout batch)
    """

    def __init__(self, beta: float, target: float | None = 6.0, horizon: int = 10_000):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n_samples: int) -> None:
        if not math.isfinite(kl):  # clipping would pass a NaN through and leave beta NaN for the rest of the run
            raise ValueError(f"AdaptiveKL.update: the measured KL is {kl}")
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n_samples / self.horizon


KL_CONTROLLERS = {"fixed": FixedKL, "adaptive": AdaptiveKL}
