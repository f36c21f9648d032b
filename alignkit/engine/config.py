"""The training engine's settings, shared by every stage (SFT, reward model, DPO, PPO, ...)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from alignkit.config import check_interval, option
from alignkit.errors import UserError


@dataclass(frozen=True)
class TrainConfig:
    """Batch sizes, in one place:

        batch_size (rows per optimiser step, all processes together)
          = micro_batch_size (rows per forward pass, per process)
          x num_processes
          x accumulation (derived: micro-batches per process per step)
    """

    batch_size: int = option(8, "Rows per optimiser step, summed over all processes (the global batch)")
    micro_batch_size: int = option(8, "Rows per forward/backward pass on one process")
    epochs: int = option(1, "Passes over the training data (ignored when max_steps is set)")
    max_steps: int | None = option(None, "Optimiser steps to run; null = epochs x steps per epoch")
    lr: float = option(1e-5, "Peak learning rate of AdamW")
    weight_decay: float = option(0.0, "AdamW decoupled weight decay (of weight matrices; not of biases and norms)")
    adam_betas: list[float] = option([0.9, 0.999], "AdamW (beta1, beta2)")
    adam_eps: float = option(1e-8, "AdamW epsilon")
    schedule: Literal["cosine", "linear", "constant"] = option("cosine", "Learning-rate decay after warm-up")
    warmup_ratio: float = option(0.1, "Share of the steps spent warming the learning rate up from 0 (rounded up)")
    max_grad_norm: float | None = option(1.0, "Clip the global gradient norm to this; null = no clipping")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "auto", "Mixed precision: auto = bf16 on a GPU that supports it, fp32 on a CPU"
    )
    seed: int = option(0, "Seed for data order, initialisation and sampling")
    save_every: int = option(0, "Write a resumable checkpoint every N steps (0 = none before the end)")
    keep_checkpoints: int = option(2, "How many recent checkpoints to keep on disk (0 = all)")
    eval_every: int = option(0, "Evaluate on held-out data every N steps (0 = only at the end)")
    log_every: int = option(1, "Log metrics every N steps")
    resume: bool = option(False, "Continue from the latest checkpoint in the output directory")
    report_to: list[str] = option(
        ["auto"], "Trackers: tensorboard, wandb, mlflow; auto = tensorboard when installed; [] = none"
    )

    def validate(self):
        for name in ("batch_size", "micro_batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise UserError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.micro_batch_size:
            raise UserError(
                f"train.batch_size ({self.batch_size}) must be a multiple of train.micro_batch_size "
                f"({self.micro_batch_size})"
            )
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError(f"train.max_steps must be >= 1 or null, got {self.max_steps}")
        check_interval("train.warmup_ratio", self.warmup_ratio, 0, 1, "[)")
        check_interval("train.lr", self.lr, 0, math.inf, "()")
        check_interval("train.adam_eps", self.adam_eps, 0, math.inf, "()")
        check_interval("train.weight_decay", self.weight_decay, 0, math.inf, "[)")
        if self.max_grad_norm is not None:
            check_interval("train.max_grad_norm", self.max_grad_norm, 0, math.inf, "()")
        check_interval("train.seed", self.seed, 0, 2**32 - 1)
        check_interval("train.log_every", self.log_every, 1, None)
        for name in ("save_every", "eval_every", "keep_checkpoints"):
            check_interval(f"train.{name}", getattr(self, name), 0, None)
        if len(self.adam_betas) != 2:
            raise UserError(f"train.adam_betas needs two numbers, got {self.adam_betas}")
        for beta in self.adam_betas:
            check_interval("train.adam_betas", beta, 0, 1, "[)")
        unknown = set(self.report_to) - {"auto", "tensorboard", "wandb", "mlflow"}
        if unknown:
            raise UserError(f"train.report_to: unknown tracker(s) {sorted(unknown)}; use tensorboard, wandb, mlflow")
