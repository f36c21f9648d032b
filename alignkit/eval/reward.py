"""Held-out metrics of a reward model on comparisons: accuracy, log loss, calibration, reward spread."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expected_calibration_error(delta: torch.Tensor, label: torch.Tensor, bins: int = 10) -> float:
    """ECE of the predicted preference p = sigmoid(r_w - r_l) (Naeini et al. 2015; Guo et al. 2017).

        conf_m = max(p_m, 1 - p_m),  hit_m = y_m if p_m >= 1/2 else 1 - y_m
        ECE = sum_b (n_b / M) |mean_{m in b} hit_m - mean_{m in b} conf_m|

    over `bins` equal-width bins of confidence on [1/2, 1]. `label` y is 1 for a hard preference
    (chosen won) or the probability that chosen is preferred; a hit is then the expected agreement.
    """
    p = torch.sigmoid(delta.double())
    y = label.double()
    conf = torch.maximum(p, 1 - p)
    hit = torch.where(p >= 0.5, y, 1 - y)
    index = ((conf - 0.5) * 2 * bins).long().clamp(0, bins - 1)  # (M,)
    count = torch.bincount(index, minlength=bins).double()
    gap = torch.bincount(index, weights=hit - conf, minlength=bins).abs()
    return float(gap.sum() / count.sum().clamp_min(1))


def comparison_metrics(delta: torch.Tensor, label: torch.Tensor | None = None, bins: int = 10) -> dict:
    """accuracy, log_loss and ece of comparisons with d = r_w - r_l (M,) and labels y (default 1).

    accuracy = mean([d > 0] y + [d < 0] (1 - y) + [d = 0] / 2), the expected agreement with the labels;
    log_loss = mean(-[y log sigmoid(d) + (1 - y) log sigmoid(-d)]) (nats).
    """
    delta = delta.double()
    y = torch.ones_like(delta) if label is None else label.double()
    agree = torch.where(delta > 0, y, 1 - y)
    agree = torch.where(delta == 0, torch.full_like(y, 0.5), agree)
    log_loss = -(y * F.logsigmoid(delta) + (1 - y) * F.logsigmoid(-delta))
    return {"accuracy": float(agree.mean()), "log_loss": float(log_loss.mean()),
            "ece": expected_calibration_error(delta, y, bins), "comparisons": int(delta.numel())}
