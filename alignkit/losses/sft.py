"""Supervised fine-tuning (behaviour cloning) loss."""

from __future__ import annotations

import torch

from alignkit.ops.logprobs import token_logps

IGNORE = -100


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, num_tokens: float | None = None):
    """Token-level negative log-likelihood of the target tokens.

        L = -(1 / N) * sum_{b, t : y[b, t+1] != IGNORE} log p(y[b, t+1] | y[b, <=t])

    logits (B, T, V) predict the next token; labels (B, T) hold target ids and IGNORE (-100) on
    prompt and padding positions. N defaults to the number of target tokens in this batch; pass the
    count over the whole accumulated (global) batch so that accumulation and data parallelism give the
    same gradient as one large batch (the per-token normalisation of Ouyang et al. 2022 / TRL).
    Returns (loss, {"nll_sum": summed NLL (detached), "tokens": target tokens in this batch}).
    """
    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != IGNORE
    logps = token_logps(logits[:, :-1], targets.clamp(min=0))  # (B, T-1)
    nll_sum = -(logps * mask).sum()
    n_tokens = int(mask.sum())
    denom = num_tokens if num_tokens is not None else max(n_tokens, 1)
    return nll_sum / denom, {"nll_sum": nll_sum.detach(), "tokens": n_tokens}
