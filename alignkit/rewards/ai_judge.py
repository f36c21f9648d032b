"""LLM-as-judge reward: the probability that a completion beats a reference completion.

    r(x, y) = P(y > y_ref | x) = 1/2 [P(A | A=y, B=y_ref) + 1 - P(A | A=y_ref, B=y)]

from `feedback.ai_judge.PairwiseJudge` (both orders, so the judge's position bias cancels). The
reference completion comes with each prompt row (`reference` field by default), so the source fits
the reward interface `score(prompts, completions, **row_fields)`: best-of-N with
`reward: ai-judge:smollm2@helpful` and prompt rows `{prompt, reference}`, or `win_rate` to evaluate
a policy's completions against a reference policy's.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from alignkit.errors import UserError
from alignkit.feedback.ai_judge import JudgeConfig, PairwiseJudge

SPEC_PREFIX = "ai-judge:"


class AIJudgeReward:
    """A reward source: P(completion > the row's reference completion) in [0, 1] (0.5 = as good)."""

    def __init__(self, judge: PairwiseJudge, question: str, reference_field: str = "reference"):
        self.judge, self.question, self.field = judge, question, reference_field

    def score(self, prompts: Sequence, completions: Sequence[str], **row_fields) -> torch.Tensor:
        references = row_fields.get(self.field)
        if references is None or any(not isinstance(r, str) for r in references):
            raise UserError(f"the AI judge compares each completion with a reference: give every prompt row "
                            f"a '{self.field}' text field")
        comparison = self.judge.compare(prompts, completions, references, [self.question] * len(completions))
        return comparison.prob.float()

    __call__ = score


def win_rate(judge: PairwiseJudge, prompts: Sequence, completions: Sequence[str], references: Sequence[str],
             question: str) -> dict:
    """Pairwise win rate of `completions` against `references` (a tie, P = 0.5, counts 1/2).

    Returns {win_rate, stderr, mean_prob (mean P(win)), same_letter_rate, n}; stderr = sqrt(mean((w - rate)^2) / n)
    of the per-pair scores w in {0, 1/2, 1} (without ties, the binomial sqrt(rate (1 - rate) / n)).
    """
    c = judge.compare(prompts, completions, references, [question] * len(completions))
    p = c.prob.double()
    wins = (p > 0.5).double() + 0.5 * (p == 0.5).double()
    n = len(wins)
    rate = float(wins.mean()) if n else float("nan")
    return {"win_rate": rate, "stderr": math.sqrt(float(((wins - rate) ** 2).mean()) / n) if n else float("nan"),
            "mean_prob": float(p.mean()) if n else float("nan"),
            "same_letter_rate": float(c.same_letter.double().mean()) if n else float("nan"), "n": n}


def load_ai_judge(spec: str) -> AIJudgeReward:
    """'ai-judge:MODEL[@PRINCIPLE]' (default principle: helpful, from the default constitution)."""
    from alignkit.data.constitution import load_constitution
    from alignkit.feedback.ai_judge import load_pairwise_judge
    from alignkit.models.load import ModelConfig

    model, _, name = spec.removeprefix(SPEC_PREFIX).partition("@")
    if not model:
        raise UserError(f"reward '{spec}': name the judge model, e.g. 'ai-judge:smollm2@helpful'")
    principle = load_constitution(None, [name or "helpful"])[0]
    judge = load_pairwise_judge(JudgeConfig(model=ModelConfig(path=model)))
    return AIJudgeReward(judge, principle.comparison)
