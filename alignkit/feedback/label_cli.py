"""`alignkit label serve|import|add-labeler|progress|export`: the labelling web app and its admin commands.

    alignkit label import --db labels.db runs/rollout/completions.jsonl
    alignkit label add-labeler --db labels.db alice            # prints alice's sign-in token
    alignkit label add-labeler --db labels.db boss --admin
    alignkit label serve --db labels.db --host 127.0.0.1 --port 8000 --per-prompt 3
    alignkit label progress --db labels.db
    alignkit label export --db labels.db --format pairs --output pairs.jsonl

Every command takes --db PATH (SQLite) or --url SQLALCHEMY_URL (e.g. PostgreSQL). `alignkit label --config ...`
(no subcommand) is still the simulated-labeler stage.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from alignkit.errors import UserError

SUBCOMMANDS = ("serve", "import", "export", "add-labeler", "progress")


def _needs_web_deps():
    try:
        import sqlalchemy  # noqa: F401
    except ImportError:
        raise UserError("the labelling app needs its extra: pip install 'alignkit[label]'") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignkit label", description="The labelling web app and its admin commands.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        where = p.add_mutually_exclusive_group(required=True)
        where.add_argument("--db", help="SQLite database file (created if missing, and its folder; WAL mode)")
        where.add_argument("--url", help="any SQLAlchemy database URL instead, e.g. postgresql+psycopg://u@host/db")
        return p

    p = command("serve", "serve the labelling web app")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--per-prompt", type=int, default=3, help="labelers per prompt (default 3)")
    p.add_argument("--secure-cookies", action="store_true", help="mark the session cookie Secure (behind HTTPS)")
    p = command("import", "load completion sets ({prompt|messages, completions: [K <= 26]}, e.g. alignkit rollout's)")
    p.add_argument("input", help="JSONL of completion sets")
    p = command("add-labeler", "create an account and print its sign-in token")
    p.add_argument("name")
    p.add_argument("--admin", action="store_true", help="may see progress, agreement and exports")
    p = command("progress", "labels per labeler, finished prompts, inter-annotator agreement")
    p.add_argument("--per-prompt", type=int, default=3, help="labelers per prompt (to count finished prompts)")
    p = command("export", "write the labels as rankings or pairs JSONL (ready for alignkit rm / dpo)")
    p.add_argument("--format", choices=("rankings", "pairs"), default="rankings")
    p.add_argument("--output", required=True, help="JSONL file to write (atomically)")
    return parser


def _fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _progress_text(p: dict) -> str:
    lines = [f"{p['labels']} labels; {p['complete_prompts']}/{p['n_prompts']} prompts with {p['per_prompt']} labels",
             f"pairwise agreement {_fmt(p['agreement'])} over {p['comparisons']} comparisons; "
             f"Krippendorff's alpha (ordinal) {_fmt(p['alpha'])}",
             f"{'labeler':<20} {'done':>6} {'skipped':>8} {'open':>5} {'agreement':>10}"]
    for row in p["labelers"]:
        lines.append(f"{row['name'][:20]:<20} {row['done']:>6} {row['skipped']:>8} {row['open']:>5} "
                     f"{_fmt(row['agreement']):>10}")
    return "\n".join(lines)


def _make_folder_of(db_file: str) -> None:
    """--db's folder, made if missing (as an output's is: a new database is one command away)."""
    from alignkit.data.jsonl import check_output

    try:
        check_output(db_file)  # a directory, a file in the way, a read-only folder
        Path(db_file).parent.mkdir(parents=True, exist_ok=True)
    except UserError as e:
        raise UserError(f"--db: {e}") from None
    except OSError as e:
        raise UserError(f"--db {db_file}: cannot make its folder ({e.strerror or e})") from None


def run(args: argparse.Namespace) -> str | None:
    _needs_web_deps()
    from alignkit.feedback import db, report

    url = db.database_url(args.db, args.url)
    if args.db:
        _make_folder_of(args.db)
    engine = db.connect(url, f"--db {args.db}" if args.db else f"--url {db.shown_url(args.url)}")
    if args.command == "serve":
        import uvicorn

        from alignkit.feedback.app import create_app

        engine.dispose()  # opened above to report a bad database in one line; the app opens its own
        app = create_app(url, per_prompt=args.per_prompt, secure_cookies=args.secure_cookies)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
        return None
    if args.command == "import":
        added, present = db.import_completion_sets(engine, args.input)
        return f"imported {added} prompts ({present} already present)"
    if args.command == "add-labeler":
        token = db.add_labeler(engine, args.name, admin=args.admin)
        return f"{'admin' if args.admin else 'labeler'} {args.name!r} created; sign-in token (shown once): {token}"
    if args.command == "progress":
        return _progress_text(report.progress(engine, args.per_prompt))
    n = report.export(engine, args.format, args.output)
    return f"wrote {n} {args.format} rows to {args.output}"


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except UserError as e:
        print(f"alignkit label {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path that cannot be written or read: not a bug, one line (as `alignkit.cli.main`)
        where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        print(f"alignkit label {args.command}: error: {where + ': ' if where else ''}{e.strerror or e}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if result:
        print(result)
    return 0
