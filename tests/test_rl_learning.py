"""Online RL on a tiny random Llama (seconds each): the reward is the number of times the target
token "a" (the character, which many BPE tokens contain) appears in the completion, so a working
policy gradient raises it quickly; a large beta keeps the policy near its reference; resume equals
an uninterrupted run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignkit.algorithms.policy_gradient import (
    GRPOConfig,
    PolicyGradient,
    REINFORCEConfig,
    RLOOConfig,
    run_grpo,
    run_reinforce,
    run_rloo,
)
from alignkit.algorithms.ppo import PPOConfig, run_ppo
from alignkit.config import load_config
from alignkit.errors import UserError
from alignkit.models.tiny import tiny_llama, tiny_tokenizer
from alignkit.rewards.base import CallableReward
from alignkit.rollout.generate import SamplingConfig
from alignkit.rollout.rollout import collect_rollout, response_logps, stack_rows

from conftest import write_jsonl

TARGET = "a"


def count_target(prompts, completions, **row_fields):
    return [c.count(TARGET) for c in completions]


def count_in_text(text):  # the same count as a gold judge of the text
    return text.count(TARGET)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rl") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"review item {i}", "item": i}) + "\n" for i in range(32)))
    return str(path)


def run(stage_cls, run_fn, model_dir, prompts, out, *overrides, threads=1):
    torch.set_num_threads(threads)
    cfg = load_config(stage_cls, None, [
        f"model.path={model_dir}", f"prompts={prompts}", f"output_dir={out}",
        "reward.function=test_rl_learning:count_target",
        "sampling.max_new_tokens=12", "online.prompts_per_step=4", "online.group_size=4", "online.chat_template=false",
        "train.batch_size=16", "train.micro_batch_size=16", "train.report_to=[]", *overrides])
    run_fn(cfg)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def gain(metrics, n=3):
    scores = [m["score_mean"] for m in metrics]
    return sum(scores[-n:]) / n - sum(scores[:n]) / n


@pytest.mark.parametrize("stage", ["grpo", "rloo", "reinforce"])
def test_critic_free_raise_reward(stage, tiny_llama_dir, prompt_file, tmp_path):
    cls, fn = {"grpo": (GRPOConfig, run_grpo), "rloo": (RLOOConfig, run_rloo),
               "reinforce": (REINFORCEConfig, run_reinforce)}[stage]
    metrics = run(cls, fn, tiny_llama_dir, prompt_file, tmp_path / stage, "online.steps=25", "train.lr=1e-2")
    assert gain(metrics) > 3.0, [m["score_mean"] for m in metrics]
    assert all(m["logp_diff_max"] < 1e-3 for m in metrics)  # sampler and trainer agree on log-probs
    assert (tmp_path / stage / "model" / "config.json").is_file()


def test_ppo_raises_reward(tiny_llama_dir, prompt_file, tmp_path):
    metrics = run(PPOConfig, run_ppo, tiny_llama_dir, prompt_file, tmp_path, "online.steps=20", "train.lr=3e-3",
                  "train.batch_size=8", "train.micro_batch_size=8")
    assert gain(metrics) > 3.0, [m["score_mean"] for m in metrics]
    assert all(m["logp_diff_max"] < 1e-3 for m in metrics)
    for key in ("kl", "beta", "entropy", "clipfrac", "approx_kl", "value_loss", "explained_variance", "score_std",
                "response_length"):
        assert key in metrics[-1]


def test_large_beta_keeps_kl_small(tiny_llama_dir, prompt_file, tmp_path):
    """Same run twice (reference = a frozen copy): beta 0.01 drifts away, beta 3 stays close."""
    common = ("online.steps=15", "train.lr=1e-2")
    free = run(GRPOConfig, run_grpo, tiny_llama_dir, prompt_file, tmp_path / "free", *common, "kl.beta=0.01")
    held = run(GRPOConfig, run_grpo, tiny_llama_dir, prompt_file, tmp_path / "held", *common, "kl.beta=3")
    late = lambda ms: sum(m["kl"] for m in ms[-5:]) / 5  # noqa: E731
    assert late(held) < 0.3 * late(free), (late(held), late(free))


def test_lora_reference_is_adapter_disabled(tiny_llama_dir, prompt_file, tmp_path):
    metrics = run(RLOOConfig, run_rloo, tiny_llama_dir, prompt_file, tmp_path, "online.steps=2", "lora.r=4",
                  "gold=test_rl_learning:count_in_text")
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the adapter starts at zero: policy == reference
    assert [m["gold_mean"] for m in metrics] == [m["score_mean"] for m in metrics]  # monitored: same function
    assert (tmp_path / "adapter").is_dir() and (tmp_path / "model" / "config.json").is_file()


def test_adaptive_beta_moves(tiny_llama_dir, prompt_file, tmp_path):
    metrics = run(PPOConfig, run_ppo, tiny_llama_dir, prompt_file, tmp_path, "online.steps=4", "train.lr=3e-3",
                  "kl.controller=adaptive", "kl.target=0.01", "kl.horizon=100", "online.epochs=1")
    betas = [m["beta"] for m in metrics]
    assert betas[-1] > betas[0]  # KL above target -> beta grows (by at most 20% x 16/100 per step)
    assert betas[0] <= 0.05 * (1 + 0.2 * 16 / 100) + 1e-9


def test_resume_equals_uninterrupted(tiny_llama_dir, prompt_file, tmp_path):
    args = ("online.steps=4", "train.lr=1e-2", "train.save_every=2", "pg.advantage=reinforce")
    whole = run(GRPOConfig, run_grpo, tiny_llama_dir, prompt_file, tmp_path, *args)
    resumed = run(GRPOConfig, run_grpo, tiny_llama_dir, prompt_file, tmp_path, *args, "train.resume=true")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(whole[2:], resumed[2:]):
        assert a["score_mean"] == b["score_mean"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_a_fixed_beta_changed_on_resume_is_used(tiny_llama_dir, prompt_file, tmp_path):
    """The checkpoint's algorithm state put back the first run's beta, though kl.beta was changed (and the change
    was listed in the resume warning); an adaptive controller's beta is state and stays restored."""
    args = ("online.steps=3", "train.save_every=2", "pg.advantage=reinforce")
    run(GRPOConfig, run_grpo, tiny_llama_dir, prompt_file, tmp_path, *args, "kl.beta=0.05")
    resumed = run(GRPOConfig, run_grpo, tiny_llama_dir, prompt_file, tmp_path, *args, "kl.beta=0.5",
                  "train.resume=true")  # from the checkpoint of step 2
    assert [(m["step"], m["beta"]) for m in resumed] == [(1, 0.05), (2, 0.05), (3, 0.5)]


def test_a_critic_with_another_tokenizer_is_refused(tiny_llama_dir, tmp_path):
    """The critic reads the policy's token ids: the MiniLM reward model as ppo.critic_model was an IndexError
    deep in the forward (or, with a smaller policy vocabulary, values computed from the wrong tokens)."""
    from alignkit.algorithms.ppo import make_actor_critic
    from alignkit.models.tiny import save_tiny

    other = save_tiny(tmp_path / "other", tokenizer=tiny_tokenizer(vocab_size=1024, seed=5))
    cfg = load_config(PPOConfig, None, [f"model.path={tiny_llama_dir}", "ppo.critic=separate",
                                        f"ppo.critic_model={other}"])
    with pytest.raises(UserError, match=r"ppo.critic_model=.*other: its tokenizer is not the policy's"):
        make_actor_critic(tiny_llama(), tiny_tokenizer(), cfg)
    same = load_config(PPOConfig, None, [f"model.path={tiny_llama_dir}", "ppo.critic=separate",
                                         f"ppo.critic_model={save_tiny(tmp_path / 'same')}"])
    assert make_actor_critic(tiny_llama(), tiny_tokenizer(), same).critic is not None


def test_a_fully_trained_critic_stays_float32_where_auto_is_bf16(tiny_llama_dir, monkeypatch):
    """On a GPU with bf16, `auto` loaded the separate critic's trunk in bf16 also when it trains in full (lora.r=0),
    against the rule that weights trained in full stay float32 (the CUDA checks are faked: no GPU here)."""
    from alignkit.algorithms.ppo import make_actor_critic

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    dtypes = {}
    for r in (0, 4):
        cfg = load_config(PPOConfig, None, [f"model.path={tiny_llama_dir}", "ppo.critic=separate", f"lora.r={r}"])
        critic = make_actor_critic(tiny_llama(), tiny_tokenizer(), cfg).critic
        dtypes[r] = {p.dtype for p in critic.parameters() if p.requires_grad}, {p.dtype for p in critic.parameters()}
    assert dtypes[0] == ({torch.float32}, {torch.float32})
    assert dtypes[4] == ({torch.float32}, {torch.float32, torch.bfloat16})  # a LoRA base: bf16, adapters float32


def test_same_seed_same_run_on_two_threads(tiny_llama_dir, prompt_file, tmp_path):
    """A seed fixes the run, also on 2 threads: the backward of indexing (GRPO's shared prompt cache, one
    row per group member) sums rows in thread order unless torch's deterministic algorithms are on."""
    runs = [run(GRPOConfig, run_grpo, tiny_llama_dir, prompt_file, tmp_path / name, "online.steps=8",
                "train.lr=1e-2", threads=2) for name in ("a", "b")]
    assert [(m["score_mean"], m["loss"]) for m in runs[0]] == [(m["score_mean"], m["loss"]) for m in runs[1]]
    a, b = (load_file(tmp_path / name / "model" / "model.safetensors") for name in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_collect_rollout_contract():
    torch.manual_seed(0)
    tok, policy = tiny_tokenizer(), tiny_llama()
    rows = [{"prompt": "review one", "item": 1}, {"prompt": "a much longer review prompt", "item": 2}]
    seen = {}

    def reward(prompts, completions, item):
        seen["item"] = item
        return [1.0] * len(completions)

    def length(prompts, completions, item):
        return [float(len(c)) for c in completions]

    r = collect_rollout(policy, tok, rows, CallableReward(reward), SamplingConfig(max_new_tokens=6), group_size=3,
                        reference=tiny_llama(), value_fn=lambda batch: torch.ones(batch["response_ids"].shape),
                        chat_template=False, no_eos_penalty=-1.0, monitor=CallableReward(length))
    b, p = r.prompt_ids.shape
    a = r.response_ids.shape[1]
    assert b == 6 and r.group.tolist() == [0, 0, 0, 1, 1, 1] and seen["item"] == [1, 1, 1, 2, 2, 2]
    for t in (r.response_mask, r.old_logps, r.ref_logps, r.values):
        assert t.shape == (b, a)
    assert not r.prompt_mask[0, 0] and r.prompt_mask[:, -1].all()  # left-padded prompts
    assert (r.values[~r.response_mask] == 0).all() and (r.old_logps[~r.response_mask] == 0).all()
    # the same weights as reference: sampler log-probs == teacher-forced reference log-probs
    assert (r.old_logps - r.ref_logps).abs().max() < 1e-4
    batch = stack_rows(r.rows())
    assert (response_logps(policy, batch) - r.old_logps).abs().max() < 1e-4
    ended = r.response_mask.sum(-1) < 6
    assert ((r.scores == -1.0) | ended).all()
    # the monitored reward is logged, never a training row field, and takes no length penalty
    texts = tok.batch_decode(r.response_ids.masked_fill(~r.response_mask, tok.pad_token_id), skip_special_tokens=True)
    assert r.gold.tolist() == [float(len(t)) for t in texts] and "gold" not in batch
    assert r.metrics()["gold_mean"] == pytest.approx(sum(map(len, texts)) / 6)


def test_rollouts_and_kl_samples_stop_at_the_models_end_of_turn():
    """A chat model's end-of-turn id in its generation config (not the tokenizer's EOS) ends a response in the RL
    rollout and in the KL / eval samples, as it does in `generate_text`: they ran to max_new_tokens past it."""
    from alignkit.algorithms.policy_kl import sample_sequences

    tok, policy = tiny_tokenizer(), tiny_llama(seed=2)
    greedy = SamplingConfig(max_new_tokens=6, do_sample=False)
    first = sample_sequences(policy, tok, ["review one"], greedy, chat_template=False)[0][1][0]
    assert first != tok.eos_token_id
    policy.generation_config.eos_token_id = [tok.eos_token_id, first]  # the end of turn: the greedy first token
    assert sample_sequences(policy, tok, ["review one"], greedy, chat_template=False)[0][1] == [first]
    r = collect_rollout(policy, tok, [{"prompt": "review one"}], CallableReward(lambda p, c: [1.0] * len(c)),
                        greedy, need_ref=False, chat_template=False, no_eos_penalty=-1.0)
    assert r.response_mask.sum().item() == 1 and r.scores.tolist() == [1.0]  # ended: no length penalty


def nan_reward(prompts, completions, **row_fields):
    return [float("nan")] * len(completions)


def test_nan_reward_from_the_cli(tiny_llama_dir, prompt_file, tmp_path):
    """One line of error on a line of its own (the progress bar is closed first), exit 2, no model written."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "alignkit.cli", "grpo", f"model.path={tiny_llama_dir}",
                          f"prompts={prompt_file}", "reward.function=test_rl_learning:nan_reward", f"output_dir={out}",
                          "sampling.max_new_tokens=4", "online.steps=2", "online.chat_template=false"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.rstrip().split("\n")[-1]  # not splitlines(): the bar redraws itself after a carriage return
    assert last.startswith("alignkit grpo: error: the reward gave a non-finite score (nan)"), last
    assert not (out / "model").exists()


def count_target_logged(prompts, completions, **row_fields):
    """count_target, appending what it scored to $SCORE_LOG.<rank>."""
    scores = count_target(prompts, completions)
    with open(f"{os.environ['SCORE_LOG']}.{os.environ.get('RANK', '0')}", "a") as f:
        f.write(json.dumps({"prompts": prompts, "completions": completions, "scores": scores}) + "\n")
    return scores


def test_grpo_two_processes_share_the_rollout(tiny_llama_dir, prompt_file, tmp_path):
    """DDP: each process samples and scores its half of every step's prompts (whole groups), and trains on the
    whole rollout gathered from both: the logged batch is the union of the two halves."""
    from test_engine import _free_port

    log = tmp_path / "scored"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "SCORE_LOG": str(log)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "alignkit.cli", "grpo", f"model.path={tiny_llama_dir}", f"prompts={prompt_file}",
           "reward.function=test_rl_learning:count_target_logged", "sampling.max_new_tokens=6", "online.steps=3",
           "online.prompts_per_step=4", "online.chat_template=false", "train.lr=1e-3", "train.batch_size=8",
           "train.micro_batch_size=4", f"output_dir={tmp_path / 'two'}"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]  # logged once, by the first process
    ranks = [[json.loads(line) for line in Path(f"{log}.{rank}").read_text().splitlines()] for rank in (0, 1)]
    for m, a, b in zip(metrics, *ranks):
        assert len(a["prompts"]) == len(b["prompts"]) == 8  # 2 prompts x group of 4 each
        assert len(set(a["prompts"]) | set(b["prompts"])) == 4  # disjoint halves of the step's 4 prompts
        assert m["score_mean"] == pytest.approx(sum(a["scores"] + b["scores"]) / 16)  # the whole batch
        assert m["logp_diff_max"] < 1e-3  # the gathered (re-padded) rows train as sampled
    assert (tmp_path / "two" / "model" / "model.safetensors").is_file()


def test_prompts_split_evenly_over_processes():
    from alignkit.engine.online import OnlineConfig

    OnlineConfig(prompts_per_step=4, group_size=3).check(batch_size=4, processes=2)
    with pytest.raises(UserError, match=r"online.prompts_per_step \(3\) must be a multiple of the number of "
                                        r"processes \(2\)"):
        OnlineConfig(prompts_per_step=3, group_size=4).check(batch_size=4, processes=2)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_reward_is_an_error(value):
    """A NaN reward would make the advantages, the loss and then every weight NaN: the rollout refuses it."""
    tok, policy = tiny_tokenizer(), tiny_llama()
    reward = CallableReward(lambda prompts, completions: [1.0] * (len(completions) - 1) + [value])
    with pytest.raises(UserError, match=rf"non-finite score \({value}\) to 1 of 4 completions"):
        collect_rollout(policy, tok, [{"prompt": "review one"}], reward, SamplingConfig(max_new_tokens=3),
                        group_size=4, reference=tiny_llama(), chat_template=False)


@pytest.mark.parametrize("options", [
    ("pg.advantage=dr_grpo", "pg.aggregation=constant"),  # Dr. GRPO
    ("pg.aggregation=token", "pg.clip_high=0.28", "pg.drop_equal_groups=true"),  # DAPO
])
def test_grpo_variants_run(options, tiny_llama_dir, prompt_file, tmp_path):
    metrics = run(GRPOConfig, run_grpo, tiny_llama_dir, prompt_file, tmp_path, "online.steps=2", *options)
    assert len(metrics) == 2 and all(m["logp_diff_max"] < 1e-3 for m in metrics if "logp_diff_max" in m)
    assert "kept_fraction" in metrics[0]


@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_ppo_lora_critics_run(critic, tiny_llama_dir, prompt_file, tmp_path):
    metrics = run(PPOConfig, run_ppo, tiny_llama_dir, prompt_file, tmp_path, "online.steps=2", f"ppo.critic={critic}",
                  "train.batch_size=8", "train.micro_batch_size=4", "ppo.whiten_rewards=true", "lora.r=4")
    assert len(metrics) == 2 and metrics[-1]["value_loss"] > 0
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-4) and metrics[0]["logp_diff_max"] < 1e-3


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_micro_batching_is_invisible(stage, tiny_llama_dir, prompt_file, tmp_path):
    """A minibatch of 16 in one pass or in 4 micro-batches of 4: the same losses over the update's
    optimiser steps (PPO: 4 epochs, so the later steps also see the same updated weights)."""
    cls, fn = {"grpo": (GRPOConfig, run_grpo), "ppo": (PPOConfig, run_ppo)}[stage]
    args = ("online.steps=1", "train.lr=1e-2", "train.max_grad_norm=null", "train.precision=fp32")
    whole = run(cls, fn, tiny_llama_dir, prompt_file, tmp_path / "whole", *args)[0]
    split = run(cls, fn, tiny_llama_dir, prompt_file, tmp_path / "split", *args, "train.micro_batch_size=4")[0]
    for key in ("loss", "clipfrac", "approx_kl", "value_loss", "kl_loss"):
        assert whole.get(key, 0.0) == pytest.approx(split.get(key, 0.0), rel=1e-4, abs=1e-7), key


@pytest.mark.parametrize("setting", ["train.max_steps=5", "train.epochs=2", "train.eval_every=3"])
def test_train_options_that_do_not_apply_online_are_refused(setting):
    """They were shown by --print-config with their offline meaning and silently ignored."""
    with pytest.raises(UserError, match=f"{setting.split('=')[0]} does not apply to the RL stages"):
        load_config(GRPOConfig, None, [setting])


def test_a_prompt_that_cannot_be_rendered_fails_at_load_naming_its_line(tiny_llama_dir, tmp_path):
    """It failed when its shuffled batch came up, mid-run, as 'row: ...'."""
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b"},
                                                 {"messages": [{"role": "user", "content": "c"}]}, {"prompt": "d"}])
    with pytest.raises(UserError, match=r"p.jsonl:3: a messages row needs a chat template"):
        run(GRPOConfig, run_grpo, tiny_llama_dir, prompts, tmp_path / "out", "online.steps=1",
            "online.prompts_per_step=1", "online.group_size=2", "train.batch_size=2", "train.micro_batch_size=2")
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_bf16_weights_rescore_the_rollout_also_without_autocast(tiny_llama_dir, prompt_file, tmp_path):
    """A LoRA base in bf16 with float32 compute: the sampler's log-probs differ from the training forward's by ~2e-3,
    but only autocast turned the rescoring on (logp_diff_max 2e-3; the step-1 KL of policy == reference 1e-4)."""
    first = run(GRPOConfig, run_grpo, tiny_llama_dir, prompt_file, tmp_path / "bf16", "online.steps=1", "lora.r=4",
                "model.dtype=bfloat16", "train.precision=fp32", "sampling.max_new_tokens=24")[0]
    assert first["logp_diff_max"] == 0.0 and first["kl"] == 0.0


def test_sampling_settings_that_bias_the_kl(caplog):
    """An adaptive controller from beta 0 stayed at 0; a truncated sampler (top-k/top-p, a minimum length) made the
    KL to the reference read 15x too high, without a word."""
    with pytest.raises(UserError, match="kl.controller=adaptive needs kl.beta > 0"):
        load_config(PPOConfig, None, ["kl.controller=adaptive", "kl.beta=0"])
    load_config(GRPOConfig, None, ["sampling.top_p=0.9", "sampling.top_k=20"])
    assert "sampling.top_k, sampling.top_p: responses come from a truncated distribution" in caplog.text
    caplog.clear()
    load_config(GRPOConfig, None, ["sampling.temperature=0.7"])  # one temperature everywhere: no bias
    assert not caplog.text


def test_a_resumed_adaptive_beta_says_where_it_continues_from(caplog):
    """The resume warning listed kl.beta 0.05 -> 0.5 as a change, but the adaptive controller went on from the
    checkpoint's beta without a word."""
    import logging

    from alignkit.algorithms.policy_gradient import PolicyGradient
    from alignkit.rewards.base import CallableReward

    cfg = load_config(GRPOConfig, None, ["kl.controller=adaptive", "kl.beta=0.5", "reward.function=x:y"])
    algorithm = PolicyGradient(tiny_tokenizer(), CallableReward(count_target), cfg, None)
    with caplog.at_level(logging.INFO, logger="alignkit.algorithms.online"):
        algorithm.load_state_dict({"beta": 0.05})
    assert algorithm.kl_ctl.beta == 0.05
    assert "continuing from the checkpoint's beta 0.05 (kl.beta=0.5 is where a new run starts)" in caplog.text


def zero_for_even_items(prompts, completions, item=0, **row_fields):
    """0 for every completion of a prompt with an even `item` (a group of equal rewards), else the text's length."""
    return [0.0 if i % 2 == 0 else float(len(c)) for i, c in zip(item, completions)]


def test_two_processes_with_a_minibatch_smaller_than_the_processes(tiny_llama_dir, tmp_path):
    """GRPO dropping a group of equal rewards left a minibatch of one row for two processes: the process with no
    row ran no backward, and the other waited for its gradients for good."""
    import socket

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"review item {i}", "item": i} for i in range(8)])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                          "-m", "alignkit.cli", "grpo", f"model.path={tiny_llama_dir}", f"prompts={prompts}",
                          "reward.function=test_rl_learning:zero_for_even_items", "sampling.max_new_tokens=6",
                          "online.steps=4", "online.prompts_per_step=2", "online.group_size=3",
                          "online.chat_template=false", "train.batch_size=2", "train.micro_batch_size=1",
                          "pg.drop_equal_groups=true", "train.report_to=[]", f"output_dir={out}"],
                         env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "model" / "config.json").is_file()


def test_logp_probe_covers_the_whole_first_minibatch(tmp_path):
    """logp_diff_max looked at the first micro-batch only: a row of the first minibatch that trains on log-probs
    other than the sampler's went unseen when it fell in a later micro-batch."""
    from alignkit.engine.loop import Engine
    from alignkit.engine.online import update

    cfg = load_config(GRPOConfig, None, ["sampling.max_new_tokens=4", "online.prompts_per_step=2", "online.group_size=4",
                                         "train.batch_size=8", "train.micro_batch_size=2", "online.chat_template=false",
                                         "train.report_to=[]", "kl.beta=0"])
    policy = tiny_llama(seed=1)
    algorithm = PolicyGradient(tiny_tokenizer(), CallableReward(lambda p, c: [float(len(x)) for x in c]), cfg)
    rows, _ = algorithm.rollout(policy, [{"prompt": "review one"}, {"prompt": "review two"}])
    for bad in range(len(rows)):  # each row in turn: wherever the shuffle puts it, the probe sees it
        engine = Engine(cfg.train, tmp_path / f"r{bad}")
        model = tiny_llama(seed=1)
        optimizer, scheduler = engine.make_optimizer(model, 1)
        shifted = [{**r, "old_logps": r["old_logps"] + 0.5 * r["response_mask"]} if i == bad else r
                   for i, r in enumerate(rows)]
        metrics = update(engine, model, algorithm, shifted, 1, optimizer, scheduler, 1)
        assert metrics["logp_diff_max"] == pytest.approx(0.5, abs=1e-3), bad
