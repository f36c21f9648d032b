"""PPO for language models with a KL penalty in the reward (Ziegler et al. 2019; Stiennon et al. 2020;
Ouyang et al. 2022), written after "The N Implementation Details of RLHF with PPO" (Huang et al.
2024); every detail and its reason is listed in docs/ppo.md.

Per step:  rollout (policy samples, reward scores, reference log-probs, values)
           r_t = -beta * kl_t, + score on the last token          (rewards.kl.kl_shaped_rewards)
           (optional) reward whitening, scale only
           A_t, R_t = GAE(r, V; gamma, lambda); A whitened over the rollout batch
           online.epochs x minibatches of
               L = L_clip(policy) + vf_coef * L_VF(clipped) - ent_coef * H
           adaptive beta update from the rollout's KL
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from alignkit.algorithms.online import OnlineAlgorithm, OnlineStageConfig, run_online
from alignkit.config import check_interval, option
from alignkit.engine.online import OnlineConfig
from alignkit.errors import UserError
from alignkit.losses.policy import clipped_policy_loss, clipped_value_loss, entropy_from_logits, entropy_loss
from alignkit.models.load import disable_dropout, unwrap
from alignkit.ops.advantages import gae
from alignkit.ops.stats import explained_variance, masked_mean, masked_whiten
from alignkit.rewards.kl import kl_shaped_rewards


@dataclass(frozen=True)
class PPOOptions:
    clip: float = option(0.2, "Policy ratio clip epsilon")
    value_clip: float = option(0.2, "Value clip: new values stay within +-value_clip of the rollout's")
    vf_coef: float = option(0.1, "Weight c1 of the value loss")
    ent_coef: float = option(0.0, "Weight c2 of the entropy bonus (L - c2 H)")
    gamma: float = option(1.0, "Discount (1: the score at the end counts fully for every token)")
    lam: float = option(0.95, "GAE lambda")
    whiten_advantages: bool = option(True, "Whiten advantages over the rollout batch")
    whiten_rewards: bool = option(False, "Scale the per-token rewards to unit variance over the rollout (no centring)")
    critic: Literal["shared", "separate"] = option("shared", "Value head on the policy trunk, or a separate critic")
    critic_model: str | None = option(None, "Separate critic trunk (HF dir with the policy's tokenizer, e.g. a reward "
                                            "model trained on the SFT model); null = model.path")

    def validate(self):
        for name in ("clip", "value_clip"):
            check_interval(f"ppo.{name}", getattr(self, name), 0, None, "()")
        check_interval("ppo.vf_coef", self.vf_coef, 0, None)
        check_interval("ppo.gamma", self.gamma, 0, 1, "(]")
        check_interval("ppo.lam", self.lam, 0, 1)
        if self.critic_model is not None and self.critic == "shared":
            raise UserError("ppo.critic_model is the trunk of a separate critic: set ppo.critic=separate too (the "
                            "shared critic is a head on the policy)")


@dataclass(frozen=True)
class PPOOnline(OnlineConfig):
    epochs: int = option(4, "Passes over each rollout batch")


@dataclass(frozen=True)
class PPOConfig(OnlineStageConfig):
    ppo: PPOOptions = option(PPOOptions(), "PPO options")
    online: PPOOnline = option(PPOOnline(), "Rollout batch, epochs per rollout")
    output_dir: str = option("runs/ppo", "Run directory")


class PPO(OnlineAlgorithm):
    unit = "token"

    def policy_of(self, model):
        return unwrap(model).policy

    def rollout(self, model, prompts: list[dict]) -> tuple[list[dict], dict]:
        o = self.cfg.ppo
        r = self.collect(model, prompts, value_fn=unwrap(model).values)
        mask = r.response_mask
        rewards, kl = kl_shaped_rewards(r.scores, r.old_logps, r.ref_logps, mask, self.kl_ctl.beta,
                                        self.cfg.kl.estimator)
        if o.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, r.values, mask, o.gamma, o.lam)
        if o.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        metrics = {**self.rollout_metrics(r), "kl_penalty": float(-self.kl_ctl.beta * kl.sum(-1).mean()),
                   "explained_variance": explained_variance(r.values, returns, mask),
                   "value_mean": float(masked_mean(r.values, mask))}
        return r.rows(advantages=advantages, returns=returns), metrics

    def loss(self, model, batch, normaliser: float):
        o, mask = self.cfg.ppo, batch["response_mask"]
        logits, values = model(batch, self.cfg.sampling.temperature)  # (B, A, V), (B, A)
        logps = self.token_logps(logits, batch)
        weights = mask.float()
        policy, metrics = clipped_policy_loss(logps, batch["old_logps"], batch["advantages"], weights, normaliser,
                                              o.clip, o.clip)
        value, value_metrics = clipped_value_loss(values, batch["values"], batch["returns"], weights, normaliser,
                                                  o.value_clip)
        ent, ent_metrics = entropy_loss(entropy_from_logits(logits), weights, normaliser)
        loss = policy + o.vf_coef * value + o.ent_coef * ent
        return loss, {**metrics, **value_metrics, **ent_metrics, "policy_loss": policy.detach(),
                      "value_loss": value.detach()}


def make_actor_critic(policy, tokenizer, cfg: PPOConfig):
    """ActorCritic with the configured critic: a head on the policy trunk, or a separate trunk (+ LoRA), which
    reads the policy's token ids and so must share the policy's `tokenizer`."""
    from alignkit.models.value import ActorCritic

    if cfg.ppo.critic == "shared":
        return ActorCritic(policy)
    from transformers import AutoModel

    from alignkit.models.load import add_lora, from_pretrained, load_tokenizer, resolve_dtype

    path = cfg.ppo.critic_model or cfg.model.path
    if path != cfg.model.path and load_tokenizer(path).get_vocab() != tokenizer.get_vocab():
        raise UserError(f"ppo.critic_model={path}: its tokenizer is not the policy's ({cfg.model.path}), and the "
                        "critic reads the policy's token ids; give a trunk of the policy's family (e.g. a reward "
                        "model trained on the SFT model) or use ppo.critic=shared")
    critic = from_pretrained(AutoModel, path, "the critic's trunk",
                             dtype=resolve_dtype(cfg.model.dtype, trained=not cfg.lora.r))
    critic = add_lora(critic, cfg.lora) if cfg.lora.r > 0 else critic
    disable_dropout(critic)
    return ActorCritic(policy, critic)


def run_ppo(cfg: PPOConfig) -> Path:
    def make(policy, tokenizer, reward, reference):
        return make_actor_critic(policy, tokenizer, cfg), PPO(tokenizer, reward, cfg, reference)

    return run_online(cfg, make, "ppo")
