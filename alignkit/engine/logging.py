"""Run logging: a progress bar, `metrics.jsonl` in the run directory, and accelerate's trackers."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import time
from pathlib import Path

from tqdm.auto import tqdm

from alignkit.data.jsonl import atomic_open, finite_json
from alignkit.errors import UserError

log = logging.getLogger(__name__)

TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def resolve_trackers(report_to: list[str]) -> list[str]:
    """`auto` means TensorBoard when it is installed; an explicitly named tracker must be installed."""
    out = []
    for name in report_to:
        if name == "auto":
            if importlib.util.find_spec("tensorboard") is not None:
                out.append("tensorboard")
        elif importlib.util.find_spec(TRACKER_MODULES[name]) is None:
            raise UserError(f"train.report_to names '{name}' but it is not installed (pip install {name})")
        else:
            out.append(name)
    return sorted(set(out))


def _plain(v):
    return v.item() if hasattr(v, "item") else v


class RunLogger:
    """Writes one JSON line per logged step (main process only) and drives the progress bar.

    On resume, lines for steps after the checkpoint are dropped so the file reads as one clean run.
    A context manager: leaving the block (also on an error) closes the bar and the trackers, so an error
    message starts on a line of its own.
    """

    def __init__(self, accelerator, run_dir: Path, total_steps: int, start_step: int, desc: str):
        self.acc = accelerator
        self.path = Path(run_dir) / "metrics.jsonl"
        if accelerator.is_main_process and self.path.exists():
            kept = [line for line, row in self._rows() if row.get("step", 0) <= start_step]
            with atomic_open(self.path) as f:
                f.write("".join(line + "\n" for line in kept))
        self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, disable=not accelerator.is_main_process)
        self.t_last, self.tokens = time.perf_counter(), 0

    def _rows(self) -> list[tuple[str, dict]]:
        """(line, parsed row) of the file's JSON lines; blank lines and lines that do not parse (a write cut short
        by a full disk or a crash) are dropped, with a warning."""
        good, bad = [], []
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if isinstance(row, dict):
                good.append((line, row))
            else:
                bad.append(number)
        if bad:
            log.warning("%s: dropped %d unreadable line(s) (first: line %d)", self.path, len(bad), bad[0])
        return good

    def count_tokens(self, n: int) -> None:
        self.tokens += n

    @contextlib.contextmanager
    def paused(self):
        """A block (held-out evaluation, a checkpoint) whose time is not training time: left out of tokens_per_s."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.t_last += time.perf_counter() - start

    def log(self, step: int, metrics: dict) -> None:
        metrics = {k: _plain(v) for k, v in metrics.items()}
        now = time.perf_counter()
        if "loss" in metrics:  # training step: add throughput since the last training log
            metrics["tokens_per_s"] = self.tokens / max(now - self.t_last, 1e-9)
            self.t_last, self.tokens = now, 0
        if self.acc.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps(finite_json({"step": step, **metrics})) + "\n")  # NaN: null
            short = {k: metrics[k] for k in ("loss", "score_mean", "kl", "lr", "tokens_per_s", "eval/loss")
                     if k in metrics}
            if short:
                self.bar.set_postfix({k: f"{v:.3g}" for k, v in short.items()}, refresh=False)
        self.acc.log(metrics, step=step)

    def advance(self) -> None:
        self.bar.update(1)

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        for tracker in self.acc.trackers:  # not `end_training()`: that also ends the process group, which the
            tracker.finish()  # stage still needs (it saves the model between two barriers)
