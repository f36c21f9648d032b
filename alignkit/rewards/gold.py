"""Gold judges: reward sources that stand in for people (simulated labelers) and measure true quality.

Every reward source is called as `score(prompts, completions, **row_fields) -> (B,) tensor`. A gold
judge here is either the VADER sentiment judge or any Python function: of the completion text
(`TextFunctionJudge`), or of the batch, `f(prompts, completions, **row_fields)`; `load_judge("vader")` or
`load_judge("package.module:function")` gives one by name (the CLI's `judge=` setting).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable, Sequence

import torch

from alignkit.errors import UserError


class TextFunctionJudge:
    """A reward source from any function `text -> float` of the completion (the prompt is ignored)."""

    def __init__(self, fn: Callable[[str], float], name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)

    def score(self, prompts: Sequence, completions: Sequence[str], **row_fields) -> torch.Tensor:
        return torch.tensor([self._number(text) for text in completions], dtype=torch.float64)

    def _number(self, text: str) -> float:
        value = self.fn(text)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"judge {self.name} returned {value!r} for {text!r:.60}; it must return a number") from None

    __call__ = score


class VaderJudge(TextFunctionJudge):
    """The VADER compound sentiment score in [-1, 1] of the completion (Hutto & Gilbert 2014).

    A lexicon and rules, no model: it runs offline, in about 0.1 ms per review, identically everywhere.
    The demo's gold judge: "write a positive review" is the task, VADER says how positive it is.
    """

    def __init__(self):
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise UserError("the VADER judge needs the package 'vadersentiment': pip install vadersentiment") from None
        analyzer = SentimentIntensityAnalyzer()
        super().__init__(lambda text: analyzer.polarity_scores(text)["compound"], name="vader")


GOLD_JUDGES: dict[str, Callable[[], object]] = {"vader": VaderJudge}


def _required_positional(fn) -> int:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: taken as a function of the text
        return 1
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in kinds and p.default is inspect.Parameter.empty for p in params)


def as_judge(obj, name: str | None = None):
    """A reward source as is (it has `.score`); a batch function `f(prompts, completions, **row_fields) -> B
    numbers` (two required arguments) as a `CallableReward`; a function `text -> float` as a `TextFunctionJudge`."""
    from alignkit.rewards.base import CallableReward

    if hasattr(obj, "score"):
        return obj
    if callable(obj):
        return CallableReward(obj, name) if _required_positional(obj) >= 2 else TextFunctionJudge(obj, name)
    raise UserError(f"{name or obj!r} is neither a reward source (with .score) nor a function")


def load_judge(spec: str):
    """'vader', or 'package.module:attribute' naming a reward source, a batch function or a text function
    (`as_judge`)."""
    if spec in GOLD_JUDGES:
        return GOLD_JUDGES[spec]()
    if ":" not in spec:
        raise UserError(f"unknown judge '{spec}'; use one of {', '.join(GOLD_JUDGES)} or 'package.module:function'")
    module_name, attr = spec.split(":", 1)
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"judge '{spec}': cannot import it ({e})") from None
    return as_judge(obj, spec)
