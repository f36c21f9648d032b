"""Reward-model losses: Bradley–Terry pairwise and InstructGPT K-wise, with an optional centering term."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignkit.losses.preference import same_shape


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
    label: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    centering: float = 0.0,
    normaliser: float | None = None,
):
    """Negative log-likelihood of the preferences under the Bradley–Terry model.

        d_b = r_w,b - r_l,b - m_b
        l_b = -[y_b log sigmoid(d_b) + (1 - y_b) log sigmoid(-d_b)] + c (r_w,b + r_l,b)^2
        L   = (1 / N) sum_b w_b l_b

    r_w / r_l are the rewards of the chosen / rejected completions (B,). With hard labels (y = 1,
    the default) l_b = -log sigmoid(r_w - r_l - m_b): Bradley & Terry (1952) as used for reward models
    by Christiano et al. (2017), Stiennon et al. (2020) and Ouyang et al. (2022). The margin m
    (default 0) asks chosen to win by at least m (Touvron et al. 2023, Llama 2). A soft label y in
    [0, 1] is the probability that chosen is preferred (cross-entropy against it, e.g. RLAIF labels,
    Lee et al. 2023). c (r_w + r_l)^2 is the reward-centering term of Eisenstein et al. (2023), which
    pins the free additive constant of the rewards near 0. w_b weights each comparison (default 1);
    N defaults to sum_b w_b; pass the count over the whole global batch for accumulation.

    Returns (loss, metrics) where every metric is a weighted sum / N like the loss, so summing over
    micro-batches gives the global-batch mean: accuracy (share with r_w > r_l, ties count 1/2),
    chosen_reward, rejected_reward and reward_margin (mean r_w - r_l).
    """
    same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards, margin=margin, label=label,
               weight=weight)
    chosen, rejected = chosen_rewards.float(), rejected_rewards.float()
    weight = torch.ones_like(chosen) if weight is None else weight.float()
    delta = chosen - rejected if margin is None else chosen - rejected - margin.float()  # (B,)
    if label is None:
        nll = -F.logsigmoid(delta)
    else:
        y = label.float()
        nll = -(y * F.logsigmoid(delta) + (1 - y) * F.logsigmoid(-delta))
    per_pair = nll + centering * (chosen + rejected) ** 2 if centering else nll  # (B,)
    n = float(weight.sum()) if normaliser is None else normaliser
    loss = (weight * per_pair).sum() / n
    with torch.no_grad():
        diff = chosen - rejected
        correct = (diff > 0).float() + 0.5 * (diff == 0).float()
        metrics = {
            "accuracy": (weight * correct).sum() / n,
            "chosen_reward": (weight * chosen).sum() / n,
            "rejected_reward": (weight * rejected).sum() / n,
            "reward_margin": (weight * diff).sum() / n,
        }
    return loss, metrics


def kwise_loss(
    rewards: torch.Tensor,
    winners: torch.Tensor,
    losers: torch.Tensor,
    group: torch.Tensor,
    margin: torch.Tensor | None = None,
    label: torch.Tensor | None = None,
    centering: float = 0.0,
    normaliser: float | None = None,
):
    """InstructGPT's K-wise loss: all comparisons of one prompt form one batch element.

        loss = -(1 / G) sum_g (1 / M_g) sum_{(w, l) in g} log sigmoid(r_w - r_l)

    (Ouyang et al. 2022, eq. 1: with K ranked completions per prompt, M_g = C(K, 2); training on
    all pairs of a prompt as one element avoids overfitting from seeing each completion K - 1 times
    per epoch, and costs K forward passes instead of 2 C(K, 2).) With ties M_g counts the comparisons
    left. `rewards` (N,) are the rewards of every completion in the batch; comparison m says
    completion `winners[m]` beat `losers[m]` within group `group[m]` (M,). Margins, soft labels and
    centering are as in `bradley_terry_loss`, which this calls with weights 1 / M_g. G (the default
    normaliser) is the number of groups, so a batch of single-pair groups is exactly the pairwise loss.
    """
    sizes = torch.bincount(group)  # comparisons per group id
    weight = 1.0 / sizes[group].float()  # (M,)
    n = float((sizes > 0).sum()) if normaliser is None else normaliser
    return bradley_terry_loss(rewards[winners], rewards[losers], margin, label, weight, centering, n)
