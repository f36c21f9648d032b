"""Constitutions: the principles behind AI feedback (Bai et al. 2022, "Constitutional AI").

A constitution is a YAML (or JSON) file with a list of principles, each a mapping of four strings:

    principles:
      - name: positive
        critique: Identify specific ways in which your last response could be more positive.
        revision: Rewrite your response to be more positive. Reply with the rewritten response only.
        comparison: Which of these responses is more positive and enthusiastic?

`critique` and `revision` drive the supervised stage (`alignkit cai revise`); `comparison` is the
question an AI judge answers with (A) or (B) (`alignkit cai label`). The default constitution ships
with the package (`alignkit/data/constitution.yaml`: helpful, honest, harmless, positive). Errors
name the file and the field, e.g. `my.yaml: principles[2].revision: missing (...)`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from alignkit.errors import UserError

DEFAULT_CONSTITUTION = Path(__file__).with_name("constitution.yaml")
FIELDS = ("name", "critique", "revision", "comparison")


@dataclass(frozen=True)
class Principle:
    name: str
    critique: str  # critique request: "Identify specific ways in which your last response ..."
    revision: str  # revision request: "Rewrite your response ..."
    comparison: str  # multiple-choice question for the AI judge: "Which of these responses ...?"


def _read(path: Path):
    import yaml

    if not path.is_file():
        raise UserError(f"{path}: constitution file not found (omit `constitution` to use the default one)")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is valid YAML
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{line}: not valid YAML/JSON ({getattr(e, 'problem', e)})") from None


def _principle(item, where: str) -> Principle:
    if not isinstance(item, dict):
        raise UserError(f"{where}: expected a mapping with keys {', '.join(FIELDS)}, got {type(item).__name__}")
    unknown = sorted(set(item) - set(FIELDS))
    if unknown:
        raise UserError(f"{where}: unknown key '{unknown[0]}'; a principle has exactly {', '.join(FIELDS)}")
    for key in FIELDS:
        if key not in item:
            raise UserError(f"{where}.{key}: missing (every principle needs {', '.join(FIELDS)})")
        if not isinstance(item[key], str) or not item[key].strip():
            raise UserError(f"{where}.{key}: must be a non-empty string, got {item[key]!r:.60}")
    return Principle(**{key: " ".join(item[key].split()) for key in FIELDS})


def parse_constitution(data, source: str) -> list[Principle]:
    """Principles of a parsed constitution (`{principles: [...]}`); `source` names the file in errors."""
    if not isinstance(data, dict) or "principles" not in data:
        raise UserError(f"{source}: the top level must be a mapping with a 'principles' list")
    unknown = sorted(set(data) - {"principles"})
    if unknown:
        raise UserError(f"{source}: unknown top-level key '{unknown[0]}'; only 'principles' is allowed")
    items = data["principles"]
    if not isinstance(items, list) or not items:
        raise UserError(f"{source}: principles: must be a non-empty list of principles")
    out, seen = [], set()
    for i, item in enumerate(items):
        principle = _principle(item, f"{source}: principles[{i}]")
        if principle.name in seen:
            raise UserError(f"{source}: principles[{i}].name: duplicate name '{principle.name}'")
        seen.add(principle.name)
        out.append(principle)
    return out


def load_constitution(path: str | Path | None = None, names: Sequence[str] | None = None) -> list[Principle]:
    """The principles of `path` (None = the default constitution), restricted to `names` if given."""
    path = Path(path) if path is not None else DEFAULT_CONSTITUTION
    principles = parse_constitution(_read(path), str(path))
    if names is None:
        return principles
    if not names:
        raise UserError("principles: an empty list selects none; leave it null for all")
    by_name = {p.name: p for p in principles}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise UserError(f"principles: '{missing[0]}' is not in {path} (it has {', '.join(by_name)})")
    return [by_name[n] for n in names]


def sample_principles(principles: Sequence[Principle], count: int, seed: int, key: int) -> list[Principle]:
    """`count` principles drawn uniformly with replacement, seeded by (`seed`, `key`).

    Each prompt or pair gets its own stream (`key` = its index), so the draws do not depend on the
    batch size or on how many other rows there are.
    """
    rng = random.Random(f"{seed}:{key}")
    return [rng.choice(list(principles)) for _ in range(count)]
