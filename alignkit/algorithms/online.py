"""What PPO, GRPO, RLOO and REINFORCE share: the stage config, the rollout call, KL control, the run.

The reference policy is the policy with its LoRA adapter disabled when `lora.r > 0` (no second copy);
with full fine-tuning it is a frozen copy loaded from `reference` (default: the policy's own path).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from alignkit.config import check_interval, option, to_dict
from alignkit.engine.config import TrainConfig
from alignkit.engine.online import OnlineConfig, fit_online
from alignkit.errors import UserError
from alignkit.models.load import LoraConfig, ModelConfig, disable_dropout, load_causal_lm, load_tokenizer, save_model
from alignkit.ops.logprobs import token_logps
from alignkit.rewards.base import RewardConfig, build_reward
from alignkit.rewards.kl import KL_CONTROLLERS
from alignkit.rollout.generate import SamplingConfig
from alignkit.rollout.rollout import Rollout, collect_rollout, gather_rollout, stack_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KLConfig:
    beta: float = option(0.05, "KL coefficient (the initial one when adaptive); 0 = no reference forward at all")
    controller: Literal["fixed", "adaptive"] = option(
        "fixed", "fixed beta, or Ziegler et al.'s adaptive controller (from kl.beta > 0)")
    target: float = option(6.0, "Adaptive: target KL per response (nats)")
    horizon: int = option(10_000, "Adaptive: responses over which beta moves by at most 20%")
    estimator: Literal["k1", "k2", "k3"] = option("k1", "Per-token KL estimator (Schulman's k1, k2, k3)")

    def validate(self):
        check_interval("kl.beta", self.beta, 0, None)
        check_interval("kl.target", self.target, 0, None, "()")
        check_interval("kl.horizon", self.horizon, 1, None)
        if self.controller == "adaptive" and self.beta == 0:
            raise UserError("kl.controller=adaptive needs kl.beta > 0 to start from: it scales beta, and 0 stays 0")


@dataclass(frozen=True)
class RolloutSampling(SamplingConfig):
    max_new_tokens: int = option(48, "Maximum number of tokens to generate per prompt (EOS included)")


@dataclass(frozen=True)
class RLTrainConfig(TrainConfig):
    """TrainConfig for online stages: train.batch_size is the minibatch (responses per optimiser step);
    epochs, max_steps and eval_every do not apply (see online.steps and online.epochs) and must stay unset."""

    epochs: int = option(1, "Not used by the RL stages: see online.epochs")
    max_steps: int | None = option(None, "Not used by the RL stages: see online.steps")
    eval_every: int = option(0, "Not used by the RL stages (no held-out data)")
    lr: float = option(1e-5, "Peak learning rate of AdamW")
    schedule: Literal["cosine", "linear", "constant"] = option("constant", "Learning-rate decay after warm-up")
    warmup_ratio: float = option(0.0, "Share of the steps spent warming the learning rate up from 0")

    def validate(self):
        super().validate()
        unused = [k for k, is_set in (("epochs", self.epochs != 1), ("max_steps", self.max_steps is not None),
                                      ("eval_every", self.eval_every != 0)) if is_set]
        if unused:
            raise UserError(f"train.{unused[0]} does not apply to the RL stages: they run online.steps rollouts, "
                            "each trained for online.epochs passes, and have no held-out data")


# Nested defaults that differ per stage are subclasses (not `option(Cls(x=...))`), so that setting one
# key of a section (`kl.beta=0.1`) keeps the stage's other defaults for that section.
@dataclass(frozen=True)
class OnlineStageConfig:
    model: ModelConfig = option(ModelConfig(), "Policy to fine-tune (e.g. the SFT model)")
    lora: LoraConfig = option(LoraConfig(), "LoRA adapter (r = 0: full fine-tuning with a frozen reference copy)")
    reference: str | None = option(None, "Reference model dir for full fine-tuning; null = model.path")
    prompts: str = option("demo", "JSONL of {prompt} or {messages} rows (+ fields for the reward); 'demo' = reviews")
    max_prompts: int | None = option(None, "Use only the first N prompts", low=1)
    reward: RewardConfig = option(RewardConfig(), "Reward sources (model, judge, function); at least one")
    gold: str | None = option(None, "Gold judge ('vader' or 'package.module:text_function') whose mean score of "
                              "each rollout batch is logged as gold_mean, never optimised (the report's "
                              "over-optimisation curve of gold vs proxy); null = none")
    kl: KLConfig = option(KLConfig(), "KL to the reference")
    sampling: RolloutSampling = option(RolloutSampling(), "Decoding of the rollouts")
    online: OnlineConfig = option(OnlineConfig(), "Rollout batch, group size, epochs per rollout")
    train: RLTrainConfig = option(RLTrainConfig(), "Optimisation; batch_size = minibatch (responses per optimiser step)")
    output_dir: str = option("runs/rl", "Run directory: metrics.jsonl, checkpoints/, model/ (and adapter/ with LoRA)")

    def validate(self):
        self.online.check(self.train.batch_size)
        if self.sampling.seed is not None:
            raise UserError("sampling.seed must be null for training: rollouts draw from the run's generator "
                            "(seeded by train.seed and restored on resume); a fixed seed would repeat every batch")
        if not self.sampling.do_sample:
            raise UserError("sampling.do_sample must be true for RL: the policy gradient and the KL estimate need "
                            "samples of the policy (greedy decoding gave a GRPO group identical responses: no update)")
        s = self.sampling
        truncated = [f"sampling.{k}" for k, on in (("top_k", s.top_k > 0), ("top_p", s.top_p < 1),
                                                   ("min_new_tokens", s.min_new_tokens > 0)) if on]
        if truncated:
            log.warning("%s: responses come from a truncated distribution, but their log-probs, the KL to the "
                        "reference and the policy gradient are the policy's: the KL is overestimated (15x with "
                        "top_k=20 on a tiny model) and the gradient is biased", ", ".join(truncated))


class OnlineAlgorithm:
    """Rollout collection, KL control and the engine protocol; subclasses add advantages and the loss."""

    unit = "token"  # loss unit: "token" or "sequence"

    def __init__(self, tokenizer, reward, cfg: OnlineStageConfig, reference=None):
        self.tokenizer, self.reward, self.cfg, self.reference = tokenizer, reward, cfg, reference
        k = cfg.kl
        self.kl_ctl = KL_CONTROLLERS[k.controller](k.beta, k.target, k.horizon)
        self.probe, self.probing = None, False
        self.monitor = None
        if cfg.gold is not None:
            from alignkit.rewards.gold import load_judge

            self.monitor = load_judge(cfg.gold)

    def policy_of(self, model):
        return model

    def collect(self, model, prompts: list[dict], value_fn=None) -> Rollout:
        """The rollout of `prompts`. With several processes each samples and scores its share of the prompts
        (whole groups), and every process then holds the whole rollout: advantages, whitening, baselines,
        metrics and the KL controller see the whole batch, the same on every process."""
        from alignkit.engine.loop import resolve_precision
        from alignkit.models.load import process_state, unwrap

        c, state = self.cfg, process_state()
        mine = prompts[state.process_index :: state.num_processes]
        policy = unwrap(self.policy_of(unwrap(model)))
        # the sampler's cached decoding matches the training forward only in float32 (bf16 weights or autocast: ~3e-3)
        rescore = resolve_precision(c.train.precision) != "no" or any(p.dtype != torch.float32
                                                                      for p in policy.parameters())
        r = collect_rollout(policy, self.tokenizer, mine, self.reward,
                            c.sampling, group_size=c.online.group_size, reference=self.reference,
                            need_ref=c.kl.beta > 0, value_fn=value_fn, no_eos_penalty=c.reward.no_eos_penalty,
                            chat_template=c.online.chat_template, monitor=self.monitor, rescore=rescore)
        return gather_rollout(r, state) if state.num_processes > 1 else r

    def rollout_metrics(self, r: Rollout) -> dict:
        """Score mean/std, length, sampled entropy -mean log pi(a_t), and (with a reference) the
        sequence KL sum_t (log pi - log pi_ref) (k1, the controller's input)."""
        mask = r.response_mask
        out = {**r.metrics(), "entropy_sampled": float(-r.old_logps[mask].mean()) if mask.any() else 0.0,
               "tokens_seen": int(r.prompt_mask.sum() + mask.sum())}
        if self.cfg.kl.beta > 0:
            out["kl"] = float((r.old_logps - r.ref_logps).masked_fill(~mask, 0.0).sum(-1).mean())
        return out

    def token_logps(self, logits, batch) -> torch.Tensor:
        """Training log-probs (B, A); while `probing` (the first minibatch of an update, over all its micro-batches)
        `probe` keeps max |logp_train - logp_rollout|."""
        logps = token_logps(logits, batch["response_ids"]).masked_fill(~batch["response_mask"], 0.0)
        if self.probing:
            diff = float((logps.detach() - batch["old_logps"]).abs().max())
            self.probe = diff if self.probe is None else max(self.probe, diff)
        return logps

    def units(self, row) -> int:
        return int(row["response_mask"].sum()) if self.unit == "token" else 1

    def prepare(self, rows):
        return stack_rows(rows)

    def after_update(self, metrics: dict) -> dict:
        self.kl_ctl.update(metrics.get("kl", 0.0), self.cfg.online.rollout_size)
        return {"beta": self.kl_ctl.beta}

    def state_dict(self) -> dict:
        return {"beta": self.kl_ctl.beta}

    def load_state_dict(self, state: dict) -> None:
        if self.cfg.kl.controller == "adaptive":  # a fixed beta is the config's, also one changed on resume
            if state["beta"] != self.kl_ctl.beta:
                log.info("kl.controller=adaptive: continuing from the checkpoint's beta %.6g (kl.beta=%g is where a "
                         "new run starts)", state["beta"], self.kl_ctl.beta)
            self.kl_ctl.beta = state["beta"]


def load_prompts(cfg: OnlineStageConfig, tokenizer) -> list[dict]:
    """The prompt rows, each rendered once: a prompt that the chat template rejects fails here, naming its file:line,
    not when its batch comes up mid-run."""
    from alignkit.data.jsonl import PROMPT_SCHEMA, iter_rows, no_rows
    from alignkit.data.preference_tokens import prompt_ids
    from alignkit.data.preferences import prompt_of

    path = cfg.prompts
    if path == "demo":
        from alignkit.tasks.demo_data import build_demo_data

        path = str(build_demo_data()["prompts_train"])
    located = list(iter_rows(path, PROMPT_SCHEMA))[: cfg.max_prompts]
    if not located:
        raise no_rows(path)
    for where, row in located:
        prompt_ids(prompt_of(row), tokenizer, cfg.online.chat_template, where)
    return [row for _, row in located]


def load_reference(cfg: OnlineStageConfig):
    """None with LoRA (adapter disabled) or beta = 0; else a frozen copy of the reference."""
    if cfg.lora.r > 0 or cfg.kl.beta == 0:
        return None
    return load_causal_lm(ModelConfig(cfg.reference or cfg.model.path, cfg.model.dtype), trainable=False)


def run_online(cfg: OnlineStageConfig, make_algorithm, desc: str) -> Path:
    """Load everything, train with `fit_online`, save the policy; returns `output_dir/model`.

    `make_algorithm(policy, tokenizer, reward, reference) -> (model to train, algorithm)`."""
    from alignkit.algorithms.sft import check_output_dir
    from alignkit.engine.loop import Engine

    out = Path(cfg.output_dir)
    engine = Engine(cfg.train, out)
    check_output_dir(out, cfg.train.resume)
    reward = build_reward(cfg.reward, device=str(engine.accelerator.device))  # a missing reward fails first
    tokenizer = load_tokenizer(cfg.model.path)
    prompts = load_prompts(cfg, tokenizer)
    policy = load_causal_lm(cfg.model, cfg.lora)
    disable_dropout(policy)
    reference = load_reference(cfg)
    model, algorithm = make_algorithm(policy, tokenizer, reward, reference)
    model = fit_online(engine, model, algorithm, prompts, cfg.online, to_dict(cfg), desc=desc)
    engine.accelerator.wait_for_everyone()
    if engine.accelerator.is_main_process:
        save_model(algorithm.policy_of(model), tokenizer, out)
    engine.accelerator.wait_for_everyone()
    return out / "model"
