"""`alignkit report RUN_DIR...`: one self-contained HTML file (plots embedded as base64 PNG) and a terminal table.

    alignkit report runs/ppo runs/dpo runs/best_of_n output=report.html
    alignkit report runs=[runs/ppo,runs/dpo]

What the report reads from each run directory (whatever is there; nothing is required):
- `metrics.jsonl`: the training curves (one JSON object per logged step, written by the engine's RunLogger).
  An RL run that logged a monitored gold reward (`gold=vader`: `gold_mean` beside the proxy `score_mean` and
  the sequence `kl` of each rollout batch) also gets an over-optimisation curve from its rollouts.
- `eval/*.json` and `eval.json` with `"kind": "alignkit.eval"` (written by `alignkit eval`): one point per
  file on the reward-KL frontier and the over-optimisation plot, e.g. `eval/step-100.json`, ...,
  `eval/final.json`; a point's step is the file's `step` (null = final, drawn after every step). The last
  point gives the run's row of the table and its before/after samples; a reference point at KL = 0 comes from
  the reference completions' rewards.
- `eval.json` of a reward model (`alignkit rm`): its reliability diagram.
- `summary.json` of `alignkit best-of-n`: one point per N at the analytic KL log N - (N - 1) / N, with the
  selection reward as proxy and `gold` as gold.
"""

from __future__ import annotations

import html
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from alignkit.config import option
from alignkit.data.jsonl import atomic_open
from alignkit.errors import UserError

log = logging.getLogger(__name__)

POSITIONAL = "runs"  # `alignkit report a b` = `alignkit report runs=[a,b]` (see alignkit.cli)
EVAL_KIND = "alignkit.eval"
TABLE = [("method", "method"), ("point", "label"), ("gold", "gold"), ("proxy", "proxy"), ("KL", "kl"),
         ("distinct-2", "distinct2"), ("perplexity", "perplexity"), ("win (proxy)", "win_proxy"),
         ("win (judge)", "win_judge")]
OPTIONAL = {"win_proxy", "win_judge"}  # columns shown only when some point has them
ROLLOUT_WINDOW = 3  # rollout curves: trailing mean over this many logged steps


@dataclass(frozen=True)
class ReportConfig:
    runs: list[str] = option([], "Run directories to report on (also accepted as bare arguments)")
    output: str = option("report.html", "Where to write the HTML file")
    samples: int = option(4, "Before/after sample completions shown per run")
    title: str = option("alignkit report", "Title of the report")

    def validate(self):
        if self.samples < 0:
            raise UserError(f"samples must be >= 0, got {self.samples}")


@dataclass
class Run:
    path: Path
    curves: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)  # sorted by step, final last
    rm_eval: dict | None = None
    best_of_n: list[dict] | None = None
    name: str = ""  # the directory's name, or more of its path where two runs of a report share one (`as_runs`)
    label: str = ""  # the method as the report shows it; `as_runs` adds the name where two runs share a method

    def __post_init__(self):
        self.name = self.name or self.path.name

    @property
    def evaluated_method(self) -> str:
        """The `method` its evaluations name (eval's option), else the directory's name."""
        return next((e["method"] for e in reversed(self.evals) if e.get("method")), self.path.name)

    @property
    def method(self) -> str:
        return self.label or self.evaluated_method


def as_runs(items) -> list[Run]:
    """Runs from Runs or run directories; runs whose directories share a name (a/ppo, b/ppo) are named by as much
    of their paths as tells them apart, and runs that share a method are shown as "method (name)", so that the
    tables and plots keep them apart."""
    runs = [r if isinstance(r, Run) else load_run(r) for r in items]
    for run in runs:
        parts = run.path.resolve().parts
        others = [o.path.resolve().parts for o in runs if o is not run and o.path.name == run.path.name]
        k = 1
        while others and any(o[-k:] == parts[-k:] for o in others) and k < len(parts):
            k += 1
        run.name = "/".join(parts[-k:]) if others else run.path.name
    shared = Counter(run.evaluated_method for run in runs)
    for run in runs:
        method = run.evaluated_method
        run.label = method if shared[method] == 1 else f"{method} ({run.name})"
    return runs


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not readable JSON ({e}); fix or remove the file") from None


def read_curves(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl (a blank or half-written last line, from a run still going, is skipped)."""
    rows, lines = [], path.read_text().splitlines()
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if i < len(lines):
                raise UserError(f"{path}:{i}: not valid JSON; fix or remove the line") from None
            continue
        if not isinstance(row, dict):
            raise UserError(f"{path}:{i}: a metrics line must be a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def load_run(path: str | Path) -> Run:
    """Everything the report uses from one run directory."""
    run = Run(Path(path))
    if not run.path.is_dir():
        raise UserError(f"run directory not found: {path}")
    if (run.path / "metrics.jsonl").is_file():
        run.curves = read_curves(run.path / "metrics.jsonl")
    candidates = sorted((run.path / "eval").glob("*.json")) + [run.path / "eval.json"]
    for p in (p for p in candidates if p.is_file()):
        data = _read_json(p)
        if isinstance(data, dict) and data.get("kind") == EVAL_KIND:
            _check_eval(data, p)
            run.evals.append({**data, "file": str(p)})
        elif isinstance(data, dict) and "reliability" in data and p.name == "eval.json":
            run.rm_eval = data
    run.evals.sort(key=lambda e: (e.get("step") is None, e.get("step") or 0))
    summary = run.path / "summary.json"
    if summary.is_file() and isinstance(data := _read_json(summary), list) and data and "kl_analytic" in data[0]:
        run.best_of_n = data
    return run


PLOTTED = ("kl", "reward/gold", "reward/proxy", "text/distinct-2", "perplexity", "win_rate/proxy", "win_rate/judge")


def _check_eval(data: dict, path: Path) -> None:
    """What the report reads of an eval JSON: numbers (or null) for the plotted metrics, a step, the samples."""
    metrics = data.get("metrics")
    if not isinstance(metrics, dict):
        raise UserError(f"{path}: 'metrics' must be an object of numbers")
    for key in PLOTTED:
        value = metrics.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise UserError(f"{path}: metrics.{key} must be a number or null, got {value!r:.40}")
    step = data.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise UserError(f"{path}: 'step' must be an integer >= 0 or null, got {step!r:.40}")
    samples = data.get("samples", [])
    what = f"{path}: 'samples' must be a list of objects with a prompt and a completion (a string)"
    if not isinstance(samples, list):
        raise UserError(f"{what}; got {samples!r:.60}")
    for i, sample in enumerate(samples):
        if not (isinstance(sample, dict) and "prompt" in sample and isinstance(sample.get("completion"), str)):
            raise UserError(f"{what}; item {i} is {sample!r:.60}")


def _point(run: Run, e: dict) -> dict:
    m = e.get("metrics", {})
    label = "final" if e.get("step") is None else f"step {e['step']}"
    return {"method": run.method, "run": run.name, "label": label,
            "kl": m.get("kl"), "gold": m.get("reward/gold"), "proxy": m.get("reward/proxy"),
            "distinct2": m.get("text/distinct-2"), "perplexity": m.get("perplexity"),
            "win_proxy": m.get("win_rate/proxy"), "win_judge": m.get("win_rate/judge")}


def rollout_points(run: Run, window: int = ROLLOUT_WINDOW) -> list[dict]:
    """One point per logged RL step that has `kl`, `score_mean` (proxy) and `gold_mean`: trailing means over
    `window` steps of each (a rollout batch is a few samples), as a policy's training trajectory."""
    rows = [r for r in run.curves if all(isinstance(r.get(k), (int, float)) for k in ("kl", "score_mean", "gold_mean"))]
    out = []
    for i, r in enumerate(rows):
        recent = rows[max(0, i - window + 1) : i + 1]
        mean = {k: sum(x[k] for x in recent) / len(recent) for k in ("kl", "score_mean", "gold_mean")}
        out.append({"method": run.method, "run": run.name, "label": f"step {r.get('step', i + 1)}",
                    "kl": mean["kl"], "gold": mean["gold_mean"], "proxy": mean["score_mean"]})
    return out


def points(runs: list[Run]) -> list[dict]:
    """Every evaluated policy as a point, plus each reference (KL 0; left out when the same policy with the
    same score is a point of any run, e.g. the SFT run evaluated against itself) and best-of-N summaries."""
    out = []
    seen = {(e.get("policy"), e.get("metrics", {}).get("reward/gold")) for run in runs for e in run.evals}
    for run in runs:
        with_ref = [e for e in run.evals if "reference/reward/gold" in e.get("metrics", {})]
        key = (with_ref[0].get("reference"), with_ref[0]["metrics"]["reference/reward/gold"]) if with_ref else None
        if with_ref and key not in seen:
            seen.add(key)
            m = with_ref[0]["metrics"]
            out.append({"method": run.method, "run": run.name, "label": "reference", "kl": 0.0,
                        "gold": m["reference/reward/gold"], "proxy": m.get("reference/reward/proxy"),
                        "distinct2": m.get("reference/text/distinct-2"), "perplexity": None,
                        "win_proxy": None, "win_judge": None})
        out += [_point(run, e) for e in run.evals]
        for line in run.best_of_n or []:
            out.append({"method": f"best-of-N ({run.name})", "run": run.name, "label": f"N={line['n']}",
                        "kl": line["kl_analytic"], "gold": line.get("gold"), "proxy": line.get("reward"),
                        "distinct2": None, "perplexity": None, "win_proxy": None, "win_judge": None})
    return out


def mixed_gold(runs: list[Run]) -> str | None:
    """A note when the gold rewards of the evaluations and best-of-N summaries come from different judges (their
    values do not compare), else None. Each evaluation records its gold source in its config (`eval
    gold.judge=...`), a best-of-N summary in `gold_judge`. The report shows it in its summary and logs it as a
    warning."""
    judges: dict[str, list[str]] = {}
    for run in runs:
        for e in run.evals:
            gold = {k: v for k, v in ((e.get("config") or {}).get("gold") or {}).items() if v is not None}
            sources = [gold[k] for k in ("judge", "model", "function") if gold.get(k)]
            if sources:  # a single source by its spec (as best-of-N names it), else every setting
                name = _spec(sources[0]) if len(gold) == 1 else ", ".join(f"{k}={v}" for k, v in sorted(gold.items()))
                judges.setdefault(name, []).append(run.name)
        for line in run.best_of_n or []:
            if line.get("gold_judge"):
                judges.setdefault(_spec(line["gold_judge"]), []).append(run.name)
    if len(judges) < 2:
        return None
    return ("the gold rewards come from different judges, so they do not compare across runs: " + "; ".join(
        f"{name} ({', '.join(sorted(set(where)))})" for name, where in judges.items()))


def _spec(spec: str) -> str:
    """A judge spec as one name: a directory (a reward model) by its absolute path, anything else as written."""
    return str(Path(spec).resolve()) if Path(spec).is_dir() else spec


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def columns(pts: list[dict]) -> list[tuple[str, str]]:
    """The TABLE columns to show: all but the optional ones that no point has."""
    return [(name, key) for name, key in TABLE if key not in OPTIONAL or any(p[key] is not None for p in pts)]


def table_rows(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """The header and one row per point: method, point, gold, proxy, KL, distinct-2, perplexity, win rates."""
    pts = points(runs)
    cols = columns(pts)
    return [name for name, _ in cols], [[_fmt(p[key]) for _, key in cols] for p in pts]


def summary_table(runs) -> str:
    """The report's table as fixed-width text for the terminal; `runs` are Runs or run directories."""
    runs = as_runs(runs)
    header, body = table_rows(runs)
    rows = [header] + body
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- HTML

STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:4px 8px;
vertical-align:top;text-align:left}th{background:#f3f3f3}img{max-width:100%;display:block;margin:1em 0}
.num{text-align:right;font-variant-numeric:tabular-nums}.note{color:#666;font-size:13px}"""


def _img(fig, alt: str) -> str:
    from alignkit.eval.plots import png_base64

    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{png_base64(fig)}">'


def _table(header: list[str], rows: list[list[str]], numeric_from: int = 99) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td{" class=num" if i >= numeric_from else ""}>{html.escape(c)}</td>'
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _prompt_text(prompt) -> str:
    if isinstance(prompt, list):  # messages: the last user turn
        return next((m.get("content", "") for m in reversed(prompt) if m.get("role") == "user"), json.dumps(prompt))
    return str(prompt)


def _samples_html(run: Run, k: int) -> str:
    final = next((e for e in reversed(run.evals) if e.get("samples")), None)
    if final is None or k == 0:
        return ""
    rows = []
    for s in final["samples"][:k]:
        before = s.get("reference_completion", "-")
        gold_before, gold_after = _fmt(s.get("reference_gold")), _fmt(s.get("gold"))
        rows.append([_prompt_text(s["prompt"]), f"{before}\n[gold {gold_before}]",
                     f"{s['completion']}\n[gold {gold_after}]"])
    note = "before = the reference policy, after = the evaluated policy, on the same prompts"
    return (f"<h3>{html.escape(run.name)} ({html.escape(_point(run, final)['label'])})</h3>"
            f"<p class=note>{note}</p>" + _table(["prompt", "before", "after"], rows).replace("\n", "<br>"))


def _peaks_table(pts: list[dict]) -> str:
    from alignkit.eval.plots import gold_peaks

    return _table(["method", "gold reward peaks at", "KL", "gold"],
                  [[m, p["label"], _fmt(p["kl"]), _fmt(p["gold"])] for m, p in gold_peaks(pts).items()], 2)


def _sections(runs: list[Run], samples: int) -> list[str]:
    from alignkit.eval.plots import frontier, overoptimisation, reliability_plot, training_curves

    pts = points(runs)
    mixed = mixed_gold(runs)
    if mixed:
        log.warning("%s", mixed)
    out = ["<h2>Summary</h2>", *([f"<p><b>Warning:</b> {html.escape(mixed)}</p>"] if mixed else []),
           _table(*table_rows(runs), numeric_from=2)]
    curves = [(run, training_curves(run.name, run.curves)) for run in runs if run.curves]
    if curves:
        out.append("<h2>Training curves</h2>")
        out += [_img(fig, f"training curves of {run.name}") for run, fig in curves if fig is not None]
    if any(p["kl"] is not None and p["gold"] is not None for p in pts):
        out += ["<h2>Reward-KL frontier</h2>", "<p class=note>gold reward of each evaluated policy against its "
                "sample-based KL to the reference (nats per completion); KL 0 = the reference policy</p>",
                _img(frontier(pts), "reward-KL frontier"),
                "<h2>Over-optimisation</h2>", "<p class=note>gold (solid) and proxy (dashed) reward against "
                "sqrt(KL), as in Gao et al. 2022; the dotted line marks where gold reward peaks</p>",
                _img(overoptimisation(pts), "over-optimisation"),
                _peaks_table(pts)]
    trajectories = [p for run in runs for p in rollout_points(run)]
    if trajectories:
        out += ["<h2>Over-optimisation during training</h2>", "<p class=note>gold (solid) and proxy (dashed) "
                f"reward of each RL run's rollout batches against sqrt(sequence KL to the reference), step by step, "
                f"trailing means over {ROLLOUT_WINDOW} steps (training prompts, sampled at the rollout temperature); the "
                "dotted line marks where gold reward peaks</p>",
                _img(overoptimisation(trajectories, by_kl=False, title="over-optimisation during training"),
                     "over-optimisation during training"), _peaks_table(trajectories)]
    calibration = [(f"{r.name}: proxy RM vs gold", e["calibration"]["proxy"]["reliability"])
                   for r in runs for e in r.evals[-1:] if e.get("calibration", {}).get("proxy")]
    calibration += [(f"{r.name}: reward model, held-out pairs", r.rm_eval["reliability"])
                    for r in runs if r.rm_eval]
    if calibration:
        out.append("<h2>Calibration</h2>")
        out += [_img(reliability_plot(table, title), title) for title, table in calibration]
    sample_html = [_samples_html(run, samples) for run in runs]
    if any(sample_html):
        out += ["<h2>Samples before and after</h2>"] + [s for s in sample_html if s]
    return out


def write_report(run_dirs, out_path: str | Path = "report.html", samples: int = 4,
                 title: str = "alignkit report") -> Path:
    """Write the HTML report of `run_dirs` (paths or Runs) to `out_path`; returns the path."""
    runs = as_runs(run_dirs)
    listing = "".join(f"<li><code>{html.escape(str(r.path))}</code>: {len(r.curves)} logged steps, "
                      f"{len(r.evals)} evaluations</li>" for r in runs)
    body = "\n".join([f"<h1>{html.escape(title)}</h1>", f"<ul>{listing}</ul>", *_sections(runs, samples)])
    page = (f"<!DOCTYPE html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")
    with atomic_open(out_path) as f:
        f.write(page)
    return Path(out_path)


def run_report(cfg: ReportConfig) -> str:
    if not cfg.runs:
        raise UserError("name at least one run directory: alignkit report RUN_DIR [RUN_DIR ...]")
    runs = as_runs(cfg.runs)
    out = write_report(runs, cfg.output, cfg.samples, cfg.title)
    print(summary_table(runs))
    return str(out)
