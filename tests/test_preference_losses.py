"""DPO-family losses: hand-computed values, and parity with TRL's own loss code on random inputs."""

import math
import types
from collections import defaultdict

import pytest
import torch

from alignkit.losses.preference import (
    PREFERENCE_LOSSES,
    cdpo_loss,
    dpo_loss,
    ipo_loss,
    kto_loss,
    log1mexp,
    orpo_loss,
    simpo_loss,
)


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def softplus(x):
    return math.log1p(math.exp(x))  # -log sigmoid(-x)


# ---- hand-computed values -------------------------------------------------------------------------
def test_dpo_hand_computed():
    # h = (-1 - -2) - (-3 - -2) = 2, beta h = 1 -> -log sigmoid(1) = log(1 + e^-1)
    loss, m = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5)
    assert loss.item() == pytest.approx(softplus(-1.0), abs=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(0.5)
    assert m["rewards/rejected"].item() == pytest.approx(-0.5)
    assert m["rewards/margin"].item() == pytest.approx(1.0)
    assert m["rewards/accuracy"].item() == 1.0


def test_dpo_soft_label_and_normaliser():
    # p = 0.25: -0.25 log sigmoid(1) - 0.75 log sigmoid(-1)
    loss, _ = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5, label=t(0.25))
    assert loss.item() == pytest.approx(0.25 * softplus(-1.0) + 0.75 * softplus(1.0), abs=1e-6)
    # two pairs normalised by a global count of 4: the sum / 4; a tie counts 1/2 towards accuracy
    loss, m = dpo_loss(t(-1.0, -2.0), t(-3.0, -2.0), t(-2.0, -2.0), t(-2.0, -2.0), beta=0.5, normaliser=4)
    assert loss.item() == pytest.approx((softplus(-1.0) + math.log(2)) / 4, abs=1e-6)
    assert m["rewards/accuracy"].item() == pytest.approx(1.5 / 4)


def test_cdpo_hand_computed():
    # epsilon 0.1: p = 0.9
    loss, _ = cdpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5, epsilon=0.1)
    assert loss.item() == pytest.approx(0.9 * softplus(-1.0) + 0.1 * softplus(1.0), abs=1e-6)
    # a soft label y = 0 with epsilon 0.1 gives p = 0.1
    loss, _ = cdpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5, epsilon=0.1, label=t(0.0))
    assert loss.item() == pytest.approx(0.1 * softplus(-1.0) + 0.9 * softplus(1.0), abs=1e-6)


def test_ipo_hand_computed():
    # mean log-ratio margin 2, target 1 / (2 * 0.5) = 1 -> (2 - 1)^2 = 1; with tau 0.25 the target is 2 -> 0
    assert ipo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), tau=0.5)[0].item() == pytest.approx(1.0)
    assert ipo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), tau=0.25)[0].item() == pytest.approx(0.0, abs=1e-12)


def test_simpo_hand_computed():
    # 2 * -1 - 2 * -1.5 - 1 = 0 -> log 2; no reference anywhere
    loss, m = simpo_loss(t(-1.0), t(-1.5), beta=2.0, gamma=1.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert m["rewards/margin"].item() == pytest.approx(1.0)


def test_orpo_hand_computed():
    # P(chosen) = 0.5 (odds 1), P(rejected) = 0.2 (odds 1/4): log odds ratio = log 4
    # L = -log 0.5 + 0.5 * -log sigmoid(log 4) = log 2 + 0.5 log(5/4)
    loss, m = orpo_loss(t(math.log(0.5)), t(math.log(0.2)), lam=0.5)
    assert loss.item() == pytest.approx(math.log(2) + 0.5 * math.log(1.25), abs=1e-6)
    assert m["log_odds_ratio"].item() == pytest.approx(math.log(4), abs=1e-6)
    assert m["nll"].item() == pytest.approx(math.log(2), abs=1e-6)


def test_kto_hand_computed():
    # ratios r = [1, -1]; z0 = mean([-3 - -4, -3 - -4]) = 1; beta = 1
    # desirable: 1 * (1 - sigmoid(0)) = 0.5; undesirable: 2 * (1 - sigmoid(1 - -1)) = 2 (1 - sigmoid(2))
    policy = t(-1.0, -2.0).requires_grad_()
    kl_policy = t(-3.0, -3.0).requires_grad_()
    loss, m = kto_loss(policy, t(-2.0, -1.0), torch.tensor([True, False]), kl_policy, t(-4.0, -4.0),
                       beta=1.0, lambda_d=1.0, lambda_u=2.0)
    sig2 = 1 / (1 + math.exp(-2))
    assert loss.item() == pytest.approx((0.5 + 2 * (1 - sig2)) / 2, abs=1e-6)
    assert m["kl"].item() == pytest.approx(1.0)
    # implicit rewards beta r as (sum, count) over the desirable / undesirable rows
    assert [float(v) for v in m["rewards/chosen"]] == [1.0, 1.0]
    assert [float(v) for v in m["rewards/rejected"]] == [-1.0, 1.0]
    none_desirable = kto_loss(t(-1.0), t(-2.0), torch.tensor([False]), t(-3.0), t(-4.0))[1]
    assert int(none_desirable["rewards/chosen"][1]) == 0  # counts no row, so the engine logs none
    loss.backward()
    assert kl_policy.grad is None  # the reference point is detached
    assert policy.grad is not None
    # z0 is clamped at 0: a negative KL estimate gives the same loss as 0
    a = kto_loss(t(-1.0, -2.0), t(-2.0, -1.0), torch.tensor([True, False]), t(-5.0), t(-4.0), beta=1.0)[0]
    b = kto_loss(t(-1.0, -2.0), t(-2.0, -1.0), torch.tensor([True, False]), t(-4.0), t(-4.0), beta=1.0)[0]
    assert a.item() == pytest.approx(b.item())


def test_loss_table_covers_the_family():
    assert set(PREFERENCE_LOSSES) == {"dpo", "cdpo", "ipo", "simpo", "orpo", "kto"}
    assert not PREFERENCE_LOSSES["simpo"].reference and not PREFERENCE_LOSSES["orpo"].reference
    assert not PREFERENCE_LOSSES["kto"].paired


# ---- parity with TRL --------------------------------------------------------------------------------
class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x

    gather = gather_for_metrics


class _FakeLM:
    """Stands in for a model called with TRL's fused LM head: returns queued per-token log-probs."""

    training = True

    def __init__(self, *per_token):
        self.queue = list(per_token)

    def __call__(self, **kwargs):
        logps = self.queue.pop(0)
        zeros = torch.zeros_like(logps)
        return types.SimpleNamespace(log_probs=logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def _random_sequences(n, t=12, seed=0):
    """Per-token log-probs (n, t - 1) that are 0 outside the completion, the completion mask (n, t), lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, t - 3, (n,), generator=g)
    mask = torch.zeros(n, t, dtype=torch.long)
    for i, n_tokens in enumerate(lengths.tolist()):
        mask[i, t - n_tokens :] = 1  # completion at the end; position 0 is always prompt
    per_token = -torch.rand(n, t - 1, generator=g) * 3 * mask[:, 1:]
    return per_token, mask, lengths.float()


def _trl_stub(cls, **attrs):
    obj = cls.__new__(cls)
    base = dict(accelerator=_Accelerator(), aux_loss_enabled=False, _metrics={"train": defaultdict(list)},
                _total_train_tokens=0, _tp_size=1, precompute_ref_logps=True)
    for k, v in {**base, **attrs}.items():
        setattr(obj, k, v)
    return obj


@pytest.mark.parametrize("loss_type", ["dpo", "ipo"])
def test_dpo_and_ipo_match_trl(loss_type):
    trl = pytest.importorskip("trl")
    b, beta = 6, 0.3
    per_token, mask, lengths = _random_sequences(2 * b)
    ref = -torch.rand(2 * b) * 20
    model = _FakeLM(per_token)
    trainer = _trl_stub(trl.DPOTrainer, model=model, ld_alpha=None, f_divergence_type="reverse_kl",
                        loss_types=["sigmoid" if loss_type == "dpo" else "ipo"], loss_weights=[1.0], beta=beta,
                        use_weighting=False, label_smoothing=0.0)
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "ref_chosen_logps": ref[:b], "ref_rejected_logps": ref[b:]}
    expected = trainer._compute_loss(model, inputs, return_outputs=False)
    sums = per_token.sum(-1)
    if loss_type == "dpo":
        ours, metrics = dpo_loss(sums[:b], sums[b:], ref[:b], ref[b:], beta=beta)
        trl_margin = trainer._metrics["train"]["rewards/margins"][-1]
        assert metrics["rewards/margin"].item() == pytest.approx(trl_margin, abs=1e-5)
    else:
        ours, _ = ipo_loss(*(sums / lengths).chunk(2), *(ref / lengths).chunk(2), tau=beta)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)


def _cpo_stub(loss_type, beta, label_smoothing=0.0, simpo_gamma=0.5):
    from trl.experimental.cpo import CPOTrainer

    return _trl_stub(CPOTrainer, alpha=0.0, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                     simpo_gamma=simpo_gamma)


def test_cdpo_matches_trl_label_smoothing():
    """TRL 1.x keeps the cDPO form in its CPO trainer's `sigmoid` loss (reference-free, so we pass log-ratios)."""
    pytest.importorskip("trl")
    g = torch.Generator().manual_seed(1)
    chosen, rejected, ref_c, ref_r = (-torch.rand(8, generator=g) * 30 for _ in range(4))
    stub = _cpo_stub("sigmoid", beta=0.2, label_smoothing=0.15)
    expected = stub.cpo_loss(chosen - ref_c, rejected - ref_r)[0].mean()
    ours, _ = cdpo_loss(chosen, rejected, ref_c, ref_r, beta=0.2, epsilon=0.15)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)


def test_simpo_matches_trl():
    pytest.importorskip("trl")
    g = torch.Generator().manual_seed(2)
    chosen, rejected = -torch.rand(8, generator=g) * 3, -torch.rand(8, generator=g) * 3  # per-token means
    expected = _cpo_stub("simpo", beta=2.0, simpo_gamma=0.7).cpo_loss(chosen, rejected)[0].mean()
    ours, _ = simpo_loss(chosen, rejected, beta=2.0, gamma=0.7)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)


def test_orpo_matches_trl():
    pytest.importorskip("trl")
    from trl.experimental.orpo import ORPOTrainer

    g = torch.Generator().manual_seed(3)
    chosen, rejected = -torch.rand(8, generator=g) * 3 - 0.01, -torch.rand(8, generator=g) * 3 - 0.01
    stub = _trl_stub(ORPOTrainer, beta=0.25)
    losses, _, _, _, log_odds = stub.odds_ratio_loss(chosen, rejected)
    nll = -chosen.mean()  # TRL takes its SFT term as an input (computed over prompt + completion tokens)
    ours, metrics = orpo_loss(chosen, rejected, lam=0.25)
    assert ours.item() == pytest.approx((nll - losses.mean()).item(), rel=1e-5)
    assert metrics["log_odds_ratio"].item() == pytest.approx(log_odds.item(), rel=1e-5)


def test_kto_matches_trl():
    trl = pytest.importorskip("trl")
    b, beta = 8, 0.4
    per_token, mask, _ = _random_sequences(b, seed=4)
    kl_per_token, kl_mask, _ = _random_sequences(b, seed=5)
    desirable = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0])
    g = torch.Generator().manual_seed(6)
    ref, ref_kl = -torch.rand(b, generator=g) * 20, -torch.rand(b, generator=g) * 20 - 5
    model = _FakeLM(kl_per_token, per_token)  # TRL scores the mismatched (KL) pairs first
    trainer = _trl_stub(trl.KTOTrainer, model=model, calculate_KL=True, loss_type="kto", beta=beta,
                        desirable_weight=1.3, undesirable_weight=0.8)
    batch = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
             "KL_input_ids": torch.zeros_like(kl_mask), "KL_attention_mask": torch.ones_like(kl_mask),
             "KL_completion_mask": kl_mask, "label": desirable, "ref_logps": ref, "ref_KL_logps": ref_kl}
    expected = trainer._compute_loss(model, batch, return_outputs=False)
    ours, metrics = kto_loss(per_token.sum(-1), ref, desirable.bool(), kl_per_token.sum(-1), ref_kl, beta=beta,
                             lambda_d=1.3, lambda_u=0.8)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["kl"].item() == pytest.approx(trainer._metrics["train"]["kl"][-1], rel=1e-5)


def test_inputs_of_different_lengths_are_an_error():
    """A (1,) against a (B,) broadcast into a loss over pairs that do not exist."""
    from alignkit.losses.reward import bradley_terry_loss

    with pytest.raises(ValueError, match=r"one entry per pair\), got chosen_logps \(2,\), rejected_logps \(1,\)"):
        dpo_loss(t(1.0, 2.0), t(1.0), t(0.0, 0.0), t(0.0, 0.0))
    with pytest.raises(ValueError, match="chosen_rewards"):
        bradley_terry_loss(t(1.0, 2.0), t(0.0))
    with pytest.raises(ValueError, match="policy_logps"):
        kto_loss(t(1.0, 2.0), t(1.0), torch.tensor([True, False]), t(0.0), t(0.0))


def test_orpo_gradient_is_finite_for_a_memorised_completion():
    """Mean log-prob within ~3e-8 of 0: the unused branch of log1mexp (log1p(-exp(x)) = -inf) made the gradient NaN."""
    chosen = t(-1e-9).requires_grad_()
    loss, _ = orpo_loss(chosen, t(-2.0))
    loss.backward()
    assert torch.isfinite(chosen.grad).all()
    assert log1mexp(t(-1e-3)).item() == pytest.approx(math.log(-math.expm1(-1e-3)), rel=1e-6)
    assert log1mexp(t(-5.0)).item() == pytest.approx(math.log1p(-math.exp(-5.0)), rel=1e-6)
