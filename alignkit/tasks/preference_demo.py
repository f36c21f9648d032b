"""Demo preference data: pairs and rankings of the embedded review texts, labelled by simulated VADER labelers.

Each comparison takes a demo prompt ("Write a short review of Zomig for migraine.") and, as its
completions, that prompt's review plus other reviews of the same domain (drugs or airlines), so every
completion answers the same prompt template. Training comparisons use only the SFT training reviews,
held-out ones only the SFT eval reviews (`tasks.demo_data` splits them by subject), so no held-out
text is seen in training. Labels come from `feedback.simulated` with the VADER judge at the tau whose
analytic accuracy ceiling on the training pairs is `TARGET_CEILING`; the same tau labels every file.

Files under `alignkit_home()/data/preferences/` (each with its `.ceiling.json`):
  pairs_train.jsonl (2,000 pairs), pairs_eval.jsonl (500), rankings_train.jsonl (300 rankings of K=4,
  1,800 comparisons: the K-wise vs pairwise check). Pure function of the demo data and SEED.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from alignkit.data.jsonl import read_rows
from alignkit.feedback.simulated import gold_scores, pair_gaps, simulate, tau_for_ceiling, write_labelled
from alignkit.tasks.embedded import alignkit_home

DATA_VERSION = 1
SEED = 0
TARGET_CEILING = 0.9
SIZES = {"pairs_train": 2000, "pairs_eval": 500, "rankings_train": 300}
K_RANKING = 4


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


def _paths(root: Path) -> dict[str, Path]:
    return {**{name: root / f"{name}.jsonl" for name in SIZES}, "manifest": root / "manifest.json"}


def build_preference_demo(force: bool = False) -> dict[str, Path]:
    """Write the demo preference files once; returns their paths (pairs_train, pairs_eval, rankings_train, manifest)."""
    from alignkit.rewards.gold import VaderJudge
    from alignkit.tasks.demo_data import build_demo_data

    paths = _paths(preference_demo_dir())
    try:
        if not force and json.loads(paths["manifest"].read_text())["data_version"] == DATA_VERSION:
            return paths
    except (OSError, ValueError, KeyError):
        pass
    demo = build_demo_data()
    rng = random.Random(SEED)
    train, held_out = read_rows(demo["sft_train"]), read_rows(demo["sft_eval"])
    judge = VaderJudge()
    sets = {"pairs_train": completion_sets(train, SIZES["pairs_train"], 2, rng, "train"),
            "pairs_eval": completion_sets(held_out, SIZES["pairs_eval"], 2, rng, "eval"),
            "rankings_train": completion_sets(train, SIZES["rankings_train"], K_RANKING, rng, "rank")}
    gold = {name: gold_scores(judge, rows) for name, rows in sets.items()}
    tau = tau_for_ceiling(pair_gaps(gold["pairs_train"]), TARGET_CEILING)
    paths["manifest"].parent.mkdir(parents=True, exist_ok=True)
    paths["manifest"].unlink(missing_ok=True)
    reports = {}
    for seed, name in enumerate(SIZES, start=SEED):
        rows, reports[name] = simulate(sets[name], gold[name], name.split("_")[0], tau, seed, "vader")
        write_labelled(paths[name], rows, reports[name])
    manifest = {"data_version": DATA_VERSION, "seed": SEED, "target_ceiling": TARGET_CEILING, "tau": tau,
                "files": {name: {"rows": SIZES[name], **reports[name]} for name in SIZES}}
    paths["manifest"].write_text(json.dumps(manifest, indent=2) + "\n")
    return paths
