"""Resumable checkpoints: trainable weights, optimiser, scheduler, fp16 loss scale and RNG states (the data
position follows from the step).

A checkpoint is written into `checkpoints/.tmp-step-N` and renamed to `checkpoints/step-N` only once
every file is on disk, so a run killed at any moment leaves either a whole checkpoint or none.
Only trainable parameters are stored (with LoRA: the adapter), which keeps checkpoints small.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from alignkit.errors import UserError
from alignkit.models.load import unwrap


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in unwrap(model).named_parameters() if p.requires_grad}


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith("step-") and (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(accelerator, run_dir: Path, step: int, model, optimizer, scheduler, keep: int, stage: str,
                    extra: dict | None = None) -> Path:
    """Write the checkpoint of `step` of a `stage` run (its name, e.g. "sft"); `extra` (JSON-able, e.g. an RL
    algorithm's adaptive beta) is stored in its `state.json` and handed back by `load_checkpoint`."""
    root = Path(run_dir) / "checkpoints"
    tmp, final = root / f".tmp-step-{step}", root / f"step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        save_file(_trainable_state(model), tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if accelerator.scaler is not None:  # fp16: the loss scale it has found
            torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"step": step, "stage": stage, "num_processes": accelerator.num_processes, "extra": extra or {}}
        (tmp / "state.json").write_text(json.dumps(state))
        if final.exists():  # a step-N without state.json (not a checkpoint: never loaded) is replaced
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, ckpt: Path, model, optimizer, scheduler, stage: str) -> tuple[int, dict]:
    """Restore everything saved by `save_checkpoint` into a `stage` run; returns the step to continue from and the
    `extra` state. A damaged checkpoint (a file truncated or missing, e.g. after a full disk) is a one-line error."""
    try:
        return _load(accelerator, ckpt, model, optimizer, scheduler, stage)
    except UserError:
        raise
    except Exception as e:  # json, safetensors, pickle and file errors alike
        reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]:.120}"
        raise UserError(f"{ckpt}: cannot resume from this checkpoint ({reason}); delete it to resume from the one "
                        "before") from None


def _load(accelerator, ckpt: Path, model, optimizer, scheduler, stage: str) -> tuple[int, dict]:
    state = json.loads((ckpt / "state.json").read_text())
    if state.get("stage", stage) != stage:
        raise UserError(f"{ckpt} is a checkpoint of a '{state['stage']}' run, not '{stage}'; pick another output_dir")
    if state["num_processes"] != accelerator.num_processes:
        raise UserError(
            f"{ckpt} was written by {state['num_processes']} process(es); resume with the same number "
            f"(now {accelerator.num_processes})"
        )
    weights = load_file(ckpt / "trainable.safetensors")
    params = dict(unwrap(model).named_parameters())
    missing = {n for n, p in params.items() if p.requires_grad} ^ set(weights)
    if missing:
        raise UserError(f"{ckpt}: checkpoint does not match the model (e.g. '{sorted(missing)[0]}'); check lora/model")
    for name, value in sorted(weights.items()):
        if value.shape != params[name].shape:
            raise UserError(f"{ckpt}: checkpoint does not match the model ('{name}' is {tuple(value.shape)} there, "
                            f"{tuple(params[name].shape)} here); check lora/model")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
    if accelerator.scaler is not None and (ckpt / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(torch.load(ckpt / "scaler.pt", weights_only=False))
    _set_rng_state(torch.load(ckpt / f"rng-{accelerator.process_index}.pt", weights_only=False))
    return int(state["step"]), state.get("extra", {})
