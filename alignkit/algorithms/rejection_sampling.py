"""Rejection-sampling fine-tuning (the iterated best-of-N loop; Touvron et al. 2023, Dong et al. 2023 "RAFT").

Each round: sample N completions per training prompt from the current policy, score them with a
reward source, keep the top `keep` per prompt, and fine-tune the policy on them with the SFT
algorithm and the engine (`alignkit.algorithms.sft.SFT`). R rounds, each logged to `rounds.jsonl`:
the mean reward of all samples (the current policy's own reward) and of the kept ones.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from alignkit.algorithms.best_of_n import load_reward, prompt_rows, sample_and_score
from alignkit.algorithms.sft import SFT
from alignkit.config import option, save_config, to_dict
from alignkit.data.jsonl import check_output, write_jsonl
from alignkit.data.preferences import prompt_of
from alignkit.engine.config import TrainConfig
from alignkit.engine.loop import Engine
from alignkit.errors import UserError
from alignkit.models.load import LoraConfig, ModelConfig, check_context, load_causal_lm, load_tokenizer, save_model
from alignkit.rollout.generate import SamplingConfig, sampling_generator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RejectionSamplingConfig:
    model: ModelConfig = option(ModelConfig(), "Policy to improve (usually the SFT model)")
    lora: LoraConfig = option(LoraConfig(), "LoRA adapter (r = 0: full fine-tuning)")
    prompts: str = option("demo", "Training prompts: JSONL of {prompt} or {messages}; 'demo' = embedded training "
                                  "review prompts")
    reward: str = option("vader", "Reward source: a reward-model directory, 'vader', or 'package.module:function'")
    rounds: int = option(2, "Sample -> select -> fine-tune rounds (R)")
    n: int = option(4, "Completions sampled per prompt and round (N)")
    keep: int = option(1, "Best completions per prompt kept for fine-tuning")
    sampling: SamplingConfig = option(SamplingConfig(max_new_tokens=64, seed=0),
                                      "Decoding settings (seed null: one unseeded generator for every round)")
    batch_size: int = option(16, "Sequences per generation batch", low=1)
    max_prompts: int | None = option(64, "Use only the first N prompts", low=1)
    max_length: int = option(256, "Longest tokenised prompt + completion for fine-tuning", low=2)
    chat_template: bool = option(True, "Wrap prompts in the tokenizer's chat template")
    train: TrainConfig = option(TrainConfig(), "Fine-tuning settings of each round (max_steps / epochs per round)")
    output_dir: str = option("runs/rejection_sampling", "Run directory: rounds.jsonl, round{r}/, model/")

    def validate(self):
        if self.rounds < 1:
            raise UserError(f"rounds must be >= 1, got {self.rounds}")
        if not 1 <= self.keep <= self.n:
            raise UserError(f"keep must be between 1 and n ({self.n}), got {self.keep}")
        if self.train.resume:
            raise UserError("train.resume: rejection sampling does not resume; start it again in a new output_dir")


def select_top(sampled: list[dict], keep: int) -> list[dict]:
    """SFT rows `{prompt|messages, completion, reward}` of the `keep` best completions of each row."""
    out = []
    for row in sampled:
        order = sorted(range(len(row["rewards"])), key=lambda i: -row["rewards"][i])[:keep]
        prompt = prompt_of(row)
        side = {"messages": prompt} if not isinstance(prompt, str) else {"prompt": prompt}
        out += [{**side, "completion": row["completions"][i], "reward": row["rewards"][i]} for i in order]
    return out


def _tokenise(rows: list[dict], tokenizer, cfg: RejectionSamplingConfig) -> list[dict]:
    from alignkit.data.sft import tokenize_sft

    def as_sft(row):
        if "messages" in row:
            return {"messages": [*row["messages"], {"role": "assistant", "content": row["completion"]}]}
        return {"prompt": row["prompt"], "completion": row["completion"]}

    examples = [tokenize_sft(as_sft(r), tokenizer, cfg.max_length, cfg.chat_template) for r in rows if r["completion"]]
    return [e for e in examples if e is not None]


def run_round(model, tokenizer, prompts: list[dict], score, cfg: RejectionSamplingConfig, r: int, out: Path,
              generator: torch.Generator | None) -> tuple[object, dict]:
    """One round: returns the fine-tuned model and the round's log line."""
    sampled = sample_and_score(model, tokenizer, prompts, score, cfg.n, cfg.sampling, cfg.batch_size,
                               cfg.chat_template, generator)
    kept = select_top(sampled, cfg.keep)
    examples = _tokenise(kept, tokenizer, cfg)
    if len(examples) < cfg.train.batch_size:
        raise UserError(f"round {r}: {len(kept) - len(examples)} of the {len(kept)} kept completions are empty or "
                        f"leave no completion token within max_length={cfg.max_length}; {len(examples)} fine-tuning "
                        f"rows are fewer than train.batch_size ({cfg.train.batch_size})")
    run_dir = out / f"round{r}"
    write_jsonl(run_dir / "samples.jsonl", sampled)
    model, _ = Engine(cfg.train, run_dir).fit(model, SFT(tokenizer.pad_token_id), examples, None, to_dict(cfg),
                                                desc=f"round {r}/{cfg.rounds}")
    all_rewards = [x for row in sampled for x in row["rewards"]]
    line = {"round": r, "reward_mean": sum(all_rewards) / len(all_rewards),
            "reward_kept": sum(k["reward"] for k in kept) / len(kept), "examples": len(examples)}
    last = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    line["sft_loss"] = next((m["loss"] for m in reversed(last) if "loss" in m), None)
    return model, line


def run_rejection_sampling(cfg: RejectionSamplingConfig) -> Path:
    """R rounds of sample / keep the best / fine-tune; returns `output_dir/model`."""
    out = Path(cfg.output_dir)
    check_output(out, cfg.prompts, directory=True)
    if out.exists() and any(out.iterdir()):
        # a run that failed before finishing a round (its config.yaml only, and a part of round1/) starts over
        if any((out / p).exists() for p in ("rounds.jsonl", "model")) or not (out / "config.yaml").is_file():
            raise UserError(f"output_dir {out} is not empty, and rejection sampling does not resume: pick another")
        for stale in out.glob("round*"):
            shutil.rmtree(stale)
    tokenizer = load_tokenizer(cfg.model.path)
    prompts = prompt_rows(cfg.prompts, cfg.max_prompts, demo="prompts_train")
    if len(prompts) * cfg.keep < cfg.train.batch_size:  # say so before sampling, not at the first fine-tuning
        raise UserError(f"{len(prompts)} prompts x keep {cfg.keep} give at most {len(prompts) * cfg.keep} fine-tuning "
                        f"rows per round, fewer than train.batch_size ({cfg.train.batch_size})")
    score = load_reward(cfg.reward)
    model = load_causal_lm(cfg.model, cfg.lora)
    check_context(model, cfg.max_length, "max_length")
    out.mkdir(parents=True, exist_ok=True)
    save_config(to_dict(cfg), out / "config.yaml")
    device = next(model.parameters()).device
    generator = sampling_generator(cfg.sampling, device)
    if generator is None:  # null seed: a fresh one, used by every round (each round's engine re-seeds torch's own)
        generator = torch.Generator(device=device)
        generator.seed()
    for r in range(1, cfg.rounds + 1):
        model, line = run_round(model, tokenizer, prompts, score, cfg, r, out, generator)
        with (out / "rounds.jsonl").open("a") as f:
            f.write(json.dumps(line) + "\n")
        log.info("round %d: mean reward of samples %.3f, of kept %.3f (%d examples), SFT loss %s", r,
                 line["reward_mean"], line["reward_kept"], line["examples"], line["sft_loss"])
    save_model(model, tokenizer, out)
    return out / "model"
