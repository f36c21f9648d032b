"""`alignkit demo` (the README's main job): the whole RLHF pipeline on the embedded SmolLM2-135M-Instruct.

    demo data -> SFT (LoRA) -> K samples per prompt -> simulated labelers (gold judge, Plackett-Luce)
    -> reward model (MiniLM, K-wise) -> PPO, GRPO (against the reward model), DPO (on the labels) and
    best-of-N (reranked by the reward model), all from the same SFT policy
    -> evaluation with the gold judge on held-out prompts -> HTML report + summary table

Every stage calls the same function as its CLI stage and writes into its own directory under
`output_dir`; a stage whose output exists is skipped, so re-running is cheap (`--fresh` starts over).
`output_dir/demo.yaml` records the settings: a re-run with other settings is refused (its finished
stages would not match them), and `--fresh` deletes only a directory that holds this file.
`examples/demo.yaml` is this config with every key: copy it, point `model`, `sft_data`, `prompts`,
`eval_prompts` and `gold` at your own, and run `alignkit demo --config my_demo.yaml`.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from alignkit.config import check_interval, flatten, option, save_config, saved_config, to_dict
from alignkit.engine.config import TrainConfig
from alignkit.errors import UserError
from alignkit.models.load import LoraConfig, ModelConfig


@dataclass(frozen=True)
class DemoConfig:
    model: str = option("smollm2", "Base policy: 'smollm2' (embedded) or any HF directory / hub name")
    sft_data: str = option("demo", "SFT demonstrations JSONL; 'demo' = the embedded review demonstrations")
    prompts: str = option("demo", "Training prompts JSONL (rollouts, RL); 'demo' = embedded review prompts")
    eval_prompts: str = option("demo", "Held-out prompts JSONL for evaluation; 'demo' = embedded held-out prompts")
    gold: str = option("vader", "Gold judge: labels the comparisons, scores the evaluation, is logged on RL rollouts")
    reward_backbone: str = option("minilm", "Reward-model backbone ('minilm' = embedded all-MiniLM-L6-v2)")
    output_dir: str = option("runs/demo", "Where every stage writes its outputs")
    fresh: bool = option(False, "Delete output_dir (a demo's, holding demo.yaml) first and run every stage again")
    lora_r: int = option(16, "LoRA rank of every policy-training stage", low=0)
    max_new_tokens: int = option(24, "Longest sampled response (rollouts, RL, evaluation)", low=1)
    sft_steps: int = option(16, "SFT optimiser steps (batch 8)", low=1)
    sft_lr: float = option(3e-4, "SFT learning rate (LoRA)")
    rm_prompts: int = option(96, "Prompts sampled K times for labelling (the reward model's data)", low=1)
    k: int = option(4, "Completions per prompt for the labelers to rank", low=2)
    label_ceiling: float = option(0.9, "Labeler noise: tau solved so the pairwise accuracy ceiling is this")
    rm_epochs: int = option(2, "Reward-model epochs", low=1)
    ppo_steps: int = option(10, "PPO rollout-and-update steps (8 prompts each; 4 epochs of 2 minibatches)", low=1)
    grpo_steps: int = option(12, "GRPO steps (2 prompts x 4 responses each)", low=1)
    dpo_steps: int = option(16, "DPO optimiser steps (batch 8 pairs)", low=1)
    rl_lr: float = option(3e-4, "Learning rate of PPO and GRPO (LoRA)")
    dpo_lr: float = option(1e-3, "Learning rate of DPO (LoRA)")
    kl_beta: float = option(0.05, "KL coefficient of PPO and GRPO; DPO's beta is 0.1")
    best_of_n: int = option(4, "N of best-of-N (reranked by the reward model)", low=1)
    eval_prompts_n: int = option(32, "Held-out prompts per evaluation", low=1)
    seed: int = option(0, "Seed for data order and sampling", low=0)

    def validate(self):
        """The stages' own checks of these values would come only when each stage starts, after the ones before."""
        for name in ("sft_lr", "rl_lr", "dpo_lr"):
            check_interval(name, getattr(self, name), 0, math.inf, "()")
        check_interval("kl_beta", self.kl_beta, 0, math.inf, "[)")
        check_interval("label_ceiling", self.label_ceiling, 0.5, 1, "()")

    def check_inputs(self) -> None:
        """Before anything is written: the data files exist and the gold judge loads."""
        from alignkit.rewards.gold import load_judge

        for name in ("sft_data", "prompts", "eval_prompts"):
            path = getattr(self, name)
            if path != "demo" and not Path(path).is_file():
                raise UserError(f"{name}: file not found: {path}")
        load_judge(self.gold)


def _done(path: Path, label: str) -> bool:
    if path.exists():
        print(f"      (skipped: {path} exists)")
        return True
    print(f"      {label}")
    return False


def _sft(cfg: DemoConfig, root: Path) -> Path:
    from alignkit.algorithms.sft import SFTConfig, SFTDataConfig, run_sft

    out = root / "sft"
    if not _done(out / "model", "supervised fine-tuning (LoRA) on the demonstrations"):
        shutil.rmtree(out, ignore_errors=True)  # a run that died before its model was saved starts over
        train = TrainConfig(batch_size=8, micro_batch_size=8, max_steps=cfg.sft_steps, lr=cfg.sft_lr, seed=cfg.seed,
                            eval_every=cfg.sft_steps, report_to=[])
        data = SFTDataConfig(train=cfg.sft_data, eval="demo" if cfg.sft_data == "demo" else None, max_length=160,
                             max_eval_rows=48)
        run_sft(SFTConfig(model=ModelConfig(path=cfg.model), lora=LoraConfig(r=cfg.lora_r), data=data, train=train,
                          output_dir=str(out)))
    return out / "model"


def _labels(cfg: DemoConfig, root: Path, policy: Path) -> Path:
    from alignkit.feedback.simulated import LabelConfig, run_label
    from alignkit.rollout.generate import SamplingConfig
    from alignkit.rollout.k_samples import RolloutConfig, run_rollout

    completions, labels = root / "rollout" / "completions.jsonl", root / "labels" / "rankings.jsonl"
    if not _done(completions, f"{cfg.k} samples per prompt from the SFT policy, {cfg.rm_prompts} prompts"):
        sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, min_new_tokens=1, seed=cfg.seed)
        run_rollout(RolloutConfig(model=ModelConfig(path=str(policy)), prompts=cfg.prompts, output=str(completions),
                                  k=cfg.k, sampling=sampling, batch_size=32, max_prompts=cfg.rm_prompts))
    if not _done(labels, f"simulated labelers rank them (gold judge '{cfg.gold}', Plackett-Luce noise)"):
        run_label(LabelConfig(input=str(completions), output=str(labels), mode="rankings", judge=cfg.gold,
                              target_ceiling=cfg.label_ceiling, seed=cfg.seed))
    return labels


def _reward_model(cfg: DemoConfig, root: Path, labels: Path) -> Path:
    from alignkit.algorithms.reward_model import RewardModelConfig, RMDataConfig, run_rm

    out = root / "rm"
    if not _done(out / "model", f"reward model: {cfg.reward_backbone} + LoRA, K-wise loss"):
        shutil.rmtree(out, ignore_errors=True)
        train = TrainConfig(batch_size=8, micro_batch_size=8, epochs=cfg.rm_epochs, lr=1e-3, seed=cfg.seed,
                            report_to=[])
        run_rm(RewardModelConfig(model=ModelConfig(path=cfg.reward_backbone), lora=LoraConfig(r=16),
                                 data=RMDataConfig(train=str(labels), eval=None, kwise=True, max_length=128),
                                 train=train, output_dir=str(out)))
    return out / "model"


def _online(cfg: DemoConfig, root: Path, name: str, policy: Path, rm: Path) -> Path:
    from alignkit.algorithms.online import KLConfig, RLTrainConfig, RolloutSampling
    from alignkit.rewards.base import RewardConfig

    out = root / name
    if _done(out / "model", f"{name.upper()} against the reward model (KL beta {cfg.kl_beta} to the SFT policy)"):
        return out
    shutil.rmtree(out, ignore_errors=True)
    # PPO: 4 epochs of 2 minibatches over each batch of 8 rollouts (GRPO: one step per batch). With 2 epochs of
    # one minibatch, 4 seeds gave gold 0.02-0.50 (mean 0.21); with these settings 0.36-0.65 (mean 0.46; docs/ppo.md).
    minibatch = 4 if name == "ppo" else 8
    common = dict(model=ModelConfig(path=str(policy)), lora=LoraConfig(r=cfg.lora_r), prompts=cfg.prompts,
                  reward=RewardConfig(model=str(rm)), gold=cfg.gold,  # gold logged per rollout, never optimised
                  sampling=RolloutSampling(max_new_tokens=cfg.max_new_tokens),
                  train=RLTrainConfig(batch_size=minibatch, micro_batch_size=minibatch, lr=cfg.rl_lr, seed=cfg.seed,
                                      report_to=[]),
                  output_dir=str(out))
    if name == "ppo":
        from alignkit.algorithms.ppo import PPOConfig, PPOOnline, run_ppo

        run_ppo(PPOConfig(**common, kl=KLConfig(beta=cfg.kl_beta), online=PPOOnline(steps=cfg.ppo_steps,
                          prompts_per_step=8, epochs=4)))
    else:
        from alignkit.algorithms.policy_gradient import K3KL, GRPOConfig, GroupOnline, run_grpo

        run_grpo(GRPOConfig(**common, kl=K3KL(beta=cfg.kl_beta), online=GroupOnline(steps=cfg.grpo_steps)))
    return out


def _dpo(cfg: DemoConfig, root: Path, policy: Path, labels: Path) -> Path:
    from alignkit.algorithms.dpo import DPOConfig, DPODataConfig, KLEvalConfig, run_dpo

    out = root / "dpo"
    if not _done(out / "model", "DPO on the labelled comparisons (beta 0.1, reference = SFT policy)"):
        shutil.rmtree(out, ignore_errors=True)
        train = TrainConfig(batch_size=8, micro_batch_size=8, max_steps=cfg.dpo_steps, lr=cfg.dpo_lr, seed=cfg.seed,
                            report_to=[])
        run_dpo(DPOConfig(model=ModelConfig(path=str(policy)), lora=LoraConfig(r=cfg.lora_r),
                          data=DPODataConfig(train=str(labels), eval=None, max_length=128), train=train,
                          reference="live",  # scores only the pairs drawn in dpo_steps, not the whole file
                          kl=KLEvalConfig(samples=0), output_dir=str(out)))
    return out


def _best_of_n(cfg: DemoConfig, root: Path, policy: Path, rm: Path) -> Path:
    from alignkit.algorithms.best_of_n import BestOfNConfig, run_best_of_n
    from alignkit.rollout.generate import SamplingConfig

    out = root / f"best_of_{cfg.best_of_n}"
    if not _done(out / "summary.json", f"best-of-{cfg.best_of_n}: sample, keep the reward model's favourite"):
        sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
        run_best_of_n(BestOfNConfig(model=ModelConfig(path=str(policy)), prompts=cfg.eval_prompts, reward=str(rm),
                                    gold=cfg.gold, n=[1, cfg.best_of_n], sampling=sampling, batch_size=32,
                                    max_prompts=cfg.eval_prompts_n, output_dir=str(out)))
    return out


def _evaluate(cfg: DemoConfig, run: Path, method: str, sft: Path, rm: Path) -> None:
    from alignkit.eval.evaluate import EvalConfig, EvalSampling, GoldRewardConfig, run_eval
    from alignkit.rewards.base import RewardConfig

    if _done(run / "eval" / "final.json", f"evaluate {method}: gold and proxy reward, KL to SFT, text metrics"):
        return
    run_eval(EvalConfig(policy=str(run / "model"), reference=str(sft), prompts=cfg.eval_prompts,
                        max_prompts=cfg.eval_prompts_n, gold=GoldRewardConfig(judge=cfg.gold),
                        proxy=RewardConfig(model=str(rm)), sampling=EvalSampling(max_new_tokens=cfg.max_new_tokens),
                        batch_size=32, method=method, show=0))


SETTINGS = "demo.yaml"  # in output_dir: the settings its stages were run with; marks the directory as a demo's


def _settings(cfg: DemoConfig) -> dict:
    return {k: v for k, v in to_dict(cfg).items() if k not in ("fresh", "output_dir")}


def _start(cfg: DemoConfig, root: Path) -> None:
    """Check `root` against this run's settings (deleting it first with --fresh) and record them."""
    root = root.resolve()  # output_dir=. has no name to rename
    trash = root.with_name(f".{root.name}.deleting")
    shutil.rmtree(trash, ignore_errors=True)  # what a --fresh cut short left
    holds = root.is_dir() and any(root.iterdir())
    if holds and not (root / SETTINGS).is_file():
        raise UserError(f"output_dir {root} holds files but no {SETTINGS}, so it is not a demo's output (or one "
                        "from before demo.yaml); the demo will not write into it or delete it: name another "
                        "output_dir")
    if holds and cfg.fresh:
        root.rename(trash)  # one step: a kill during the deletion leaves no half-deleted stage behind
        shutil.rmtree(trash)
    elif holds and (root / "sft" / "model").exists():  # a stage has finished (SFT, the first), so would be reused
        old, new = saved_config(root / SETTINGS), flatten(_settings(cfg))
        changed = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in new.items() if old.get(k) != v]
        if changed:
            raise UserError(f"{root} holds a demo run with other settings ({'; '.join(changed)}), whose finished "
                            "stages would be reused: add --fresh to start over, or name another output_dir")
    root.mkdir(parents=True, exist_ok=True)
    save_config(_settings(cfg), root / SETTINGS)


def run_demo(cfg: DemoConfig) -> str:
    from alignkit.eval.report import load_run, summary_table, write_report

    root = Path(cfg.output_dir)
    cfg.check_inputs()
    _start(cfg, root)
    t0 = time.perf_counter()
    steps = []

    def stage(title: str):
        steps.append(title)
        print(f"[{len(steps)}/7 {time.perf_counter() - t0:5.0f} s] {title}")

    stage("SFT")
    sft = _sft(cfg, root)
    stage("human feedback (simulated)")
    labels = _labels(cfg, root, sft)
    stage("reward model")
    rm = _reward_model(cfg, root, labels)
    stage("RL: PPO and GRPO")
    runs = {"ppo": _online(cfg, root, "ppo", sft, rm), "grpo": _online(cfg, root, "grpo", sft, rm)}
    stage("DPO")
    runs["dpo"] = _dpo(cfg, root, sft, labels)
    stage("best-of-N")
    bon = _best_of_n(cfg, root, sft, rm)
    stage("evaluation")
    for method, run in {"sft": sft.parent, **runs}.items():
        _evaluate(cfg, run, method, sft, rm)
    report = write_report([sft.parent, *runs.values(), bon], root / "report.html",
                          title="alignkit demo: SmolLM2-135M-Instruct, VADER gold judge" if cfg.model == "smollm2"
                          else f"alignkit demo: {cfg.model}")
    print()
    print(summary_table([load_run(p) for p in (sft.parent, *runs.values(), bon)]))
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; report: {Path(report).resolve()}")
    return str(report)
