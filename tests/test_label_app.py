"""The labelling web app through FastAPI's TestClient: auth, CSRF, validation, escaping, shuffles, limits, export."""

import json
import math
import os
import random
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the labelling app needs the 'label' extra")
pytest.importorskip("sqlalchemy", reason="the labelling app needs the 'label' extra")
from fastapi.testclient import TestClient  # noqa: E402

from alignkit.cli import main as cli_main  # noqa: E402
from alignkit.data.preferences import read_pairs, read_rankings  # noqa: E402
from alignkit.feedback import db  # noqa: E402
from alignkit.feedback.agreement import krippendorff_alpha, pairwise_agreement  # noqa: E402
from alignkit.feedback.app import create_app  # noqa: E402
from alignkit.feedback.report import progress  # noqa: E402

XSS = "<script>alert('x')</script>"
SETS = [
    {"prompt": "Review <b>Jaws</b>.", "completions": [XSS, "Great film.", "Awful film.", "Fine film."], "prompt_id": "p0"},
    {"prompt": "Review Alien.", "completions": ["Scary.", "Dull.", "Tense."], "prompt_id": "p1", "topic": "scifi"},
]


@pytest.fixture
def lab(tmp_path):
    """A database with SETS imported, two labelers and an admin; `lab.client(name)` signs someone in."""
    path = tmp_path / "sets.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in SETS))
    # ALIGNKIT_LABEL_TEST_URL runs these tests on another database (e.g. postgresql+psycopg://...), emptied first
    url = os.environ.get("ALIGNKIT_LABEL_TEST_URL") or f"sqlite:///{tmp_path / 'labels.db'}"
    if os.environ.get("ALIGNKIT_LABEL_TEST_URL"):
        from sqlalchemy import create_engine

        engine = create_engine(url)
        db.metadata.drop_all(engine)
        engine.dispose()

    class Lab:
        def __init__(self, per_prompt=2):
            self.app = create_app(url, per_prompt=per_prompt, rng=random.Random(0))
            self.engine = self.app.state.ctx.engine
            assert db.import_completion_sets(self.engine, path) == (2, 0)
            self.tokens = {n: db.add_labeler(self.engine, n, admin=n == "boss") for n in ("ann", "bob", "boss")}

        def client(self, name=None):
            c = TestClient(self.app, follow_redirects=False)
            if name:
                r = c.post("/login", data={"token": self.tokens[name], "csrf": csrf(c.get("/login"))})
                assert r.status_code == 303
            return c

    Lab.url, Lab.tmp = url, tmp_path
    return Lab


def csrf(page) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page.text)[1]


def shown(page) -> tuple[int, list[str]]:
    """(assignment id, completion texts in display order) of a label page (texts unescaped)."""
    import html

    aid = int(re.search(r'name="assignment_id" value="(\d+)"', page.text)[1])
    return aid, [html.unescape(t) for t in re.findall(r'<div class="text">(.*?)</div>', page.text, re.S)]


def submit(client, page, ranking, **fields):
    data = {"csrf": csrf(page), "assignment_id": str(shown(page)[0]), "ranking": json.dumps(ranking), **fields}
    return client.post("/label", data=data)


def test_every_route_but_sign_in_needs_a_session(lab):
    c = lab().client()
    assert c.get("/login").status_code == 200
    for path in ("/", "/label", "/admin", "/admin/export?format=pairs"):
        r = c.get(path)
        assert (r.status_code, r.headers["location"]) == (303, "/login"), path
    for path in ("/label", "/skip", "/logout", "/admin/labelers"):
        assert c.post(path, data={}).status_code == 303, path
    r = c.post("/login", data={"token": "not-a-token", "csrf": csrf(c.get("/login"))})
    assert r.status_code == 401 and "Unknown or revoked token" in r.text
    # a forged cookie (bad signature) is an anonymous session
    c.cookies.set("alignkit_session", "1.9999999999.abc.deadbeef")
    assert c.get("/label").status_code == 303


def test_csrf_is_checked_on_every_form(lab):
    app = lab()
    ann, bob = app.client("ann"), app.client("bob")
    page = ann.get("/label")
    good = {"assignment_id": str(shown(page)[0]), "ranking": "[0, 1, 2, 3]"}
    assert ann.post("/label", data=good).status_code == 403                                   # missing
    assert ann.post("/label", data={**good, "csrf": "0" * 64}).status_code == 403             # forged
    assert ann.post("/label", data={**good, "csrf": csrf(bob.get("/label"))}).status_code == 403  # another session's
    assert ann.post("/skip", data=good).status_code == 403
    anon = app.client()
    assert anon.post("/login", data={"token": app.tokens["ann"]}).status_code == 403       # sign-in form too
    assert db.count(app.engine, db.labels) == 0
    assert ann.post("/label", data={**good, "csrf": csrf(page)}).status_code == 303
    assert db.count(app.engine, db.labels) == 1


@pytest.mark.parametrize("ranking, fields, message", [
    ([0, 1, 2], {}, "leaves out completion(s) 3"),
    ([0, 1, 2, 2], {}, "names completion 2 twice"),
    ([0, 1, 2, 7], {}, "names completion 7"),
    ([0, [1, 2], True], {}, "list of positions"),
    ("0,1,2,3", {}, "not valid JSON"),
    ([0, 1, 2, 3], {"helpful_0": "6"}, "helpful_0"),
    ([0, 1, 2, 3], {"harmless_9": "1", "flag_2": "evil"}, "flag_2"),
    ([0, 1, 2, 3], {"note": "x" * 2001}, "note"),
    ("[" * 1500 + "]" * 1500, {}, "nested too deep"),
])
def test_invalid_labels_are_refused_and_not_stored(lab, ranking, fields, message):
    app = lab()
    ann = app.client("ann")
    page = ann.get("/label")
    data = {"csrf": csrf(page), "assignment_id": str(shown(page)[0]), **fields,
            "ranking": ranking if isinstance(ranking, str) else json.dumps(ranking)}
    r = ann.post("/label", data=data)
    assert r.status_code == 400 and message in r.text
    assert db.count(app.engine, db.labels) == 0
    assert shown(r)[0] == shown(page)[0]  # the same prompt is shown again, with the error


@pytest.mark.parametrize("path", ["/label", "/skip"])
def test_an_assignment_id_out_of_the_keys_range_is_refused(lab, path):
    app = lab()
    ann = app.client("ann")
    page = ann.get("/label")
    for aid in (2**63, 2**31, 0):
        r = ann.post(path, data={"csrf": csrf(page), "assignment_id": str(aid), "ranking": "[0, 1, 2, 3]"})
        assert r.status_code == 400 and "field &#39;assignment_id&#39; must be an assignment number" in r.text
    assert db.count(app.engine, db.labels) == 0 and shown(ann.get("/label"))[0] == shown(page)[0]


def test_payloads_render_as_text(lab):
    app = lab()
    ann = app.client("ann")
    page = ann.get("/label")
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in page.text and XSS not in page.text
    assert "Review &lt;b&gt;Jaws&lt;/b&gt;." in page.text
    assert "script-src 'sha256-" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    cookie = page.headers.get("set-cookie") or ""
    r = app.client().get("/login")
    assert "httponly" in r.headers["set-cookie"].lower() and "samesite=lax" in r.headers["set-cookie"].lower()
    # a payload in a note and in a labeler name comes back escaped on the admin page
    assert submit(ann, page, [0, 1, 2, 3], note=XSS).status_code == 303
    boss = app.client("boss")
    r = boss.post("/admin/labelers", data={"name": "<img src=x onerror=alert(1)>", "csrf": csrf(boss.get("/admin"))})
    assert r.status_code == 200 and "&lt;img src=x onerror=alert(1)&gt;" in r.text and "<img src=x" not in r.text
    assert cookie == ""  # a signed-in page sets no new cookie


def test_shuffle_is_per_labeler_recorded_and_mapped_back(lab):
    app = lab()
    ann, bob = app.client("ann"), app.client("bob")
    pages = {"ann": ann.get("/label"), "bob": bob.get("/label")}
    orders = {}
    for name, page in pages.items():
        aid, texts = shown(page)
        with db.read_tx(app.engine) as conn:
            orders[name] = json.loads(conn.execute(db.select(db.assignments.c.order_json)
                                                   .where(db.assignments.c.id == aid)).scalar_one())
        assert texts == [SETS[0]["completions"][i] for i in orders[name]]  # page order == recorded order
    assert orders["ann"] != orders["bob"] and sorted(orders["ann"]) == [0, 1, 2, 3]
    # display positions [0, [1, 2], 3] are stored as the file's completion indices
    assert submit(ann, pages["ann"], [0, [1, 2], 3], helpful_1="4", flag_3="unsafe").status_code == 303
    o = orders["ann"]
    [row] = db.labelled_rows(app.engine)
    assert json.loads(row["ranking_json"]) == [o[0], sorted([o[1], o[2]]), o[3]]
    assert json.loads(row["ratings_json"]) == {str(o[1]): {"helpful": 4}}
    assert json.loads(row["flags_json"]) == {str(o[3]): ["unsafe"]}


def test_each_prompt_goes_to_at_most_per_prompt_labelers(lab):
    app = lab(per_prompt=1)
    ann, bob, boss = app.client("ann"), app.client("bob"), app.client("boss")
    a, b = ann.get("/label"), bob.get("/label")
    assert {"Review &lt;b&gt;Jaws&lt;/b&gt;." in a.text, "Review Alien." in b.text} == {True}
    assert "Nothing left" in boss.get("/label").text            # both prompts are held
    assert ann.get("/label").text == a.text                     # an open assignment is shown again, same order
    r = ann.post("/skip", data={"csrf": csrf(a), "assignment_id": str(shown(a)[0])})
    assert r.status_code == 303
    assert "Review &lt;b&gt;Jaws&lt;/b&gt;." in boss.get("/label").text  # the skip freed the slot
    assert "Nothing left" in ann.get("/label").text             # a skipped prompt is not shown again
    assert submit(bob, b, [2, 1, 0]).status_code == 303
    assert submit(bob, b, [0, 1, 2]).status_code == 303         # a resubmission is a no-op ...
    assert db.count(app.engine, db.labels) == 1                 # ... nothing duplicated
    assert json.loads(db.labelled_rows(app.engine)[0]["ranking_json"]) == _stored_order(app, shown(b)[0], [2, 1, 0])


def _stored_order(app, aid, display_ranking):
    with db.read_tx(app.engine) as conn:
        order = json.loads(conn.execute(db.select(db.assignments.c.order_json)
                                        .where(db.assignments.c.id == aid)).scalar_one())
    return [order[i] for i in display_ranking]


def test_a_labeler_sees_only_their_own_work(lab):
    app = lab()
    ann, bob = app.client("ann"), app.client("bob")
    a = ann.get("/label")
    assert submit(ann, a, [0, 1, 2, 3], note="ann-secret-note").status_code == 303
    b = bob.get("/label")
    assert "ann-secret-note" not in b.text
    # bob cannot submit or skip ann's assignment, and cannot reach admin pages or exports
    r = bob.post("/label", data={"csrf": csrf(b), "assignment_id": str(shown(a)[0]), "ranking": "[0, 1, 2, 3]"})
    assert r.status_code == 404
    assert bob.post("/skip", data={"csrf": csrf(b), "assignment_id": str(shown(a)[0])}).status_code == 404
    assert db.count(app.engine, db.labels) == 1
    for path in ("/admin", "/admin/export?format=rankings"):
        assert bob.get(path).status_code == 403


def test_export_is_ready_for_rm_and_dpo_and_agreement_is_right(lab, capsys):
    app = lab(per_prompt=2)
    ann, bob = app.client("ann"), app.client("bob")
    # no labels yet: refused, as by the CLI (the page returned 200 with an empty file)
    assert "nothing to export" in app.client("boss").get("/admin/export?format=pairs").text
    # both labelers get p0 first; rank it in file indices: ann 0 > 1 > 2 > 3, bob 0 > (1 = 2) > 3
    for client, ranking in ((ann, [0, 1, 2, 3]), (bob, [0, [1, 2], 3])):
        page = client.get("/label")
        order = _stored_order(app, shown(page)[0], range(4))
        pos = {c: p for p, c in enumerate(order)}
        display = [[pos[i] for i in x] if isinstance(x, list) else pos[x] for x in ranking]
        assert submit(client, page, display).status_code == 303
    for fmt in ("rankings", "pairs"):
        out = str(Path(app.tmp) / f"{fmt}.jsonl")
        assert cli_main(["label", "export", "--url", app.url, "--format", fmt, "--output", out]) == 0
    rankings = read_rankings(Path(app.tmp) / "rankings.jsonl")
    assert [(r["labeler"], r["ranking"], r["source_prompt_id"]) for r in rankings] == [
        ("ann", [0, 1, 2, 3], "p0"), ("bob", [0, [1, 2], 3], "p0")]
    pairs = read_pairs(Path(app.tmp) / "pairs.jsonl")
    assert len(pairs) == 6 + 5  # C(4, 2) for ann; bob's tie drops one
    first = pairs[0]
    assert (first["prompt"], first["chosen"], first["rejected"]) == ("Review <b>Jaws</b>.", XSS, "Great film.")
    assert len({p["id"] for p in pairs}) == len(pairs)
    # agreement by hand: of the 6 completion pairs the labelers differ only on (1, 2): 5/6.
    # alpha (ordinal) on mid-ranks: units {1,1}, {2,2.5}, {3,2.5}, {4,4}; n_1 = n_4 = 2, n_2 = n_3 = 1, n_2.5 = 2,
    # observed sum o*d2 = 4 * 2.25 = 9; expected sum n_c n_k d2 over ordered pairs = 2 * 324 = 648 -> 1 - 7 * 9 / 648
    p = progress(app.engine, per_prompt=2)
    assert p["agreement"] == pytest.approx(5 / 6) and p["comparisons"] == 6
    assert p["alpha"] == pytest.approx(1 - 7 * 9 / 648)
    assert [(x["name"], x["done"]) for x in p["labelers"]] == [("ann", 1), ("bob", 1), ("boss", 0)]
    boss = app.client("boss")
    r = boss.get("/admin/export?format=pairs")
    assert r.status_code == 200 and [json.loads(x) for x in r.text.splitlines()] == [
        json.loads(x) for x in (Path(app.tmp) / "pairs.jsonl").read_text().splitlines()]
    assert "0.833" in boss.get("/admin").text


def test_export_has_the_labelers_ranking_not_the_imported_files(tmp_path):
    # a file labelled already (simulated labelers: ranking and gold; pair fields too) imported for human labels
    sets = tmp_path / "ranked.jsonl"
    sets.write_text(json.dumps({"prompt": "Rate.", "completions": ["good", "ok", "bad"], "ranking": [2, 1, 0],
                                "gold": [0.9, 0.5, 0.1], "chosen": "bad", "rejected": "good", "label": 0.2,
                                "margin": 1.0, "note": "file", "labeler": "bob", "flags": {"0": ["unsafe"]},
                                "topic": "x"}) + "\n")  # an earlier export, say
    url = f"sqlite:///{tmp_path / 'l.db'}"
    engine = db.connect(url)
    assert db.import_completion_sets(engine, sets) == (1, 0)
    ann = db.find_labeler(engine, token=db.add_labeler(engine, "ann"))
    item = db.current_assignment(engine, ann["id"], per_prompt=1, rng=random.Random(0))
    pos = {c: p for p, c in enumerate(item["order"])}
    assert db.save_label(engine, ann["id"], item["assignment_id"], [[pos[0]], [pos[1]], [pos[2]]], {}, {}, "")
    for fmt in ("rankings", "pairs"):
        out = str(tmp_path / f"{fmt}.jsonl")
        assert cli_main(["label", "export", "--url", url, "--format", fmt, "--output", out]) == 0
    [row] = read_rankings(tmp_path / "rankings.jsonl")
    assert (row["ranking"], row["note"], row["gold"], row["topic"]) == ([0, 1, 2], "", [0.9, 0.5, 0.1], "x")
    assert not {"chosen", "rejected", "label", "margin"} & row.keys()
    pairs = read_pairs(tmp_path / "pairs.jsonl")
    assert [(p["chosen"], p["rejected"], p["chosen_gold"]) for p in pairs] == [
        ("good", "ok", 0.9), ("good", "bad", 0.9), ("ok", "bad", 0.5)]
    assert not any({"label", "margin"} & p.keys() for p in pairs)
    # the file's label details (an earlier labeler's note and flags) are not passed off as ann's
    assert all(p["labeler"] == "ann" and not {"note", "flags"} & p.keys() for p in pairs)


@pytest.mark.parametrize("first, second, key", [
    ({"prompt_id": 5}, {"id": "5"}, "'5'"),
    ({"prompt_id": 5}, {"prompt_id": "5"}, "'5'"),
])
def test_import_refuses_two_rows_of_a_file_with_one_prompt_id(tmp_path, capsys, first, second, key):
    sets = tmp_path / "sets.jsonl"
    row = {"prompt": "a", "completions": ["x", "y"]}
    other = {**row, "completions": ["x", "z"]}
    sets.write_text(json.dumps({**row, **first}) + "\n\n" + json.dumps({**other, **second}) + "\n")
    dbp = str(tmp_path / "l.db")
    assert cli_main(["label", "import", "--db", dbp, str(sets)]) == 2
    err = capsys.readouterr().err
    assert f"{sets}:1 and {sets}:3 both get the prompt id {key}" in err and err.count("\n") == 1
    assert db.count(db.connect(f"sqlite:///{dbp}"), db.prompts) == 0


def test_import_keys_content_and_exports(tmp_path, capsys):
    """A second rollout file (prompt ids 0, 1, ... again) was dropped as "already present"; an export imported back
    became one prompt per label (p0#1, p0#2) and lost the prompt ids."""
    dbp = str(tmp_path / "l.db")
    for n, prompts in enumerate((["Review Jaws.", "Review Alien."], ["Review Heat.", "Review Up."])):
        path = tmp_path / f"rollout{n}.jsonl"
        path.write_text("".join(json.dumps({"prompt": t, "completions": ["x", "y"], "prompt_id": i}) + "\n"
                                for i, t in enumerate(prompts)))
        assert cli_main(["label", "import", "--db", dbp, str(path)]) == (0 if n == 0 else 2)
    err = capsys.readouterr().err
    assert "rollout1.jsonl:1 and the database's prompt both get the prompt id '0'" in err
    assert db.count(db.connect(f"sqlite:///{dbp}"), db.prompts) == 2  # nothing of the second file
    export = tmp_path / "export.jsonl"  # two labels of p0, as `label export --format rankings` writes them
    export.write_text("".join(json.dumps({"id": f"p0#{i}", "source_prompt_id": "p0", "labeler": name, "prompt": "a",
                                          "completions": ["x", "y"], "ranking": [0, 1]}) + "\n"
                              for i, name in ((1, "ann"), (2, "bob"))))
    engine = db.connect(f"sqlite:///{tmp_path / 'again.db'}")
    assert db.import_completion_sets(engine, export) == (1, 0)
    with db.read_tx(engine) as conn:
        assert list(conn.execute(db.select(db.prompts.c.prompt_id)).scalars()) == ["p0"]


def test_import_refuses_more_completions_than_the_page_can_name(tmp_path, capsys):
    sets = tmp_path / "sets.jsonl"
    sets.write_text("".join(json.dumps({"prompt": f"p{k}", "completions": [f"c{i}" for i in range(k)]}) + "\n"
                            for k in (26, 27)))
    dbp = str(tmp_path / "l.db")
    assert cli_main(["label", "import", "--db", dbp, str(sets)]) == 2
    assert f"{sets}:2: 27 completions; the labelling app shows at most 26" in capsys.readouterr().err
    sets.write_text(sets.read_text().splitlines()[0] + "\n")
    app = create_app(f"sqlite:///{dbp}", per_prompt=1)
    assert db.import_completion_sets(app.state.ctx.engine, sets) == (1, 0)
    c = TestClient(app, follow_redirects=False)
    token = db.add_labeler(app.state.ctx.engine, "ann")
    assert c.post("/login", data={"token": token, "csrf": csrf(c.get("/login"))}).status_code == 303
    page = c.get("/label")
    assert page.status_code == 200 and len(shown(page)[1]) == 26 and "[Z]" in page.text


def test_krippendorff_alpha_matches_published_values():
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability", 4 coders x 12 units with gaps
    coders = [[1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None], [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
              [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None], [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None]]
    units = [[v for v in unit if v is not None] for unit in zip(*coders)]
    assert round(krippendorff_alpha(units, "nominal"), 3) == 0.743
    assert round(krippendorff_alpha(units, "ordinal"), 3) == 0.815
    assert round(krippendorff_alpha(units, "interval"), 3) == 0.849
    assert math.isnan(krippendorff_alpha([[1, 1], [1, 1]]))
    assert pairwise_agreement({"p": {"a": [[0], [1]], "b": [[1], [0]]}})[:2] == (0.0, 1)


def test_cli_subcommands_and_the_simulated_stage_still_parse(tmp_path, capsys):
    sets = tmp_path / "sets.jsonl"
    sets.write_text("".join(json.dumps(r) + "\n" for r in SETS))
    dbp = str(tmp_path / "l.db")
    assert cli_main(["label", "import", "--db", dbp, str(sets)]) == 0
    assert "imported 2 prompts (0 already present)" in capsys.readouterr().out
    assert cli_main(["label", "import", "--db", dbp, str(sets)]) == 0
    assert "imported 0 prompts (2 already present)" in capsys.readouterr().out
    assert cli_main(["label", "add-labeler", "--db", dbp, "ann"]) == 0
    assert cli_main(["label", "add-labeler", "--db", dbp, "ann"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["label", "export", "--db", dbp, "--output", str(tmp_path / "x.jsonl")]) == 2
    assert "nothing to export" in capsys.readouterr().err
    assert cli_main(["label", "progress", "--db", dbp]) == 0
    assert "0/2 prompts" in capsys.readouterr().out
    # without a subcommand, `label` is still the simulated-labeler stage
    assert cli_main(["label", "--print-config", "input=a.jsonl", "output=b.jsonl"]) == 0
    assert "input: a.jsonl" in capsys.readouterr().out


def test_a_bad_database_is_one_line_naming_the_option(tmp_path, capsys):
    """A missing folder, a file that is no database and a malformed URL gave SQLAlchemy tracebacks (exit 1)."""
    notdb = tmp_path / "rows.jsonl"
    notdb.write_text('{"prompt": "p"}\n')
    afile = tmp_path / "afile"
    afile.write_text("")
    for where, message in (
            (["--db", str(notdb)], f"--db {notdb}: cannot open the database (file is not a database)"),
            (["--db", str(tmp_path)], f"--db: cannot write {tmp_path}: it is a directory; name a file"),
            (["--db", str(afile / "l.db")], f"--db: cannot write {afile / 'l.db'}: {afile} is a file, not a directory"),
            (["--url", "notaurl"], "--url notaurl: not a database URL (Could not parse SQLAlchemy URL from given URL "
                                   "string); e.g. sqlite:///labels.db or postgresql+psycopg://user@host/db"),
            (["--url", f"sqlite:///{tmp_path / 'no' / 'l.db'}"],
             f"--url sqlite:///{tmp_path / 'no' / 'l.db'}: cannot open the database (unable to open database file)")):
        for command in (["progress"], ["add-labeler", "ann"], ["import", str(notdb)],
                        ["export", "--output", str(tmp_path / "x.jsonl")]):
            assert cli_main(["label", *command, *where]) == 2
            assert capsys.readouterr().err == f"alignkit label {command[0]}: error: {message}\n"
    assert notdb.read_text() == '{"prompt": "p"}\n' and not (tmp_path / "x.jsonl").exists()
    # a new database's folder is made, as an output's is
    new = tmp_path / "new" / "deeper" / "l.db"
    assert cli_main(["label", "progress", "--db", str(new)]) == 0
    assert "0/0 prompts" in capsys.readouterr().out and new.is_file()


def test_an_os_error_is_one_line(tmp_path, capsys, monkeypatch):
    """An OSError, e.g. reading a file without permission (which root, running the tests, is not denied), is one
    line and exit 2, as in `alignkit.cli.main`; it was a traceback."""
    sets = tmp_path / "sets.jsonl"
    sets.write_text("".join(json.dumps(r) + "\n" for r in SETS))

    def unreadable(engine, path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(db, "import_completion_sets", unreadable)
    assert cli_main(["label", "import", "--db", str(tmp_path / "l.db"), str(sets)]) == 2
    assert capsys.readouterr().err == f"alignkit label import: error: {sets}: Permission denied\n"


def test_import_alignkit_stays_free_of_web_deps():
    import subprocess

    code = "import alignkit, alignkit.cli, sys; print(sorted(m for m in ('fastapi', 'sqlalchemy', 'uvicorn', 'jinja2') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


def test_acknowledged_labels_survive_kill_9(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from label_load import run_load

    r = run_load(labelers=3, per_labeler=6, per_prompt=2, k=3, kill_at=0.5, workdir=str(tmp_path))
    assert r["errors"] == [] and r["acknowledged"] == r["labels"] == 18 and r["lost"] == 0
    assert r["lost after kill"] == 0 and r["checked after kill"] >= 9
    assert r["duplicate labeler-prompt"] == 0 and r["prompts over limit"] == 0
