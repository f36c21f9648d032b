"""Simulated labelers: preference labels from a gold judge with Bradley–Terry / Plackett–Luce noise.

A labeler with gold scores g and temperature tau prefers a over b with probability

    P(a > b) = sigmoid((g(a) - g(b)) / tau)                       (Bradley & Terry 1952)

and ranks K completions by sampling a Plackett–Luce order with weights exp(g / tau) (Plackett 1975,
Luce 1959). Both are drawn the same way: sort g / tau + Gumbel noise (the Gumbel-max trick), so every
pair inside a ranking also follows the Bradley–Terry probability above (the difference of two Gumbel
variables is logistic). tau -> 0 is a perfect labeler, large tau a coin flip.

The analytic accuracy ceiling is the expected agreement of the noisy labels with the gold ordering,

    ceiling = mean over comparisons of max(p, 1 - p) = mean sigmoid(|g(a) - g(b)| / tau),

the best held-out accuracy any reward model can expect against these labels. It is written next to
the data as `<name>.ceiling.json` with tau, the judge and the empirical agreement of the drawn labels.
Two completions with the same text are no comparison (`data.preferences.ranked_pairs`): they get no pair and
no place in the ceiling.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from alignkit.config import option
from alignkit.data.jsonl import check_io, write_json, write_jsonl
from alignkit.data.preferences import (
    carried_fields, distinct_pairs, prompt_fields, prompt_of, ranked_pairs, read_completion_sets, set_prompt_ids,
)
from alignkit.errors import UserError
from alignkit.rewards.base import checked_scores, row_fields

log = logging.getLogger(__name__)

CEILING_DEFINITION = ("mean over comparisons of max(p, 1 - p), p = sigmoid((g(a) - g(b)) / tau): the expected "
                      "agreement of the noisy labels with the gold ordering")


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


def accuracy_ceiling(gaps, tau: float) -> float:
    """mean sigmoid(|gap| / tau) over gold gaps g(a) - g(b) (a gap of 0 contributes 1/2)."""
    gaps = np.abs(np.asarray(gaps, dtype=np.float64))
    return float(sigmoid(gaps / tau).mean()) if gaps.size else float("nan")


def tau_for_ceiling(gaps, target: float) -> float:
    """The tau at which `accuracy_ceiling(gaps, tau) == target` (bisection on log tau; it decreases in tau),
    searched on a range scaled to the gaps (a noise-free labeler at its low end, a coin at its high end)."""
    size = np.abs(np.asarray(gaps, dtype=np.float64))
    nonzero = size[size > 0]
    best = (nonzero.size + 0.5 * (size.size - nonzero.size)) / max(size.size, 1)  # tau -> 0: ties count 1/2
    if not 0.5 < target < best:
        raise UserError(f"target_ceiling must be in (0.5, {best:.4f}) for these completions (the ceiling of "
                        f"a noise-free labeler is {best:.4f}), got {target}")
    lo, hi = math.log(nonzero.min() * 1e-3), math.log(nonzero.max() * 1e6)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if accuracy_ceiling(gaps, math.exp(mid)) > target else (lo, mid)
    return math.exp(0.5 * (lo + hi))


def plackett_luce_order(gold: np.ndarray, tau: float, rng: np.random.Generator) -> list[int]:
    """Indices best first, drawn from Plackett–Luce with weights exp(gold / tau) (Gumbel-max)."""
    noisy = np.asarray(gold, dtype=np.float64) / tau + rng.gumbel(size=len(gold))
    return [int(i) for i in np.argsort(-noisy, kind="stable")]


def gold_scores(judge, rows: list[dict]) -> list[list[float]]:
    """The judge's score of every completion of every row (one batched call)."""
    prompts = [prompt_of(r) for r in rows for _ in r["completions"]]
    texts = [c for r in rows for c in r["completions"]]
    fields = row_fields([r for r in rows for _ in r["completions"]])
    fields.pop("ranking", None)  # an earlier labeler's ranking is no field of the completions
    flat = checked_scores(judge.score(prompts, texts, **fields), prompts, texts, "the gold judge").tolist()
    out, i = [], 0
    for r in rows:
        out.append(flat[i : i + len(r["completions"])])
        i += len(r["completions"])
    return out


def label_pairs(rows: list[dict], gold: list[list[float]], tau: float, seed: int, where: str = "input") -> list[dict]:
    """Every C(K, 2) pair of distinct texts of each completion set, labelled independently with Bradley–Terry noise.

    Pairs keep the row's other fields (`carried_fields`), get a `prompt_id` (`set_prompt_ids`) and the
    gold scores of both sides (`chosen_gold`, `rejected_gold`).
    """
    rng = np.random.default_rng(seed)
    pairs = []
    for row, g, pid in zip(rows, gold, set_prompt_ids(rows, where)):
        extra = carried_fields(row)
        for a, b in distinct_pairs(row):
            w, l = plackett_luce_order(np.array([g[a], g[b]]), tau, rng)
            w, l = (a, b)[w], (a, b)[l]
            pairs.append({**prompt_fields(row), "chosen": row["completions"][w], "rejected": row["completions"][l],
                          **extra, "prompt_id": pid, "id": f"{pid}:{w}>{l}",
                          "chosen_gold": g[w], "rejected_gold": g[l]})
    return pairs


def rank_plackett_luce(rows: list[dict], gold: list[list[float]], tau: float, seed: int) -> list[dict]:
    """One Plackett–Luce ranking per completion set (`ranking` best first, `gold` per completion)."""
    rng = np.random.default_rng(seed)
    return [{**row, "ranking": plackett_luce_order(np.array(g), tau, rng), "gold": g} for row, g in zip(rows, gold)]


def label_report(gaps, tau: float, judge: str, seed: int) -> dict:
    """The ceiling JSON, from the gold gap g(winner) - g(loser) of every labelled comparison."""
    gaps = np.asarray(gaps, dtype=np.float64)
    agree = np.where(gaps > 0, 1.0, np.where(gaps == 0, 0.5, 0.0))
    return {"judge": judge, "tau": tau, "seed": seed, "comparisons": int(gaps.size),
            "ceiling": accuracy_ceiling(gaps, tau), "empirical_agreement": float(agree.mean()),
            "ceiling_definition": CEILING_DEFINITION}


def ceiling_path(data_path: str | Path) -> Path:
    """`data/pairs.jsonl` -> `data/pairs.ceiling.json`."""
    path = Path(data_path)
    return path.with_name(path.name.rsplit(".", 1)[0] + ".ceiling.json")


def write_labelled(path: str | Path, rows: list[dict], report: dict) -> Path:
    write_jsonl(path, rows)
    write_json(ceiling_path(path), report)
    return Path(path)


def simulate(rows: list[dict], gold: list[list[float]], mode: str, tau: float, seed: int,
             judge_name: str, where: str = "input") -> tuple[list[dict], dict]:
    """Label completion sets as `pairs` or `rankings`; returns the labelled rows and their ceiling report."""
    if mode == "pairs":
        out = label_pairs(rows, gold, tau, seed, where)
        gaps = [p["chosen_gold"] - p["rejected_gold"] for p in out]
    else:
        out = rank_plackett_luce(rows, gold, tau, seed)
        gaps = [r["gold"][w] - r["gold"][l] for r in out for w, l in ranked_pairs(r)]
    return out, label_report(gaps, tau, judge_name, seed)


def pair_gaps(rows: list[dict], gold: list[list[float]]) -> list[float]:
    """g(a) - g(b) for every pair of completions with different texts within each set."""
    return [g[a] - g[b] for row, g in zip(rows, gold) for a, b in distinct_pairs(row)]


@dataclass(frozen=True)
class LabelConfig:
    input: str | None = option(None, "Completion sets to label: {prompt|messages, completions: [K]} rows "
                               "(alignkit rollout's output)")
    output: str | None = option(None, "Labelled JSONL to write; the ceiling goes beside it "
                                "(pairs.jsonl -> pairs.ceiling.json)")
    mode: Literal["pairs", "rankings"] = option("pairs", "pairs: every C(K,2) pair labelled independently "
                                                "(Bradley-Terry); rankings: one Plackett-Luce ranking per row")
    judge: str = option("vader", "Gold judge: 'vader' or 'package.module:function' (text -> float, or a reward source)")
    tau: float = option(0.25, "Labeler noise temperature: P(a > b) = sigmoid((g(a) - g(b)) / tau)")
    target_ceiling: float | None = option(None, "If set, solve tau so the analytic accuracy ceiling equals this")
    seed: int = option(0, "Seed of the label noise")

    def validate(self):
        if not self.tau > 0:
            raise UserError(f"tau must be > 0, got {self.tau}")


def run_label(cfg: LabelConfig) -> str:
    from alignkit.rewards.gold import load_judge

    check_io(cfg.input, cfg.output, "both input=COMPLETIONS.jsonl and output=LABELLED.jsonl")
    judge = load_judge(cfg.judge)
    rows = read_completion_sets(cfg.input)
    if not any(distinct_pairs(row) for row in rows):  # nothing to compare: no labels and no ceiling
        raise UserError(f"{cfg.input}: no pairs (every completion set holds copies of one text)")
    gold = gold_scores(judge, rows)
    tau = tau_for_ceiling(pair_gaps(rows, gold), cfg.target_ceiling) if cfg.target_ceiling is not None else cfg.tau
    out, report = simulate(rows, gold, cfg.mode, tau, cfg.seed, cfg.judge, cfg.input)
    write_labelled(cfg.output, out, report)
    log.info("%d %s (tau %.4g): accuracy ceiling %.4f, labels agree with the gold order on %.4f",
             len(out), cfg.mode, report["tau"], report["ceiling"], report["empirical_agreement"])
    return cfg.output
