"""The one training loop. It owns the optimiser step, accumulation, clipping, scheduling,
checkpointing, logging and distribution; algorithms only turn rows into a loss.

An algorithm is any object with
    units(row) -> int                        loss units in one row (target tokens, pairs, ...)
    prepare(rows) -> dict[str, Tensor]       collate rows into one micro-batch
    loss(model, batch, normaliser) -> (loss, metrics)   summed loss / normaliser
and optionally `eval_metrics(mean_loss) -> dict`, and `batch_inputs(model, micro_batches) -> dict[str, Tensor]`:
per-row values (no gradient) that every micro-batch's loss reads for the whole global batch, joined over the
micro-batches and processes and added to each batch (KTO's reference point is their mean).

Normalisation: the loss of every micro-batch is divided by the number of units in the whole global
batch (divided by the number of processes, because DDP averages gradients). So 4 micro-batches of 2,
1 batch of 8, or 2 processes x 4 rows all give the gradient of one batch of 8 (per-token mean).
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from transformers import get_scheduler

from alignkit.config import flatten, save_config
from alignkit.data.jsonl import check_output
from alignkit.engine.checkpoint import checkpoint_dirs, load_checkpoint, save_checkpoint
from alignkit.engine.config import TrainConfig
from alignkit.engine.logging import RunLogger, resolve_trackers
from alignkit.errors import UserError
from alignkit.models.load import cpu_processes

log = logging.getLogger(__name__)

# torch deprecates `broadcast_buffers` for `forward_sync_buffers`, which accelerate's DDP kwargs cannot pass yet; the
# warning itself says to keep `broadcast_buffers=False` for now (printed by every process of every DDP run)
warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)


# The settings that place a step in the data (the batches of an epoch, the prompts of an RL step follow from the
# step number, the seed and these): a resumed run keeps them, or it would skip or repeat rows.
POSITION_KEYS = ("train.batch_size", "train.seed", "online.prompts_per_step")


def resolve_precision(name: str) -> str:
    if name == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return "no" if name == "fp32" else name


def add_metrics(sums: dict, metrics: dict) -> None:
    """Add one micro-batch's `metrics` into `sums`. A metric is a number (summed over micro-batches), or a
    tuple (numerator, denominator), a mean over the rows it counts, whose two parts are summed apart."""
    for k, v in metrics.items():
        parts = [float(x) for x in (v if isinstance(v, tuple) else (v,))]
        sums[k] = [a + b for a, b in zip(sums.get(k, [0.0] * len(parts)), parts)]


def total_metrics(sums: dict) -> dict:
    """The metrics of `add_metrics`' sums; a mean that counted no row is left out (not logged as 0)."""
    return {k: v[0] if len(v) == 1 else v[0] / v[1] for k, v in sums.items() if len(v) == 1 or v[1]}


def chunks(rows: list, size: int) -> list[list]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def without_autocast(model):
    """`model` with its class's forward again: accelerate's `prepare` sets an instance `forward` that runs under the
    training's autocast, and what a stage does with the trained model next (a reward model's normalisation, DPO's KL
    estimate) runs in its own precision. (`unwrap_model(keep_fp32_wrapper=False)` also strips transformers' own
    decorators of forward, e.g. `return_dict=False`'s.)"""
    for name in ("forward", "_original_forward"):
        model.__dict__.pop(name, None)
    return model


class Engine:
    """`results`: the files a stage writes into the run directory after training, besides `model/` and `adapter/`
    (e.g. a reward model's eval.json). All of them are removed when training starts, so that a run killed after a
    resume never shows the results of the run it resumed."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, results: tuple[str, ...] = ()):
        check_output(run_dir, directory=True)  # before any work: not after a DPO reference pass, say
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.results = ("model", "adapter", *results)
        trackers = resolve_trackers(cfg.report_to)
        AcceleratorState._reset_state()  # each engine its own precision (accelerate keeps one per process)
        # No buffer broadcast at each DDP forward: our models' buffers (rotary frequencies, position ids) never change,
        # and the broadcast is a collective, so processes that run different numbers of forwards (an evaluation share
        # left empty, a reward model's forward chunks) waited on each other for good.
        self.accelerator = Accelerator(
            mixed_precision=resolve_precision(cfg.precision), log_with=trackers or None, project_dir=self.run_dir,
            cpu=cpu_processes(), kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
        )
        if cfg.precision == "fp16" and self.accelerator.device.type == "cpu":  # accelerate would run fp32 silently
            raise UserError("train.precision=fp16 needs a GPU (on a CPU it would run in fp32); use bf16 or fp32")
        world = self.accelerator.num_processes
        if cfg.batch_size % (cfg.micro_batch_size * world):
            raise UserError(
                f"train.batch_size ({cfg.batch_size}) must be a multiple of train.micro_batch_size x processes "
                f"({cfg.micro_batch_size} x {world})"
            )
        self.accumulation = cfg.batch_size // (cfg.micro_batch_size * world)
        # On a CPU, deterministic algorithms make a seed give the same run (at no cost measured here): the
        # backward of indexing (e.g. a group's shared prompt cache) otherwise sums rows in thread order.
        # On a GPU torch's default stays (determinism there costs speed and needs cuBLAS settings).
        # Each process its own seed (seed + rank; one process: the seed), so that processes sampling RL rollouts
        # draw independent samples; weights initialised at random (LoRA, heads) are rank 0's, which DDP
        # broadcasts when the model is prepared.
        set_seed(cfg.seed, device_specific=True, deterministic=self.accelerator.device.type == "cpu")

    # ---- one optimiser step -------------------------------------------------------------------
    def _my_rows(self, rows: list) -> list:
        """This process's share of a global batch (contiguous slices, in rank order)."""
        acc = self.accelerator
        per = math.ceil(len(rows) / acc.num_processes)
        return rows[acc.process_index * per : (acc.process_index + 1) * per]

    def accumulate(self, model, algorithm, rows: list) -> tuple[torch.Tensor, dict]:
        """Forward and backward over this process's micro-batches of the global batch `rows`.

        Gradients are left in `.grad`; returns the global mean loss and the metrics of all processes
        (`combined`). A process whose share is empty (a batch of fewer rows than processes, e.g. after GRPO
        dropped groups) runs one row at weight 0, so that it joins the gradient all-reduce.
        """
        acc = self.accelerator
        normaliser = max(sum(algorithm.units(r) for r in rows), 1) / acc.num_processes
        mine = self._my_rows(rows)
        micro = self._prepared(algorithm, chunks(mine or rows[:1], self.cfg.micro_batch_size))
        shared = self._whole_batch(model, algorithm, micro, bool(mine))
        total, metrics = torch.zeros((), device=acc.device), {}
        for j, batch in enumerate(micro):
            sync = contextlib.nullcontext() if j == len(micro) - 1 else acc.no_sync(model)
            with sync, acc.autocast():
                loss, m = algorithm.loss(model, {**batch, **shared}, normaliser)
                loss = loss if mine else loss * 0.0
                acc.backward(loss)
            total += loss.detach()
            if mine:
                add_metrics(metrics, m)
        return acc.reduce(total, "mean"), self.combined(metrics)

    def _prepared(self, algorithm, parts: list) -> list[dict]:
        return [{k: v.to(self.accelerator.device) for k, v in algorithm.prepare(part).items()} for part in parts]

    @torch.no_grad()
    def _whole_batch(self, model, algorithm, micro: list[dict], counted: bool = True) -> dict:
        """What a loss reads from the whole global batch rather than its micro-batch (KTO's reference point):
        the algorithm's `batch_inputs` over this process's micro-batches, joined over the processes (a process
        whose rows are not `counted`, the weight-0 row of an empty share, adds none). {} for other algorithms."""
        if not hasattr(algorithm, "batch_inputs"):
            return {}
        with self.accelerator.autocast():
            local = algorithm.batch_inputs(model, micro)  # name -> (rows, ...) tensor
        local = {k: v if counted else v[:0] for k, v in local.items()}
        if self.accelerator.num_processes == 1:
            return local
        parts: list = [None] * self.accelerator.num_processes
        torch.distributed.all_gather_object(parts, {k: v.cpu() for k, v in local.items()})
        return {k: torch.cat([p[k] for p in parts]).to(self.accelerator.device) for k in local}

    def combined(self, sums: dict) -> dict:
        """The metrics of `add_metrics`' sums over every process: a (numerator, denominator) metric sums both
        parts, `tokens_seen` adds up, and any other number, a sum over a process's rows divided by its share
        of the global normaliser, is averaged over the processes."""
        acc = self.accelerator
        if acc.num_processes > 1:
            parts: list = [None] * acc.num_processes
            torch.distributed.all_gather_object(parts, sums)
            sums = {}
            for part in parts:
                add_metrics(sums, {k: tuple(v) if len(v) == 2 else v[0] for k, v in part.items()})
            sums = {k: v if len(v) == 2 or k == "tokens_seen" else [v[0] / acc.num_processes] for k, v in sums.items()}
        return total_metrics(sums)

    def train_step(self, model, algorithm, rows, optimizer, scheduler) -> dict:
        loss, metrics = self.accumulate(model, algorithm, rows)
        out = {"loss": loss.item(), "lr": scheduler.get_last_lr()[0]}
        if self.cfg.max_grad_norm is not None:
            params = [p for p in model.parameters() if p.requires_grad]
            out["grad_norm"] = float(self.accelerator.clip_grad_norm_(params, self.cfg.max_grad_norm))
        # fp16's loss scaler skips steps whose gradients overflow (and lowers its scale): those are expected
        checked = ("loss",) if self.accelerator.scaler is not None else ("loss", "grad_norm")
        bad = {k: out[k] for k in checked if k in out and not math.isfinite(out[k])}
        if bad:  # the optimiser step would write NaN into every weight; stop before it
            raise UserError(f"non-finite {', '.join(f'{k} ({v})' for k, v in bad.items())} at optimiser step "
                            f"{scheduler.last_epoch + 1}: stopped before updating the weights; lower train.lr "
                            "or check the data and the reward for NaN or inf")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return {**metrics, **out}

    @torch.no_grad()
    def evaluate(self, model, algorithm, rows: list) -> dict:
        """Mean loss over `rows` (normalised over all of them, like one big batch), plus extras."""
        was_training = model.training
        model.eval()
        normaliser = max(sum(algorithm.units(r) for r in rows), 1) / self.accelerator.num_processes
        total, sums = torch.zeros((), device=self.accelerator.device), {}
        micro = self._prepared(algorithm, chunks(self._my_rows(rows), self.cfg.micro_batch_size))
        shared = self._whole_batch(model, algorithm, micro)
        for batch in micro:
            with self.accelerator.autocast():
                loss, metrics = algorithm.loss(model, {**batch, **shared}, normaliser)
            total += loss.float()
            add_metrics(sums, {k: v for k, v in metrics.items() if k != "tokens_seen"})
        model.train(was_training)
        mean = self.accelerator.reduce(total, "mean").item()
        extra = {**self.combined(sums), **(algorithm.eval_metrics(mean) if hasattr(algorithm, "eval_metrics") else {})}
        return {"eval/loss": mean, **{f"eval/{k}": v for k, v in extra.items()}}

    # ---- the whole run --------------------------------------------------------------------------
    def batches(self, n_rows: int, epoch: int) -> list[list[int]]:
        """Global batches of one epoch: a permutation seeded by (seed, epoch); the last partial batch is dropped."""
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        order = torch.randperm(n_rows, generator=g).tolist()
        bs = self.cfg.batch_size
        return [order[i : i + bs] for i in range(0, n_rows - bs + 1, bs)]

    def make_optimizer(self, model, total_steps: int):
        cfg = self.cfg
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise UserError("the model has no trainable parameters")
        # the fused kernel: one pass over all parameters (on a 2-core CPU, 6x faster than the default
        # per-tensor loop for a 5M-parameter model; the same update up to float rounding)
        fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
        # weight decay on matrices only: biases and norm weights (1-D) are not decayed, as in transformers' Trainer
        groups = [{"params": [p for p in params if p.dim() >= 2]},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay, fused=fused or None,
        )
        name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.schedule]
        warmup = math.ceil(cfg.warmup_ratio * total_steps)  # rounded up, as transformers' Trainer
        scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
        return optimizer, scheduler

    def resume(self, model, optimizer, scheduler, stage: str, last: int, last_key: str) -> tuple[int, dict]:
        """With `train.resume`, restore the latest checkpoint of this `stage`'s run: (its step, its extra state);
        else (0, {}). `last` is the run's last step, set by the config key `last_key`."""
        if not self.cfg.resume:
            return 0, {}
        ckpts = checkpoint_dirs(self.run_dir)
        if not ckpts:
            if (self.run_dir / "model").exists():
                raise UserError(f"train.resume: {self.run_dir} holds a finished model and no checkpoint to continue "
                                "from (train.save_every was 0); pick another output_dir")
            log.info("train.resume: no checkpoint in %s yet; starting from step 0", self.run_dir)
            return 0, {}
        step, extra = load_checkpoint(self.accelerator, ckpts[-1], model, optimizer, scheduler, stage)
        if step > last:
            raise UserError(f"{ckpts[-1]} is step {step}, past the run's last step {last} ({last_key}); set it to "
                            f"{step} or more, or pick another output_dir")
        self._config_hyperparameters(optimizer, scheduler)
        log.info("resumed from %s (step %d)", ckpts[-1], step)
        return step, extra

    def _config_hyperparameters(self, optimizer, scheduler) -> None:
        """The optimiser's and scheduler's states restore their hyperparameters too; a resumed run uses its own
        train.lr, adam_betas, adam_eps and weight_decay (the moments and the schedule's position are kept)."""
        cfg = self.cfg
        for group in optimizer.param_groups:
            group.update(initial_lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                         weight_decay=cfg.weight_decay)
        scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
        scheduler.last_epoch -= 1
        scheduler.step()  # the current step's learning rate from the new base

    def begin(self, config: dict | None, start: int) -> None:
        """Once the run can start (from step `start` + 1; a resumed run's checkpoint has loaded): write the run's
        `config.yaml` (a resumed run may not change `POSITION_KEYS`), remove the results of an earlier finish and
        what a killed save left (temp dirs), and start the trackers (TensorBoard: run_dir/alignkit, hiding what
        the run logged after its checkpoint, as metrics.jsonl drops it)."""
        if self.accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(config or {}, self.run_dir / "config.yaml", POSITION_KEYS if start else ())
            leftovers = [*self.run_dir.glob(".*.tmp-*"), *self.run_dir.glob(".*.old"),
                         *self.run_dir.glob("checkpoints/.tmp-step-*")]
            for path in [self.run_dir / name for name in self.results] + leftovers:
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        self.accelerator.wait_for_everyone()
        self.accelerator.init_trackers("alignkit", config=_flat(config or {}),
                                       init_kwargs={"tensorboard": {"purge_step": start + 1}} if start else {})

    def steps_per_epoch(self, n_rows: int) -> int:
        """Optimiser steps in one pass over `n_rows` training rows; fewer rows than one batch is an error (stages
        with costly work before `fit`, such as DPO's reference log-probs, call this first)."""
        if n_rows < self.cfg.batch_size:
            raise UserError(f"only {n_rows} training rows, fewer than train.batch_size ({self.cfg.batch_size})")
        return n_rows // self.cfg.batch_size

    def fit(self, model, algorithm, train_rows: list, eval_rows: list | None = None, config: dict | None = None,
            desc: str = "train"):
        """Train `model` on `train_rows`; returns the (unwrapped-able) model and the last eval metrics."""
        cfg, acc = self.cfg, self.accelerator
        steps_per_epoch = self.steps_per_epoch(len(train_rows))
        total = cfg.max_steps or cfg.epochs * steps_per_epoch
        model.train()
        optimizer, scheduler = self.make_optimizer(model, total)
        model, optimizer = acc.prepare(model, optimizer)
        start, _ = self.resume(model, optimizer, scheduler, desc, total,
                               "train.max_steps" if cfg.max_steps else "train.epochs x steps per epoch")
        self.begin(config, start)
        with RunLogger(acc, self.run_dir, total, start, desc) as logger:
            eval_metrics = {}
            for step in range(start + 1, total + 1):
                epoch, index = divmod(step - 1, steps_per_epoch)
                rows = [train_rows[i] for i in self.batches(len(train_rows), epoch)[index]]
                metrics = self.train_step(model, algorithm, rows, optimizer, scheduler)
                logger.count_tokens(metrics.pop("tokens_seen", 0))
                if step % cfg.log_every == 0 or step == total:
                    logger.log(step, {"epoch": epoch + (index + 1) / steps_per_epoch, **metrics})
                if eval_rows and (step == total or (cfg.eval_every and step % cfg.eval_every == 0)):
                    with logger.paused():
                        eval_metrics = self.evaluate(model, algorithm, eval_rows)
                    logger.log(step, eval_metrics)
                if cfg.save_every and step % cfg.save_every == 0 and step < total:
                    with logger.paused():
                        save_checkpoint(acc, self.run_dir, step, model, optimizer, scheduler, cfg.keep_checkpoints,
                                        desc)
                logger.advance()
        return without_autocast(acc.unwrap_model(model)), eval_metrics


def _flat(d: dict) -> dict:
    """A nested config as tracker hyperparameters: dotted keys, plain values (anything else as text)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten(d).items()}
