"""Online RL step speed and memory: alignkit PPO / GRPO / RLOO, and TRL's GRPO / RLOO trainers on the
same workload when TRL is installed (bench-only dependency).

    python benchmarks/rl_step.py                                   # tiny workload, grpo rloo ppo (+ TRL)
    python benchmarks/rl_step.py --algos grpo --steps 3 --warmup 1 --repeats 1   # a quick smoke run
    python benchmarks/rl_step.py --model smollm2 --algos grpo ppo  # embedded SmolLM2-135M with LoRA r 16
    python benchmarks/rl_step.py --model smollm2 --memory          # LoRA PPO peak RSS vs one model's full FT
    python benchmarks/rl_step.py --gpu --threads 8 --algos grpo rloo  # on a GPU: bf16 autocast, both toolkits

Workload "tiny" (../shared/BENCHMARK.md): the benchmark Llama (5.2M parameters, seed 0) and tokenizer;
256 prompts of exactly 32 tokens; at most 32 new tokens, temperature 1, no top-k/top-p, stop at EOS;
8 responses per step (GRPO/RLOO: 2 prompts x 4), one optimiser step per rollout (PPO: 8 prompts,
one epoch, one minibatch), AdamW lr 1e-5, float32, 2 threads, KL beta 0.05 to a frozen reference
copy; reward = count of "good" in the completion (PPO: the benchmark reward model, seed 1, which is
also the critic's trunk). 2 warm-up steps, then 20 measured steps. Each toolkit runs in its own
process (peak RSS is per process); the processes alternate and every measurement is repeated.
PPO is absent from current TRL (compare against trl==1.12.0 in a separate environment).

Reported: median seconds per step, tokens/s (non-pad prompt + response tokens, once per sequence),
share of the step spent generating, peak RSS (ru_maxrss), and ours / TRL within the same repeat.

`--gpu`: both toolkits on the GPU under bf16 autocast (a LoRA base in bf16, fully trained weights in float32);
peak RSS is then the host's, and the GPU's peak allocation is reported beside it.

`--memory`: peak RSS of LoRA PPO with what PPO itself holds (policy, reference = the adapter-disabled base,
value head on the policy trunk; the count-of-"good" reward, so no reward model) against one full
fine-tuning of the same model (AdamW, the same 8 sequences of 32 + 32 tokens per step), each in its own
process.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

N_PROMPTS, PROMPT_LEN, NEW_TOKENS, LR, BETA = 256, 32, 32, 1e-5, 0.05


def make_prompts(tokenizer, seed: int = 0) -> list[str]:
    """256 prompts of exactly 32 tokens: single-token words with a leading space."""
    from alignkit.models.tiny import pseudo_words

    words = sorted(set(pseudo_words(3000, seed)))
    pool = [w for w in words if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1]
    rng = random.Random(seed)
    return ["".join(" " + rng.choice(pool) for _ in range(PROMPT_LEN)) for _ in range(N_PROMPTS)]


def count_good(prompts, completions, **row_fields):
    return [float(c.count("good")) for c in completions]


class SeqClsReward:
    """A `LlamaForSequenceClassification` as a reward source (the tiny workload's reward model)."""

    def __init__(self, model, tokenizer):
        self.model, self.tok = model.eval(), tokenizer

    def score(self, prompts, completions, **row_fields):
        import torch

        self.tok.padding_side = "right"
        batch = self.tok([p + c for p, c in zip(prompts, completions)], return_tensors="pt", padding=True)
        batch = batch.to(self.model.device)
        self.tok.padding_side = "left"
        with torch.no_grad():
            return self.model(**batch).logits[:, 0].float()


def load(model_name: str):
    """(policy, reference, reward model, tokenizer, lora r) of the workload."""
    from alignkit.models.tiny import bench_llama, tiny_tokenizer

    if model_name == "tiny":
        return bench_llama(0), bench_llama(0), bench_llama(1, num_labels=1), tiny_tokenizer(), 0
    from alignkit.models.load import LoraConfig, ModelConfig, add_lora, load_causal_lm, load_tokenizer
    from alignkit.models.reward import load_reward_model

    tok = load_tokenizer(model_name)
    policy = add_lora(load_causal_lm(ModelConfig(model_name)), LoraConfig(r=16))
    return policy, None, load_reward_model(ModelConfig(model_name), tok.pad_token_id), tok, 16


# ---- alignkit --------------------------------------------------------------------------------------------
def ours(algo: str, model_name: str, steps: int, warmup: int, gpu: bool) -> dict:
    import copy

    import alignkit.rollout.rollout as rollout_mod
    from alignkit.algorithms.policy_gradient import GRPOConfig, PolicyGradient, RLOOConfig
    from alignkit.algorithms.ppo import PPO, PPOConfig
    from alignkit.config import load_config
    from alignkit.engine.loop import Engine
    from alignkit.engine.online import update
    from alignkit.models.load import LoraConfig, add_lora
    from alignkit.models.value import ActorCritic
    from alignkit.rewards.base import CallableReward

    policy, reference, rm, tok, r = load(model_name)
    group = 1 if algo.startswith("ppo") else 4
    cls = {"grpo": GRPOConfig, "rloo": RLOOConfig, "ppo": PPOConfig, "ppo-shared": PPOConfig}[algo]
    cfg = load_config(cls, None, [
        "reward.function=rl_step:count_good", f"kl.beta={BETA}", f"sampling.max_new_tokens={NEW_TOKENS}",
        f"online.prompts_per_step={8 // group}", f"online.group_size={group}", "online.epochs=1",
        "online.chat_template=false", f"online.steps={steps + warmup}", "train.batch_size=8",
        "train.micro_batch_size=8", f"train.lr={LR}", "train.report_to=[]", f"lora.r={r}",
        f"train.precision={'bf16' if gpu else 'fp32'}"])
    if algo == "ppo":  # the critic is a copy of the reward model's trunk (+ LoRA), a value head on top
        critic = copy.deepcopy(rm).base_model
        critic = add_lora(critic, LoraConfig(r=r)) if r else critic
        model, reward = ActorCritic(policy, critic), SeqClsReward(rm, tok)
        algorithm = PPO(tok, reward, cfg, reference)
    elif algo == "ppo-shared":  # value head on the policy trunk, a reward function: PPO's own models only
        from alignkit.algorithms.ppo import make_actor_critic

        model, algorithm = make_actor_critic(policy, tok, cfg), PPO(tok, CallableReward(count_good), cfg, reference)
    else:
        model, algorithm = policy, PolicyGradient(tok, CallableReward(count_good), cfg, reference)
    gen_time = [0.0]
    generate = rollout_mod.generate

    def timed_generate(*args, **kwargs):
        t = time.perf_counter()
        out = generate(*args, **kwargs)
        gen_time[0] += time.perf_counter() - t
        return out

    rollout_mod.generate = timed_generate
    engine = Engine(cfg.train, tempfile.mkdtemp())
    optimizer, scheduler = engine.make_optimizer(model, steps + warmup)
    model, optimizer = engine.accelerator.prepare(model, optimizer)
    rows_all = [{"prompt": p} for p in make_prompts(tok)]
    times, shares, tokens = [], [], []
    for step in range(steps + warmup):
        gen_time[0] = 0.0
        t = time.perf_counter()
        rows, metrics = algorithm.rollout(model, rows_all[step * 8 // group : (step + 1) * 8 // group])
        update(engine, model, algorithm, rows, 1, optimizer, scheduler, step + 1)
        if step >= warmup:
            times.append(time.perf_counter() - t)
            shares.append(gen_time[0] / times[-1])
            tokens.append(metrics["tokens_seen"])
    return summary(times, shares, tokens)


def full_finetune(model_name: str, steps: int, warmup: int) -> dict:
    """One model fully fine-tuned (AdamW, fp32) on 8 sequences of 64 tokens per step: the memory yardstick."""
    import torch

    from alignkit.models.load import ModelConfig, load_causal_lm, load_tokenizer
    from alignkit.models.tiny import bench_llama, tiny_tokenizer

    if model_name == "tiny":
        tok, model = tiny_tokenizer(), bench_llama(0)
    else:
        tok, model = load_tokenizer(model_name), load_causal_lm(ModelConfig(model_name))
    prompts = make_prompts(tok)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    times = []
    for step in range(steps + warmup):
        texts = [prompts[(2 * i + step * 16) % N_PROMPTS] + prompts[(2 * i + 1 + step * 16) % N_PROMPTS]
                 for i in range(8)]
        ids = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)["input_ids"]
        t = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - t)
    return summary(times, [0.0] * len(times), [ids.numel()] * len(times))


# ---- TRL -------------------------------------------------------------------------------------------------
def trl(algo: str, model_name: str, steps: int, warmup: int, gpu: bool) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback

    import trl as trl_mod

    policy, _, _, tok, r = load(model_name)
    if r:  # TRL adds the adapter itself (peft_config) and wants the base model's path for its reference
        policy = policy.get_base_model()
    path = tempfile.mkdtemp()  # TRL builds its reference model from the policy's path
    policy.save_pretrained(path)
    tok.save_pretrained(path)
    times, shares, tokens, gen_time = [], [], [], [0.0]
    generate = type(policy).generate

    def timed_generate(self, *args, **kwargs):
        t = time.perf_counter()
        out = generate(self, *args, **kwargs)
        gen_time[0] += time.perf_counter() - t
        tokens.append(int((out != tok.pad_token_id).sum()))
        return out

    type(policy).generate = timed_generate

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t, gen_time[0] = time.perf_counter(), 0.0

        def on_step_end(self, args, state, control, **kw):
            if state.global_step > warmup:
                times.append(time.perf_counter() - self.t)
                shares.append(gen_time[0] / times[-1])

    config_cls, trainer_cls = {"grpo": (trl_mod.GRPOConfig, trl_mod.GRPOTrainer),
                               "rloo": (trl_mod.RLOOConfig, trl_mod.RLOOTrainer)}[algo]
    args = config_cls(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=NEW_TOKENS, temperature=1.0, top_k=0, top_p=1.0, beta=BETA,
                      learning_rate=LR, max_steps=steps + warmup, bf16=gpu, gradient_checkpointing=False,
                      use_cpu=not gpu, report_to="none", save_strategy="no", logging_steps=1000, num_iterations=1,
                      steps_per_generation=1, model_init_kwargs={"dtype": "bfloat16" if gpu and r else "float32"})
    peft = None
    if r:
        from peft import LoraConfig

        peft = LoraConfig(r=r, lora_alpha=32, target_modules="all-linear")
    data = Dataset.from_list([{"prompt": p} for p in make_prompts(tok)])
    trainer = trainer_cls(model=path, reward_funcs=count_good, args=args, train_dataset=data, processing_class=tok,
                          callbacks=[Timer()], peft_config=peft)
    trainer.train()
    return summary(times, shares, tokens[-len(times):] if times else [])


def summary(times, shares, tokens) -> dict:
    import torch

    med = statistics.median(times)
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"s_per_step": med, "tokens_per_s": statistics.median(tokens) / med if tokens else None,
            "generation_share": statistics.median(shares),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_gpu_mb": gpu}


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="rl-bench-") as scratch:  # every run's files go, and go away
        tempfile.tempdir = scratch
        if args.algo == "full-ft":
            result = full_finetune(args.model, args.steps, args.warmup)
        else:
            result = (ours if args.toolkit == "alignkit" else trl)(args.algo, args.model, args.steps, args.warmup,
                                                                   args.gpu)
    print("RESULT " + json.dumps(result))


def run_child(toolkit: str, algo: str, args) -> dict | None:
    cmd = [sys.executable, __file__, "--child", toolkit, "--algo-one", algo, "--model", args.model,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    cmd += ["--gpu"] if args.gpu else []
    here = os.path.dirname(os.path.abspath(__file__))  # the reward function is rl_step:count_good
    env = {**os.environ, "PYTHONPATH": here + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env |= {} if args.gpu else {"CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        print(f"{toolkit} {algo} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1][7:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="'tiny' or an HF dir / 'smollm2' (LoRA r 16)")
    p.add_argument("--algos", nargs="+", default=["grpo", "rloo", "ppo"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gpu", action="store_true", help="run both toolkits on the GPU (bf16 autocast)")
    p.add_argument("--memory", action="store_true", help="LoRA PPO peak RSS against one model's full fine-tuning")
    p.add_argument("--child", choices=["alignkit", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--algo-one", dest="algo", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.toolkit = args.child
        return child(args)
    if args.memory:
        if args.gpu:
            p.error("--memory compares host RSS; run it without --gpu")
        return memory(args)
    has_trl = importlib.util.find_spec("trl") is not None
    print("| algo | toolkit | s/step | tokens/s | generation share | peak RSS MB | peak GPU MB | ours / TRL (s/step) |")
    print("|---|---|---|---|---|---|---|---|")
    for repeat in range(args.repeats):
        for algo in args.algos:
            kits = ["alignkit"] + (["trl"] if has_trl and algo != "ppo" else [])
            kits = kits if repeat % 2 == 0 else kits[::-1]
            res = {k: run_child(k, algo, args) for k in kits}
            for k, v in res.items():
                if v is None:
                    continue
                ratio = ""
                if k == "alignkit" and res.get("trl"):
                    ratio = f"{v['s_per_step'] / res['trl']['s_per_step']:.2f}"
                tps = f"{v['tokens_per_s']:.0f}" if v["tokens_per_s"] else "-"
                gpu_mb = f"{v['peak_gpu_mb']:.0f}" if v["peak_gpu_mb"] else "-"
                print(f"| {algo} | {k} | {v['s_per_step']:.3f} | {tps} | {v['generation_share']:.0%} | "
                      f"{v['peak_rss_mb']:.0f} | {gpu_mb} | {ratio} |", flush=True)


def memory(args) -> None:
    """Peak RSS of PPO (policy + adapter-disabled reference + value head) against one full fine-tuning."""
    print(f"Peak RSS, workload {args.model}, {args.steps} measured steps after {args.warmup} warm-up\n")
    print("| run | s/step | peak RSS MB | x full fine-tuning |\n|---|---|---|---|")
    base = run_child("alignkit", "full-ft", args)
    ppo = run_child("alignkit", "ppo-shared", args)
    for name, v in (("full fine-tuning, one model (AdamW)", base), ("PPO: policy + reference + value head", ppo)):
        if v is not None:
            ratio = f"{v['peak_rss_mb'] / base['peak_rss_mb']:.2f}" if base else "-"
            print(f"| {name} | {v['s_per_step']:.3f} | {v['peak_rss_mb']:.0f} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
