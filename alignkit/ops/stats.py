"""Masked statistics over (B, A) response tensors: only positions where `mask` is True count."""

from __future__ import annotations

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum_{mask} x (over `dim`, or everything)."""
    x = x.masked_fill(~mask.bool(), 0.0)
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum_{mask} x / |mask| (0 where nothing is kept)."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp_min(1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the kept entries; with `unbiased`, Bessel's correction n / (n - 1)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    return var * n / (n - 1).clamp_min(1) if unbiased else var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the kept entries; masked entries become 0.

    With `shift_mean=False` only the scale changes, x / sqrt(var + eps), as used for rewards, whose sign
    carries meaning (Ziegler et al. 2019 scale rewards, they do not centre them per batch). TRL's flag of the
    same name adds the mean back after whitening instead, which moves every token's reward by
    mean (1 - 1 / std): per token, a shift that favours long or short answers.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    white = (x - mean if shift_mean else x) * torch.rsqrt(var + eps)
    return white.masked_fill(~mask.bool(), 0.0)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[returns - values] / Var[returns]: 1 = perfect critic, 0 = no better than a constant."""
    var_returns = masked_var(returns, mask)
    if var_returns <= 0:
        return float("nan")
    return float(1 - masked_var(returns - values, mask) / var_returns)
