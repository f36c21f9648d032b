"""`alignkit report`: HTML with embedded PNG plots and the terminal table, from two hand-made run directories."""

import base64
import json
import re

import pytest

from alignkit.cli import main
from alignkit.eval.plots import gold_peaks
from alignkit.eval.report import as_runs, load_run, mixed_gold, points, rollout_points, summary_table, write_report


def _eval(step, kl, gold, proxy, method, completion="after"):
    metrics = {"kl": kl, "reward/gold": gold, "reward/proxy": proxy, "reference/reward/gold": 0.1,
               "reference/reward/proxy": 0.0, "text/distinct-2": 0.5, "perplexity": 12.0}
    samples = [{"prompt": "Write a review.", "completion": completion, "reference_completion": "before text",
                "gold": gold, "reference_gold": 0.1}]
    calibration = {"proxy": {"reliability": {"confidence": [0.55, None, 0.95], "accuracy": [0.5, None, 1.0],
                                             "count": [3, 0, 1], "low": 0.5}}}
    return {"kind": "alignkit.eval", "format": 1, "step": step, "method": method, "metrics": metrics,
            "calibration": calibration, "samples": samples}


@pytest.fixture
def run_dirs(tmp_path):
    ppo, dpo = tmp_path / "ppo", tmp_path / "dpo"
    (ppo / "eval").mkdir(parents=True)
    (dpo / "eval").mkdir(parents=True)
    gold = [0.0, 0.3, 0.6, 0.3, 0.0]  # rollouts' gold rises then falls while the proxy keeps rising
    rl = [{"step": s, "score_mean": 0.1 * s, "gold_mean": gold[s - 1], "kl": 0.5 * s, "entropy": 2 - 0.1 * s,
           "loss": 1 / s, "lr": 1e-5} for s in range(1, 6)]
    (ppo / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rl) + '{"step": 6, "lo')  # still writing
    dp = [{"step": s, "loss": 0.7 - 0.1 * s, "rewards/margin": 0.2 * s, "lr": 5e-7} for s in range(1, 4)]
    dp.append({"step": 3, "eval/loss": 0.5})
    (dpo / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dp))
    for step, kl, gold, proxy in [(10, 1.0, 0.3, 0.5), (20, 4.0, 0.6, 1.5), (None, 9.0, 0.4, 2.5)]:
        name = "final" if step is None else f"step-{step}"
        (ppo / "eval" / f"{name}.json").write_text(json.dumps(_eval(step, kl, gold, proxy, "ppo", "<b>great</b>")))
    (dpo / "eval" / "final.json").write_text(json.dumps(_eval(None, 2.0, 0.5, None, "dpo")))
    (dpo / "eval" / "notes.json").write_text(json.dumps({"something": "else"}))  # not an eval: ignored
    (dpo / "summary.json").write_text(json.dumps([{"n": 1, "kl_analytic": 0.0, "reward": 0.0, "gold": 0.1},
                                                  {"n": 4, "kl_analytic": 0.636, "reward": 1.0, "gold": 0.45}]))
    return ppo, dpo


def test_load_run_reads_what_is_there(run_dirs):
    ppo = load_run(run_dirs[0])
    assert len(ppo.curves) == 5  # the half-written last line is skipped
    assert [e["step"] for e in ppo.evals] == [10, 20, None]  # steps in order, final last
    assert ppo.method == "ppo"
    dpo = load_run(run_dirs[1])
    assert len(dpo.evals) == 1 and len(dpo.best_of_n) == 2


def test_points_and_gold_peak(run_dirs):
    pts = points([load_run(d) for d in run_dirs])
    ppo = [p for p in pts if p["method"] == "ppo"]
    assert [(p["label"], p["kl"]) for p in ppo] == [("reference", 0.0), ("step 10", 1.0), ("step 20", 4.0),
                                                    ("final", 9.0)]
    peaks = gold_peaks(pts)
    assert peaks["ppo"]["kl"] == 4.0 and peaks["ppo"]["gold"] == 0.6  # gold peaks, then falls while proxy rises
    assert peaks["best-of-N (dpo)"]["label"] == "N=4"


def test_rollout_points_are_trailing_means(run_dirs):
    pts = rollout_points(load_run(run_dirs[0]), window=3)
    assert [p["label"] for p in pts] == [f"step {s}" for s in range(1, 6)]
    assert pts[0]["gold"] == 0.0 and pts[1]["kl"] == pytest.approx(0.75)  # (0.5 + 1.0) / 2
    assert [p["gold"] for p in pts[2:]] == pytest.approx([0.3, 0.4, 0.3])
    assert pts[4]["proxy"] == pytest.approx(0.4) and pts[4]["kl"] == pytest.approx(2.0)  # steps 3-5
    assert gold_peaks(pts)["ppo"]["label"] == "step 4"
    assert rollout_points(load_run(run_dirs[1])) == []  # DPO logs no rollouts


def test_report_html_has_png_plots_and_samples(run_dirs, tmp_path):
    out = write_report(run_dirs, tmp_path / "out" / "report.html")
    page = out.read_text()
    images = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([^"]+)"', page)
    alts = [alt for alt, _ in images]
    # curves of both runs, frontier, over-optimisation, one reliability diagram per run
    assert alts == ["training curves of ppo", "training curves of dpo", "reward-KL frontier", "over-optimisation",
                    "over-optimisation during training", "ppo: proxy RM vs gold", "dpo: proxy RM vs gold"]
    for _, data in images:
        assert base64.b64decode(data).startswith(b"\x89PNG\r\n\x1a\n")
    assert "&lt;b&gt;great&lt;/b&gt;" in page and "<b>great</b>" not in page  # completions are escaped
    assert "before text" in page
    peak = re.search(r"<tr><td>ppo</td><td>([^<]*)</td><td class=num>([^<]*)</td>", page.split("peaks at")[1])
    assert peak.groups() == ("step 20", "4")  # gold peaks at step 20 (KL 4), then falls while proxy rises


def test_summary_table_and_cli(run_dirs, tmp_path, capsys):
    table = summary_table(run_dirs).splitlines()
    assert table[0].split() == ["method", "point", "gold", "proxy", "KL", "distinct-2", "perplexity"]
    rows = [line.split() for line in table[2:]]
    assert ["ppo", "final", "0.4", "2.5", "9", "0.5", "12"] in rows
    assert ["dpo", "final", "0.5", "-", "2", "0.5", "12"] in rows
    assert ["ppo", "reference", "0.1", "0", "0", "-", "-"] in rows  # KL 0 by definition
    (run_dirs[1] / "eval" / "final.json").write_text(json.dumps(  # a win rate by an LLM judge adds its column
        {**_eval(None, 2.0, 0.5, None, "dpo"), "metrics": {"kl": 2.0, "reward/gold": 0.5, "win_rate/judge": 0.75}}))
    table = summary_table(run_dirs).splitlines()
    assert table[0].split()[-3:] == ["perplexity", "win", "(judge)"]  # no win rate by proxy anywhere: no column
    assert ["dpo", "final", "0.5", "-", "2", "-", "-", "0.75"] in [line.split() for line in table[2:]]
    out = tmp_path / "r.html"
    assert main(["report", str(run_dirs[0]), str(run_dirs[1]), f"output={out}"]) == 0
    printed = capsys.readouterr().out
    assert "distinct-2" in printed and str(out) in printed and out.is_file()
    configs = []
    for argv in ([str(run_dirs[0]), str(run_dirs[1])], [f"runs=[{run_dirs[0]},{run_dirs[1]}]"]):
        assert main(["report", *argv, "samples=2", "--print-config"]) == 0
        configs.append(capsys.readouterr().out)
    assert configs[0] == configs[1] and f"runs: [{run_dirs[0]}, {run_dirs[1]}]" in configs[0]


def test_runs_that_share_a_directory_name_stay_apart(run_dirs, tmp_path):
    """a/ppo and b/ppo were one 'ppo' in the table, one line in the plots and one row of the gold peaks."""
    import shutil

    other = tmp_path / "b" / "ppo"
    shutil.copytree(run_dirs[0], other)
    (other / "eval" / "final.json").write_text(json.dumps(_eval(None, 3.0, 0.9, 1.0, "ppo")))
    runs = as_runs([run_dirs[0], other])
    assert [r.name for r in runs] == [f"{tmp_path.name}/ppo", "b/ppo"]
    assert [r.method for r in runs] == [f"ppo ({tmp_path.name}/ppo)", "ppo (b/ppo)"]
    peaks = gold_peaks(points(runs))
    assert peaks["ppo (b/ppo)"]["gold"] == 0.9 and peaks[f"ppo ({tmp_path.name}/ppo)"]["gold"] == 0.6
    assert [r.method for r in as_runs(run_dirs)] == ["ppo", "dpo"]  # distinct names stay short
    rows = [line.split()[:4] for line in summary_table(runs).splitlines()[2:]]
    assert ["ppo", "(b/ppo)", "final", "0.9"] in rows


def test_runs_that_share_a_method_stay_apart(run_dirs, tmp_path):
    """Two runs evaluated with method=ppo (ppo_lr1, ppo_lr2) were one line in the plots and one gold peak."""
    import shutil

    other = tmp_path / "ppo_lr2"
    shutil.copytree(run_dirs[0], other)
    (other / "eval" / "final.json").write_text(json.dumps(_eval(None, 3.0, 0.9, 1.0, "ppo")))
    runs = as_runs([run_dirs[0], other])
    assert [r.method for r in runs] == ["ppo (ppo)", "ppo (ppo_lr2)"]
    peaks = gold_peaks(points(runs))
    assert peaks["ppo (ppo_lr2)"]["gold"] == 0.9 and peaks["ppo (ppo)"]["gold"] == 0.6


def test_the_reference_point_does_not_depend_on_the_order_of_runs(run_dirs, tmp_path):
    """The reference row was left out only when the same policy was a point of a run listed before it."""
    ppo, dpo = run_dirs
    sft = tmp_path / "sft"
    (sft / "eval").mkdir(parents=True)
    same = {**_eval(None, 0.0, 0.1, 0.0, "sft"), "policy": "/runs/sft/model"}
    (sft / "eval" / "final.json").write_text(json.dumps(same))
    for path in (ppo / "eval").glob("*.json"):  # evaluated against the SFT model, which scored gold 0.1
        path.write_text(json.dumps({**json.loads(path.read_text()), "reference": "/runs/sft/model"}))
    labels = [sorted((p["method"], p["label"]) for p in points(as_runs(order))) for order in ([ppo, sft], [sft, ppo])]
    assert labels[0] == labels[1] and ("ppo", "reference") not in labels[0]


def test_gold_from_different_judges_is_flagged(run_dirs, tmp_path):
    """The table and plots put gold rewards of every run side by side; from different judges they do not compare."""
    def set_gold(path, gold):
        data = json.loads(path.read_text())
        path.write_text(json.dumps({**data, "config": {"gold": gold}}))

    ppo, dpo = run_dirs
    for path in (ppo / "eval").glob("*.json"):
        set_gold(path, {"judge": "vader", "model": None})
    set_gold(dpo / "eval" / "final.json", {"judge": "vader"})
    assert mixed_gold([load_run(ppo), load_run(dpo)]) is None
    set_gold(dpo / "eval" / "final.json", {"function": "mine:score"})
    note = mixed_gold([load_run(ppo), load_run(dpo)])
    assert note.endswith("vader (ppo); mine:score (dpo)")
    set_gold(dpo / "eval" / "final.json", {"judge": "vader"})  # best-of-N scored by another judge
    summary = json.loads((dpo / "summary.json").read_text())
    (dpo / "summary.json").write_text(json.dumps([{**line, "gold_judge": "mine:chars"} for line in summary]))
    assert mixed_gold([load_run(ppo), load_run(dpo)]).endswith("vader (dpo, ppo); mine:chars (dpo)")
    assert "<b>Warning:</b> the gold rewards come from different judges" in write_report(
        run_dirs, tmp_path / "r.html").read_text()


def test_report_errors(tmp_path, capsys):
    assert main(["report"]) == 2
    assert "name at least one run directory" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "run directory not found" in capsys.readouterr().err
    bad_line = tmp_path / "bad_line"
    bad_line.mkdir()
    (bad_line / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n[1, 2]\n{"step": 2, "loss": 0.5}\n')
    assert main(["report", str(bad_line)]) == 2  # was AttributeError: 'list' object has no attribute 'get'
    assert "metrics.jsonl:2: a metrics line must be a JSON object, got list" in capsys.readouterr().err
    bad_eval = tmp_path / "bad_eval"
    (bad_eval / "eval").mkdir(parents=True)
    (bad_eval / "eval" / "final.json").write_text(json.dumps({**_eval(None, "abc", 0.5, 0.1, "x")}))
    assert main(["report", str(bad_eval)]) == 2  # was a TypeError in the plots
    assert "final.json: metrics.kl must be a number or null, got 'abc'" in capsys.readouterr().err
    good = _eval(None, 0.1, 0.5, 0.1, "x")
    for change, message in (({"samples": [{"completion": "x"}]}, "item 0 is {'completion': 'x'}"),  # a KeyError
                            ({"samples": "abc"}, "and a completion (a string); got 'abc'"),  # an AttributeError
                            ({"step": "5"}, "'step' must be an integer >= 0 or null, got '5'")):  # sort TypeError
        (bad_eval / "eval" / "final.json").write_text(json.dumps({**good, **change}))
        assert main(["report", str(bad_eval)]) == 2
        assert message in capsys.readouterr().err
