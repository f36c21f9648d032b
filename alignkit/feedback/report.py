"""What the admin sees and exports: progress per labeler and per prompt, agreement, JSONL exports.

Exports (one row per stored label, in the reward-model formats of alignkit/data/preferences.py):

    rankings: {prompt|messages, completions, ranking, id, source_prompt_id, labeler, ratings, flags, note, ...}
    pairs:    rankings_to_pairs of the same rows (ties dropped): {prompt|messages, chosen, rejected, prompt_id, id, ...}

`id` is "<prompt_id>#<labeler id>", unique per row, so several labelers of one prompt give rows that
`alignkit rm` and `alignkit dpo` read without id clashes; `source_prompt_id` names the imported prompt.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from alignkit.data.jsonl import write_jsonl
from alignkit.data.preferences import rankings_to_pairs, ranking_levels
from alignkit.errors import UserError
from alignkit.feedback import db
from alignkit.feedback.agreement import pairwise_agreement, ranking_alpha

FORMATS = ("rankings", "pairs")


def ranking_rows(engine: Engine, details: bool = True) -> list[dict]:
    """One rankings-format row per stored label; `details` adds ratings, flags and the note."""
    rows = []
    for r in db.labelled_rows(engine):
        # the imported row's other fields first, so that none overrides the stored label or the export's own fields
        row: dict[str, Any] = {**json.loads(r["extra_json"]), **json.loads(r["prompt_json"]),
                               "completions": json.loads(r["completions_json"]),
                               "ranking": json.loads(r["ranking_json"]), "id": f"{r['prompt_id']}#{r['labeler_id']}",
                               "source_prompt_id": r["prompt_id"], "labeler": r["labeler"]}
        if details:
            row.update(ratings=json.loads(r["ratings_json"]), flags=json.loads(r["flags_json"]), note=r["note"])
        rows.append(row)
    return rows


NOTHING_TO_EXPORT = "nothing to export: no labels (or, for pairs, only ties) in the database"


def export_rows(engine: Engine, fmt: str) -> list[dict]:
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "rankings":
        return ranking_rows(engine)
    return rankings_to_pairs(ranking_rows(engine, details=False))


def export(engine: Engine, fmt: str, output: str) -> int:
    """Write the export atomically; returns the number of rows."""
    rows = export_rows(engine, fmt)
    if not rows:
        raise UserError(NOTHING_TO_EXPORT)
    write_jsonl(output, rows)
    return len(rows)


def _by_prompt(engine: Engine) -> dict:
    out: dict = {}
    for r in db.labelled_rows(engine):
        levels = ranking_levels(json.loads(r["ranking_json"]), len(json.loads(r["completions_json"])))
        out.setdefault(r["prompt_id"], {})[r["labeler"]] = levels
    return out


def _status_counts(engine: Engine, key) -> dict:
    counts: dict = {}
    query = select(key, db.assignments.c.status, func.count()).group_by(key, db.assignments.c.status)
    with db.read_tx(engine) as conn:
        for who, status, n in conn.execute(query.select_from(db.assignments)):
            counts.setdefault(who, {"open": 0, "done": 0, "skipped": 0})[status] = n
    return counts


def progress(engine: Engine, per_prompt: int, max_prompts: int = 500) -> dict:
    """Counts per labeler and per prompt (the first `max_prompts`), pairwise agreement and ordinal alpha."""
    by_prompt = _by_prompt(engine)
    agreement, comparisons, per_labeler = pairwise_agreement(by_prompt)
    per_l = _status_counts(engine, db.assignments.c.labeler_id)
    per_p = _status_counts(engine, db.assignments.c.prompt_pk)
    empty = {"open": 0, "done": 0, "skipped": 0}
    with db.read_tx(engine) as conn:
        people = conn.execute(select(db.labelers).order_by(db.labelers.c.id)).mappings().all()
        prompt_rows = conn.execute(select(db.prompts.c.id, db.prompts.c.prompt_id).order_by(db.prompts.c.id)).all()
    labeler_stats = []
    for p in people:
        hits, n = per_labeler.get(p["name"], (0, 0))
        labeler_stats.append({"name": p["name"], "admin": p["is_admin"], "active": p["active"],
                              **per_l.get(p["id"], empty), "agreement": hits / n if n else None})
    prompt_stats = [{"prompt_id": pid, **per_p.get(pk, empty)} for pk, pid in prompt_rows[:max_prompts]]
    done_prompts = sum(1 for pk, _ in prompt_rows if per_p.get(pk, empty)["done"] >= per_prompt)
    return {"labelers": labeler_stats, "prompts": prompt_stats, "n_prompts": len(prompt_rows),
            "complete_prompts": done_prompts, "per_prompt": per_prompt,
            "labels": sum(s["done"] for s in labeler_stats), "agreement": agreement,
            "comparisons": comparisons, "alpha": ranking_alpha(by_prompt)}
