"""Load and crash test of the labelling app (loopback only, bounded by --timeout).

    python benchmarks/label_load.py                      # 50 labelers x 200 labels, kill -9 at 40%
    python benchmarks/label_load.py --labelers 4 --per-labeler 10 --kill-at 0.5

Starts `alignkit label serve` as a subprocess on a fresh SQLite database, then N simulated labelers
(threads, one HTTP session each) sign in and repeat: GET /label, parse the form, POST a random ranking
(sometimes with a tie, a rating and a flag). A POST answered with 303 is an acknowledged label.
When a transport error hits a POST, the labeler sends the same POST again until it is answered: the
server treats a second submission of a done assignment as a no-op, so retries never duplicate.

After a share `--kill-at` of the labels is acknowledged the server gets SIGKILL; the database is opened
directly and every label acknowledged so far must be there; the server is restarted and the labelers
carry on. At the end: labels stored == N x per-labeler, each acknowledged label present with the ranking
sent (mapped through the display order the server recorded), no labeler-prompt pair twice, no prompt over
its per-prompt limit. Prints a table of counts and p50 / p99 latencies.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

CSRF = re.compile(r'name="csrf" value="([^"]+)"')
ASSIGNMENT = re.compile(r'name="assignment_id" value="(\d+)"')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db_path: str, port: int, per_prompt: int, timeout: float = 600.0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "alignkit.cli", "label", "serve", "--db", db_path, "--host", "127.0.0.1",
           "--port", str(port), "--per-prompt", str(per_prompt)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/login", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start in time")


def setup_database(db_path: str, n_prompts: int, k: int, n_labelers: int) -> list[str]:
    """Completion sets and labeler accounts; returns the sign-in tokens."""
    from alignkit.data.jsonl import write_jsonl
    from alignkit.feedback import db

    sets = Path(db_path).with_suffix(".sets.jsonl")
    write_jsonl(sets, [{"prompt": f"Review film {i}.", "completions": [f"film {i}, take {j}" for j in range(k)],
                        "prompt_id": f"p{i}"} for i in range(n_prompts)])
    engine = db.connect(f"sqlite:///{db_path}")
    db.import_completion_sets(engine, sets)
    tokens = [db.add_labeler(engine, f"labeler{i}") for i in range(n_labelers)]
    engine.dispose()
    return tokens


class Labeler(threading.Thread):
    def __init__(self, base: str, token: str, target: int, seed: int, shared: "Shared"):
        super().__init__(daemon=True)
        self.base, self.token, self.target, self.shared = base, token, target, shared
        self.rng = random.Random(seed)
        self.acked: list[tuple[int, list]] = []  # (assignment id, ranking over display positions)
        self.get_ms: list[float] = []
        self.post_ms: list[float] = []
        self.retries = 0
        self.error: str | None = None

    def request(self, client: httpx.Client, method: str, path: str, **kw) -> tuple[httpx.Response, float]:
        """Send until answered (the server may be down while it restarts); (response, latency in ms)."""
        while not self.shared.stop.is_set():
            t0 = time.perf_counter()
            try:
                response = client.request(method, path, **kw)
                return response, 1000 * (time.perf_counter() - t0)
            except httpx.TransportError:
                self.retries += 1
                time.sleep(0.2)
        raise TimeoutError("stopped")

    def run(self):
        try:
            with httpx.Client(base_url=self.base, timeout=60, follow_redirects=False) as client:
                page, _ = self.request(client, "GET", "/login")
                r, _ = self.request(client, "POST", "/login", data={"token": self.token, "csrf": CSRF.search(page.text)[1]})
                assert r.status_code == 303, r.status_code
                while len(self.acked) < self.target:
                    self.label_one(client)
        except Exception as e:  # reported in the summary
            self.error = f"{type(e).__name__}: {e}"

    def label_one(self, client: httpx.Client) -> None:
        page, ms = self.request(client, "GET", "/label")
        self.get_ms.append(ms)
        found = ASSIGNMENT.search(page.text)
        if page.status_code != 200 or found is None:
            raise RuntimeError(f"GET /label answered {page.status_code} without a prompt")
        k = page.text.count('class="card"')
        order = list(range(k))
        self.rng.shuffle(order)
        ranking: list = list(order)
        if self.rng.random() < 0.2:  # a tie of the last two
            ranking = ranking[:-2] + [sorted(ranking[-2:])]
        data = {"csrf": CSRF.search(page.text)[1], "assignment_id": found[1], "ranking": json.dumps(ranking),
                "helpful_0": str(self.rng.randint(1, 5)), "note": "load test"}
        if self.rng.random() < 0.1:
            data["flag_1"] = "nonsense"
        r, ms = self.request(client, "POST", "/label", data=data)
        if r.status_code != 303:
            raise RuntimeError(f"POST /label answered {r.status_code}")
        self.post_ms.append(ms)
        self.acked.append((int(found[1]), ranking))
        self.shared.add_ack()


class Shared:
    def __init__(self):
        self.lock = threading.Lock()
        self.acks = 0
        self.stop = threading.Event()

    def add_ack(self):
        with self.lock:
            self.acks += 1


def missing_acks(db_path: str, labelers: list[Labeler]) -> tuple[int, int]:
    """(acknowledged labels checked, how many are missing or differ from what was sent)."""
    from sqlalchemy import select

    from alignkit.feedback import db

    engine = db.connect(f"sqlite:///{db_path}")
    with db.read_tx(engine) as conn:
        stored = {aid: (ranking, order) for aid, ranking, order in conn.execute(
            select(db.labels.c.assignment_id, db.labels.c.ranking_json, db.assignments.c.order_json)
            .join(db.assignments, db.assignments.c.id == db.labels.c.assignment_id))}
    engine.dispose()
    checked = bad = 0
    for lab in labelers:
        for aid, ranking in list(lab.acked):
            checked += 1
            if aid not in stored:
                bad += 1
                continue
            order = json.loads(stored[aid][1])
            expected = [sorted(order[i] for i in x) if isinstance(x, list) else order[x] for x in ranking]
            bad += json.loads(stored[aid][0]) != expected
    return checked, bad


def integrity(db_path: str, per_prompt: int) -> dict:
    import sqlite3

    con = sqlite3.connect(db_path)
    q = lambda sql: con.execute(sql).fetchone()[0]  # noqa: E731
    out = {"labels": q("SELECT COUNT(*) FROM labels"),
           "duplicate labeler-prompt": q("SELECT COUNT(*) FROM (SELECT labeler_id, prompt_pk FROM labels "
                                         "GROUP BY 1, 2 HAVING COUNT(*) > 1)"),
           "prompts over limit": q(f"SELECT COUNT(*) FROM (SELECT prompt_pk FROM labels GROUP BY 1 "
                                   f"HAVING COUNT(*) > {int(per_prompt)})")}
    con.close()
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def run_load(labelers: int = 50, per_labeler: int = 200, per_prompt: int = 10, k: int = 4, kill_at: float = 0.4,
             timeout: float = 900.0, workdir: str | None = None) -> dict:
    """Run the load (and, with 0 < kill_at < 1, the kill -9 check); returns the figures."""
    workdir = workdir or tempfile.mkdtemp(prefix="label-load-")
    db_path = os.path.join(workdir, "labels.db")
    n_prompts = max(1, 2 * labelers * per_labeler // per_prompt)
    tokens = setup_database(db_path, n_prompts, k, labelers)
    port = free_port()
    server = start_server(db_path, port, per_prompt)
    shared = Shared()
    clients = [Labeler(f"http://127.0.0.1:{port}", t, per_labeler, i, shared) for i, t in enumerate(tokens)]
    total, crash = labelers * per_labeler, None
    t0 = time.perf_counter()
    try:
        for c in clients:
            c.start()
        while any(c.is_alive() for c in clients) and time.perf_counter() - t0 < timeout:
            if crash is None and 0 < kill_at < 1 and shared.acks >= kill_at * total:
                os.kill(server.pid, signal.SIGKILL)
                server.wait()
                acked_at_kill = shared.acks
                checked, bad = missing_acks(db_path, clients)
                crash = {"acked at kill": acked_at_kill, "checked after kill": checked, "lost after kill": bad}
                server = start_server(db_path, port, per_prompt)
            time.sleep(0.05)
        elapsed = time.perf_counter() - t0
        shared.stop.set()
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
    checked, lost = missing_acks(db_path, clients)
    gets = [x for c in clients for x in c.get_ms]
    posts = [x for c in clients for x in c.post_ms]
    return {"labelers": labelers, "per labeler": per_labeler, "acknowledged": shared.acks, "checked": checked,
            "lost": lost, **integrity(db_path, per_prompt), **(crash or {}), "client retries": sum(c.retries for c in clients),
            "errors": [c.error for c in clients if c.error], "seconds": elapsed, "labels/s": shared.acks / elapsed,
            "GET /label p50 ms": percentile(gets, 50), "GET /label p99 ms": percentile(gets, 99),
            "POST /label p50 ms": percentile(posts, 50), "POST /label p99 ms": percentile(posts, 99)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--labelers", type=int, default=50)
    p.add_argument("--per-labeler", type=int, default=200)
    p.add_argument("--per-prompt", type=int, default=10)
    p.add_argument("--kill-at", type=float, default=0.4, help="kill -9 the server after this share of labels (0: never)")
    p.add_argument("--timeout", type=float, default=900.0)
    args = p.parse_args()
    r = run_load(args.labelers, args.per_labeler, args.per_prompt, kill_at=args.kill_at, timeout=args.timeout)
    width = max(map(len, r))
    for key, value in r.items():
        shown = f"{value:.1f}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {shown}")
    expected = args.labelers * args.per_labeler
    ok = (r["labels"] == r["acknowledged"] == expected and r["lost"] == 0 and not r["errors"]
          and r["duplicate labeler-prompt"] == 0 and r["prompts over limit"] == 0 and r.get("lost after kill", 0) == 0)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
