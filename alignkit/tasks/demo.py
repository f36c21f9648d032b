"""`alignkit demo` (the README's main job): the pipeline on the embedded SmolLM2-135M-Instruct.

So far: build the review data -> sample before -> SFT with LoRA -> sample after, printed side by side.
Each stage is skipped when its output already exists; `--fresh` starts over.
"""

from __future__ import annotations

import json
import shutil
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from alignkit.config import option
from alignkit.engine.config import TrainConfig
from alignkit.models.load import LoraConfig, ModelConfig, load_causal_lm, load_tokenizer


@dataclass(frozen=True)
class DemoConfig:
    model: str = option("smollm2", "Base policy: 'smollm2' (embedded) or any HF directory / hub name")
    output_dir: str = option("runs/demo", "Where every stage writes its outputs")
    fresh: bool = option(False, "Delete output_dir first and run every stage again")
    sft_steps: int = option(24, "SFT optimiser steps (batch 8, LoRA)")
    lora_r: int = option(16, "LoRA rank used by the demo's training stages")
    sft_lr: float = option(3e-4, "SFT learning rate (LoRA)")
    samples: int = option(4, "Held-out prompts to show before/after")
    max_new_tokens: int = option(48, "Longest sample")
    seed: int = option(0, "Seed for data order and sampling")


def _samples(model_path: str, prompts: list[dict], cfg: DemoConfig, out: Path, desc: str) -> list[dict]:
    from alignkit.data.jsonl import write_jsonl
    from alignkit.rollout.generate import SamplingConfig
    from alignkit.rollout.stage import sample_rows

    if out.exists():
        return [json.loads(line) for line in out.read_text().splitlines()]
    tokenizer = load_tokenizer(model_path)
    model = load_causal_lm(ModelConfig(path=model_path), trainable=False)
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=0.7, top_p=0.9, seed=cfg.seed)
    rows = sample_rows(model, tokenizer, prompts, sampling, batch_size=len(prompts), chat=True, desc=desc)
    write_jsonl(out, rows)
    return rows


def _sft(cfg: DemoConfig, root: Path) -> str:
    from alignkit.algorithms.sft import SFTConfig, SFTDataConfig, run_sft

    out = root / "sft"
    if (out / "model").is_dir():
        return str(out / "model")
    shutil.rmtree(out, ignore_errors=True)  # a run that died before its model was saved starts over
    train = TrainConfig(batch_size=8, micro_batch_size=8, max_steps=cfg.sft_steps, lr=cfg.sft_lr, seed=cfg.seed,
                        eval_every=cfg.sft_steps // 2)
    sft = SFTConfig(model=ModelConfig(path=cfg.model), lora=LoraConfig(r=cfg.lora_r), data=SFTDataConfig(max_length=160, max_eval_rows=48),
                    train=train, output_dir=str(out))
    return str(run_sft(sft))


def run_demo(cfg: DemoConfig) -> str:
    from alignkit.data.jsonl import PROMPT_SCHEMA, read_rows
    from alignkit.tasks.demo_data import build_demo_data

    root = Path(cfg.output_dir)
    if cfg.fresh:
        shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = build_demo_data()
    prompts = read_rows(str(data["prompts_eval"]), PROMPT_SCHEMA)[: cfg.samples]
    print(f"[1/3] samples from the base model ({cfg.model})")
    before = _samples(cfg.model, prompts, cfg, root / "samples_base.jsonl", "sample base")
    print("[2/3] supervised fine-tuning (LoRA) on the review demonstrations")
    sft_model = _sft(cfg, root)
    print("[3/3] samples from the SFT policy")
    after = _samples(sft_model, prompts, cfg, root / "samples_sft.jsonl", "sample sft")
    for b, a in zip(before, after):
        print("\n=== " + b["prompt"])
        print("  base: " + textwrap.shorten(b["completion"], 300))
        print("  sft:  " + textwrap.shorten(a["completion"], 300))
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; outputs in {root}")
    return str(root)
