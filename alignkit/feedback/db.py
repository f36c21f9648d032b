"""Storage of the labelling app: SQLAlchemy Core over SQLite (WAL) by default, any SQLAlchemy URL as an option.

Tables: `prompts` (one completion set each: the prompt, its K completions, its other fields and
`assigned`, the number of labelers holding or done with it), `labelers` (name, sha256 of the sign-in
token, admin flag), `assignments` (one per labeler and prompt: the shuffled display order shown to that
labeler and a status open / done / skipped) and `labels` (one per done assignment: the ranking in the
file's completion indices, ratings, flags and a note).

Reliability: every write is one transaction, committed before the app answers; SQLite runs in WAL mode
with `synchronous=FULL`, so an acknowledged label survives a kill -9 (and a power cut). Writers take
SQLite's write lock up front (BEGIN IMMEDIATE) so concurrent writers queue instead of failing.
Unique keys make a repeated submission a no-op: (labeler, prompt) in `assignments`, the assignment in
`labels`. Only parameterised statements are used (SQLAlchemy Core); no SQL is built from input.
"""

from __future__ import annotations

import hashlib
import json
import random
import secrets
import time
from contextlib import contextmanager
from typing import Any, Iterator

from sqlalchemy import (Boolean, Column, Float, ForeignKey, Integer, MetaData, String, Table, Text,
                        UniqueConstraint, create_engine, event, func, insert, select, update)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError

from alignkit.data.preferences import COMPLETIONS_SCHEMA, carried_fields, prompt_fields, prompt_key, read_located
from alignkit.errors import UserError

MAX_K = 26  # completions per prompt: the label page names them A to Z
LABEL_FIELDS = {"source_prompt_id", "labeler", "ratings", "flags", "note"}  # what an export adds to a label
metadata = MetaData()
meta = Table("meta", metadata, Column("key", String(64), primary_key=True), Column("value", Text, nullable=False))
prompts = Table(
    "prompts", metadata,
    Column("id", Integer, primary_key=True),
    Column("prompt_id", String(200), nullable=False, unique=True),
    Column("prompt_json", Text, nullable=False),        # {"prompt": str} or {"messages": [...]}
    Column("completions_json", Text, nullable=False),   # [K texts] in the file's order
    Column("extra_json", Text, nullable=False),         # the row's other fields, passed on at export
    Column("k", Integer, nullable=False),
    Column("assigned", Integer, nullable=False, default=0, index=True),  # open + done assignments
)
labelers = Table(
    "labelers", metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(100), nullable=False, unique=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("is_admin", Boolean, nullable=False, default=False),
    Column("active", Boolean, nullable=False, default=True),
    Column("created", Float, nullable=False),
)
assignments = Table(
    "assignments", metadata,
    Column("id", Integer, primary_key=True),
    Column("labeler_id", Integer, ForeignKey("labelers.id"), nullable=False, index=True),
    Column("prompt_pk", Integer, ForeignKey("prompts.id"), nullable=False, index=True),
    Column("order_json", Text, nullable=False),          # display position -> completion index
    Column("status", String(8), nullable=False),         # open | done | skipped
    Column("created", Float, nullable=False),
    Column("finished", Float),
    UniqueConstraint("labeler_id", "prompt_pk"),
)
labels = Table(
    "labels", metadata,
    Column("id", Integer, primary_key=True),
    Column("assignment_id", Integer, ForeignKey("assignments.id"), nullable=False, unique=True),
    Column("labeler_id", Integer, ForeignKey("labelers.id"), nullable=False, index=True),
    Column("prompt_pk", Integer, ForeignKey("prompts.id"), nullable=False, index=True),
    Column("ranking_json", Text, nullable=False),        # file format: completion indices, best first, ties nested
    Column("ratings_json", Text, nullable=False),        # {completion index: {helpful, honest, harmless}}
    Column("flags_json", Text, nullable=False),          # {completion index: ["unsafe", "nonsense"]}
    Column("note", Text, nullable=False),
    Column("created", Float, nullable=False),
)


def database_url(db: str | None = None, url: str | None = None) -> str:
    """`--db PATH` (SQLite file) or `--url` (any SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db)."""
    if bool(db) == bool(url):
        raise UserError("give exactly one of --db PATH (SQLite file) or --url SQLALCHEMY_URL")
    return url or f"sqlite:///{db}"


def _sqlite_setup(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # the driver's own BEGIN is off; `_on_begin` issues ours
        cursor = dbapi_conn.cursor()
        for pragma in ("journal_mode=WAL", "synchronous=FULL", "busy_timeout=30000", "foreign_keys=ON"):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        write = conn.get_execution_options().get("alignkit_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def shown_url(url: str) -> str:
    """`url` for a message: its password, if any, as ***."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def connect(url: str, name: str | None = None) -> Engine:
    """An engine on `url` with the tables created and a signing secret stored (first use).

    UserError naming `name` (e.g. "--db labels.db"; default: the URL) when `url` is no database URL, its driver
    is not installed, or the database cannot be opened (a missing folder, a file that is no SQLite database, ...).
    """
    name = name or shown_url(url)
    sqlite_file = url.startswith("sqlite") and ":memory:" not in url and url.rstrip("/") != "sqlite:"
    pool = {"pool_size": 20, "max_overflow": 20} if sqlite_file else {}
    try:
        engine = create_engine(url, pool_pre_ping=not url.startswith("sqlite"), **pool)
    except ArgumentError as e:
        raise UserError(f"{name}: not a database URL ({_one_line(e)}); e.g. sqlite:///labels.db or "
                        "postgresql+psycopg://user@host/db") from None
    except ImportError as e:
        raise UserError(f"{name}: the database's driver is not installed ({_one_line(e)})") from None
    if engine.dialect.name == "sqlite":
        _sqlite_setup(engine)
    try:
        metadata.create_all(engine)
        with write_tx(engine) as conn:
            if conn.execute(select(meta.c.value).where(meta.c.key == "secret")).first() is None:
                conn.execute(insert(meta).values(key="secret", value=secrets.token_hex(32)))
    except DBAPIError as e:
        engine.dispose()
        raise UserError(f"{name}: cannot open the database ({_one_line(e.orig or e)})") from None
    return engine


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


@contextmanager
def write_tx(engine: Engine) -> Iterator[Any]:
    """One write transaction (SQLite: BEGIN IMMEDIATE); committed on exit, rolled back on error."""
    with engine.connect() as conn:
        conn.execution_options(alignkit_write=True)
        with conn.begin():
            yield conn


@contextmanager
def read_tx(engine: Engine) -> Iterator[Any]:
    with engine.connect() as conn, conn.begin():
        yield conn


def signing_secret(engine: Engine) -> bytes:
    with read_tx(engine) as conn:
        return conn.execute(select(meta.c.value).where(meta.c.key == "secret")).scalar_one().encode()


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def add_labeler(engine: Engine, name: str, admin: bool = False) -> str:
    """Create an account; returns its sign-in token (only its hash is stored, so show it once)."""
    name = name.strip()
    if not name or len(name) > 100:
        raise UserError(f"labeler name must be 1 to 100 characters, got {name!r}")
    token = secrets.token_urlsafe(24)
    try:
        with write_tx(engine) as conn:
            conn.execute(insert(labelers).values(name=name, token_hash=token_hash(token), is_admin=admin,
                                                 active=True, created=time.time()))
    except IntegrityError:
        raise UserError(f"a labeler named {name!r} already exists; choose another name") from None
    return token


def find_labeler(engine: Engine, *, token: str | None = None, labeler_id: int | None = None) -> dict | None:
    """The active labeler with this token or id, else None."""
    where = labelers.c.token_hash == token_hash(token) if token is not None else labelers.c.id == labeler_id
    with read_tx(engine) as conn:
        row = conn.execute(select(labelers).where(where, labelers.c.active.is_(True))).mappings().first()
    return dict(row) if row else None


def _import_id(row: dict) -> str:
    pid = next((row[k] for k in ("prompt_id", "source_prompt_id", "id") if row.get(k) is not None), None)
    if pid is not None:
        return str(pid)
    content = prompt_key(row) + json.dumps(row["completions"], ensure_ascii=False)
    return "sha1:" + hashlib.sha1(content.encode()).hexdigest()[:16]


def _content(row: dict) -> tuple[str, str]:
    """(prompt, completions) of a row as the database stores them."""
    return json.dumps(prompt_fields(row), ensure_ascii=False), json.dumps(row["completions"], ensure_ascii=False)


def import_completion_sets(engine: Engine, path) -> tuple[int, int]:
    """Load `{prompt|messages, completions: [K <= MAX_K], prompt_id?}` rows; returns (added, already present).

    A row's key is its `prompt_id` (else an export's `source_prompt_id`, else `id`, else a hash of prompt and
    completions), compared as text, so importing the same file twice adds nothing, and an export (one row per
    label) comes back as one prompt per prompt. A key that holds another prompt or other completions, in the
    file or in the database (e.g. two rollout files, both numbering their rows 0, 1, ...), is an error and
    nothing is imported. The other fields are passed on at export, but not those a label derives
    (`carried_fields`: a labelled file's own `ranking`, `chosen`, `label`, ...) nor those of a label
    (`LABEL_FIELDS`: an imported export's labeler, note, ...), which the labelers' own replace; `gold` is kept.
    """
    rows: dict[str, tuple[str, dict]] = {}
    clash = ("both get the prompt id {pid!r} (its prompt_id, else source_prompt_id, else id, as text) but differ "
             "in prompt or completions; give every row its own prompt_id")
    for where, row in read_located(path, COMPLETIONS_SCHEMA):
        if len(row["completions"]) > MAX_K:
            raise UserError(f"{where}: {len(row['completions'])} completions; the labelling app shows at most "
                            f"{MAX_K} per prompt (A to Z): split the set or keep fewer completions")
        pid = _import_id(row)
        first, kept = rows.setdefault(pid, (where, row))
        if first != where and _content(kept) != _content(row):
            raise UserError(f"{first} and {where} " + clash.format(pid=pid))
    added = 0
    with write_tx(engine) as conn:
        present = {r["prompt_id"]: (r["prompt_json"], r["completions_json"])
                   for r in conn.execute(select(prompts.c.prompt_id, prompts.c.prompt_json,
                                                prompts.c.completions_json)).mappings()}
        for pid, (where, row) in rows.items():
            if pid in present:
                if present[pid] != _content(row):
                    raise UserError(f"{where} and the database's prompt " + clash.format(pid=pid))
                continue
            kept = (carried_fields(row).keys() | {"gold"}) - LABEL_FIELDS
            extra = {k: v for k, v in row.items() if k in kept}
            prompt_json, completions_json = _content(row)
            conn.execute(insert(prompts).values(
                prompt_id=pid, prompt_json=prompt_json, completions_json=completions_json,
                extra_json=json.dumps(extra, ensure_ascii=False), k=len(row["completions"]), assigned=0))
            added += 1
    return added, len(rows) - added


def _assignment_view(conn, assignment: dict) -> dict:
    p = conn.execute(select(prompts).where(prompts.c.id == assignment["prompt_pk"])).mappings().one()
    order = json.loads(assignment["order_json"])
    completions = json.loads(p["completions_json"])
    return {"assignment_id": assignment["id"], "prompt_id": p["prompt_id"], **json.loads(p["prompt_json"]),
            "order": order, "shown": [completions[i] for i in order]}


def current_assignment(engine: Engine, labeler_id: int, per_prompt: int, rng: random.Random | None = None) -> dict | None:
    """The labeler's open assignment, else a new one on a prompt held by fewer than `per_prompt` labelers.

    Prompts already partly labelled come first (they finish sooner). A slot is claimed with
    `UPDATE prompts SET assigned = assigned + 1 WHERE id = ? AND assigned < per_prompt`, which is atomic in
    every database, so no prompt is ever given to more than `per_prompt` labelers. The display order is a
    fresh shuffle, stored with the assignment. Returns None when nothing is left for this labeler.
    """
    rng = rng or random.SystemRandom()
    with write_tx(engine) as conn:
        mine = select(assignments).where(assignments.c.labeler_id == labeler_id)
        open_row = conn.execute(mine.where(assignments.c.status == "open").order_by(assignments.c.id)).mappings().first()
        if open_row:
            return _assignment_view(conn, dict(open_row))
        seen = select(assignments.c.prompt_pk).where(assignments.c.labeler_id == labeler_id)
        candidates = conn.execute(
            select(prompts.c.id, prompts.c.k).where(prompts.c.assigned < per_prompt, prompts.c.id.not_in(seen))
            .order_by(prompts.c.assigned.desc(), prompts.c.id).limit(50)).all()
        for prompt_pk, k in candidates:
            claimed = conn.execute(update(prompts).where(prompts.c.id == prompt_pk, prompts.c.assigned < per_prompt)
                                   .values(assigned=prompts.c.assigned + 1)).rowcount
            if claimed:
                order = list(range(k))
                rng.shuffle(order)
                row = {"labeler_id": labeler_id, "prompt_pk": prompt_pk, "order_json": json.dumps(order),
                       "status": "open", "created": time.time()}
                row["id"] = conn.execute(insert(assignments).values(**row)).inserted_primary_key[0]
                return _assignment_view(conn, row)
    return None


def _own_assignment(conn, labeler_id: int, assignment_id: int) -> dict:
    row = conn.execute(select(assignments).where(assignments.c.id == assignment_id,
                                                 assignments.c.labeler_id == labeler_id)).mappings().first()
    if row is None:
        raise LookupError(f"assignment {assignment_id} is not yours")
    return dict(row)


def save_label(engine: Engine, labeler_id: int, assignment_id: int, levels: list[list[int]],
               ratings: dict[int, dict], flags: dict[int, list[str]], note: str) -> str:
    """Store a label for the labeler's assignment; `levels`, `ratings` and `flags` use display positions.

    Returns "saved", or "duplicate" when the assignment was already done or skipped (a resubmission);
    raises LookupError when the assignment is not this labeler's.
    """
    with write_tx(engine) as conn:
        a = _own_assignment(conn, labeler_id, assignment_id)
        if a["status"] != "open":
            return "duplicate"
        order = json.loads(a["order_json"])
        ranking = [order[lv[0]] if len(lv) == 1 else sorted(order[i] for i in lv) for lv in levels]
        now = time.time()
        conn.execute(insert(labels).values(
            assignment_id=assignment_id, labeler_id=labeler_id, prompt_pk=a["prompt_pk"],
            ranking_json=json.dumps(ranking), note=note, created=now,
            ratings_json=json.dumps({str(order[pos]): r for pos, r in sorted(ratings.items())}),
            flags_json=json.dumps({str(order[pos]): f for pos, f in sorted(flags.items())})))
        conn.execute(update(assignments).where(assignments.c.id == assignment_id)
                     .values(status="done", finished=now))
    return "saved"


def skip_assignment(engine: Engine, labeler_id: int, assignment_id: int) -> str:
    """Mark the assignment skipped and give its slot back to the prompt; "skipped" or "duplicate"."""
    with write_tx(engine) as conn:
        a = _own_assignment(conn, labeler_id, assignment_id)
        if a["status"] != "open":
            return "duplicate"
        conn.execute(update(assignments).where(assignments.c.id == assignment_id)
                     .values(status="skipped", finished=time.time()))
        conn.execute(update(prompts).where(prompts.c.id == a["prompt_pk"]).values(assigned=prompts.c.assigned - 1))
    return "skipped"


def labelled_rows(engine: Engine) -> list[dict]:
    """Every stored label joined with its prompt and labeler, in the order they were stored."""
    query = (select(labels, prompts.c.prompt_id, prompts.c.prompt_json, prompts.c.completions_json,
                    prompts.c.extra_json, labelers.c.name.label("labeler"))
             .join(prompts, prompts.c.id == labels.c.prompt_pk).join(labelers, labelers.c.id == labels.c.labeler_id)
             .order_by(labels.c.id))
    with read_tx(engine) as conn:
        return [dict(r) for r in conn.execute(query).mappings()]


def count(engine: Engine, table: Table) -> int:
    with read_tx(engine) as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def assignment_size(engine: Engine, labeler_id: int, assignment_id: int) -> int:
    """K of the labeler's assignment; LookupError when it is not theirs."""
    with read_tx(engine) as conn:
        a = _own_assignment(conn, labeler_id, assignment_id)
        return conn.execute(select(prompts.c.k).where(prompts.c.id == a["prompt_pk"])).scalar_one()
