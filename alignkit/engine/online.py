"""The online loop: alternate a rollout with several epochs of minibatch updates, on the one engine.

Batch sizes, all in one place (PPO, GRPO, RLOO and REINFORCE alike):

    one step = one rollout batch = online.prompts_per_step x online.group_size responses
      │   (generate -> score -> reference/critic forward -> advantages)
      ├─ online.epochs passes; each pass shuffles the rollout into minibatches of train.batch_size
      │    responses, and each minibatch is one optimiser step (engine.train_step)
      │      └─ micro-batches of train.micro_batch_size responses per forward/backward (accumulation,
      │         loss normalised over the whole minibatch by the engine)
      └─ optimiser steps per step = online.epochs x rollout batch / train.batch_size

The engine's pieces are reused unchanged: `Engine.train_step` (accumulation, clipping, optimiser and
scheduler step), `make_optimizer`, `resume` / `begin`, `RunLogger`, `save_checkpoint`. A checkpoint is
taken between steps; the algorithm's own state (adaptive beta, moving baseline) is stored in it, and
the prompt order is a function of (seed, epoch), so a resumed run continues exactly where it stopped.

An online algorithm adds to the engine's protocol (units / prepare / loss):
    rollout(model, prompt_rows) -> (rows, metrics)   rows for the updates, metrics of the rollout
    after_update(metrics) -> dict                    e.g. the adaptive KL controller; extra metrics
    state_dict() / load_state_dict(d)                JSON-able state for resume
    probe, probing                                    max |logp(rollout) - logp(train)|, kept by loss() while probing
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from alignkit.config import option
from alignkit.engine.checkpoint import save_checkpoint
from alignkit.engine.logging import RunLogger
from alignkit.engine.loop import Engine, without_autocast
from alignkit.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OnlineConfig:
    steps: int = option(100, "Rollout-and-update steps to run (each is one rollout batch)")
    prompts_per_step: int = option(8, "Prompts sampled per rollout batch")
    group_size: int = option(1, "Responses per prompt (k; GRPO/RLOO need >= 2)")
    epochs: int = option(1, "Passes over each rollout batch (PPO: 4)")
    chat_template: bool = option(True, "Wrap prompts in the tokenizer's chat template")

    @property
    def rollout_size(self) -> int:
        return self.prompts_per_step * self.group_size

    def check(self, batch_size: int, processes: int = 1) -> None:
        for name in ("steps", "prompts_per_step", "group_size", "epochs"):
            if getattr(self, name) < 1:
                raise UserError(f"online.{name} must be >= 1, got {getattr(self, name)}")
        if self.prompts_per_step % processes:
            raise UserError(f"online.prompts_per_step ({self.prompts_per_step}) must be a multiple of the number of "
                            f"processes ({processes}): each samples an equal share of the prompts")
        if self.rollout_size % batch_size:
            raise UserError(f"the rollout batch (online.prompts_per_step x group_size = {self.rollout_size}) must be "
                            f"a multiple of train.batch_size ({batch_size}), the minibatch of one optimiser step")


def prompt_batch(rows: list, step: int, per_step: int, seed: int) -> list:
    """The prompts of `step` (1-based): epochs over a permutation seeded by (seed, epoch)."""
    per_epoch = len(rows) // per_step
    if per_epoch == 0:
        raise UserError(f"only {len(rows)} prompts, fewer than online.prompts_per_step ({per_step})")
    epoch, index = divmod(step - 1, per_epoch)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    return [rows[i] for i in order[index * per_step : (index + 1) * per_step]]


def update(engine: Engine, model, algorithm, rows: list, epochs: int, optimizer, scheduler, step: int) -> dict:
    """`epochs` shuffled passes of minibatch optimiser steps; returns the mean of their metrics."""
    size, totals, n = engine.cfg.batch_size, {}, 0
    algorithm.probe = None  # the first minibatch, before any update, records max |logp(rollout) - logp(train)|
    for epoch in range(epochs):
        g = torch.Generator().manual_seed(engine.cfg.seed * 1_000_003 + step * 1_009 + epoch)
        order = torch.randperm(len(rows), generator=g).tolist()
        for start in range(0, len(rows), size):
            algorithm.probing = n == 0
            metrics = engine.train_step(model, algorithm, [rows[i] for i in order[start : start + size]],
                                        optimizer, scheduler)
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            n += 1
    algorithm.probing = False
    out = {k: v / max(n, 1) for k, v in totals.items()}
    if algorithm.probe is not None:  # every process's first minibatch: the max over the processes
        probe = torch.tensor(algorithm.probe, device=engine.accelerator.device)
        if engine.accelerator.num_processes > 1:
            torch.distributed.all_reduce(probe, op=torch.distributed.ReduceOp.MAX)
        out["logp_diff_max"] = float(probe)
    return out


def fit_online(engine: Engine, model, algorithm, prompt_rows: list, online: OnlineConfig, config: dict | None = None,
               desc: str = "rl"):
    """Run `online.steps` rollout-and-update steps; returns the unwrapped model."""
    cfg, acc = engine.cfg, engine.accelerator
    online.check(cfg.batch_size, acc.num_processes)
    model.train()
    updates = online.steps * online.epochs * online.rollout_size // cfg.batch_size  # optimiser steps in the run
    optimizer, scheduler = engine.make_optimizer(model, updates)
    model, optimizer = acc.prepare(model, optimizer)
    start, state = engine.resume(model, optimizer, scheduler, desc, online.steps, "online.steps")
    if start:
        algorithm.load_state_dict(state)
    engine.begin(config, start)
    with RunLogger(acc, engine.run_dir, online.steps, start, desc) as logger:
        for step in range(start + 1, online.steps + 1):
            prompts = prompt_batch(prompt_rows, step, online.prompts_per_step, cfg.seed)
            with acc.autocast():  # sampling, reference and value forwards in the training's precision
                rows, metrics = algorithm.rollout(model, prompts)
            if rows:
                metrics.update(update(engine, model, algorithm, rows, online.epochs, optimizer, scheduler, step))
            metrics.update(algorithm.after_update(metrics))
            logger.count_tokens(metrics.pop("tokens_seen", 0))
            if step % cfg.log_every == 0 or step == online.steps:
                logger.log(step, metrics)
            if cfg.save_every and step % cfg.save_every == 0 and step < online.steps:
                with logger.paused():
                    save_checkpoint(acc, engine.run_dir, step, model, optimizer, scheduler, cfg.keep_checkpoints,
                                    desc, algorithm.state_dict())
            logger.advance()
    return without_autocast(acc.unwrap_model(model))
