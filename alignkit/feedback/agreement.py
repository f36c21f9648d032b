"""Inter-annotator agreement on rankings: pairwise agreement and Krippendorff's alpha.

Pairwise agreement: for every prompt, every two labelers who ranked it and every two completions a, b,
each labeler's verdict is sign(rank(a) - rank(b)) in {-1, 0, +1} (0 = tie); the agreement is the share
of such (labeler pair, completion pair) comparisons on which the verdicts are equal.

Krippendorff's alpha (Krippendorff 2004, "Content Analysis", ch. 11; 2011, "Computing Krippendorff's
alpha-reliability"): a unit is one completion of one prompt, a value is the rank a labeler gave it
(1 = best, ties share their mid-rank). From the coincidence matrix

    o_ck = sum over units u of (number of ordered value pairs (c, k) within u) / (m_u - 1),
    n_c = sum_k o_ck,   n = sum_c n_c          (only units with m_u >= 2 values count)

    alpha = 1 - D_o / D_e = 1 - (n - 1) * sum_ck o_ck d2_ck / sum_ck n_c n_k d2_ck

with the ordinal distance d2_ck = (sum_{g from c to k} n_g - (n_c + n_k) / 2)^2 (nominal: [c != k],
interval: (c - k)^2). alpha = 1 is perfect agreement, 0 is chance, < 0 systematic disagreement.
"""

from __future__ import annotations

import math
from itertools import combinations


def mid_ranks(levels: list[list[int]]) -> dict[int, float]:
    """Completion index -> rank (1 = best); tied completions share the mean of the ranks they span."""
    ranks, start = {}, 1
    for level in levels:
        mid = start + (len(level) - 1) / 2
        for i in level:
            ranks[i] = mid
        start += len(level)
    return ranks


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def pairwise_agreement(by_prompt: dict) -> tuple[float, int, dict]:
    """(agreement, number of comparisons, {labeler: (agreements, comparisons)}).

    `by_prompt` maps a prompt to {labeler: ranking levels}; prompts with one labeler add nothing.
    The agreement is nan when no prompt has two labelers.
    """
    agree = total = 0
    per_labeler: dict = {}
    for rankings in by_prompt.values():
        ranks = {who: mid_ranks(levels) for who, levels in rankings.items()}
        for x, y in combinations(sorted(ranks), 2):
            for a, b in combinations(sorted(ranks[x]), 2):
                same = _sign(ranks[x][a] - ranks[x][b]) == _sign(ranks[y][a] - ranks[y][b])
                agree += same
                total += 1
                for who in (x, y):
                    hits, n = per_labeler.get(who, (0, 0))
                    per_labeler[who] = (hits + same, n + 1)
    return (agree / total if total else math.nan), total, per_labeler


def _distance(metric: str, values: list[float], totals: dict[float, float]):
    if metric == "nominal":
        return lambda c, k: float(c != k)
    if metric == "interval":
        return lambda c, k: (c - k) ** 2
    if metric != "ordinal":
        raise ValueError(f"metric must be nominal, ordinal or interval, got {metric!r}")
    position = {v: i for i, v in enumerate(values)}
    cumulative = [0.0]
    for v in values:
        cumulative.append(cumulative[-1] + totals[v])

    def ordinal(c, k):
        lo, hi = sorted((position[c], position[k]))
        return (cumulative[hi + 1] - cumulative[lo] - (totals[c] + totals[k]) / 2) ** 2
    return ordinal


def krippendorff_alpha(units: list[list[float]], metric: str = "ordinal") -> float:
    """Krippendorff's alpha of `units` (each the values given to one unit; missing values left out).

    nan when fewer than two pairable values exist or every value is the same (no expected disagreement).
    """
    coincidence: dict[tuple[float, float], float] = {}
    for unit in units:
        m = len(unit)
        if m < 2:
            continue
        for i, c in enumerate(unit):
            for j, k in enumerate(unit):
                if i != j:
                    coincidence[(c, k)] = coincidence.get((c, k), 0.0) + 1.0 / (m - 1)
    totals: dict[float, float] = {}
    for (c, _), o in coincidence.items():
        totals[c] = totals.get(c, 0.0) + o
    n = sum(totals.values())
    values = sorted(totals)
    if n < 2 or len(values) < 2:
        return math.nan
    d2 = _distance(metric, values, totals)
    observed = sum(o * d2(c, k) for (c, k), o in coincidence.items())
    expected = sum(totals[c] * totals[k] * d2(c, k) for c in values for k in values)
    return 1.0 - (n - 1) * observed / expected


def ranking_alpha(by_prompt: dict) -> float:
    """Ordinal alpha over units (prompt, completion), values the labelers' mid-ranks."""
    units = []
    for rankings in by_prompt.values():
        ranks = [mid_ranks(levels) for levels in rankings.values()]
        for index in sorted({i for r in ranks for i in r}):
            units.append([r[index] for r in ranks if index in r])
    return krippendorff_alpha(units, "ordinal")
