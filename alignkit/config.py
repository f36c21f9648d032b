"""Nested, frozen dataclass configs: YAML load/save, `key=value` overrides, and `--print-config`.

Every field is declared with `option(default, help)`, so each one carries its own docstring; the help
text is printed as a YAML comment by `--print-config`. Derived values are properties, never fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from alignkit.errors import UserError


def option(default: Any, help: str, low: float | None = None) -> Any:
    """A config field with a default and a one-line docstring (`help`); `low`: the smallest value allowed
    (checked whenever the field is set; null stays allowed where the type allows it)."""
    metadata = {"help": help, "low": low}
    if isinstance(default, (list, dict, set)) or dataclasses.is_dataclass(default):
        value = default
        return dataclasses.field(default_factory=lambda: _copy(value), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _copy(value):
    import copy

    return copy.deepcopy(value)


def check_interval(name: str, value: float, low: float | None, high: float | None, brackets: str = "[]") -> None:
    """UserError unless `value` lies in the interval, e.g. brackets "(]": low < value <= high; None: unbounded."""
    above = low is None or (value >= low if brackets[0] == "[" else value > low)
    below = high is None or (value <= high if brackets[1] == "]" else value < high)
    if not (above and below):
        lo = "(-inf" if low is None else f"{brackets[0]}{low}"
        hi = "inf)" if high is None else f"{high}{brackets[1]}"
        raise UserError(f"{name} must be in {lo}, {hi}, got {value}")


@dataclasses.dataclass(frozen=True)
class _Override:
    """A scalar `key=value` of the command line, or a plain scalar of a config file that YAML reads as a number or
    boolean: its YAML value, and its text, which a string field takes as typed (`output=0755` names the file 0755,
    not the octal number 493; `output_dir=no` is not false)."""

    text: str
    value: Any


class _Loader(yaml.SafeLoader):
    """YAML that keeps the text of a plain scalar read as a number or boolean (as an `_Override`), so that a string
    field gets it as written: `output_dir: 0755` is the directory 0755, not the octal number 493."""

    def construct_mapping(self, node, deep=False):
        mapping = super().construct_mapping(node, deep)
        return {k.value if isinstance(k, _Override) else k: v for k, v in mapping.items()}


def _with_text(construct):
    def construct_keeping_text(loader, node):
        value = construct(loader, node)
        return _Override(node.value, value) if node.style is None else value  # style None: a plain (unquoted) scalar

    return construct_keeping_text


for _tag in ("int", "float", "bool"):
    _tag = f"tag:yaml.org,2002:{_tag}"
    _Loader.add_constructor(_tag, _with_text(yaml.SafeLoader.yaml_constructors[_tag]))


def _takes_text(tp: Any, value: Any) -> bool:
    if tp is str:
        return True
    args = get_args(tp) if get_origin(tp) in (typing.Union, types.UnionType) else ()
    return str in args and not (value is None and type(None) in args)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a YAML value to the annotated type `tp`; `where` names the field in errors."""
    if isinstance(value, _Override):
        if _takes_text(tp, value.value):
            return value.text
        value = value.value
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"{where}: must not be null")
    if origin is Literal:
        if value not in args:
            raise UserError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping of fields, got {value!r}")
        return _build(tp, value, where + ".")
    if origin in (list, tuple):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            try:
                value = [value] if not isinstance(value, str) else [yaml.safe_load(v) for v in value.split(",")
                                                                     if v.strip()]
            except yaml.YAMLError:
                raise UserError(f"{where}: expected a list, got {value!r}") from None
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"{where}: expected a string, got {value!r}")
    return value


def _build(cls: type, data: dict, prefix: str = ""):
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise UserError(f"unknown config key '{prefix}{key}'{hint}")
    kwargs = {k: _coerce(_with_default(cls, k, v), hints[k], prefix + k) for k, v in data.items()}
    low = {f.name: f.metadata.get("low") for f in dataclasses.fields(cls)}
    for k, v in kwargs.items():
        if low[k] is not None and v is not None:
            check_interval(prefix + k, v, low[k], None)
    if isinstance(kwargs.get("output_dir"), str) and not kwargs["output_dir"].strip():  # Path("") is the cwd
        raise UserError(f"{prefix}output_dir: empty; name the run directory")
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        check()
    return obj


def _with_default(cls: type, name: str, value: Any) -> Any:
    """A partial mapping for a nested config fills in from the field's own default, not the class's:
    `kl.beta=0.1` keeps every other key of a stage-specific `kl` default."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if not isinstance(value, dict) or f.default_factory is dataclasses.MISSING:
        return value
    default = f.default_factory()
    return _merge(to_dict(default), value) if dataclasses.is_dataclass(default) else value


def parse_overrides(overrides: list[str]) -> dict:
    """`["train.lr=1e-4", "lora.r=8"]` -> nested dict with YAML-parsed values (scalars as `_Override`s)."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' is not of the form key=value (e.g. train.lr=1e-4)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if not isinstance(value, (dict, list)):
            value = _Override(raw, value)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"override '{item}': '{p}' is set twice")
        node[parts[-1]] = value
    return out


def _check_sections(file: dict, overrides: dict, prefix: str = "") -> None:
    """A section the file sets to a value (`train: 5`) and the command line sets keys of (`train.lr=...`) is an
    error: merging would drop the file's value without a word."""
    for k, v in overrides.items():
        old = file.get(k)
        if isinstance(v, dict) and isinstance(old, dict):
            _check_sections(old, v, f"{prefix}{k}.")
        elif isinstance(v, dict) and old is not None:
            shown = old.text if isinstance(old, _Override) else repr(old)
            raise UserError(f"'{prefix}{k}' is {shown} in the config file, but {prefix}{k}.* is set on the command "
                            "line; make it a mapping")


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] = ()):
    """Build config `cls` from an optional YAML file plus `key=value` overrides (overrides win)."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            data = yaml.load(path.read_text(), Loader=_Loader) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise UserError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: the top level must be a mapping of config keys")
    overridden = parse_overrides(list(overrides))
    _check_sections(data, overridden)
    data = _merge(data, overridden)
    try:
        return _build(cls, data)
    except UserError as e:
        raise UserError(f"{path}: {e}" if path else str(e)) from None


def to_dict(cfg) -> dict:
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def to_yaml(cfg) -> str:
    """YAML text of `cfg`, each field's help written above it (`--print-config`)."""
    lines: list[str] = []

    def emit(obj, indent: int):
        pad = "  " * indent
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.metadata.get("help"):
                lines.append(f"{pad}# {f.metadata['help']}")
            if dataclasses.is_dataclass(value):
                lines.append(f"{pad}{f.name}:")
                emit(value, indent + 1)
            else:
                text = yaml.safe_dump({f.name: to_dict(value)}, default_flow_style=True, width=10_000).strip()
                lines.append(pad + text[1:-1] if text.startswith("{") else pad + text)

    emit(cfg, 0)
    return "\n".join(lines) + "\n"


def flatten(d: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1e-5}} -> {"train.lr": 1e-5}."""
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def saved_config(path: str | Path) -> dict:
    """The flattened config a run saved at `path` ({"train.lr": ...}); {} when the file is not readable YAML."""
    try:
        return flatten(yaml.safe_load(Path(path).read_text()) or {})
    except yaml.YAMLError:
        return {}


def save_config(config: dict, path: str | Path, fixed: tuple[str, ...] = ()) -> None:
    """Write a run's config (`to_dict` of it) as YAML, atomically. A resumed run overwrites its earlier
    config: the settings that changed are logged as a warning first (continuing with, say, another
    learning rate is allowed); a change of one of the `fixed` keys is a UserError, and the file is kept."""
    path = Path(path)
    if path.exists():
        old, new = saved_config(path), flatten(config)
        frozen = [k for k in fixed if k in old and k in new and old[k] != new[k]]
        if frozen:
            raise UserError(f"{frozen[0]}: {old[frozen[0]]!r} in the run being resumed ({path}), {new[frozen[0]]!r} "
                            "now; a resumed run keeps it (it sets which data each step sees): change it back, or "
                            "start a new output_dir")
        changed = [f"{k} {old[k]!r} -> {new[k]!r}" for k in new if k in old and old[k] != new[k] and k != "train.resume"]
        if changed:
            logging.getLogger(__name__).warning("%s: continuing with changed settings: %s", path, "; ".join(changed))
    from alignkit.data.jsonl import atomic_open

    with atomic_open(path) as f:
        f.write(yaml.safe_dump(config, sort_keys=False))
