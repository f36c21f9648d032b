"""Row schemas: which fields a data row needs, their types, and one-line error messages.

A `Schema` lists alternative sets of required fields (an SFT row is EITHER {prompt, completion} OR
{messages}) plus optional fields. `Schema.check(row)` returns None for a good row or a message such
as "field 'prompt' must be a string, got int"; the readers in `alignkit.data.jsonl` put the location
("data/train.jsonl:9: ...") in front. Fields the schema does not name are kept untouched: later
stages pass them on (a reference answer for a reward function, an id, a label).

Field types are names in `TYPES` ("str", "int", "float", "bool", "list[str]", "list[float]",
"messages"); `register_type` adds one. A field can also carry an extra `check` for rules that depend
on the use (an SFT conversation needs an assistant turn, a prompt conversation must not end with one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

ROLES = ("system", "user", "assistant")

# A type check returns None when the value is fine, otherwise the end of a message that follows
# "field 'name' ", e.g. "must be a string, got int".
TypeCheck = Callable[[str, Any], "str | None"]


def type_name(value: Any) -> str:
    """The name users see for a JSON value's type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) or _is_numpy_number(value)


def _is_numpy_number(value: Any) -> bool:
    module = type(value).__module__
    return module == "numpy" and hasattr(value, "dtype") and value.dtype.kind in "iuf"


def _scalar(kind: str, test: Callable[[Any], bool]) -> TypeCheck:
    def check(name: str, value: Any) -> str | None:
        return None if test(value) else f"field '{name}' must be {kind}, got {type_name(value)}"

    return check


def _list_of(kind: str, item_kind: str, test: Callable[[Any], bool]) -> TypeCheck:
    def check(name: str, value: Any) -> str | None:
        if not isinstance(value, (list, tuple)):
            return f"field '{name}' must be {kind}, got {type_name(value)}"
        for i, item in enumerate(value):
            if not test(item):
                return f"field '{name}[{i}]' must be {item_kind}, got {type_name(item)}"
        return None

    return check


def _check_float(name: str, value: Any) -> str | None:
    if not _is_number(value):
        return f"field '{name}' must be a number, got {type_name(value)}"
    return None if math.isfinite(value) else f"field '{name}' must be finite, got {value}"


def _check_messages(name: str, value: Any) -> str | None:
    """A conversation: a list of {"role": system|user|assistant, "content": str} objects."""
    if not isinstance(value, (list, tuple)):
        return f"field '{name}' must be a list of {{role, content}} messages, got {type_name(value)}"
    for i, msg in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(msg, dict):
            return f"field '{where}' must be an object with role and content, got {type_name(msg)}"
        for key in ("role", "content"):
            if key not in msg or msg[key] is None:
                return f"field '{where}' has no '{key}' (each message needs role and content)"
            if not isinstance(msg[key], str):
                return f"field '{where}.{key}' must be a string, got {type_name(msg[key])}"
        if msg["role"] not in ROLES:
            return f"field '{where}.role' must be one of {', '.join(ROLES)}, got '{msg['role']}'"
    return None


_check_str_list = _list_of("a list of strings", "a string", lambda v: isinstance(v, str))


def _check_references(name: str, value: Any) -> str | None:
    """Reference text(s) of a prompt (BLEU, ROUGE, BERTScore): a string or a non-empty list of strings."""
    if isinstance(value, str):
        return None
    if isinstance(value, (list, tuple)) and value:
        return _check_str_list(name, value)
    return f"field '{name}' must be a string or a non-empty list of strings, got {type_name(value)}"


TYPES: dict[str, TypeCheck] = {
    "str": _scalar("a string", lambda v: isinstance(v, str)),
    "int": _scalar("an integer", lambda v: _is_int(v) or (_is_numpy_number(v) and v.dtype.kind in "iu")),
    "float": _check_float,
    "bool": _scalar("true or false", lambda v: isinstance(v, bool)),
    "list[str]": _check_str_list,
    "list[float]": _list_of("a list of numbers", "a number", _is_number),
    "messages": _check_messages,
    "references": _check_references,
}


def register_type(name: str, check: TypeCheck) -> None:
    """Add a field type usable in `Field(type=name)`; `check(field_name, value)` returns None or a message."""
    TYPES[name] = check


@dataclass(frozen=True)
class Field:
    """One named field: its type, whether an empty value ("" or []) is an error, and an extra check."""

    type: str = "str"
    nonempty: bool = False
    check: Callable[[str, Any], "str | None"] | None = None

    def __post_init__(self):
        if self.type not in TYPES:
            raise ValueError(f"unknown field type {self.type!r}; known: {', '.join(TYPES)}")

    def validate(self, name: str, value: Any) -> str | None:
        error = TYPES[self.type](name, value)
        if error is None and self.nonempty and len(value) == 0:
            error = f"field '{name}' is empty"
        if error is None and self.check is not None:
            error = self.check(name, value)
        return error


@dataclass(frozen=True)
class Schema:
    """Alternative sets of required fields (`variants`) plus optional fields, with a human description.

    `what` names a row in messages ("an SFT row"); the hint after a missing field reads
    "(an SFT row needs prompt+completion or messages)".
    """

    what: str
    variants: tuple[Mapping[str, Field], ...]
    optional: Mapping[str, Field] = field(default_factory=dict)

    def __post_init__(self):
        if not self.variants:
            raise ValueError("a Schema needs at least one variant (set of required fields)")

    @property
    def hint(self) -> str:
        shapes = " or ".join("+".join(v) for v in self.variants)
        return f"{self.what} needs {shapes}"

    def fields(self) -> set[str]:
        """Every field name this schema knows (required in some variant or optional)."""
        names = set(self.optional)
        for variant in self.variants:
            names.update(variant)
        return names

    def is_text(self, name: str) -> bool:
        """Whether the field `name` is a string in some shape of the row (a CSV cell of it stays text)."""
        return any(spec.type == "str" for fields in (*self.variants, self.optional)
                   for field_name, spec in fields.items() if field_name == name)

    def _pick_variant(self, row: Mapping[str, Any]) -> tuple[Mapping[str, Field] | None, str | None]:
        # null counts as absent when choosing the shape (exports of mixed tables write null for
        # the other shape's columns); a shape complete only with nulls is then type-checked.
        complete = [v for v in self.variants if all(row.get(k) is not None for k in v)]
        complete = complete or [v for v in self.variants if all(k in row for k in v)]
        if len(complete) > 1:
            # A variant that is a subset of another (e.g. {prompt} vs {prompt, completion}) is no conflict.
            largest = max(complete, key=len)
            others = [v for v in complete if not set(v) <= set(largest)]
            if others:
                shapes = " and ".join("+".join(v) for v in [largest, *others])
                return None, f"row has both {shapes}; keep only one ({self.hint})"
            return largest, None
        if complete:
            return complete[0], None
        closest = max(self.variants, key=lambda v: sum(k in row for k in v))  # first one wins ties
        missing = next(k for k in closest if k not in row)
        return None, f"missing field '{missing}' ({self.hint})"

    def check(self, row: Any) -> str | None:
        """None when `row` fits the schema, else a one-line message without the location."""
        if not isinstance(row, dict):
            return f"a row must be a JSON object, got {type_name(row)} ({self.hint})"
        variant, error = self._pick_variant(row)
        if error:
            return error
        for name, spec in [*variant.items(), *self.optional.items()]:
            if name in variant or (name in row and row[name] is not None):
                error = spec.validate(name, row[name])
                if error:
                    return error
        return None


def _sft_messages(name: str, messages: list) -> str | None:
    if not messages:
        return f"field '{name}' is empty"
    if not any(m["role"] == "assistant" for m in messages):
        return f"field '{name}' has no assistant turn, so there is nothing to train on"
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"]:
            return f"field '{name}[{i}].content' is empty (an assistant turn needs text to train on)"
    return None


def _prompt_messages(name: str, messages: list) -> str | None:
    if not messages:
        return f"field '{name}' is empty"
    if messages[-1]["role"] == "assistant":
        return f"field '{name}' ends with an assistant turn; a prompt must end with a user or system turn"
    return None


SFT_SCHEMA = Schema(
    what="an SFT row",
    variants=(
        {"prompt": Field("str"), "completion": Field("str", nonempty=True)},
        {"messages": Field("messages", check=_sft_messages)},
    ),
)

PROMPT_SCHEMA = Schema(
    what="a prompt row",
    variants=(
        {"prompt": Field("str", nonempty=True)},
        {"messages": Field("messages", check=_prompt_messages)},
    ),
)
