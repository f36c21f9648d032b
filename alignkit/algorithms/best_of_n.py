"""Best-of-N sampling: draw N completions per prompt, score them with any reward source, keep the best.

    pi_bon(y|x): the argmax-reward completion of N samples of pi(.|x)
    KL(pi_bon || pi) = log N - (N - 1) / N          (Stiennon et al. 2020, appendix G)

The analytic KL holds when the policy puts no noticeable probability on any single completion
(continuous rewards, no ties) and is an upper bound in general (Beirami et al. 2024, "Theoretical
guarantees on the best-of-n alignment policy"). With `n: [1, 4, 16]` the largest N is sampled once
and every smaller N uses the first N of those samples, so the rows of the report share their
samples. A `gold` judge (e.g. `vader`) scores the chosen completions too: the proxy reward can be
gamed, the gold reward says whether quality really rose.

Reward sources are called as `score(prompts, completions, **row_fields) -> (B,) tensor`: a trained
reward-model directory, `vader`, or `package.module:function` (see `load_reward`).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from alignkit.algorithms.policy_kl import decode, sample_sequences
from alignkit.config import option, save_config, to_dict
from alignkit.data.jsonl import PROMPT_SCHEMA, check_output, read_rows, write_json, write_jsonl
from alignkit.data.preferences import prompt_of
from alignkit.errors import UserError
from alignkit.models.load import ModelConfig, load_causal_lm, load_tokenizer
from alignkit.rollout.generate import SamplingConfig, sampling_generator

log = logging.getLogger(__name__)


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || base policy) = log n - (n - 1) / n, in nats (0 for n = 1)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def load_reward(spec: str):
    """A reward source from a reward-model directory, 'vader', 'ai-judge:MODEL[@PRINCIPLE]' (P(beats the
    row's `reference` completion) under an AI judge) or 'package.module:function'."""
    from alignkit.rewards.gold import load_judge

    if spec.startswith("ai-judge:"):
        from alignkit.rewards.ai_judge import load_ai_judge

        return load_ai_judge(spec)
    if Path(spec).is_dir():
        from alignkit.rewards.reward_model import RewardModel

        return RewardModel(spec)
    if Path(spec).name != spec:  # a path; a judge is 'vader' or 'package.module:function'
        raise UserError(f"reward={spec}: no such reward-model directory")
    return load_judge(spec)


def score_rows(source, rows: Sequence[dict], completions: Sequence[str], what: str = "the reward") -> torch.Tensor:
    """Rewards (B,) of one completion per row by a reward source; the rows' other fields are passed as keyword lists.
    `what` names the source in the error on a non-finite score."""
    from alignkit.rewards.base import checked_scores, row_fields

    fields = row_fields(rows)
    prompts = [prompt_of(r) for r in rows]
    return checked_scores(source.score(prompts, list(completions), **fields), prompts, completions, what)


def sample_and_score(model, tokenizer, rows: Sequence[dict], source, n: int, sampling: SamplingConfig,
                     batch_size: int = 16, chat_template: bool = True, generator: torch.Generator | None = None,
                     ) -> list[dict]:
    """Each row with `completions` (n samples) and their `rewards` (n floats) by the reward `source`.

    Prompts are repeated n times and generated in batches of `batch_size` sequences, all from one generator
    (`generator`, else one seeded from `sampling.seed`), so that no batch repeats another's draws.
    """
    generator = sampling_generator(sampling, next(model.parameters()).device, generator)
    repeated = [row for row in rows for _ in range(n)]
    texts: list[str] = []
    for i in range(0, len(repeated), batch_size):
        chunk = repeated[i : i + batch_size]
        seqs = sample_sequences(model, tokenizer, [prompt_of(r) for r in chunk], sampling, chat_template, generator)
        texts += decode(tokenizer, seqs)
    rewards = score_rows(source, repeated, texts).view(len(rows), n)  # (R, n)
    return [{**row, "completions": texts[j * n : (j + 1) * n], "rewards": rewards[j].tolist()}
            for j, row in enumerate(rows)]


def pick_best(sampled: Sequence[dict], n: int) -> list[dict]:
    """The best of the first n completions of each row: `{**row, completion, reward}` (first wins ties)."""
    out = []
    for row in sampled:
        rewards = row["rewards"][:n]
        best = max(range(n), key=rewards.__getitem__)
        rest = {k: v for k, v in row.items() if k not in ("completions", "rewards")}
        out.append({**rest, "completion": row["completions"][best], "reward": rewards[best]})
    return out


@dataclass(frozen=True)
class BestOfNConfig:
    model: ModelConfig = option(ModelConfig(), "Policy to sample from (e.g. the SFT model)")
    prompts: str = option("demo", "JSONL of {prompt} or {messages} rows; 'demo' = embedded held-out review prompts")
    reward: str = option("vader", "Reward source: a reward-model directory, 'vader', or 'package.module:function'")
    gold: str | None = option(None, "Gold judge that also scores the chosen completions (e.g. 'vader'); null = none")
    n: list[int] = option([1, 4, 16], "Values of N to report; the largest is sampled, smaller ones reuse its samples")
    sampling: SamplingConfig = option(SamplingConfig(max_new_tokens=64, seed=0), "Decoding settings")
    batch_size: int = option(16, "Sequences per generation batch", low=1)
    max_prompts: int | None = option(64, "Use only the first N prompts", low=1)
    chat_template: bool = option(True, "Wrap prompts in the tokenizer's chat template")
    output_dir: str = option("runs/best_of_n", "Where to write best_n{N}.jsonl and summary.json")

    def validate(self):
        if not self.n or min(self.n) < 1:
            raise UserError(f"n must list values >= 1, got {self.n}")
        if not self.sampling.do_sample:  # greedy or beam search gives N equal completions: nothing to choose from
            raise UserError("best-of-N needs sampling.do_sample=true (its analytic KL assumes N independent samples)")


def prompt_rows(path: str, max_prompts: int | None, demo: str = "prompts_eval", schema=PROMPT_SCHEMA) -> list[dict]:
    """The first `max_prompts` rows of a prompt file (checked against `schema`); 'demo' = the embedded review
    prompts file `demo`."""
    if path == "demo":
        from alignkit.tasks.demo_data import build_demo_data

        path = str(build_demo_data()[demo])
    return read_rows(path, schema)[:max_prompts]


def run_best_of_n(cfg: BestOfNConfig) -> str:
    """Sample max(n) completions per prompt, report best-of-N for each N; returns the summary path."""
    check_output(cfg.output_dir, cfg.prompts, directory=True)
    tokenizer = load_tokenizer(cfg.model.path)
    rows = prompt_rows(cfg.prompts, cfg.max_prompts)
    score = load_reward(cfg.reward)
    gold = load_reward(cfg.gold) if cfg.gold else None
    model = load_causal_lm(cfg.model, trainable=False)
    sampled = sample_and_score(model, tokenizer, rows, score, max(cfg.n), cfg.sampling, cfg.batch_size,
                               cfg.chat_template)
    s = cfg.sampling
    plain = s.temperature == 1 and s.top_k == 0 and s.top_p == 1 and s.min_new_tokens == 0
    if not plain:  # the samples come from a reshaped policy, whose own KL to the policy is unknown here
        log.warning("sampling reshapes the policy (temperature, top_k, top_p or min_new_tokens): log N - (N-1)/N is "
                    "the KL to that sampler, not to the policy, so summary.json leaves kl_analytic null (the report "
                    "then shows best-of-N in its table but not on the KL plots)")
    picks, summary = {}, []
    for n in sorted(set(cfg.n)):
        picks[n] = best = pick_best(sampled, n)
        line = {"n": n, "kl_analytic": best_of_n_kl(n) if plain else None,
                "reward": sum(b["reward"] for b in best) / len(best)}
        if gold is not None:
            gold_rewards = score_rows(gold, best, [b["completion"] for b in best], "the gold judge")
            for b, g in zip(best, gold_rewards.tolist()):
                b["gold"] = g
            line["gold"], line["gold_judge"] = float(gold_rewards.mean()), cfg.gold
        summary.append(line)
        kl = "-" if line["kl_analytic"] is None else f"{line['kl_analytic']:.3f}"
        log.info("best-of-%d: analytic KL %s nats, reward %.3f%s", n, kl, line["reward"],
                 f", gold {line['gold']:.3f}" if "gold" in line else "")
    out = Path(cfg.output_dir)  # written once every N is scored: a failing judge leaves no partial output
    written = {f"best_n{n}.jsonl" for n in picks}
    for stale in out.glob("best_n*.jsonl"):  # an earlier run's N that this one does not have
        if re.fullmatch(r"best_n\d+\.jsonl", stale.name) and stale.name not in written:
            stale.unlink()
    for n, best in picks.items():
        write_jsonl(out / f"best_n{n}.jsonl", best)
    save_config(to_dict(cfg), out / "config.yaml")
    return str(write_json(out / "summary.json", summary))
