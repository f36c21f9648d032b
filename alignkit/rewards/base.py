"""Reward sources behind one interface, and how a run builds its reward from config.

A reward source is any object with `score(prompts, completions, **row_fields) -> (B,) tensor`:
a trained reward model (`rewards.reward_model.RewardModel`, normalised), a gold judge
(`rewards.gold`, e.g. VADER), or any Python function `f(prompts, completions, **row_fields)`
(verifiable rewards: a unit test, an exact-match check). `WeightedSum` adds several.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from alignkit.config import option
from alignkit.errors import UserError


class CallableReward:
    """A reward source from `f(prompts, completions, **row_fields) -> sequence of B numbers`."""

    def __init__(self, fn: Callable, name: str | None = None):
        self.fn, self.name = fn, name or getattr(fn, "__name__", "function")

    def score(self, prompts: Sequence, completions: Sequence[str], **row_fields) -> torch.Tensor:
        scores = self.fn(prompts, completions, **row_fields)
        try:
            out = torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
        except (TypeError, ValueError, RuntimeError):
            raise UserError(f"reward function {self.name} must return {len(completions)} numbers, "
                            f"got {scores!r:.80}") from None
        if out.numel() != len(completions):
            raise UserError(f"reward function {self.name} returned {out.numel()} scores for "
                            f"{len(completions)} completions")
        return out

    __call__ = score


class WeightedSum:
    """sum_i w_i * source_i(prompts, completions, **row_fields)."""

    def __init__(self, sources: Sequence, weights: Sequence[float]):
        self.sources, self.weights = list(sources), list(weights)

    def score(self, prompts: Sequence, completions: Sequence[str], **row_fields) -> torch.Tensor:
        total = torch.zeros(len(completions), dtype=torch.float32)
        for source, w in zip(self.sources, self.weights):
            total += w * source.score(prompts, completions, **row_fields).float().cpu()
        return total

    __call__ = score


# Row fields never passed to a reward source: the prompt itself, and the names of score's own arguments (a row
# of `alignkit rollout`'s output carries `completions`; passing it would clash with the sampled completions).
NOT_ROW_FIELDS = ("prompt", "messages", "prompts", "completions")


def row_fields(rows: Sequence[dict]) -> dict[str, list]:
    """The prompt rows' other fields as keyword lists for a reward source, None where a row lacks one: every
    field that any row has (a field on a later row only is passed too), except `NOT_ROW_FIELDS`."""
    keys = dict.fromkeys(k for r in rows for k in r if k not in NOT_ROW_FIELDS)
    return {k: [r.get(k) for r in rows] for k in keys}


def checked_scores(raw, prompts: Sequence, completions: Sequence[str], what: str = "the reward") -> torch.Tensor:
    """A reward source's output for `completions` as a float64 CPU tensor (B,). UserError unless it is B finite
    numbers: a NaN would turn advantages, losses, a best-of-N choice or a label into noise (and an RL update
    every weight into NaN)."""
    try:
        scores = torch.as_tensor(raw, dtype=torch.float64).reshape(-1).cpu()
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise UserError(f"{what} must return numbers (within float range), got {raw!r:.80}") from None
    if scores.numel() != len(completions):
        raise UserError(f"{what} returned {scores.numel()} scores for {len(completions)} completions")
    bad = ~torch.isfinite(scores)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise UserError(f"{what} gave a non-finite score ({scores[i].item()}) to {int(bad.sum())} of "
                        f"{len(completions)} completions, e.g. {completions[i]!r:.60} to the prompt {prompts[i]!r:.60}")
    return scores


def length_penalty(scores: torch.Tensor, ended: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """Responses that hit the length limit without EOS get `penalty` as their score instead
    (Ziegler et al. 2019 used -1 for samples that did not end; null keeps their score)."""
    if penalty is None:
        return scores
    return torch.where(ended.to(scores.device, torch.bool), scores, torch.full_like(scores, penalty))


def import_attr(spec: str, what: str):
    if ":" not in spec:
        raise UserError(f"{what} '{spec}' must be of the form 'package.module:function'")
    module_name, attr = spec.split(":", 1)
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"{what} '{spec}': cannot import it ({e})") from None


@dataclass(frozen=True)
class RewardConfig:
    model: str | None = option(None, "Reward model directory (alignkit rm's output); its normalisation is applied")
    judge: str | None = option(None, "Gold judge of the completion text: 'vader' or 'package.module:text_function'")
    function: str | None = option(None, "'package.module:f' with f(prompts, completions, **row_fields) -> B scores")
    weights: list[float] | None = option(None, "Weights of model, judge, function (those set, in order); null = 1 each")
    no_eos_penalty: float | None = option(None, "Score of responses cut at max_new_tokens without EOS; null = keep")

    @property
    def sources(self) -> int:
        return sum(x is not None for x in (self.model, self.judge, self.function))

    def validate(self):  # a stage that needs a reward checks that one is set (eval's gold or proxy may be none)
        if self.no_eos_penalty is not None and not math.isfinite(self.no_eos_penalty):
            raise UserError(f"no_eos_penalty must be a finite number or null, got {self.no_eos_penalty}")
        if self.weights is not None and len(self.weights) != self.sources:
            raise UserError(f"weights has {len(self.weights)} entries for {self.sources} reward source(s) "
                            "(of model, judge, function: those set)")


def build_reward(cfg: RewardConfig, device: str | None = None):
    """The reward source of `cfg`: one source, or a weighted sum of the ones set."""
    from alignkit.rewards.gold import load_judge

    if not cfg.sources:
        raise UserError("set a reward: reward.model=DIR (a reward model), reward.judge=vader, or "
                        "reward.function=package.module:f")
    cfg.validate()  # a stage's default RewardConfig() is not validated when built, so check here
    sources = []
    if cfg.model is not None:
        from alignkit.rewards.reward_model import RewardModel

        sources.append(RewardModel(cfg.model, normalize=True, device=device))
    if cfg.judge is not None:
        sources.append(load_judge(cfg.judge))
    if cfg.function is not None:
        sources.append(CallableReward(import_attr(cfg.function, "reward.function"), cfg.function))
    if len(sources) == 1 and cfg.weights is None:
        return sources[0]
    return WeightedSum(sources, cfg.weights or [1.0] * len(sources))
