"""Reading and writing data rows, validated against a `Schema`, with file:line in every error.

    rows = read_rows("data/train.jsonl", SFT_SCHEMA)   # .jsonl / .json / .parquet / .csv
    write_jsonl("runs/x/samples.jsonl", rows)          # atomic: a crash never leaves half a file
    write_json("runs/x/summary.json", summary)          # the same for one JSON document

Errors are `UserError`s on one line, e.g.
    data/train.jsonl:17: not valid JSON (Expecting ',' delimiter at column 23)
    data/train.jsonl:4: missing field 'completion' (an SFT row needs prompt+completion or messages)
    data/train.parquet:row 3: field 'prompt' must be a string, got int
Blank lines are skipped but counted, so line numbers match an editor's. Fields the schema does not
name are kept (later stages pass them on as keyword arguments).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from alignkit.data.schema import PROMPT_SCHEMA, SFT_SCHEMA, Field, Schema, register_type  # noqa: F401
from alignkit.errors import UserError

__all__ = [
    "PROMPT_SCHEMA", "SFT_SCHEMA", "Field", "Schema", "register_type",
    "atomic_open", "check_io", "iter_rows", "read_jsonl", "read_rows", "write_json", "write_jsonl",
]

JSON_LINES = (".jsonl", ".json")
TABULAR = (".parquet", ".csv")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _check_file(path: Path) -> None:
    if not path.exists():
        raise UserError(f"{path}: file not found (check the data path in your config or command line)")
    if path.is_dir():
        raise UserError(f"{path}: is a directory; give the path of a data file (.jsonl, .json, .parquet, .csv)")


def no_rows(path: str | os.PathLike) -> UserError:
    return UserError(f"{path}: no rows (the file is empty or holds only blank lines); add data or fix the path")


def _validated(where: str, row: Any, schema: Schema | None) -> dict:
    error = schema.check(row) if schema is not None else (None if isinstance(row, dict) else "a row must be a JSON object")
    if error:
        raise UserError(f"{where}: {error}")
    return row


def _json_error(e: json.JSONDecodeError) -> str:
    # some messages end in "at" ("Unterminated string starting at"): no "at at column"
    return f"{e.msg.removesuffix(' at')} at column {e.colno}"


def _iter_json_lines(path: Path, schema: Schema | None) -> Iterator[tuple[str, dict]]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{where}: not valid UTF-8 (byte {e.start + 1}); save the file as UTF-8") from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark some editors write
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))  # a column past the end names the line's end, not "column 1"
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({_json_error(e)})") from None
            yield where, _validated(where, row, schema)


def _iter_json_array(path: Path, schema: Schema | None) -> Iterator[tuple[str, dict]]:
    """A .json file holding one array of row objects (rows are numbered from 1)."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 (byte {e.start + 1}); save the file as UTF-8") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({_json_error(e)})") from None
    for i, row in enumerate(rows, start=1):
        where = f"{path}:row {i}"
        yield where, _validated(where, row, schema)


def _starts_with_array(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def _load_parquet(path: Path) -> list[dict]:
    """Rows of a Parquet file through `datasets` (in memory, nothing left in the HF cache)."""
    from datasets import Dataset

    quiet = logging.getLogger("datasets")  # it logs a reader's error before raising it: we report it once, below
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        with tempfile.TemporaryDirectory(prefix="alignkit-datasets-") as cache:
            return Dataset.from_parquet(str(path), keep_in_memory=True, cache_dir=cache).to_list()
    except Exception as e:  # datasets wraps the reader's error; show the cause
        cause = e.__cause__ or e
        raise UserError(f"{path}: could not read as Parquet ({_one_line(cause)[:300]}); check the file") from None
    finally:
        quiet.setLevel(level)


def _load_csv(path: Path, schema: Schema | None) -> list[dict]:
    """Rows of a CSV file with a header. A cell of a text field stays text as written ("4", "02108", "NA");
    other cells are read as JSON when they parse (numbers, true/false, a messages list), else as text. An
    empty cell is an absent field; a row with more or fewer cells than the header is an error."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        rows = []
        for cells in reader:
            if cells and len(cells) != len(header):
                raise UserError(f"{path}:{reader.line_num}: {len(cells)} cells, but the header names {len(header)} "
                                "columns; quote cells that contain commas")
            if cells:
                rows.append({k: _cell(v, schema is not None and schema.is_text(k)) for k, v in zip(header, cells)})
    return rows


def _cell(text: str, is_text: bool):
    if text == "" or is_text:
        return text or None
    try:
        return json.loads(text)
    except ValueError:
        return text


def _iter_tabular(path: Path, schema: Schema | None) -> Iterator[tuple[str, dict]]:
    if path.stat().st_size == 0:
        return
    rows = _load_parquet(path) if path.suffix.lower() == ".parquet" else _load_csv(path, schema)
    for i, row in enumerate(rows, start=1):
        # An empty cell (null) means "this row has no such field", so mixed-shape tables validate per row.
        row = {k: v for k, v in row.items() if v is not None}
        where = f"{path}:row {i}"
        yield where, _validated(where, row, schema)


def iter_rows(path: str | os.PathLike, schema: Schema | None = None) -> Iterator[tuple[str, dict]]:
    """Validated rows with their location ("file:17" or "file:row 3") for later error messages.

    The format comes from the extension: .jsonl/.json are JSON lines (a .json file that starts with
    `[` is one array of rows), .parquet goes through `datasets`, .csv through `csv` (`_load_csv`).
    Raises UserError on the first bad row, a missing file or an unknown extension; an empty file yields
    nothing.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in JSON_LINES + TABULAR:
        known = ", ".join(JSON_LINES + TABULAR)
        raise UserError(f"{path}: unknown data format '{suffix or path.name}'; use one of {known}")
    _check_file(path)
    if suffix in TABULAR:
        yield from _iter_tabular(path, schema)
    elif suffix == ".json" and _starts_with_array(path):
        yield from _iter_json_array(path, schema)
    else:
        yield from _iter_json_lines(path, schema)


def read_jsonl(path: str | os.PathLike, schema: Schema | None = None) -> list[dict]:
    """All rows of a JSON-lines file, each checked against `schema`; UserError at the first bad line."""
    path = Path(path)
    _check_file(path)
    rows = [row for _, row in _iter_json_lines(path, schema)]
    if not rows:
        raise no_rows(path)
    return rows


def read_rows(path: str | os.PathLike, schema: Schema | None = None) -> list[dict]:
    """All rows of a .jsonl/.json/.parquet/.csv file, validated; UserError when bad or empty."""
    rows = [row for _, row in iter_rows(path, schema)]
    if not rows:
        raise no_rows(path)
    return rows


def _to_json(value: Any) -> Any:
    """Fallback for json.dumps: tensors and numpy values become numbers and lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot write a {type(value).__name__} to JSON")


def check_io(input: str | None, output: str | None, hint: str) -> None:
    """At the start of a run (not in the config's validation, so that `--print-config` works without them):
    both paths set, and the output not the input (it would be overwritten) and writable."""
    if not input or not output:
        raise UserError(f"set {hint}")
    check_output(output, input)


def check_output(output: str | os.PathLike | None, input: str | None = None, directory: bool = False) -> None:
    """At the start of a run, before its work: UserError when `output` (a file, or with `directory` a run directory)
    is the `input` file (writing it would overwrite what is being read) or cannot be written there (a file in the
    way, a read-only folder), rather than after hours of sampling or judging."""
    if not output:
        return
    path = Path(output)
    if input and path.resolve() == Path(input).resolve():
        raise UserError(f"output={output} is the input file; write the result elsewhere")
    if not directory and path.is_dir():
        raise UserError(f"cannot write {output}: it is a directory; name a file")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if existing.is_file() and (directory or existing != path):
        raise UserError(f"cannot write {output}: {existing} is a file, not a directory")
    folder = existing if existing.is_dir() else existing.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {output}: {folder} is not writable")


def make_readable(root: Path) -> None:
    """mkstemp / mkdtemp create 0600 / 0700 and some writers (safetensors) 0600: give a written file, or a
    directory and everything in it, the usual umask-based permissions, so that others can read it."""
    umask = os.umask(0)
    os.umask(umask)
    for p in (root, *(root.rglob("*") if root.is_dir() else ())):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[IO[str]]:
    """A text file to write `path` through: a temp file in the same folder, renamed over `path` only when
    the block ends without an error, so a crash never leaves half a file."""
    if str(path).endswith(("/", os.sep)):  # Path() would drop the slash and write a file of the folder's name
        raise UserError(f"cannot write {path}: it names a directory; name a file")
    path = Path(path)
    check_output(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")  # a killed run's: the engine's
        # start removes .*.tmp-* from a run directory
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        make_readable(Path(tmp))  # mkstemp makes the file private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """Write rows as UTF-8 JSON lines, atomically."""
    with atomic_open(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=_to_json) + "\n")
    return Path(path)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write one JSON document (reports, summaries, metadata), indented, atomically. NaN and infinities
    become null, so the file is strict JSON (readable by browsers and jq)."""
    with atomic_open(path) as f:
        f.write(json.dumps(finite_json(data), indent=1, ensure_ascii=False, default=_to_json) + "\n")
    return Path(path)


def finite_json(value):
    """`value` with every NaN and infinity (in nested dicts and lists) replaced by None: strict JSON's null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value
