"""Validation of the submitted label form: every field checked, errors name the field."""

from __future__ import annotations

import json

from alignkit.data.preferences import ranking_levels

DIMENSIONS = ("helpful", "honest", "harmless")
SCALE = (1, 2, 3, 4, 5)
FLAGS = ("unsafe", "nonsense")
MAX_NOTE = 2000
MAX_FIELD = 4000


class FormError(ValueError):
    """A submitted form is invalid; the message is shown to the labeler."""


def parse_label_form(form: dict[str, list[str]], k: int) -> tuple[list[list[int]], dict, dict, str]:
    """(levels, ratings, flags, note) from a submitted label form for K = `k` shown completions.

    `ranking` is JSON over display positions, best first, a nested list a tie: it must rank every shown
    position exactly once. Ratings `<dimension>_<pos>` are blank or 1..5; flags `flag_<pos>` are
    unsafe / nonsense; the note is at most 2000 characters. Raises FormError naming the field.
    """
    def one(name: str) -> str:
        values = form.get(name, [""])
        if len(values) != 1 or len(values[0]) > MAX_FIELD:
            raise FormError(f"field '{name}' must be given once and be at most {MAX_FIELD} characters")
        return values[0]

    try:
        ranking = json.loads(one("ranking"))
    except (json.JSONDecodeError, RecursionError):  # RecursionError: lists nested too deep to parse
        raise FormError("field 'ranking' is not valid JSON (or is nested too deep)") from None
    items = ranking if isinstance(ranking, list) else [None]
    if any(not isinstance(i, int) or isinstance(i, bool) for x in items for i in (x if isinstance(x, list) else [x])):
        raise FormError("field 'ranking' must be a list of positions or lists of tied positions")
    try:
        levels = ranking_levels(ranking, k)
    except ValueError as e:
        raise FormError(str(e)) from None
    ratings: dict[int, dict] = {}
    flags: dict[int, list[str]] = {}
    for pos in range(k):
        for dim in DIMENSIONS:
            value = one(f"{dim}_{pos}").strip()
            if value:
                if value not in {str(v) for v in SCALE}:
                    raise FormError(f"field '{dim}_{pos}' must be blank or one of {', '.join(map(str, SCALE))}")
                ratings.setdefault(pos, {})[dim] = int(value)
        marked = form.get(f"flag_{pos}", [])
        if any(f not in FLAGS for f in marked):
            raise FormError(f"field 'flag_{pos}' must be one of {', '.join(FLAGS)}")
        if marked:
            flags[pos] = sorted(set(marked))
    note = one("note").strip()
    if len(note) > MAX_NOTE:
        raise FormError(f"field 'note' is {len(note)} characters; at most {MAX_NOTE}")
    return levels, ratings, flags, note
