"""DPO step speed and memory: alignkit vs TRL's DPOTrainer on the same workload, side by side.

    python benchmarks/dpo_step.py                      # the "tiny" workload of ../shared/BENCHMARK.md
    python benchmarks/dpo_step.py --model smollm2      # embedded SmolLM2-135M-Instruct with LoRA r=16
    python benchmarks/dpo_step.py --steps 3 --warmup 1 --repeats 1 --rows 32   # a quick smoke run

Workload "tiny": the benchmark Llama (5.2M parameters, seed 0) and tokenizer; 256 pairs whose prompt,
chosen and rejected texts are each exactly 32 tokens (chosen holds "good" four times, rejected
"bad"), each completion followed by EOS; batch 8 pairs, no accumulation, AdamW lr 1e-5, float32,
2 threads; 2 warm-up steps, then 20 measured optimiser steps. Each toolkit runs in its own process
(peak RSS is per process), the two alternate, and every measurement is repeated (`--repeats`).

Two reference settings, compared like with like:
  cached  alignkit `reference=cached`  vs TRL `precompute_ref_log_probs=True` (the pass that computes
          the reference log-probs is in `setup s`, with tokenisation, not in the step times)
  live    alignkit `reference=live`    vs TRL's default (a reference forward every step)
TRL runs with `bf16=False, gradient_checkpointing=False` (its defaults are ~16x slower on a CPU).

Reported: median seconds per step, pairs/s, tokens/s (non-pad prompt + completion tokens of both
sequences of a pair), peak RSS (ru_maxrss) and the ratio ours / TRL within the same repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

N_ROWS, LENGTH, BATCH, LR = 256, 32, 8, 1e-5
FILLER = ["the", "a", "is", "was", "food", "service", "review", "great", "and", "of", "to", "in", "it", "we", "you"]


# ---- the workload -------------------------------------------------------------------------------------
def one_token_words(tokenizer, words: list[str]) -> list[str]:
    """Words that are a single token with a leading space, so a text of k of them is exactly k tokens."""
    return [w for w in words if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1]


def make_pairs(tokenizer, n_rows: int = N_ROWS, seed: int = 0) -> list[dict]:
    from alignkit.models.tiny import pseudo_words

    rng = random.Random(seed)
    pool = one_token_words(tokenizer, sorted(set(FILLER + pseudo_words(3000, seed))))
    if not {"good", "bad"} <= set(one_token_words(tokenizer, ["good", "bad"])):
        raise SystemExit("' good' / ' bad' are not single tokens in this tokenizer")

    def text(marker: str | None) -> str:
        words = [rng.choice(pool) for _ in range(LENGTH)]
        for i in (rng.sample(range(LENGTH), 4) if marker else []):
            words[i] = marker
        return "".join(" " + w for w in words)

    return [{"prompt": text(None), "chosen": text("good"), "rejected": text("bad")} for _ in range(n_rows)]


def load_workload(model_name: str, lora: bool, n_rows: int = N_ROWS):
    """(model, tokenizer, pairs) for 'tiny' or 'smollm2'."""
    import torch

    from alignkit.models.load import LoraConfig, ModelConfig, load_causal_lm, load_tokenizer
    from alignkit.models.tiny import bench_llama, tiny_tokenizer

    if model_name == "tiny":
        tokenizer, model = tiny_tokenizer(), bench_llama(seed=0).train()
    else:
        tokenizer, model = load_tokenizer("smollm2"), load_causal_lm(ModelConfig("smollm2", "float32"))
    torch.manual_seed(0)
    peft = LoraConfig(r=16, alpha=32.0) if lora else None
    return model, tokenizer, make_pairs(tokenizer, n_rows), peft


# ---- one measured run per process ------------------------------------------------------------------------
def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(model, tokenizer, pairs, peft, reference: str, steps: int, warmup: int) -> dict:
    import torch

    from alignkit.algorithms.dpo import DPOConfig, PairPreference
    from alignkit.algorithms.reference import Reference, cache_reference, disable_dropout
    from alignkit.data.jsonl import write_jsonl
    from alignkit.data.preference_tokens import load_pairs
    from alignkit.engine.config import TrainConfig
    from alignkit.engine.loop import Engine
    from alignkit.models.load import add_lora

    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="dpo-bench-"))
    rows = load_pairs(write_jsonl(tmp / "pairs.jsonl", pairs), tokenizer, 1024, chat_template=False)
    model = add_lora(model, peft) if peft else model
    disable_dropout(model)
    cfg = DPOConfig(reference=reference)
    ref = Reference() if peft or reference == "cached" else Reference(_frozen_copy(model))
    algorithm = PairPreference(cfg.spec, cfg.hyper, tokenizer.pad_token_id, ref)
    if reference == "cached":
        cache_reference(model, algorithm, {"train": rows}, tmp / "ref.pt", "bench", BATCH, "cpu")
    train = TrainConfig(batch_size=BATCH, micro_batch_size=BATCH, lr=LR, schedule="constant", warmup_ratio=0.0,
                        max_steps=steps + warmup, report_to=[], precision="fp32")
    engine = Engine(train, tmp / "run")
    optimizer, scheduler = engine.make_optimizer(model, steps + warmup)
    model, optimizer = engine.accelerator.prepare(model, optimizer)
    model.train()
    setup_s = time.perf_counter() - t0
    times, tokens = [], 0
    for step, batch_index in enumerate(engine.batches(len(rows), 0)[: steps + warmup]):
        batch_rows = [rows[i] for i in batch_index]
        t = time.perf_counter()
        engine.train_step(model, algorithm, batch_rows, optimizer, scheduler)
        if step >= warmup:
            times.append(time.perf_counter() - t)
            tokens += sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in batch_rows)
    return {"times": times, "tokens": tokens, "setup_s": setup_s, "torch_threads": torch.get_num_threads()}


def _frozen_copy(model):
    import copy

    return copy.deepcopy(model).requires_grad_(False).eval()


def run_trl(model, tokenizer, pairs, peft, reference: str, steps: int, warmup: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.t = [], 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t)

    peft_config = None
    if peft:
        from peft import LoraConfig as PeftLoraConfig

        from alignkit.models.load import LORA_TARGETS

        peft_config = PeftLoraConfig(r=peft.r, lora_alpha=peft.alpha, lora_dropout=0.0, bias="none",
                                     target_modules=LORA_TARGETS[model.config.model_type])
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-dpo-bench-"), per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        max_steps=steps + warmup, bf16=False, fp16=False, gradient_checkpointing=False, report_to="none",
        save_strategy="no", eval_strategy="no", logging_steps=10_000, dataloader_num_workers=0, seed=0,
        max_length=1024, precompute_ref_log_probs=reference == "cached", optim="adamw_torch", use_cpu=True,
        dataset_num_proc=None,
    )
    timer = StepTimer()
    t0 = time.perf_counter()
    # an in-memory model has no hub name TRL could load a reference from: hand it a frozen copy (as we do)
    ref_model = _frozen_copy(model) if reference == "live" and peft is None else None
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(pairs),
                         processing_class=tokenizer, peft_config=peft_config, callbacks=[timer])
    init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    per_pair = 2 * (LENGTH + LENGTH + 1)  # prompt + completion + EOS, for chosen and for rejected
    times = timer.times[warmup:]
    setup_s = init_s + max(train_s - sum(timer.times), 0.0)  # tokenising, reference pass, dataloader
    return {"times": times, "tokens": per_pair * BATCH * len(times), "setup_s": setup_s,
            "torch_threads": torch.get_num_threads()}


def worker(toolkit: str, model_name: str, reference: str, steps: int, warmup: int, threads: int, rows: int) -> None:
    import torch

    torch.set_num_threads(threads)
    model, tokenizer, pairs, peft = load_workload(model_name, lora=model_name != "tiny", n_rows=rows)
    run = {"ours": run_ours, "trl": run_trl}[toolkit]
    with tempfile.TemporaryDirectory(prefix="dpo-bench-") as scratch:  # every run's files go, and go away
        tempfile.tempdir = scratch
        out = run(model, tokenizer, pairs, peft, reference, steps, warmup)
    out["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(out))


# ---- the driver -------------------------------------------------------------------------------------------
def measure(toolkit: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", toolkit, "--model", args.model, "--reference", args.reference_mode,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--rows", str(args.rows)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise SystemExit(f"{toolkit} run failed:\n{proc.stderr[-3000:]}")
    result = json.loads(line[len("RESULT "):])
    s = statistics.median(result["times"])
    result.update(s_per_step=s, pairs_per_s=BATCH / s, tokens_per_s=result["tokens"] / sum(result["times"]))
    return result


def table(rows: list[tuple[str, str, int, dict, dict]]) -> str:
    head = ("| reference | toolkit | repeat | s/step | pairs/s | tokens/s | setup s | peak RSS MB | speed x TRL | "
            "RSS x TRL |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for mode, name, rep, r, trl in rows:
        lines.append(f"| {mode} | {name} | {rep} | {r['s_per_step']:.3f} | {r['pairs_per_s']:.2f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['setup_s']:.1f} | {r['peak_rss_mb']:,.0f} | "
                     f"{trl['s_per_step'] / r['s_per_step']:.2f} | {r['peak_rss_mb'] / trl['peak_rss_mb']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    p.add_argument("--reference", choices=["cached", "live", "both"], default="both")
    p.add_argument("--steps", type=int, default=20, help="measured optimiser steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="alternating repeats of each toolkit")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=N_ROWS, help="pairs in the data set (fewer: a quicker smoke run)")
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.model, args.reference, args.steps, args.warmup, args.threads, args.rows)
        return
    rows = []
    for mode in (["cached", "live"] if args.reference == "both" else [args.reference]):
        args.reference_mode = mode
        for rep in range(1, args.repeats + 1):
            order = ["trl", "ours"] if rep % 2 else ["ours", "trl"]
            results = {name: measure(name, args) for name in order}
            rows += [(mode, name, rep, results[name], results["trl"]) for name in ("ours", "trl")]
            print(f"{mode} repeat {rep}: ours {results['ours']['s_per_step']:.3f} s/step, "
                  f"TRL {results['trl']['s_per_step']:.3f} s/step", flush=True)
    print(f"\nDPO step, workload {args.model}, batch {BATCH} pairs, {args.steps} measured steps, "
          f"{args.threads} threads\n")
    print(table(rows))


if __name__ == "__main__":
    main()
