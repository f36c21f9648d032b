"""Per-token estimators of KL(pi || pi_ref) from samples of pi (J. Schulman, "Approximating KL
Divergence", 2020, http://joschu.net/blog/kl-approx.html).

With x ~ pi and log r = log pi_ref(x) - log pi(x):
    k1 = -log r                  unbiased, high variance, can be negative per sample
    k2 = (log r)^2 / 2           biased (exact to second order), low variance, >= 0
    k3 = (r - 1) - log r         unbiased, low variance, >= 0 (the GRPO loss term)
All take and return (B, A) tensors; masking is the caller's.
"""

from __future__ import annotations

from typing import Callable

import torch


def kl_k1(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    return logps - ref_logps


def kl_k2(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    return 0.5 * (ref_logps - logps) ** 2


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    log_r = ref_logps - logps
    return torch.expm1(log_r) - log_r


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}
