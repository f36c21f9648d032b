"""Critic-free policy gradient: REINFORCE, RLOO, GRPO (and its Dr. GRPO and DAPO options), one algorithm.

The variants differ only in table entries, never in branches:
    advantage    ADVANTAGES:    grpo (group-normalised), dr_grpo (group-centred), rloo (leave-one-out),
                                reinforce (moving-average baseline)
    aggregation  AGGREGATIONS:  sequence (GRPO), constant (Dr. GRPO), token (DAPO)
    kl_in        KL_PLACEMENTS: loss (GRPO: + beta * k3 term) or reward (REINFORCE/RLOO: s - beta * KL(seq))
plus clip_low/clip_high (DAPO's clip-higher) and drop_equal_groups (DAPO). Every variant uses the
clipped ratio; with one epoch and one minibatch per rollout the ratio is 1 and its gradient equals
REINFORCE's A * grad log pi exactly, so plain REINFORCE/RLOO are the same loss.

Presets (set the keys under `pg.`):
    GRPO       advantage=grpo     aggregation=sequence kl_in=loss   (kl.estimator=k3)
    Dr. GRPO   advantage=dr_grpo  aggregation=constant
    DAPO       advantage=grpo     aggregation=token    clip_high=0.28 drop_equal_groups=true
    RLOO       advantage=rloo     aggregation=token    kl_in=reward
    REINFORCE  advantage=reinforce aggregation=token   kl_in=reward  (online.group_size=1 works)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from alignkit.algorithms.online import KLConfig, OnlineAlgorithm, OnlineStageConfig, run_online
from alignkit.config import check_interval, option
from alignkit.engine.online import OnlineConfig
from alignkit.errors import UserError
from alignkit.losses.policy import AGGREGATIONS, clipped_policy_loss, kl_loss
from alignkit.ops.advantages import MovingAverage, equal_groups, group_centred, group_normalised, leave_one_out
from alignkit.ops.kl import KL_ESTIMATORS
from alignkit.rollout.rollout import Rollout, forward_response

ADVANTAGES = {
    "grpo": lambda scores, group, baseline: group_normalised(scores, group),
    "dr_grpo": lambda scores, group, baseline: group_centred(scores, group),
    "rloo": lambda scores, group, baseline: leave_one_out(scores, group),
    "reinforce": lambda scores, group, baseline: baseline.advantages(scores),
}


def _sequence_kl(r: Rollout, estimator: str) -> torch.Tensor:
    return KL_ESTIMATORS[estimator](r.old_logps, r.ref_logps).masked_fill(~r.response_mask, 0.0).sum(-1)


# where the KL to the reference acts: name -> (scores used for advantages, weight of the KL loss term)
KL_PLACEMENTS = {
    "loss": (lambda r, beta, est: r.scores, 1.0),
    "reward": (lambda r, beta, est: r.scores - beta * _sequence_kl(r, est), 0.0),
}


@dataclass(frozen=True)
class PGOptions:
    advantage: Literal["grpo", "dr_grpo", "rloo", "reinforce"] = option("grpo", "Advantage estimator (see module doc)")
    aggregation: Literal["sequence", "constant", "token"] = option(
        "sequence", "Loss over tokens: per-sequence mean (GRPO), sum / max_new_tokens (Dr. GRPO), token mean (DAPO)")
    kl_in: Literal["loss", "reward"] = option("loss", "KL as a loss term (GRPO) or subtracted from the score (RLOO)")
    clip_low: float = option(0.2, "Ratio clip below: 1 - clip_low")
    clip_high: float | None = option(None, "Ratio clip above: 1 + clip_high (DAPO: 0.28); null = clip_low")
    drop_equal_groups: bool = option(False, "Drop groups whose responses all scored the same (DAPO)")
    baseline_momentum: float = option(0.9, "REINFORCE: momentum of the moving-average baseline")

    def validate(self):
        check_interval("pg.clip_low", self.clip_low, 0, 1, "()")
        if self.clip_high is not None:
            check_interval("pg.clip_high", self.clip_high, 0, None, "()")
        check_interval("pg.baseline_momentum", self.baseline_momentum, 0, 1, "[)")


@dataclass(frozen=True)
class RLOOOptions(PGOptions):
    advantage: Literal["grpo", "dr_grpo", "rloo", "reinforce"] = option("rloo", "Advantage estimator (see module doc)")
    aggregation: Literal["sequence", "constant", "token"] = option("token", "Loss over tokens (see PGOptions)")
    kl_in: Literal["loss", "reward"] = option("reward", "KL as a loss term (GRPO) or subtracted from the score (RLOO)")


@dataclass(frozen=True)
class REINFORCEOptions(RLOOOptions):
    advantage: Literal["grpo", "dr_grpo", "rloo", "reinforce"] = option("reinforce", "Advantage estimator")


@dataclass(frozen=True)
class GroupOnline(OnlineConfig):
    prompts_per_step: int = option(2, "Prompts sampled per rollout batch")
    group_size: int = option(4, "Responses per prompt (k; GRPO/RLOO need >= 2)")


@dataclass(frozen=True)
class K3KL(KLConfig):
    estimator: Literal["k1", "k2", "k3"] = option("k3", "Per-token KL estimator (Schulman's k1, k2, k3)")


class PGStageConfig(OnlineStageConfig):
    """What the critic-free stages share: a baseline from the other samples of a prompt needs several."""

    def validate(self):
        if self.pg.advantage in ("grpo", "dr_grpo", "rloo") and self.online.group_size < 2:
            raise UserError(f"pg.advantage={self.pg.advantage} compares the samples of one prompt: "
                            f"online.group_size must be >= 2, got {self.online.group_size}")
        super().validate()


@dataclass(frozen=True)
class GRPOConfig(PGStageConfig):
    """GRPO (Shao et al. 2024); Dr. GRPO and DAPO through `pg.*` options."""

    pg: PGOptions = option(PGOptions(), "Variant options")
    kl: K3KL = option(K3KL(), "KL to the reference (a k3 loss term)")
    online: GroupOnline = option(GroupOnline(), "Rollout batch, group size, epochs")
    output_dir: str = option("runs/grpo", "Run directory")


@dataclass(frozen=True)
class RLOOConfig(PGStageConfig):
    """RLOO (Ahmadian et al. 2024): leave-one-out baseline, KL in the reward."""

    pg: RLOOOptions = option(RLOOOptions(), "Variant options")
    online: GroupOnline = option(GroupOnline(), "Rollout batch, group size, epochs")
    output_dir: str = option("runs/rloo", "Run directory")


@dataclass(frozen=True)
class REINFORCEConfig(PGStageConfig):
    """REINFORCE with a moving-average baseline, KL in the reward."""

    pg: REINFORCEOptions = option(REINFORCEOptions(), "Variant options")
    output_dir: str = option("runs/reinforce", "Run directory")


PolicyGradientConfig = GRPOConfig | RLOOConfig | REINFORCEConfig


class PolicyGradient(OnlineAlgorithm):
    def __init__(self, tokenizer, reward, cfg: PolicyGradientConfig, reference=None):
        super().__init__(tokenizer, reward, cfg, reference)
        self.opts = cfg.pg
        self.weights, self.unit = AGGREGATIONS[cfg.pg.aggregation]
        self.shape_scores, self.kl_loss_weight = KL_PLACEMENTS[cfg.pg.kl_in]
        self.baseline = MovingAverage(cfg.pg.baseline_momentum)

    def rollout(self, model, prompts: list[dict]) -> tuple[list[dict], dict]:
        r = self.collect(model, prompts)
        scores = self.shape_scores(r, self.kl_ctl.beta, self.cfg.kl.estimator)
        advantages = ADVANTAGES[self.opts.advantage](scores, r.group, self.baseline)
        self.baseline.update(scores)
        keep = ~equal_groups(r.scores, r.group) if self.opts.drop_equal_groups else torch.ones_like(r.group, dtype=bool)
        rows = [row for row, k in zip(r.rows(advantages=advantages), keep.tolist()) if k]
        return rows, {**self.rollout_metrics(r), "kept_fraction": float(keep.float().mean())}

    def loss(self, model, batch, normaliser: float):
        mask = batch["response_mask"]
        logits, _ = forward_response(model, batch, self.cfg.sampling.temperature)
        logps = self.token_logps(logits, batch)  # (B, A)
        weights = self.weights(mask, self.cfg.sampling.max_new_tokens)
        advantages = batch["advantages"].unsqueeze(-1).expand_as(logps)  # one advantage per response
        loss, metrics = clipped_policy_loss(logps, batch["old_logps"], advantages, weights, normaliser,
                                            self.opts.clip_low, self.opts.clip_high)
        beta = self.kl_loss_weight * self.kl_ctl.beta
        if beta > 0:
            kl = KL_ESTIMATORS[self.cfg.kl.estimator](logps, batch["ref_logps"])
            term, kl_metrics = kl_loss(kl, weights, normaliser)
            loss, metrics = loss + beta * term, {**metrics, **kl_metrics}
        return loss, metrics

    def state_dict(self) -> dict:
        return {**super().state_dict(), "baseline": self.baseline.value}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.baseline.value = state.get("baseline")


def run_policy_gradient(cfg: PolicyGradientConfig, desc: str) -> Path:
    def make(policy, tokenizer, reward, reference):
        return policy, PolicyGradient(tokenizer, reward, cfg, reference)

    return run_online(cfg, make, desc)


def run_grpo(cfg: GRPOConfig) -> Path:
    return run_policy_gradient(cfg, "grpo")


def run_rloo(cfg: RLOOConfig) -> Path:
    return run_policy_gradient(cfg, "rloo")


def run_reinforce(cfg: REINFORCEConfig) -> Path:
    return run_policy_gradient(cfg, "reinforce")
