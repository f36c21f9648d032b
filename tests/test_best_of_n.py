"""Best-of-N (analytic KL, selection, the stage) and rejection-sampling fine-tuning on a tiny model."""

import dataclasses
import json
import math

import pytest
import torch

from alignkit.algorithms.best_of_n import (
    BestOfNConfig, best_of_n_kl, pick_best, run_best_of_n, sample_and_score, score_rows,
)
from alignkit.algorithms.rejection_sampling import RejectionSamplingConfig, run_rejection_sampling, select_top
from alignkit.engine.config import TrainConfig
from alignkit.errors import UserError
from alignkit.models.load import LoraConfig, ModelConfig
from alignkit.models.tiny import tiny_llama, tiny_tokenizer
from alignkit.rewards.base import CallableReward
from alignkit.rollout.generate import SamplingConfig

from conftest import write_jsonl


def length_reward(prompts, completions, **fields):
    """A batch reward function for the tests: the number of characters of the completion."""
    return torch.tensor([float(len(c)) for c in completions])


def n_chars(text: str) -> float:
    """The same as a `text -> float` function (`reward=package.module:function` takes either form)."""
    return float(len(text))


def test_best_of_n_kl_formula():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl(16) == pytest.approx(math.log(16) - 15 / 16)
    # Exact KL of best-of-n over M equally likely outcomes with distinct rewards -> the formula as M grows.
    m, n = 20_000, 4
    k = torch.arange(1, m + 1, dtype=torch.float64)
    p = (k / m) ** n - ((k - 1) / m) ** n  # P(the best of n draws is the k-th ranked outcome)
    kl = float((p * torch.log(p * m)).sum())
    assert kl == pytest.approx(best_of_n_kl(n), abs=1e-3)


def test_pick_best_and_select_top():
    sampled = [{"prompt": "p", "completions": ["a", "bbb", "cc"], "rewards": [1.0, 3.0, 2.0], "id": 7}]
    assert pick_best(sampled, 3) == [{"prompt": "p", "id": 7, "completion": "bbb", "reward": 3.0}]
    assert pick_best(sampled, 1)[0]["completion"] == "a"  # the first n samples only
    assert [r["completion"] for r in select_top(sampled, 2)] == ["bbb", "cc"]


def test_sample_and_score_returns_n_scored_completions():
    tok = tiny_tokenizer()
    rows = [{"prompt": "review abc", "ref": 1}, {"prompt": "review def", "ref": 2}]
    seen = {}

    def reward(prompts, completions, **fields):
        seen.update(fields)
        return length_reward(prompts, completions)

    out = sample_and_score(tiny_llama(), tok, rows, CallableReward(reward), 3, SamplingConfig(max_new_tokens=6, seed=0),
                           batch_size=4)
    assert [len(r["completions"]) for r in out] == [3, 3]
    assert out[0]["rewards"] == [float(len(c)) for c in out[0]["completions"]]
    assert seen["ref"] == [1, 1, 1, 2, 2, 2]  # the rows' other fields reach the reward source


def test_batches_draw_new_samples():
    """Without a generator each batch made its own from sampling.seed: batches of 3 repeated the same 3 draws."""
    out = sample_and_score(tiny_llama(), tiny_tokenizer(), [{"prompt": "review abc"}], CallableReward(length_reward), 8,
                           SamplingConfig(max_new_tokens=8, seed=0), batch_size=3)
    assert len(set(out[0]["completions"])) == 8


class LengthSource:
    """A reward source with only `.score` (not callable)."""

    def score(self, prompts, completions, **row_fields):
        return torch.tensor([float(len(c)) for c in completions])


length_source = LengthSource()


def test_reward_specs_take_batch_functions_and_sources():
    """best-of-n's documented f(prompts, completions, **row_fields) was called as f(text) (a TypeError), and a
    source with only .score was called (not callable)."""
    from alignkit.rewards.gold import TextFunctionJudge, load_judge

    rows, texts = [{"prompt": "p"}, {"prompt": "q"}], ["ab", "abcd"]
    for spec in ("test_best_of_n:length_reward", "test_best_of_n:length_source", "test_best_of_n:n_chars"):
        assert score_rows(load_judge(spec), rows, texts).tolist() == [2.0, 4.0], spec
    assert isinstance(load_judge("test_best_of_n:n_chars"), TextFunctionJudge)
    assert isinstance(load_judge("test_best_of_n:length_reward"), CallableReward)


def test_best_of_n_needs_sampling():
    """Greedy decoding gives N equal completions, yet the analytic KL log N - (N-1)/N was reported."""
    from alignkit.config import load_config
    from alignkit.errors import UserError

    with pytest.raises(UserError, match="best-of-N needs sampling.do_sample=true"):
        load_config(BestOfNConfig, None, ["sampling.do_sample=false"])


def test_a_nan_reward_is_an_error():
    """best-of-N and rejection sampling picked (and fine-tuned on) samples by NaN rewards, exit 0."""
    from alignkit.errors import UserError

    def nan_reward(prompts, completions, **fields):
        return [float("nan")] * len(completions)

    with pytest.raises(UserError, match=r"the reward gave a non-finite score \(nan\) to 2 of 2 completions"):
        sample_and_score(tiny_llama(), tiny_tokenizer(), [{"prompt": "review abc"}], CallableReward(nan_reward), 2,
                         SamplingConfig(max_new_tokens=4, seed=0))


def test_best_of_n_stage(tmp_path, tiny_llama_dir):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"review {w}"} for w in ("abc", "def", "ghi")])
    cfg = BestOfNConfig(model=ModelConfig(tiny_llama_dir), prompts=str(prompts), reward="test_best_of_n:n_chars",
                        gold="test_best_of_n:n_chars", n=[1, 4], sampling=SamplingConfig(max_new_tokens=8, seed=0),
                        output_dir=str(tmp_path / "bon"))
    summary = json.loads(open(run_best_of_n(cfg)).read())
    assert [s["n"] for s in summary] == [1, 4]
    assert summary[1]["reward"] >= summary[0]["reward"]  # best of 4 includes the single sample
    assert summary[1]["kl_analytic"] == pytest.approx(best_of_n_kl(4))
    assert summary[1]["gold"] == pytest.approx(summary[1]["reward"])
    # a sampler other than the policy (here temperature 0.5): log N - (N-1)/N is not the KL to the policy
    cooler = dataclasses.replace(cfg, sampling=SamplingConfig(max_new_tokens=8, seed=0, temperature=0.5))
    assert [s["kl_analytic"] for s in json.loads(open(run_best_of_n(cooler)).read())] == [None, None]


def test_a_rerun_with_other_ns_leaves_no_stale_file_and_a_missing_reward_model_is_named(tmp_path, tiny_llama_dir):
    """best_n4.jsonl of a run with n=[1, 4] stayed beside the best_n1/2 and summary.json of a later n=[1, 2]; a
    reward-model directory that does not exist was 'unknown judge'."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"review {w}"} for w in ("abc", "def")])
    cfg = BestOfNConfig(model=ModelConfig(tiny_llama_dir), prompts=str(prompts), reward="test_best_of_n:n_chars",
                        n=[1, 4], sampling=SamplingConfig(max_new_tokens=4, seed=0), output_dir=str(tmp_path / "bon"))
    run_best_of_n(cfg)
    run_best_of_n(dataclasses.replace(cfg, n=[1, 2]))
    assert sorted(p.name for p in (tmp_path / "bon").iterdir()) == ["best_n1.jsonl", "best_n2.jsonl", "config.yaml",
                                                                   "summary.json"]
    assert "n:\n- 1\n- 2\n" in (tmp_path / "bon" / "config.yaml").read_text()  # the settings, beside the results
    with pytest.raises(UserError, match=r"reward=.*/rm/model: no such reward-model directory"):
        run_best_of_n(dataclasses.replace(cfg, reward=str(tmp_path / "rm" / "model")))


def test_a_failing_gold_judge_leaves_no_partial_output(tmp_path, tiny_llama_dir, monkeypatch):
    """The best-of-1 file was written before the gold judge failed on best-of-2, and the error blamed the reward."""
    calls = []

    def gold(text):
        calls.append(text)
        return float("nan") if len(calls) > 3 else 1.0  # fine for best-of-1's three rows, NaN after

    monkeypatch.setattr("test_best_of_n.flaky_gold", gold, raising=False)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"review {w}"} for w in ("abc", "def", "ghi")])
    cfg = BestOfNConfig(model=ModelConfig(tiny_llama_dir), prompts=str(prompts), reward="test_best_of_n:n_chars",
                        gold="test_best_of_n:flaky_gold", n=[1, 2], sampling=SamplingConfig(max_new_tokens=4, seed=0),
                        output_dir=str(tmp_path / "bon"))
    with pytest.raises(UserError, match="the gold judge gave a non-finite score"):
        run_best_of_n(cfg)
    assert not (tmp_path / "bon").exists()


def test_rejection_sampling_starts_over_after_a_failed_first_round(tmp_path, tiny_llama_dir, monkeypatch):
    """Its config.yaml blocked the retry ("not empty, and rejection sampling does not resume")."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"review {i}"} for i in range(4)])
    monkeypatch.setattr("test_best_of_n.nan_chars", lambda text: float("nan"), raising=False)
    kw = dict(model=ModelConfig(tiny_llama_dir), prompts=str(prompts), n=2, keep=1, max_length=64,
              sampling=SamplingConfig(max_new_tokens=4, seed=0), output_dir=str(tmp_path / "rs"),
              train=TrainConfig(batch_size=4, micro_batch_size=4, max_steps=1, report_to=[]))
    with pytest.raises(UserError, match="non-finite score"):
        run_rejection_sampling(RejectionSamplingConfig(reward="test_best_of_n:nan_chars", **kw))
    model_dir = run_rejection_sampling(RejectionSamplingConfig(reward="test_best_of_n:n_chars", **kw))
    assert (model_dir / "config.json").is_file()
    with pytest.raises(UserError, match="does not resume"):  # a finished run is kept
        run_rejection_sampling(RejectionSamplingConfig(reward="test_best_of_n:n_chars", **kw))


def test_rejection_sampling_two_rounds(tmp_path, tiny_llama_dir):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"review {i}"} for i in range(8)])
    cfg = RejectionSamplingConfig(
        model=ModelConfig(tiny_llama_dir), lora=LoraConfig(r=4), prompts=str(prompts),
        reward="test_best_of_n:n_chars", rounds=2, n=2, keep=1, max_length=64,
        sampling=SamplingConfig(max_new_tokens=8, seed=0),
        train=TrainConfig(batch_size=4, micro_batch_size=4, max_steps=2, lr=1e-3, report_to=[]),
        output_dir=str(tmp_path / "rs"))
    model_dir = run_rejection_sampling(cfg)
    rounds = [json.loads(x) for x in (tmp_path / "rs" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["reward_kept"] >= r["reward_mean"] and r["examples"] == 8 for r in rounds)
    assert all(math.isfinite(r["sft_loss"]) for r in rounds)
    assert (model_dir / "config.json").is_file()


def test_rejection_sampling_with_too_few_prompts_fails_before_sampling(tmp_path, tiny_llama_dir, monkeypatch):
    import alignkit.algorithms.rejection_sampling as rs

    monkeypatch.setattr(rs, "load_causal_lm", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"review {i}"} for i in range(3)])
    cfg = RejectionSamplingConfig(
        model=ModelConfig(tiny_llama_dir), prompts=str(prompts), reward="test_best_of_n:n_chars", n=2, keep=2,
        train=TrainConfig(batch_size=8, micro_batch_size=8, report_to=[]), output_dir=str(tmp_path / "rs"))
    with pytest.raises(UserError, match=r"3 prompts x keep 2 give at most 6 .* fewer than train.batch_size \(8\)"):
        run_rejection_sampling(cfg)
    assert not (tmp_path / "rs").exists()


def test_a_null_sampling_seed_draws_from_torchs_global_generator(tmp_path, tiny_llama_dir):
    """sampling.seed=null ("torch's global generator") was seed 0 in best-of-N: every run drew the same samples."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"review {w}"} for w in ("abc", "def", "ghi")])

    def samples(name, global_seed, seed):
        torch.manual_seed(global_seed)
        cfg = BestOfNConfig(model=ModelConfig(tiny_llama_dir), prompts=str(prompts), reward="test_best_of_n:n_chars",
                            n=[2], sampling=SamplingConfig(max_new_tokens=8, seed=seed), output_dir=str(tmp_path / name))
        run_best_of_n(cfg)
        return (tmp_path / name / "best_n2.jsonl").read_text()

    assert samples("a", 1, None) != samples("b", 2, None)
    assert samples("c", 1, 0) == samples("d", 2, 0)  # a given seed fixes the samples


def test_rejection_sampling_rounds_draw_new_samples_with_a_null_seed(tmp_path, tiny_llama_dir):
    """With sampling.seed=null each round's engine re-seeded torch's global generator: rounds 2 and 3 drew the same
    numbers (the same samples, from a policy that did not move)."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"review {i}"} for i in range(4)])
    cfg = RejectionSamplingConfig(
        model=ModelConfig(tiny_llama_dir), prompts=str(prompts), reward="test_best_of_n:n_chars", rounds=3, n=2,
        max_length=64, sampling=SamplingConfig(max_new_tokens=8, seed=None), output_dir=str(tmp_path / "rs"),
        train=TrainConfig(batch_size=4, micro_batch_size=4, max_steps=1, lr=1e-30, report_to=[]))
    run_rejection_sampling(cfg)
    samples = [(tmp_path / "rs" / f"round{r}" / "samples.jsonl").read_text() for r in (1, 2, 3)]
    assert len(set(samples)) == 3


def test_rejection_sampling_says_why_a_round_has_too_few_rows(tmp_path, tiny_llama_dir):
    """Kept completions that max_length leaves nothing of gave 'only 0 training rows', after round1/ was written."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"review {i}"} for i in range(4)])
    cfg = RejectionSamplingConfig(
        model=ModelConfig(tiny_llama_dir), prompts=str(prompts), reward="test_best_of_n:n_chars", n=2, max_length=2,
        sampling=SamplingConfig(max_new_tokens=4, seed=0), output_dir=str(tmp_path / "rs"),
        train=TrainConfig(batch_size=4, micro_batch_size=4, max_steps=1, report_to=[]))
    with pytest.raises(UserError, match=r"round 1: 4 of the 4 kept completions are empty or leave no completion token "
                                        r"within max_length=2"):
        run_rejection_sampling(cfg)
    assert not (tmp_path / "rs" / "round1").exists()


def test_rejection_sampling_refuses_resume():
    """train.resume was listed by --print-config and ignored (in an empty output_dir the run started over)."""
    from alignkit.config import load_config

    with pytest.raises(UserError, match="rejection sampling does not resume"):
        load_config(RejectionSamplingConfig, None, ["train.resume=true"])
