"""The labelling app in real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright).

Sign in, rank a prompt by keyboard only (with a tie), submit, export as an admin, and the exported pairs
are the ones the keyboard made. Completions carry script payloads that must stay text. Set
ALIGNKIT_LABEL_SCREENSHOT=/tmp/label_page.png to keep a screenshot of the labelling page.
"""

import json
import os
import random
import shutil
import socket
import threading
import time

import pytest

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"Chromium not found at {CHROMIUM} (apt-get install -y chromium); browser test skipped")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the 'label' extra")
uvicorn = pytest.importorskip("uvicorn", reason="uvicorn is in the 'label' extra")

from alignkit.cli import main as cli_main  # noqa: E402
from alignkit.data.preferences import read_pairs  # noqa: E402
from alignkit.feedback import db  # noqa: E402
from alignkit.feedback.app import create_app  # noqa: E402

COMPLETIONS = ["Alpha <img src=x onerror=\"window.pwned=1\">", "Beta answer.", "Gamma <script>window.pwned=2</script>"]
TARGET = [2, 0, 1]  # best first, in file indices; then Beta is tied with Alpha by keyboard


@pytest.fixture
def server(tmp_path):
    sets = tmp_path / "sets.jsonl"
    sets.write_text(json.dumps({"prompt": "Review the film <i>Jaws</i>.", "completions": COMPLETIONS,
                                "prompt_id": "jaws"}) + "\n")
    app = create_app(f"sqlite:///{tmp_path / 'labels.db'}", per_prompt=1, rng=random.Random(3))
    engine = app.state.ctx.engine
    db.import_completion_sets(engine, sets)
    tokens = {"ann": db.add_labeler(engine, "ann"), "boss": db.add_labeler(engine, "boss", admin=True)}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", tokens, tmp_path
    srv.should_exit = True
    thread.join(timeout=10)


def _rank_by_keyboard(page) -> None:
    """Move each target completion to its place with j/k (select) and a digit (move to rank)."""
    focused = 0
    for rank, index in enumerate(TARGET):
        texts = page.locator("li.card .text").all_inner_texts()
        at = next(i for i, t in enumerate(texts) if t == COMPLETIONS[index])
        for _ in range(abs(at - focused)):
            page.keyboard.press("j" if at > focused else "k")
        page.keyboard.press(str(rank + 1))
        focused = rank
    assert focused == len(TARGET) - 1  # the last card (Beta) is selected ...
    page.keyboard.press("t")           # ... and ties with the one above (Alpha)


def test_sign_in_rank_by_keyboard_submit_export(server):
    base, tokens, tmp = server
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto(base + "/label")
            assert page.url.endswith("/login")
            page.fill("#token", tokens["ann"])
            page.press("#token", "Enter")
            page.wait_for_url("**/label")
            page.wait_for_function("document.activeElement && document.activeElement.classList.contains('card')")
            _rank_by_keyboard(page)
            assert page.locator("li.card .text").all_inner_texts() == [COMPLETIONS[i] for i in TARGET]
            assert page.locator("li.card .rank").all_inner_texts() == ["1.", "2.", "= 2."]
            assert page.evaluate("window.pwned") is None  # payloads stayed text
            assert "<i>Jaws</i>" in page.locator("#prompt").inner_text()
            shot = tmp / "label_page.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 5000
            if os.environ.get("ALIGNKIT_LABEL_SCREENSHOT"):
                shutil.copy(shot, os.environ["ALIGNKIT_LABEL_SCREENSHOT"])
            page.keyboard.press("Enter")
            page.wait_for_selector("text=Nothing left for you to label")

            admin = browser.new_context().new_page()
            admin.goto(base + "/login")
            admin.fill("#token", tokens["boss"])
            admin.press("#token", "Enter")
            admin.wait_for_url("**/admin")
            with admin.expect_download() as download:
                admin.click("#export-pairs")
            exported = tmp / "downloaded_pairs.jsonl"
            download.value.save_as(str(exported))
        finally:
            browser.close()
    want = [(COMPLETIONS[2], COMPLETIONS[0]), (COMPLETIONS[2], COMPLETIONS[1])]
    assert [(p["chosen"], p["rejected"]) for p in read_pairs(exported)] == want
    out = tmp / "pairs.jsonl"
    assert cli_main(["label", "export", "--db", str(tmp / "labels.db"), "--format", "pairs", "--output", str(out)]) == 0
    assert [(p["chosen"], p["rejected"], p["labeler"]) for p in read_pairs(out)] == [(c, r, "ann") for c, r in want]
