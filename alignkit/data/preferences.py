"""Preference data: pairs and K-wise rankings, validated with file:line errors; rankings -> pairs.

Pairs, one comparison per row (the prompt is a string, or a conversation in `messages`):

    {"prompt": "Review X.", "chosen": "Loved it.", "rejected": "Meh."}
    {"messages": [{"role": "user", "content": "Review X."}], "chosen": "Loved it.", "rejected": "Meh."}

  optional: `margin` (>= 0, how much better chosen is; subtracted inside the reward model's loss as in Llama 2;
  the DPO family leaves it unused, with a warning),
  `label` (in [0, 1], the probability that chosen is preferred: a soft label, e.g. from an AI judge),
  `id` (unique per row) and `prompt_id` (groups the comparisons of one prompt; one prompt per id).

Rankings, K >= 2 completions of one prompt ranked best first:

    {"prompt": "Review X.", "completions": ["a", "b", "c", "d"], "ranking": [2, [0, 3], 1]}

  `ranking` lists completion indices (0-based), best first; a nested list is a tie, so above
  completion 2 is best, 0 and 3 tie for second and 1 is last. Every completion appears exactly once.
  `id` / `prompt_id` are optional and unique per row. Completion sets ready for labelling
  (`alignkit rollout`'s output) are rankings without `ranking`.

Two completions with the same text state no preference: they count as a tie wherever comparisons are
made (a ranking's pairs, simulated labels), and a pair whose chosen and rejected are the same text is left
out when the file is read, with a warning.

`rankings_to_pairs` turns each ranking into all of its C(K, 2) pairs, dropping tied ones; every pair
keeps the ranking's other fields and its `prompt_id`, so the K-wise grouping survives the conversion.
A ranking's per-completion gold scores (`gold`, written by the simulated labelers) become each pair's
`chosen_gold` / `rejected_gold`, the fields simulated pairs carry; the reward model's evaluation
measures its agreement with the gold order from them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any, Sequence

from alignkit.config import option
from alignkit.data.jsonl import check_io, iter_rows, no_rows, write_jsonl
from alignkit.data.schema import Field, Schema, _is_number, _prompt_messages, register_type, type_name
from alignkit.errors import UserError

log = logging.getLogger(__name__)


def _check_id(name: str, value: Any) -> str | None:
    ok = isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))
    return None if ok else f"field '{name}' must be a string or an integer, got {type_name(value)}"


def _check_ranking_type(name: str, value: Any) -> str | None:
    if not isinstance(value, (list, tuple)):
        return f"field '{name}' must be a list of completion indices (best first), got {type_name(value)}"
    for i, item in enumerate(value):
        for index in item if isinstance(item, (list, tuple)) else [item]:
            if not isinstance(index, int) or isinstance(index, bool):
                return (f"field '{name}[{i}]' must be a completion index or a list of tied indices, "
                        f"got {type_name(index)}")
    return None


register_type("id", _check_id)
register_type("ranking", _check_ranking_type)


def _probability(name: str, value: float) -> str | None:
    return None if 0.0 <= value <= 1.0 else f"field '{name}' must be a probability in [0, 1], got {value}"


def _non_negative(name: str, value: float) -> str | None:
    return None if value >= 0 else f"field '{name}' must be >= 0 (how much better chosen is), got {value}"


def _completion_list(name: str, value: list) -> str | None:
    if len(value) < 2:
        return f"field '{name}' has {len(value)} completion(s); a ranking needs at least 2 (K >= 2)"
    empty = next((i for i, text in enumerate(value) if not text), None)
    return None if empty is None else f"field '{name}[{empty}]' is empty (every completion needs text)"


_PROMPT = {"prompt": Field("str")}
_MESSAGES = {"messages": Field("messages", check=_prompt_messages)}
_IDS = {"id": Field("id"), "prompt_id": Field("id")}
_SIDES = {"chosen": Field("str", nonempty=True), "rejected": Field("str", nonempty=True)}
_COMPLETIONS = {"completions": Field("list[str]", check=_completion_list)}

PAIR_SCHEMA = Schema(
    what="a preference pair",
    variants=({**_PROMPT, **_SIDES}, {**_MESSAGES, **_SIDES}),
    optional={"margin": Field("float", check=_non_negative), "label": Field("float", check=_probability), **_IDS},
)
COMPLETIONS_SCHEMA = Schema(
    what="a completion set", variants=({**_PROMPT, **_COMPLETIONS}, {**_MESSAGES, **_COMPLETIONS}), optional=_IDS
)
_RANKED = {**_COMPLETIONS, "ranking": Field("ranking")}
RANKING_SCHEMA = Schema(
    what="a ranking", variants=({**_PROMPT, **_RANKED}, {**_MESSAGES, **_RANKED}), optional=_IDS
)


def prompt_of(row: dict) -> str | list:
    """The prompt of a row: its text, or its `messages` conversation."""
    return row["messages"] if row.get("messages") is not None else row["prompt"]


def prompt_key(row: dict) -> str:
    """A hashable key that is equal for equal prompts (text or conversation)."""
    return json.dumps(prompt_of(row), sort_keys=True, ensure_ascii=False)


def ranking_levels(ranking: list, k: int) -> list[list[int]]:
    """`[2, [0, 3], 1]` -> `[[2], [0, 3], [1]]` after checking that it ranks each of the k completions once.

    Raises ValueError with a message that names the problem (the reader adds file:line).
    """
    levels = [list(item) if isinstance(item, (list, tuple)) else [item] for item in ranking]
    seen: set[int] = set()
    for index in (i for level in levels for i in level):
        if not 0 <= index < k:
            raise ValueError(f"field 'ranking' names completion {index}, but the row has {k} completions "
                             f"(indices are 0-based: 0 to {k - 1})")
        if index in seen:
            raise ValueError(f"field 'ranking' names completion {index} twice; rank every completion exactly once")
        seen.add(index)
    missing = sorted(set(range(k)) - seen)
    if missing:
        raise ValueError(f"field 'ranking' leaves out completion(s) {', '.join(map(str, missing))} of {k}; "
                         "rank every completion once (a nested list is a tie, e.g. [0, [1, 2]])")
    if any(not level for level in levels):
        raise ValueError("field 'ranking' has an empty tie group []")
    return levels


class _UniqueIds:
    """File-wide id checks: `id` unique per row; `prompt_id` unique per row (rankings) or per prompt (pairs)."""

    def __init__(self, prompt_id_per_row: bool):
        self.per_row = prompt_id_per_row
        self.ids: dict[Any, str] = {}
        self.prompts: dict[Any, tuple[str, str]] = {}

    def check(self, where: str, row: dict) -> None:
        if row.get("id") is not None:
            first = self.ids.setdefault(row["id"], where)
            if first != where:
                raise UserError(f"{where}: duplicate id {row['id']!r} (first used at {first}); ids must be unique")
        pid = row.get("prompt_id")
        if pid is None:
            return
        key = prompt_key(row)
        first, first_key = self.prompts.setdefault(pid, (where, key))
        if first != where and (self.per_row or first_key != key):
            why = "one row per prompt" if self.per_row else "a different prompt"
            raise UserError(f"{where}: duplicate prompt_id {pid!r} (first used at {first} for {why}); "
                            "give every prompt its own prompt_id")


def read_located(path: str | Path, schema: Schema) -> list[tuple[str, dict]]:
    """Validated rows of a pairs / rankings / completion-set file with their "file:line" locations.

    Pairs whose chosen and rejected are the same text are left out, with a warning naming the first.
    """
    ids = _UniqueIds(prompt_id_per_row=schema is not PAIR_SCHEMA)
    out, same = [], []
    for where, row in iter_rows(path, schema):
        if schema is PAIR_SCHEMA and row["chosen"] == row["rejected"]:
            same.append(where)
            continue
        if schema is RANKING_SCHEMA:
            try:
                ranking_levels(row["ranking"], len(row["completions"]))
            except ValueError as e:
                raise UserError(f"{where}: {e}") from None
        ids.check(where, row)
        out.append((where, row))
    if same and not out:
        raise UserError(f"{path}: every pair has the same text as chosen and rejected ({same[0]}); a pair compares "
                        "two different completions")
    if same:
        log.warning("%s: left out %d pair(s) whose chosen and rejected are the same text (first at %s); they state "
                    "no preference", path, len(same), same[0])
    if not out:
        raise no_rows(path)
    return out


def read_pairs(path: str | Path) -> list[dict]:
    return [row for _, row in read_located(path, PAIR_SCHEMA)]


def read_rankings(path: str | Path) -> list[dict]:
    return [row for _, row in read_located(path, RANKING_SCHEMA)]


def read_completion_sets(path: str | Path) -> list[dict]:
    return [row for _, row in read_located(path, COMPLETIONS_SCHEMA)]


def preference_kind(path: str | Path) -> str:
    """'pairs' or 'rankings', from the first row of the file."""
    for where, row in iter_rows(path, None):
        if "ranking" in row:
            return "rankings"
        if "chosen" in row or "rejected" in row:
            return "pairs"
        unpaired = "completion" in row and "label" in row
        kto = "; an unpaired KTO row (completion, label) needs loss=kto" if unpaired else ""
        raise UserError(f"{where}: neither a pair (prompt, chosen, rejected) nor a ranking "
                        f"(prompt, completions, ranking){kto}; see alignkit/data/preferences.py for the formats")
    raise no_rows(path)


def read_preferences(path: str | Path) -> tuple[str, list[dict]]:
    """(kind, rows) of a pairs or rankings file, validated."""
    kind = preference_kind(path)
    return kind, (read_rankings(path) if kind == "rankings" else read_pairs(path))


def prompt_fields(row: dict) -> dict:
    return {"messages": row["messages"]} if row.get("messages") is not None else {"prompt": row["prompt"]}


# What a pair derives from its completion set; a set's own fields of these names are not carried over.
_DERIVED = {"prompt", "messages", "completions", "ranking", "id", "prompt_id", "chosen", "rejected",
            "chosen_gold", "rejected_gold", "label", "margin"}


def carried_fields(row: dict) -> dict:
    """The fields of a completion set or ranking that its pairs carry over (e.g. a category or a source);
    `gold` too unless it is one score per completion (then it becomes `chosen_gold` / `rejected_gold`)."""
    derived = _DERIVED | ({"gold"} if gold_scores(row) else set())
    return {k: v for k, v in row.items() if k not in derived}


def set_prompt_ids(rows: Sequence[dict], where: str) -> list:
    """Each completion set's prompt id: its `prompt_id`, else its `id`, else its 0-based row number.
    UserError when two sets would share one (e.g. a row number equal to another row's own id), since the
    pairs' ids "<prompt_id>:<winner>><loser>" would then collide; compared as text, as in those ids."""
    ids, first = [], {}
    for n, row in enumerate(rows):
        pid = next((row[k] for k in ("prompt_id", "id") if row.get(k) is not None), n)
        if first.setdefault(str(pid), n) != n:
            raise UserError(f"{where}: rows {first[str(pid)] + 1} and {n + 1} both get the prompt id {pid!r} (a row "
                            "without prompt_id or id gets its 0-based row number); give every row its own prompt_id")
        ids.append(pid)
    return ids


def distinct_pairs(row: dict) -> list[tuple[int, int]]:
    """(a, b) completion indices, a < b, of every two completions of a set with different texts."""
    texts = row["completions"]
    return [(a, b) for a, b in combinations(range(len(texts)), 2) if texts[a] != texts[b]]


def ranked_pairs(row: dict) -> list[tuple[int, int]]:
    """(winner, loser) completion indices of every comparison a ranking makes: tied pairs and pairs of
    completions with the same text are left out."""
    levels, texts = ranking_levels(row["ranking"], len(row["completions"])), row["completions"]
    return [(w, l) for better, worse in combinations(range(len(levels)), 2)
            for w in levels[better] for l in levels[worse] if texts[w] != texts[l]]


def rankings_to_pairs(rows: Sequence[dict], where: str = "rankings") -> list[dict]:
    """All C(K, 2) pairs of every ranking, better completion first (`ranked_pairs`: tied and same-text ones dropped).

    Each pair keeps the ranking's other fields (`carried_fields`), its prompt (`prompt` or `messages`), a
    `prompt_id` (`set_prompt_ids`) and an `id` "<prompt_id>:<winner>><loser>" naming the two completion
    indices; a per-completion `gold` list becomes `chosen_gold` / `rejected_gold`.
    """
    pairs = []
    for row, pid in zip(rows, set_prompt_ids(rows, where)):
        gold = gold_scores(row)
        extra = carried_fields(row)
        for w, l in ranked_pairs(row):
            sides = {"chosen_gold": gold[w], "rejected_gold": gold[l]} if gold else {}
            pairs.append({**prompt_fields(row), "chosen": row["completions"][w], "rejected": row["completions"][l],
                          **extra, **sides, "prompt_id": pid, "id": f"{pid}:{w}>{l}"})
    return pairs


def gold_scores(row: dict) -> list[float] | None:
    """A ranking's per-completion gold scores (`gold`, as the simulated labelers write them), else None."""
    gold = row.get("gold")
    if isinstance(gold, list) and len(gold) == len(row["completions"]) and all(_is_number(g) for g in gold):
        return [float(g) for g in gold]
    return None


def comparison_groups(kind: str, rows: list[dict], kwise: bool) -> list[dict]:
    """Batch elements for reward-model training: `{prompt, completions, winners, losers, margin, label, gold}`.

    With `kwise`, one element per prompt holds all its comparisons (a ranking, or the pairs sharing a
    `prompt_id`, else the same prompt); otherwise one element per comparison. `winners[m]` /
    `losers[m]` index `completions`; a group whose completions are all tied (or the same text) has no comparison
    and is left out.
    `gold` holds a gold score per completion when the rows carry them (a ranking's `gold`, a pair's
    `chosen_gold` / `rejected_gold`), else None.
    """
    if kind == "rankings" and not kwise:
        kind, rows = "pairs", rankings_to_pairs(rows)
    if kind == "rankings":
        groups = [_ranking_group(row) for row in rows]
    elif kwise:
        by_prompt: dict[Any, list[dict]] = {}
        for row in rows:
            key = row["prompt_id"] if row.get("prompt_id") is not None else prompt_key(row)
            by_prompt.setdefault(key, []).append(row)
        groups = [_pairs_group(group) for group in by_prompt.values()]
    else:
        groups = [_pairs_group([row]) for row in rows]
    return [g for g in groups if g["winners"]]


def _ranking_group(row: dict) -> dict:
    wins = ranked_pairs(row)
    return {"prompt": prompt_of(row), "completions": list(row["completions"]), "winners": [w for w, _ in wins],
            "losers": [l for _, l in wins], "margin": [0.0] * len(wins), "label": [1.0] * len(wins),
            "gold": gold_scores(row)}


def _pairs_group(pairs: list[dict]) -> dict:
    completions: list[str] = []
    index: dict[str, int] = {}
    gold: dict[str, float] = {}
    group = {"prompt": prompt_of(pairs[0]), "completions": completions, "winners": [], "losers": [],
             "margin": [], "label": []}
    for pair in pairs:
        for side, key in (("chosen", "winners"), ("rejected", "losers")):
            text = pair[side]
            if text not in index:
                index[text] = len(completions)
                completions.append(text)
            group[key].append(index[text])
            if _is_number(pair.get(f"{side}_gold")):
                gold[text] = float(pair[f"{side}_gold"])
        group["margin"].append(float(pair.get("margin") or 0.0))
        group["label"].append(float(pair["label"]) if pair.get("label") is not None else 1.0)
    group["gold"] = [gold[t] for t in completions] if len(gold) == len(completions) else None
    return group


@dataclass(frozen=True)
class RankingsToPairsConfig:
    input: str | None = option(None, "Rankings file: {prompt|messages, completions: [K], ranking} rows")
    output: str | None = option(None, "Where to write the pairs: {prompt|messages, chosen, rejected, prompt_id, id}")


def run_rankings_to_pairs(cfg: RankingsToPairsConfig) -> str:
    check_io(cfg.input, cfg.output, "both input=RANKINGS.jsonl and output=PAIRS.jsonl")
    rows = read_rankings(cfg.input)
    pairs = rankings_to_pairs(rows, cfg.input)
    if not pairs:
        raise UserError(f"{cfg.input}: no pairs (every ranking is a full tie, or ranks copies of one text)")
    write_jsonl(cfg.output, pairs)
    log.info("%d rankings -> %d pairs (ties and same-text pairs dropped) in %s", len(rows), len(pairs), cfg.output)
    return cfg.output
