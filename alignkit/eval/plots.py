"""The report's figures, drawn with matplotlib's object API on the Agg canvas (no pyplot, no display) and
returned as base64 PNG text for `<img src="data:image/png;base64,...">`.

A point (one evaluated policy) is a dict with `method`, `label`, `kl`, `gold`, `proxy` (None when absent).
"""

from __future__ import annotations

import base64
import io
import math

# What each training-curve panel shows: the first group of keys that a run logged (RunLogger's metrics.jsonl:
# RL score_mean/gold_mean/kl/entropy, DPO rewards/margin, KTO rewards/chosen and rewards/rejected, SFT/DPO loss
# and eval/loss, the engine's lr). Keys of one group share a scale (RL's `kl` is per sequence, `approx_kl` per
# token: never in one panel).
PANELS = {
    "reward": [["score_mean", "gold_mean"], ["rewards/margin", "eval/rewards/margin"],
               ["rewards/chosen", "rewards/rejected", "eval/rewards/chosen", "eval/rewards/rejected"], ["reward"]],
    "KL (nats)": [["kl"], ["approx_kl"]],
    "entropy (nats)": [["entropy", "entropy_sampled"]],
    "loss": [["loss", "eval/loss"]],
    "learning rate": [["lr"]],
}
MARKERS = "osD^vP*Xh<>"


def new_figure(width: float = 6.0, height: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_base64(fig) -> str:
    """The figure as base64 PNG text."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def training_curves(name: str, rows: list[dict]):
    """One panel per PANELS entry that the run logged (curves against the step); None when nothing to plot."""
    def logged(key):
        return any(isinstance(r.get(key), (int, float)) for r in rows)

    panels = {title: next(([k for k in g if logged(k)] for g in groups if any(map(logged, g))), [])
              for title, groups in PANELS.items()}
    panels = {t: k for t, k in panels.items() if k}
    if not panels:
        return None
    fig = new_figure(3.2 * len(panels), 2.8)
    for ax, (title, keys) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels.items()):
        for key in keys:
            xy = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "step" in r]
            ax.plot([x for x, _ in xy], [y for _, y in xy], marker="." if len(xy) < 30 else None, label=key)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(name, fontsize=11)
    return fig


def _by_method(points: list[dict], key: str, by_kl: bool = True) -> dict[str, list[dict]]:
    """Points with `kl` and `key`, grouped by method; in order of KL, or as given (a training trajectory)."""
    out: dict[str, list[dict]] = {}
    for p in points:
        if p.get("kl") is not None and p.get(key) is not None:
            out.setdefault(p["method"], []).append(p)
    return {m: sorted(ps, key=lambda p: p["kl"]) if by_kl else ps for m, ps in out.items()}


def gold_peaks(points: list[dict]) -> dict[str, dict]:
    """Per method, the point with the highest gold reward (the first of equals, in order of KL)."""
    return {method: max(ps, key=lambda p: p["gold"]) for method, ps in _by_method(points, "gold").items()}


def frontier(points: list[dict]):
    """Gold reward (y) against KL to the reference (x), one marker per evaluated policy, a line per method."""
    fig = new_figure()
    ax = fig.subplots()
    for i, (method, ps) in enumerate(_by_method(points, "gold").items()):
        ax.plot([p["kl"] for p in ps], [p["gold"] for p in ps], marker=MARKERS[i % len(MARKERS)], label=method)
        for p in ps:
            ax.annotate(p["label"], (p["kl"], p["gold"]), fontsize=6, alpha=0.7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xlabel("KL(policy || reference), nats per completion")
    ax.set_ylabel("gold reward")
    ax.set_title("reward-KL frontier")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def overoptimisation(points: list[dict], by_kl: bool = True, title: str = "over-optimisation: gold vs proxy reward"):
    """Gold (solid) and proxy (dashed) reward against sqrt(KL) per method, as in Gao et al. 2022 ("Scaling
    laws for reward model overoptimization"); a dotted vertical line marks the KL where gold reward peaks.
    `by_kl=False` joins the points in the order given (steps of a training run) instead of by KL."""
    fig = new_figure(7.0, 4.2)
    ax = fig.subplots()
    for i, (method, ps) in enumerate(_by_method(points, "gold", by_kl).items()):
        x = [math.sqrt(max(p["kl"], 0.0)) for p in ps]
        line, = ax.plot(x, [p["gold"] for p in ps], marker=MARKERS[i % len(MARKERS)], label=f"{method}: gold")
        proxy = [(xi, p["proxy"]) for xi, p in zip(x, ps) if p.get("proxy") is not None]
        if proxy:
            ax.plot([a for a, _ in proxy], [b for _, b in proxy], linestyle="--", color=line.get_color(),
                    marker=MARKERS[i % len(MARKERS)], fillstyle="none", label=f"{method}: proxy")
        best = ps.index(gold_peaks(ps)[method])
        ax.axvline(x[best], linestyle=":", color=line.get_color(), alpha=0.8)
        ax.annotate(f"gold peaks at KL={max(ps[best]['kl'], 0.0):.3g}", (x[best], ps[best]["gold"]), fontsize=7,
                    color=line.get_color(), xytext=(4, -12), textcoords="offset points")
    ax.set_xlabel("sqrt(KL(policy || reference)), sqrt(nats)")
    ax.set_ylabel("reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def reliability_plot(table: dict, title: str):
    """Reliability diagram of a `eval.reward.reliability` table: accuracy against confidence per bin, the
    diagonal (perfect calibration), and the share of predictions in each bin as bars."""
    fig = new_figure(4.5, 4.0)
    ax = fig.subplots()
    low = table.get("low", 0.5)
    bins = len(table["count"])
    width = (1 - low) / bins
    centers = [low + (i + 0.5) * width for i in range(bins)]
    total = max(sum(table["count"]), 1)
    ax.bar(centers, [c / total for c in table["count"]], width=width * 0.9, alpha=0.25, color="gray",
           label="share of predictions")
    xy = [(c, a) for c, a in zip(table["confidence"], table["accuracy"]) if c is not None]
    ax.plot([low, 1], [low, 1], linestyle="--", color="black", linewidth=1, label="perfect calibration")
    ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label="observed")
    ax.set_xlim(low, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return fig
