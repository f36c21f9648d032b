"""Reward metrics: calibration of probabilistic predictions (reward models, classifiers), win rates,
and summaries of gold and proxy rewards.

A reward model's comparison d = r_w - r_l predicts p = sigmoid(d) that the first completion wins
(Bradley-Terry); a classifier predicts class probabilities. Both are scored the same way:
log loss, Brier score, and the expected calibration error with its reliability table.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _as_distributions(prob: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions p (N, C) and targets q (N, C): (N,) probabilities of the positive class become [1 - p, p],
    (N,) labels (hard 0/1 or soft probabilities) become [1 - y, y]; (N,) class indices with (N, C) p one-hot."""
    prob = prob.double()
    if prob.dim() == 1:
        y = label.double()
        return torch.stack([1 - prob, prob], -1), torch.stack([1 - y, y], -1)
    return prob, F.one_hot(label.long(), prob.shape[-1]).double()


def reliability(prob: torch.Tensor, label: torch.Tensor, bins: int = 10) -> dict:
    """Top-label reliability table: conf_m = max_c p_mc, hit_m = q_m[argmax_c p_mc] (the target's probability of
    the predicted class; 1/0 for hard labels; the mean over the classes that tie for the max, so a binary p = 1/2
    counts half, as accuracy counts a tie), over `bins` equal-width bins of confidence on [1/C, 1].

    Returns {"confidence": [...], "accuracy": [...], "count": [...], "low": 1/C}: per-bin means (None for an
    empty bin) and counts. For a binary prediction p, conf = max(p, 1 - p) on [1/2, 1].
    """
    p, q = _as_distributions(prob, label)
    conf = p.max(-1).values  # (N,)
    top = (p == conf[:, None]).double()  # (N, C) the predicted class, or the classes tied for it
    hit = (q * top).sum(-1) / top.sum(-1)
    low = 1.0 / p.shape[-1]
    # bins are right-open, [0.7, 0.75): a confidence within 1e-6 of an edge is on it (0.7 gives 3.999..., and float32
    # holds 0.65 as 0.6499999762)
    index = ((conf - low) / (1 - low) * bins + 1e-6).long().clamp(0, bins - 1)  # (N,)
    count = torch.bincount(index, minlength=bins).double()
    conf_sum = torch.bincount(index, weights=conf, minlength=bins)
    hit_sum = torch.bincount(index, weights=hit, minlength=bins)

    def means(total):
        return [float(t / c) if c > 0 else None for t, c in zip(total, count)]

    return {"confidence": means(conf_sum), "accuracy": means(hit_sum), "count": [int(c) for c in count], "low": low}


def ece_of(table: dict) -> float:
    """ECE = sum_b (n_b / N) |acc_b - conf_b| of a `reliability` table (Naeini et al. 2015; Guo et al. 2017)."""
    n = sum(table["count"])
    gaps = (c * abs(a - f) for a, f, c in zip(table["accuracy"], table["confidence"], table["count"]) if c)
    return float(sum(gaps) / max(n, 1))


def calibration(prob: torch.Tensor, label: torch.Tensor, bins: int = 10) -> dict:
    """log_loss, brier, ece and the reliability table of probabilistic predictions.

    prob (N,) = P(positive) with label (N,) in [0, 1], or prob (N, C) with class indices label (N,).
        log_loss = mean_m -sum_c q_mc log p_mc                      (nats)
        brier    = mean_m (p_m - y_m)^2               binary (N,) input
                   mean_m sum_c (p_mc - q_mc)^2       (N, C) input (Brier 1950)
    """
    p, q = _as_distributions(prob, label)
    log_loss = -(q * p.clamp_min(1e-12).log()).sum(-1).mean()
    brier = ((p[:, 1] - q[:, 1]) ** 2).mean() if prob.dim() == 1 else ((p - q) ** 2).sum(-1).mean()
    table = reliability(prob, label, bins)
    return {"log_loss": float(log_loss), "brier": float(brier), "ece": ece_of(table), "reliability": table}


def comparison_metrics(delta: torch.Tensor, label: torch.Tensor | None = None, bins: int = 10) -> dict:
    """accuracy, log_loss, brier and ece of comparisons with d = r_w - r_l (M,) and labels y (default 1),
    plus the reliability table of p = sigmoid(d).

    accuracy = mean([d > 0] y + [d < 0] (1 - y) + [d = 0] / 2), the expected agreement with the labels;
    log_loss = mean(-[y log sigmoid(d) + (1 - y) log sigmoid(-d)]) (nats); brier = mean((sigmoid(d) - y)^2).
    """
    delta = delta.double()
    y = torch.ones_like(delta) if label is None else label.double()
    agree = torch.where(delta > 0, y, 1 - y)
    agree = torch.where(delta == 0, torch.full_like(y, 0.5), agree)
    log_loss = -(y * F.logsigmoid(delta) + (1 - y) * F.logsigmoid(-delta))
    cal = calibration(torch.sigmoid(delta), y, bins)
    return {"accuracy": float(agree.mean()), "log_loss": float(log_loss.mean()), "brier": cal["brier"],
            "ece": cal["ece"], "comparisons": int(delta.numel()), "reliability": cal["reliability"]}


def gold_agreement(delta: torch.Tensor, gap: torch.Tensor, bins: int = 4) -> dict:
    """How often score differences d (M,) order comparisons as a gold judge does, given gold gaps g (M,).

        agreement = mean over comparisons with g != 0 of ([d g > 0] + [d = 0] / 2)

    overall, and in `bins` bins of equal count by |g|, smallest gaps first (`by_gap`: the |g| range, count
    and agreement of each): a disagreement at a large gold gap is an error, at a small one a close call.
    With simulated labels this measures the model against the judge itself, without the label noise.
    """
    d, g = delta.double(), gap.double()
    keep = g != 0
    d, g = d[keep], g[keep]
    hits = (d * g > 0).double() + 0.5 * (d == 0).double()
    size = g.abs()
    by_gap = [{"gap_low": float(size[part].min()), "gap_high": float(size[part].max()), "count": len(part),
               "agreement": float(hits[part].mean())} for part in size.argsort().tensor_split(bins) if len(part)]
    return {"agreement": float(hits.mean()) if len(hits) else float("nan"), "comparisons": int(keep.sum()),
            "ties_left_out": int((~keep).sum()), "by_gap": by_gap}


def win_rate(scores: torch.Tensor, baseline: torch.Tensor) -> float:
    """mean([s_i > b_i] + [s_i = b_i] / 2): how often the policy beats the baseline on the same prompt."""
    if scores.shape != baseline.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and baseline {tuple(baseline.shape)}: one baseline per score")
    s, b = scores.double(), baseline.double()
    return float(((s > b).double() + 0.5 * (s == b).double()).mean())


def describe(values: torch.Tensor) -> dict:
    """mean, std (population), stderr = std_{n-1} / sqrt(n), min and max of a 1-D tensor."""
    v = values.double()
    n = v.numel()
    if not n:
        raise ValueError("describe: no values")
    stderr = float(v.std() / math.sqrt(n)) if n > 1 else float("nan")
    return {"mean": float(v.mean()), "std": float(v.std(unbiased=False)), "stderr": stderr,
            "min": float(v.min()), "max": float(v.max())}


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two 1-D tensors; nan when either is constant."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = x.norm() * y.norm()
    return float((x * y).sum() / denom) if denom > 0 else float("nan")
