"""Pure RL ops and losses against values worked out by hand (see each comment)."""

import math

import pytest
import torch

from alignkit.errors import UserError
from alignkit.losses.policy import (
    AGGREGATIONS,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    kl_loss,
)
from alignkit.ops.advantages import MovingAverage, equal_groups, gae, group_centred, group_normalised, leave_one_out
from alignkit.ops.kl import KL_ESTIMATORS
from alignkit.ops.stats import explained_variance, masked_mean, masked_var, masked_whiten
from alignkit.rewards.base import CallableReward, WeightedSum, length_penalty, row_fields
from alignkit.rewards.kl import AdaptiveKL, FixedKL, kl_shaped_rewards

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
M = torch.tensor([[True, True, True], [True, False, False]])


def test_masked_stats():
    # kept: 1, 2, 3, 4 -> mean 2.5; squared deviations 2.25 + .25 + .25 + 2.25 = 5 -> var 5/3 (unbiased), 5/4
    assert masked_mean(X, M).item() == pytest.approx(2.5)
    assert masked_var(X, M).item() == pytest.approx(5 / 3)
    assert masked_var(X, M, unbiased=False).item() == pytest.approx(1.25)
    assert masked_mean(X, M, dim=1).tolist() == pytest.approx([2.0, 4.0])
    white = masked_whiten(X, M)
    assert white[0].tolist() == pytest.approx([(v - 2.5) / math.sqrt(5 / 3) for v in (1, 2, 3)], abs=1e-6)
    assert white[1, 1:].tolist() == [0.0, 0.0]
    scaled = masked_whiten(X, M, shift_mean=False)  # scale only: a 0 reward stays 0 (it moved by mean (1 - 1/std))
    assert scaled[0].tolist() == pytest.approx([v / math.sqrt(5 / 3) for v in (1, 2, 3)], abs=1e-6)


def gae_loop(rewards, values, gamma, lam):
    """GAE of one unpadded trajectory, written step by step from the definition (no recurrence)."""
    n = len(rewards)
    deltas = [rewards[t] + gamma * (values[t + 1] if t + 1 < n else 0.0) - values[t] for t in range(n)]
    return [sum((gamma * lam) ** (k - t) * deltas[k] for k in range(t, n)) for t in range(n)]


def test_gae_hand_and_loop():
    # r = (0, 0, 1), V = .5: delta = (-.05, -.05, .5) at gamma .9; A2 = .5, A1 = -.05 + .45 * .5 = .175,
    # A0 = -.05 + .45 * .175 = .02875
    rewards, values = torch.tensor([[0.0, 0.0, 1.0]]), torch.full((1, 3), 0.5)
    adv, ret = gae(rewards, values, torch.ones(1, 3, dtype=torch.bool), 0.9, 0.5)
    assert adv[0].tolist() == pytest.approx([0.02875, 0.175, 0.5])
    assert ret[0].tolist() == pytest.approx([0.52875, 0.675, 1.0])
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    lengths = [6, 4, 1]
    mask = torch.arange(6) < torch.tensor(lengths).unsqueeze(1)
    adv, _ = gae(rewards, values, mask, 0.95, 0.9)
    for b, n in enumerate(lengths):
        want = gae_loop(rewards[b, :n].tolist(), values[b, :n].tolist(), 0.95, 0.9)
        assert adv[b, :n].tolist() == pytest.approx(want, abs=1e-5)
        assert adv[b, n:].abs().sum() == 0


def test_kl_estimators():
    # pi = .5, pi_ref = .25: log r = log .5; k1 = log 2, k2 = (log 2)^2 / 2, k3 = (.5 - 1) + log 2
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    l2 = math.log(2)
    assert KL_ESTIMATORS["k1"](logp, ref).item() == pytest.approx(l2)
    assert KL_ESTIMATORS["k2"](logp, ref).item() == pytest.approx(l2**2 / 2)
    assert KL_ESTIMATORS["k3"](logp, ref).item() == pytest.approx(-0.5 + l2)
    for fn in KL_ESTIMATORS.values():
        assert fn(logp, logp).item() == 0.0


def test_group_advantages():
    scores, group = torch.tensor([1.0, 2.0, 3.0, 5.0]), torch.tensor([0, 0, 1, 1])
    # group 0: mean 1.5, unbiased std sqrt(.5); group 1: mean 4, std sqrt(2)
    want = [-0.5 / (0.5**0.5 + 1e-4), 0.5 / (0.5**0.5 + 1e-4), -1 / (2**0.5 + 1e-4), 1 / (2**0.5 + 1e-4)]
    assert group_normalised(scores, group).tolist() == pytest.approx(want)
    assert group_centred(scores, group).tolist() == pytest.approx([-0.5, 0.5, -1.0, 1.0])
    # RLOO over (1, 2, 6): 1 - 4, 2 - 3.5, 6 - 1.5
    assert leave_one_out(torch.tensor([1.0, 2.0, 6.0]), torch.zeros(3, dtype=torch.long)).tolist() == [-3.0, -1.5, 4.5]
    assert equal_groups(torch.tensor([1.0, 1.0, 0.0, 2.0]), group).tolist() == [True, True, False, False]
    empty = torch.zeros(0)
    for fn in (group_normalised, group_centred, leave_one_out, equal_groups):
        assert fn(empty, empty.long()).numel() == 0
        with pytest.raises(ValueError, match="one shape"):
            fn(scores, group[:3])


def test_a_group_of_equal_float32_scores_has_advantage_zero():
    """A float32 group sum / count misses the shared score by a rounding error for many values (three VADER
    scores of 0.7717: GRPO gave each -6e-4, and DAPO's drop_equal_groups kept the group)."""
    g = torch.Generator().manual_seed(0)
    for k in (3, 4, 5, 7, 8, 16):
        values = torch.rand(50, generator=g)
        scores = values.repeat_interleave(k)  # 50 groups of k equal scores
        group = torch.arange(50).repeat_interleave(k)
        assert equal_groups(scores, group).all(), k
        for fn in (group_normalised, group_centred, leave_one_out):
            assert torch.count_nonzero(fn(scores, group)) == 0, (fn.__name__, k)
    vader = torch.tensor([0.7717] * 3 + [0.1, 0.2, 0.3])
    assert equal_groups(vader, torch.tensor([0, 0, 0, 1, 1, 1])).tolist() == [True] * 3 + [False] * 3


def test_moving_average_baseline():
    b = MovingAverage(0.9)
    assert b.advantages(torch.tensor([1.0, 3.0])).tolist() == [-1.0, 1.0]  # first batch: its own mean
    b.update(torch.tensor([1.0, 3.0]))
    assert b.advantages(torch.tensor([4.0])).tolist() == [2.0]
    b.update(torch.tensor([4.0]))
    assert b.value == pytest.approx(0.9 * 2 + 0.1 * 4)


def test_clipped_policy_loss():
    # ratios 1.5 and .5, A = 1, eps .2: max(-1.5, -1.2) = -1.2 (clipped), max(-.5, -.8) = -.5 -> mean -.85
    old = torch.zeros(1, 2)
    logps = torch.log(torch.tensor([[1.5, 0.5]]))
    w = torch.ones(1, 2)
    loss, m = clipped_policy_loss(logps, old, torch.ones(1, 2), w, 2.0, 0.2)
    assert loss.item() == pytest.approx(-0.85)
    assert m["clipfrac"].item() == pytest.approx(0.5)
    # A = -1: max(1.5, 1.2) = 1.5, max(.5, .8) = .8 (clipped) -> 1.15
    loss, m = clipped_policy_loss(logps, old, -torch.ones(1, 2), w, 2.0, 0.2)
    assert loss.item() == pytest.approx(1.15)
    # clip-higher .6: 1.5 is inside (.8, 1.6) -> -1.5 - .5 = -2 / 2
    loss, _ = clipped_policy_loss(logps, old, torch.ones(1, 2), w, 2.0, 0.2, 0.6)
    assert loss.item() == pytest.approx(-1.0)
    # approx KL at ratio 1.5: .5 - log 1.5; at .5: -.5 + log 2
    assert m["approx_kl"].item() == pytest.approx((0.5 - math.log(1.5) - 0.5 + math.log(2)) / 2)
    # gradient at ratio 1 is -A * grad log pi (REINFORCE)
    x = torch.zeros(1, 2, requires_grad=True)
    clipped_policy_loss(x, torch.zeros(1, 2), torch.tensor([[2.0, -1.0]]), w, 1.0)[0].backward()
    assert x.grad.tolist() == [[-2.0, 1.0]]


def test_clipped_value_loss():
    # V = 1, old V = .5, R = 2, clip .2: V_clip = .7; max((1 - 2)^2, (.7 - 2)^2) = 1.69 -> .5 * 1.69
    one = torch.ones(1, 1)
    loss, m = clipped_value_loss(one, 0.5 * one, 2.0 * one, one, 1.0)
    assert loss.item() == pytest.approx(0.845)
    assert m["value_clipfrac"].item() == 1.0


def test_entropy_and_kl_loss():
    assert entropy_from_logits(torch.zeros(1, 1, 4)).item() == pytest.approx(math.log(4))
    assert entropy_from_logits(torch.tensor([[[0.0, -1e9]]])).item() == pytest.approx(0.0, abs=1e-6)
    loss, _ = kl_loss(torch.tensor([[1.0, 3.0]]), torch.tensor([[1.0, 0.0]]), 1.0)
    assert loss.item() == 1.0


def test_aggregations():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert AGGREGATIONS["token"][0](mask, 4).tolist() == [[1, 1, 0], [1, 0, 0]]
    assert AGGREGATIONS["sequence"][0](mask, 4).tolist() == [[0.5, 0.5, 0], [1, 0, 0]]
    assert AGGREGATIONS["constant"][0](mask, 4).tolist() == [[0.25, 0.25, 0], [0.25, 0, 0]]
    units = {k: v[1] for k, v in AGGREGATIONS.items()}
    assert units == {"token": "token", "sequence": "sequence", "constant": "sequence"}


def test_kl_shaped_rewards_and_controllers():
    # kl_t (k1) = (1, 0); r = -.5 * kl, + score 1 on the last kept token
    rewards, kl = kl_shaped_rewards(torch.tensor([1.0]), torch.tensor([[-1.0, -1.0, 0.0]]),
                                    torch.tensor([[-2.0, -1.0, 5.0]]), torch.tensor([[True, True, False]]), 0.5)
    assert rewards.tolist() == [[-0.5, 1.0, 0.0]]
    assert kl.tolist() == [[1.0, 0.0, 0.0]]
    ctl = AdaptiveKL(0.1, target=6.0, horizon=100)
    ctl.update(12.0, 10)  # error 1 -> clipped .2: beta * (1 + .2 * 10 / 100)
    assert ctl.beta == pytest.approx(0.102)
    ctl = AdaptiveKL(0.1, target=6.0, horizon=100)
    ctl.update(5.4, 10)  # error -.1
    assert ctl.beta == pytest.approx(0.1 * (1 - 0.1 * 10 / 100))
    with pytest.raises(ValueError, match="KL is nan"):
        ctl.update(float("nan"), 10)
    assert ctl.beta == pytest.approx(0.1 * (1 - 0.1 * 10 / 100))
    fixed = FixedKL(0.3)
    fixed.update(100.0, 10)
    assert fixed.beta == 0.3


def test_reward_sources():
    count = CallableReward(lambda prompts, completions, **kw: [c.count("a") for c in completions])
    const = CallableReward(lambda prompts, completions, bonus, **kw: bonus)
    total = WeightedSum([count, const], [2.0, 1.0])
    assert total.score(["p", "q"], ["aa", "b"], bonus=[0.5, 1.0]).tolist() == [4.5, 1.0]
    with pytest.raises(UserError, match="must return 2 numbers, got"):
        CallableReward(lambda prompts, completions: ["good"] * 2).score(["p", "q"], ["a", "b"])
    assert length_penalty(torch.tensor([1.0, 2.0]), torch.tensor([True, False]), -1.0).tolist() == [1.0, -1.0]
    assert length_penalty(torch.tensor([1.0, 2.0]), torch.tensor([True, False]), None).tolist() == [1.0, 2.0]
    assert length_penalty(torch.tensor([1.0, 2.0]), torch.tensor([1, 0]), -1.0).tolist() == [1.0, -1.0]  # a 0/1 mask
    # every row's fields reach the reward (only the first row's keys were passed), None where a row lacks one
    rows = [{"prompt": "a"}, {"messages": [], "reference": "good", "n": 2}]
    assert row_fields(rows) == {"reference": [None, "good"], "n": [None, 2]}
    # a row of rollout's output carries `completions`: passed on, it clashed with score's own argument (a TypeError)
    assert row_fields([{"prompt": "a", "completions": ["x", "y"], "prompts": "z", "n": 1}]) == {"n": [1]}


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.zeros(1, 3) + 2.0, returns, mask) == pytest.approx(0.0)
