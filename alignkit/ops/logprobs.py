"""Token log-probabilities from logits, computed without materialising a full (B, T, V) log-softmax."""

from __future__ import annotations

import torch


def token_logps(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(tokens[b, t]) under softmax(logits[b, t] / temperature).

    logits (B, T, V), tokens (B, T) -> (B, T) float32. Uses logsumexp so the only (B, T, V) tensor is
    the (possibly scaled) logits themselves.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return picked - torch.logsumexp(logits, dim=-1)
