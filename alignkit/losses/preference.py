"""Direct preference losses: DPO, cDPO (label smoothing), IPO, SimPO, ORPO and KTO.

Every function takes sequence log-probabilities (one number per completion) and floats and returns
`(loss, metrics)`. The loss is a sum over the batch divided by `normaliser` (default: the batch
size), so passing the number of pairs in the whole global batch makes gradient accumulation and
data parallelism give the gradient of one large batch. Every metric is likewise a sum / normaliser,
so summing metrics over micro-batches gives the global-batch mean.

Notation: pi = policy, pi_ref = reference, y_w / y_l = chosen / rejected completion of prompt x,
log pi(y|x) = sum of token log-probs of the completion, |y| = its number of tokens,
h = log pi(y_w|x)/pi_ref(y_w|x) - log pi(y_l|x)/pi_ref(y_l|x) (the DPO "implicit reward margin" / beta).

`PREFERENCE_LOSSES` maps a name to the function and what it needs (a reference model, per-token
means instead of sums, paired or unpaired data, which config fields are its hyperparameters).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _n(batch: Tensor, normaliser: float | None) -> float:
    return float(batch.shape[0]) if normaliser is None else normaliser


def same_shape(**tensors: Tensor | None) -> None:
    """ValueError unless the given tensors (None: absent) share one shape: a (1,) against a (B,) would broadcast
    into a loss over pairs that do not exist."""
    shapes = {k: tuple(v.shape) for k, v in tensors.items() if isinstance(v, Tensor)}
    if len(set(shapes.values())) > 1:
        raise ValueError("inputs must share one shape (one entry per pair), got "
                         + ", ".join(f"{k} {s}" for k, s in shapes.items()))


def _pair_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor, n: float) -> dict[str, Tensor]:
    """Implicit-reward metrics of a batch of pairs, each a sum / n (ties count 1/2 towards accuracy)."""
    with torch.no_grad():
        margin = chosen_rewards - rejected_rewards
        correct = (margin > 0).float() + 0.5 * (margin == 0).float()
        return {
            "rewards/chosen": chosen_rewards.sum() / n,
            "rewards/rejected": rejected_rewards.sum() / n,
            "rewards/margin": margin.sum() / n,
            "rewards/accuracy": correct.sum() / n,
        }


def dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    label: Tensor | float | None = None,
    normaliser: float | None = None,
):
    """Direct Preference Optimisation (Rafailov et al. 2023, eq. 7), with optional soft labels.

        h   = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]
        l   = -p log sigmoid(beta h) - (1 - p) log sigmoid(-beta h)
        L   = (1 / N) sum_b l_b

    p is the probability that y_w is preferred: 1 by default (the paper's loss -log sigmoid(beta h)),
    a per-pair soft label in [0, 1] (`label`, shape (B,)), or 1 - epsilon for cDPO. The implicit
    rewards are beta (log pi - log pi_ref). All log-probs (B,) are sums over completion tokens.
    """
    same_shape(chosen_logps=chosen_logps, rejected_logps=rejected_logps, ref_chosen_logps=ref_chosen_logps,
               ref_rejected_logps=ref_rejected_logps, label=label)
    chosen_ratio = chosen_logps.float() - ref_chosen_logps.float()  # (B,)
    rejected_ratio = rejected_logps.float() - ref_rejected_logps.float()  # (B,)
    logits = beta * (chosen_ratio - rejected_ratio)  # (B,)
    p = torch.ones_like(logits) if label is None else torch.as_tensor(label, dtype=logits.dtype).expand_as(logits)
    per_pair = -p * F.logsigmoid(logits) - (1 - p) * F.logsigmoid(-logits)
    n = _n(logits, normaliser)
    return per_pair.sum() / n, _pair_metrics(beta * chosen_ratio.detach(), beta * rejected_ratio.detach(), n)


def cdpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    epsilon: float = 0.1,
    label: Tensor | float | None = None,
    normaliser: float | None = None,
):
    """Conservative DPO: DPO with label smoothing (Mitchell 2023, "A note on DPO with noisy preferences").

        p = epsilon + (1 - 2 epsilon) y          (y = label, 1 by default, so p = 1 - epsilon)
        L = (1 / N) sum_b [-p log sigmoid(beta h) - (1 - p) log sigmoid(-beta h)]

    epsilon is the assumed probability that a label is flipped; h as in `dpo_loss`. The same formula
    as the `sigmoid` loss with `label_smoothing` of TRL's CPO trainer (and of DPO trainers before TRL 1).
    """
    y = 1.0 if label is None else torch.as_tensor(label, dtype=torch.float32)
    p = epsilon + (1 - 2 * epsilon) * y
    return dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, p, normaliser)


def ipo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    tau: float = 0.1,
    normaliser: float | None = None,
):
    """Identity Preference Optimisation (Azar et al. 2023, "A General Theoretical Paradigm...", eq. 17).

        h_bar = [mean log pi(y_w|x) - mean log pi_ref(y_w|x)] - [mean log pi(y_l|x) - mean log pi_ref(y_l|x)]
        L     = (1 / N) sum_b (h_bar_b - 1 / (2 tau))^2

    A squared loss that regresses the log-ratio margin to 1 / (2 tau) instead of pushing it to
    infinity, so it does not overfit deterministic preferences. Log-probs are per-token MEANS over
    the completion (sum / |y|): the convention of TRL (checked with the IPO authors), which keeps
    tau comparable across completion lengths. Implicit rewards are tau (mean log-ratio).
    """
    same_shape(chosen_logps=chosen_logps, rejected_logps=rejected_logps, ref_chosen_logps=ref_chosen_logps,
               ref_rejected_logps=ref_rejected_logps)
    chosen_ratio = chosen_logps.float() - ref_chosen_logps.float()  # (B,)
    rejected_ratio = rejected_logps.float() - ref_rejected_logps.float()  # (B,)
    per_pair = (chosen_ratio - rejected_ratio - 1 / (2 * tau)) ** 2
    n = _n(per_pair, normaliser)
    return per_pair.sum() / n, _pair_metrics(tau * chosen_ratio.detach(), tau * rejected_ratio.detach(), n)


def simpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
    normaliser: float | None = None,
):
    """Simple Preference Optimisation (Meng et al. 2024, eq. 6): no reference model.

        L = -(1 / N) sum_b log sigmoid(beta mean log pi(y_w|x) - beta mean log pi(y_l|x) - gamma)

    The implicit reward is the length-normalised log-likelihood beta / |y| log pi(y|x) (log-probs
    here are per-token MEANS), and gamma > 0 is a target reward margin. The paper uses beta 2-2.5 and
    gamma / beta about 0.5. Same as TRL's CPO trainer with loss_type="simpo", simpo_gamma=gamma.
    """
    same_shape(chosen_logps=chosen_logps, rejected_logps=rejected_logps)
    chosen_rewards = beta * chosen_logps.float()  # (B,)
    rejected_rewards = beta * rejected_logps.float()  # (B,)
    per_pair = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    n = _n(per_pair, normaliser)
    return per_pair.sum() / n, _pair_metrics(chosen_rewards.detach(), rejected_rewards.detach(), n)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2 (Maechler 2012). Each branch sees only inputs
    of its own side: the unused branch's infinite gradient would otherwise turn the where's into NaN (near x = 0,
    where log1p(-exp(x)) is -inf in float32)."""
    cut = -0.6931471805599453
    return torch.where(x < cut, torch.log1p(-torch.exp(x.clamp(max=cut))), torch.log(-torch.expm1(x.clamp(min=cut))))


def orpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    lam: float = 0.1,
    normaliser: float | None = None,
):
    """Odds Ratio Preference Optimisation (Hong et al. 2024, eqs. 6-7): SFT plus an odds-ratio term, no reference.

        P(y|x)     = exp(mean log pi(y|x))              (length-normalised likelihood)
        log odds   = log P - log(1 - P)
        L_OR       = -log sigmoid(log odds(y_w|x) - log odds(y_l|x))
        L          = (1 / N) sum_b [-mean log pi(y_w|x) + lam L_OR]

    The first term is the SFT negative log-likelihood of the chosen completion (per-token mean over
    its tokens, as in the paper; TRL's ORPO trainer instead averages cross-entropy over the prompt
    and completion tokens of the whole batch). Log-probs here are per-token MEANS. Metrics: the
    implicit rewards lam * mean log pi (as TRL logs them), `nll` and `log_odds_ratio`.
    """
    same_shape(chosen_logps=chosen_logps, rejected_logps=rejected_logps)
    chosen, rejected = chosen_logps.float(), rejected_logps.float()  # (B,)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))  # (B,)
    odds_term = -F.logsigmoid(log_odds)
    per_pair = -chosen + lam * odds_term
    n = _n(per_pair, normaliser)
    metrics = _pair_metrics(lam * chosen.detach(), lam * rejected.detach(), n)
    metrics["nll"] = -chosen.detach().sum() / n
    metrics["log_odds_ratio"] = log_odds.detach().sum() / n
    return per_pair.sum() / n, metrics


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl_policy_logps: Tensor,
    kl_ref_logps: Tensor,
    beta: float = 0.1,
    lambda_d: float = 1.0,
    lambda_u: float = 1.0,
    normaliser: float | None = None,
):
    """Kahneman-Tversky Optimisation (Ethayarajh et al. 2024, eq. 7) on unpaired desirable/undesirable data.

        r_b  = log pi(y_b|x_b) - log pi_ref(y_b|x_b)
        z0   = max(0, mean_j [log pi(y'_j|x_j) - log pi_ref(y'_j|x_j)])    (detached)
        l_b  = lambda_D (1 - sigmoid(beta (r_b - z0)))    if y_b is desirable
               lambda_U (1 - sigmoid(beta (z0 - r_b)))    otherwise
        L    = (1 / N) sum_b l_b

    The reference point z0 estimates KL(pi || pi_ref) from mismatched pairs (x_j, y'_j): prompts
    paired with another example's completion, `kl_policy_logps` / `kl_ref_logps` (M,). It is clamped
    at 0 and carries no gradient. `desirable` (B,) is bool; log-probs are sums over completion tokens.
    Same as TRL's KTOTrainer (loss_type="kto", desirable_weight, undesirable_weight). Metrics: `kl`
    (z0, weighted by this batch's share B / N of the global batch) and the mean implicit reward beta r
    of the desirable (`rewards/chosen`) and undesirable (`rewards/rejected`) rows, each a tuple
    (sum, count) so that the engine averages over the global batch's rows of that kind (a batch without
    any logs none).
    """
    same_shape(policy_logps=policy_logps, ref_logps=ref_logps, desirable=desirable)
    same_shape(kl_policy_logps=kl_policy_logps, kl_ref_logps=kl_ref_logps)
    ratio = policy_logps.float() - ref_logps.float()  # (B,)
    z0 = (kl_policy_logps.float() - kl_ref_logps.float()).mean().clamp(min=0).detach()
    want = desirable.bool()
    per_example = torch.where(
        want, lambda_d * (1 - torch.sigmoid(beta * (ratio - z0))), lambda_u * (1 - torch.sigmoid(beta * (z0 - ratio)))
    )
    n = _n(per_example, normaliser)
    with torch.no_grad():
        rewards, share = beta * ratio, ratio.shape[0] / n  # share: this batch's weight in the global mean
        metrics = {"kl": z0 * share, "rewards/chosen": ((rewards * want).sum(), want.sum()),
                   "rewards/rejected": ((rewards * ~want).sum(), (~want).sum())}
    return per_example.sum() / n, metrics


@dataclass(frozen=True)
class PreferenceLoss:
    """A loss of the table and what it needs from the algorithm."""

    fn: Callable
    hyper: Mapping[str, str]  # keyword argument of `fn` -> field of the stage config that sets it
    reference: bool = True  # needs reference log-probs
    average: bool = False  # takes per-token mean log-probs (else sums over the completion)
    paired: bool = True  # {prompt, chosen, rejected}; False = unpaired {prompt, completion, label}
    soft_labels: bool = False  # accepts a per-pair `label` in [0, 1]


PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    "dpo": PreferenceLoss(dpo_loss, {"beta": "beta"}, soft_labels=True),
    "cdpo": PreferenceLoss(cdpo_loss, {"beta": "beta", "epsilon": "epsilon"}, soft_labels=True),
    "ipo": PreferenceLoss(ipo_loss, {"tau": "tau"}, average=True),
    "simpo": PreferenceLoss(simpo_loss, {"beta": "beta", "gamma": "gamma"}, reference=False, average=True),
    "orpo": PreferenceLoss(orpo_loss, {"lam": "orpo_lambda"}, reference=False, average=True),
    "kto": PreferenceLoss(kto_loss, {"beta": "beta", "lambda_d": "lambda_d", "lambda_u": "lambda_u"}, paired=False),
}
