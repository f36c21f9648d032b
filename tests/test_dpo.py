"""The DPO stage: sequence log-probs, reference caching and LoRA reference, learning, KTO data, KL estimate."""

import copy
import json
import math

import pytest
import torch

from alignkit.algorithms.dpo import DPOConfig, DPODataConfig, KLEvalConfig, PairPreference, UnpairedPreference, run_dpo
from alignkit.errors import UserError
from alignkit.algorithms.policy_kl import policy_kl
from alignkit.algorithms.reference import Reference, cache_reference, pair_logps, sequence_logps
from alignkit.data.preference_tokens import (
    collate_pairs,
    collate_sequences,
    load_pairs,
    load_unpaired,
    tokenize_completion,
)
from alignkit.engine.config import TrainConfig
from alignkit.engine.loop import Engine
from alignkit.losses.preference import PREFERENCE_LOSSES
from alignkit.models.load import LoraConfig, ModelConfig, add_lora
from alignkit.models.tiny import pseudo_words, tiny_gpt2, tiny_llama, tiny_tokenizer

from conftest import write_jsonl


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    """A learnable preference: the chosen review says 'good', the rejected one 'bad'."""
    words = pseudo_words(3 * n, seed)
    return [{"prompt": f"review {words[3 * i]} {words[3 * i + 1]}", "chosen": f"{words[3 * i]} is good good",
             "rejected": f"{words[3 * i]} is bad bad"} for i in range(n)]


@pytest.fixture
def pair_files(tmp_path):
    return (str(write_jsonl(tmp_path / "train.jsonl", make_pairs(48, seed=0))),
            str(write_jsonl(tmp_path / "eval.jsonl", make_pairs(16, seed=1))))


def _pairs(tmp_path, n=8):
    tok = tiny_tokenizer()
    return tok, load_pairs(str(write_jsonl(tmp_path / "p.jsonl", make_pairs(n))), tok, 64)


def _seqs(rows):
    """(prompt, completion) sequences of pairs, chosen then rejected for each pair."""
    return [(r["prompt_ids"], r[side]) for r in rows for side in ("chosen_ids", "rejected_ids")]


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2])
def test_sequence_logps_match_unpadded_forward(tmp_path, make_model):
    """Left-padded prompts + right-padded completions + logits_to_keep give the log-probs of each sequence alone."""
    tok, rows = _pairs(tmp_path, 4)
    model = make_model()
    seqs = _seqs(rows)
    sums, counts = sequence_logps(model, collate_sequences(seqs, tok.pad_token_id))
    for (prompt, completion), total, n in zip(seqs, sums, counts):
        ids = torch.tensor([prompt + completion])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        expected = logp[len(prompt) - 1 :].gather(-1, torch.tensor(completion)[:, None]).sum()
        assert n == len(completion)
        assert total.item() == pytest.approx(expected.item(), abs=1e-3)


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2])
def test_shared_prompt_pass_equals_full_sequences(tmp_path, make_model):
    """Prompt once + both completions over its cache = two full sequences per pair: values and gradients."""
    tok, rows = _pairs(tmp_path, 4)
    rows[1]["prompt_ids"] = rows[1]["prompt_ids"][:3]  # prompts of different lengths (left padding)
    model = make_model().train()
    full, full_counts = sequence_logps(model, collate_sequences(_seqs(rows), tok.pad_token_id))
    full.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    shared, counts = pair_logps(model, collate_pairs(rows, tok.pad_token_id))
    shared.sum().backward()
    assert torch.allclose(shared.flatten(), full, atol=1e-4) and torch.equal(counts.flatten(), full_counts)
    for name, grad in grads.items():
        assert torch.allclose(model.get_parameter(name).grad, grad, atol=1e-4), name


def test_pair_tokenisation_keeps_the_prompt_boundary(tmp_path):
    tok = tiny_tokenizer()
    prompt, completion = tokenize_completion("review abc", "abc is good", tok, 64, True)
    assert tok.decode(prompt).endswith("assistant: ")
    assert completion[-1] == tok.eos_token_id
    rankings = [{"prompt": "p", "completions": ["a b", "c d", "e f"], "ranking": [1, [0, 2]]}]
    assert len(load_pairs(str(write_jsonl(tmp_path / "r.jsonl", rankings)), tok, 64)) == 2  # ties dropped


def _spec_algorithm(loss: str, tok, reference: Reference):
    cfg = DPOConfig(loss=loss)
    return PairPreference(cfg.spec, cfg.hyper, tok.pad_token_id, reference)


def test_lora_reference_is_the_disabled_adapter(tmp_path):
    tok, rows = _pairs(tmp_path, 4)
    base = tiny_llama(seed=1)
    frozen = copy.deepcopy(base)
    policy = add_lora(base, LoraConfig(r=4))
    with torch.no_grad():  # move the adapter away from its zero init, so policy != reference
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    batch = collate_pairs(rows, tok.pad_token_id)
    ref = Reference().run(policy, lambda m: pair_logps(m, batch)[0])
    assert torch.allclose(ref, pair_logps(frozen, batch)[0], atol=1e-4)
    assert not torch.allclose(ref, pair_logps(policy, batch)[0], atol=1e-2)


@pytest.mark.parametrize("lora", [0, 4])
def test_cached_reference_equals_live(tmp_path, lora):
    """Cache before training, train a step, then the cached and the live reference give the same loss."""
    tok, rows = _pairs(tmp_path, 8)
    policy = tiny_llama(seed=2)
    policy = add_lora(policy, LoraConfig(r=lora)) if lora else policy
    live = Reference() if lora else Reference(copy.deepcopy(policy).requires_grad_(False))
    cached_rows = copy.deepcopy(rows)
    algorithm = _spec_algorithm("dpo", tok, live)
    cache_reference(policy, _spec_algorithm("dpo", tok, Reference()), {"train": cached_rows}, tmp_path / "ref.pt",
                    "tiny", 4, "cpu")
    # float32 training: the cache above is float32, and the live reference runs in the training's precision
    engine = Engine(TrainConfig(batch_size=8, micro_batch_size=8, lr=1e-2, max_steps=1, warmup_ratio=0.0, report_to=[],
                                precision="fp32"), tmp_path / "r")
    policy, _ = engine.fit(policy, algorithm, rows)
    policy.eval()
    with torch.no_grad():
        live, cached = ({k: v.to(policy.device) for k, v in algorithm.prepare(r).items()} for r in (rows, cached_rows))
        loss_live, m_live = algorithm.loss(policy, live, 8)
        loss_cached, m_cached = algorithm.loss(policy, cached, 8)
    assert abs(m_live["rewards/margin"].item()) > 1e-4  # the step moved the policy off the reference
    assert loss_cached.item() == pytest.approx(loss_live.item(), abs=1e-5)
    # a second run with the same data and reference reads the cache instead of recomputing it
    again = copy.deepcopy(rows)
    cache_reference(None, None, {"train": again}, tmp_path / "ref.pt", "tiny", 4, "cpu")
    assert [r["ref"] for r in again] == [r["ref"] for r in cached_rows]
    # a cache file cut short (a full disk) is computed again, with a warning (it was a traceback)
    (tmp_path / "ref.pt").write_bytes((tmp_path / "ref.pt").read_bytes()[:200])
    again = copy.deepcopy(rows)
    cache_reference(policy, _spec_algorithm("dpo", tok, Reference()), {"train": again}, tmp_path / "ref.pt",
                    "tiny", 4, "cpu")
    assert len(again[0]["ref"]) == len(cached_rows[0]["ref"])


def test_accumulation_matches_one_batch(tmp_path):
    tok, rows = _pairs(tmp_path, 8)
    cache_reference(tiny_llama(seed=3), _spec_algorithm("ipo", tok, Reference()), {"train": rows}, tmp_path / "ref.pt",
                    "t", 8, "cpu")
    grads = []
    for micro in (2, 8):
        engine = Engine(TrainConfig(batch_size=8, micro_batch_size=micro, report_to=[], precision="fp32"),
                        tmp_path / f"a{micro}")
        model = tiny_llama(seed=3).train()
        with torch.no_grad():
            model.lm_head.weight.add_(0.01 * torch.randn_like(model.lm_head.weight))  # policy != reference
        model.to(engine.accelerator.device)
        engine.accumulate(model, _spec_algorithm("ipo", tok, Reference()), rows)
        grads.append(model.lm_head.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_kto_reference_point_is_the_whole_batchs(tmp_path):
    """KTO's reference point (the mean KL of the mismatched pairs) was each micro-batch's own: gradients
    depended on the split. It is now the global batch's, so accumulation gives the gradient of one batch."""
    tok = tiny_tokenizer()
    rows = load_unpaired(str(write_jsonl(tmp_path / "p.jsonl", make_pairs(4))), tok, 64)  # 8 unpaired rows
    reference = tiny_llama(seed=3).eval()
    with torch.no_grad():  # a sharper, random reference: the policy's log-probs are higher, the KL positive
        reference.lm_head.weight.add_(torch.randn(reference.lm_head.weight.shape, generator=torch.Generator().manual_seed(1)))
    cfg = DPOConfig(loss="kto")
    grads, kls = [], []
    for micro in (2, 8):
        engine = Engine(TrainConfig(batch_size=8, micro_batch_size=micro, report_to=[], precision="fp32"),
                        tmp_path / f"a{micro}")
        model = tiny_llama(seed=3).train()
        with torch.no_grad():
            model.lm_head.weight.add_(0.3 * torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(0)))
        algorithm = UnpairedPreference(cfg.spec, cfg.hyper, tok.pad_token_id, Reference(reference))
        _, metrics = engine.accumulate(model, algorithm, rows)
        grads.append(model.lm_head.weight.grad.clone())
        kls.append(metrics["kl"])
    assert kls[0] > 0 and kls[0] == pytest.approx(kls[1], abs=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def _run(tmp_path, files, loss, lora=0, steps=12, **kw):
    cfg = DPOConfig(
        model=ModelConfig(kw.pop("model")), lora=LoraConfig(r=lora),
        data=DPODataConfig(train=files[0], eval=files[1], max_length=64),
        train=TrainConfig(batch_size=8, micro_batch_size=8, max_steps=steps, lr=kw.pop("lr", 1e-3), report_to=[]),
        kl=KLEvalConfig(samples=4, max_new_tokens=8), loss=loss, output_dir=str(tmp_path / f"run-{loss}"), **kw)
    run_dpo(cfg)
    lines = [json.loads(x) for x in (tmp_path / f"run-{loss}" / "metrics.jsonl").read_text().splitlines()]
    return lines, json.loads((tmp_path / f"run-{loss}" / "kl.json").read_text())


def test_bad_kl_prompts_fail_before_training(tmp_path, pair_files, tiny_llama_dir):
    """The KL prompts are read with the data: a bad file was found after training, and the model was lost."""
    cfg = DPOConfig(model=ModelConfig(tiny_llama_dir), data=DPODataConfig(train=pair_files[0], eval=None),
                    kl=KLEvalConfig(prompts=str(tmp_path / "missing.jsonl")), output_dir=str(tmp_path / "run"),
                    train=TrainConfig(batch_size=8, micro_batch_size=8, max_steps=2, report_to=[]))
    with pytest.raises(UserError, match="missing.jsonl: file not found"):
        run_dpo(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_too_few_rows_fail_before_the_reference_is_scored(tmp_path, pair_files, tiny_llama_dir, monkeypatch):
    import alignkit.algorithms.dpo as dpo

    monkeypatch.setattr(dpo, "cache_reference", lambda *a, **k: pytest.fail("reference scored before the check"))
    cfg = DPOConfig(model=ModelConfig(tiny_llama_dir), data=DPODataConfig(train=pair_files[0], eval=None),
                    output_dir=str(tmp_path / "run"),
                    train=TrainConfig(batch_size=4096, micro_batch_size=8, max_steps=2, report_to=[]))
    with pytest.raises(UserError, match=r"training rows, fewer than train.batch_size \(4096\)"):
        run_dpo(cfg)


def test_dpo_learns_the_preference(tmp_path, pair_files, tiny_llama_dir):
    lines, kl = _run(tmp_path, pair_files, "dpo", model=tiny_llama_dir)
    first, final = lines[0], lines[-1]
    assert first["rewards/margin"] == pytest.approx(0.0, abs=1e-4)  # the first step's policy is the reference
    assert final["eval/rewards/accuracy"] > 0.9
    assert final["eval/rewards/margin"] > 0.3
    assert final["eval/loss"] < math.log(2) - 0.1
    assert math.isfinite(kl["kl"]) and len(kl["samples"]) == 4
    assert (tmp_path / "run-dpo" / "model" / "config.json").is_file()


def test_kto_with_lora_and_live_reference_learns(tmp_path, pair_files, tiny_llama_dir):
    lines, _ = _run(tmp_path, pair_files, "kto", lora=8, lr=3e-3, model=tiny_llama_dir, reference="live")
    assert lines[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-4)  # the first step's policy is the reference
    assert lines[0]["rewards/rejected"] == pytest.approx(0.0, abs=1e-4)
    assert lines[-1]["eval/rewards/chosen"] - lines[-1]["eval/rewards/rejected"] > 0.05
    assert (tmp_path / "run-kto" / "adapter").is_dir()


def test_kto_rows_pair_each_prompt_with_another_completion(tmp_path):
    tok = tiny_tokenizer()
    pairs = make_pairs(6)
    rows = load_unpaired(str(write_jsonl(tmp_path / "p.jsonl", pairs)), tok, 64)
    assert len(rows) == 12 and sum(r["desirable"] for r in rows) == 6
    prompt_of = {tuple(r["seqs"][0][1]): r["prompt"] for r in rows}
    assert all(prompt_of[tuple(r["seqs"][1][1])] != r["prompt"] for r in rows)  # another prompt's completion
    # four completions per prompt: the shuffled rotation took one of the same prompt (a matched pair) 1 time in 4
    many = [{"prompt": f"review {p}", "completion": f"text {p} {j}", "label": j % 2 == 0} for p in range(3)
            for j in range(4)]
    rows = load_unpaired(str(write_jsonl(tmp_path / "m.jsonl", many)), tok, 64)
    prompt_of = {tuple(r["seqs"][0][1]): r["prompt"] for r in rows}
    assert all(prompt_of[tuple(r["seqs"][1][1])] != r["prompt"] for r in rows)
    unpaired = [{"prompt": f"review {i}", "completion": f"text {i}", "label": i % 2 == 0} for i in range(4)]
    rows = load_unpaired(str(write_jsonl(tmp_path / "u.jsonl", unpaired)), tok, 64)
    assert [r["desirable"] for r in rows] == [True, False, True, False]
    from alignkit.errors import UserError

    bad = write_jsonl(tmp_path / "bad.jsonl", [*unpaired, {"prompt": "p", "completion": "c", "label": "yes"}])
    with pytest.raises(UserError, match=r"bad.jsonl:5: field 'label'"):
        load_unpaired(str(bad), tok, 64)
    with pytest.raises(UserError, match=r"u.jsonl:1: neither a pair .* an unpaired KTO row .* needs loss=kto"):
        load_pairs(str(tmp_path / "u.jsonl"), tok, 64)  # what the paired losses read


def test_a_prompt_cut_inside_an_earlier_assistant_turn_leaves_no_completion():
    """max_length ending inside a message prompt's assistant turn made that turn's fragment the completion: chosen
    and rejected came out the same text (and a KTO row's label went to it)."""
    tok = tiny_tokenizer()
    prompt = [{"role": "user", "content": "summarise the plot"},
              {"role": "assistant", "content": "the plot follows a young sailor who leaves home and is lost at sea"},
              {"role": "user", "content": "shorter please"}]
    whole_prompt, whole = tokenize_completion(prompt, "a sailor is lost", tok, 1 << 30, True)
    cut = len(whole_prompt) - 24  # inside the earlier assistant turn (the last user turn is 14 tokens)
    assert tokenize_completion(prompt, "a sailor is lost", tok, cut, True) is None
    kept = tokenize_completion(prompt, "a sailor is lost", tok, len(whole_prompt) + 2, True)
    assert kept == (whole_prompt, whole[:2])


def test_soft_labels_only_for_losses_that_take_them(tmp_path, tiny_llama_dir):
    from alignkit.errors import UserError

    labelled = [{**p, "label": 0.8} for p in make_pairs(16)]
    path = str(write_jsonl(tmp_path / "soft.jsonl", labelled))
    with pytest.raises(UserError, match="soft labels"):
        _run(tmp_path, (path, None), "simpo", steps=1, model=tiny_llama_dir)
    assert PREFERENCE_LOSSES["cdpo"].soft_labels
    hard = str(write_jsonl(tmp_path / "hard.jsonl", make_pairs(16)))
    with pytest.raises(UserError, match=f"^{path}: rows carry soft labels"):  # the held-out file was not checked
        _run(tmp_path, (hard, path), "ipo", steps=1, model=tiny_llama_dir)
    with pytest.raises(UserError, match=f"^{path}:1: a pair with a soft label"):  # KTO made every chosen desirable
        _run(tmp_path, (path, None), "kto", steps=1, model=tiny_llama_dir)


def test_kl_is_zero_for_the_reference_itself(tmp_path):
    tok = tiny_tokenizer()
    policy = add_lora(tiny_llama(seed=4), LoraConfig(r=4))  # zero-initialised adapter: policy = reference
    out = policy_kl(policy, Reference(), tok, ["review abc", "review def"], max_new_tokens=6)
    assert out["kl"] == pytest.approx(0.0, abs=1e-4)
    assert all(s["tokens"] >= 1 for s in out["samples"])


# The entries proposed for alignkit/cli.py's STAGES table (added there by the lead).
CLI_STAGES = {
    "dpo": ("alignkit.algorithms.dpo", "DPOConfig", "run_dpo",
            "direct preference optimisation: loss=dpo|cdpo|ipo|simpo|orpo|kto"),
    "best-of-n": ("alignkit.algorithms.best_of_n", "BestOfNConfig", "run_best_of_n",
                  "sample N completions per prompt, keep the best by a reward source"),
    "rejection-sampling": ("alignkit.algorithms.rejection_sampling", "RejectionSamplingConfig",
                           "run_rejection_sampling", "iterated best-of-N fine-tuning (sample, keep the best, SFT)"),
}


def test_cli_entries(monkeypatch, capsys, tmp_path, pair_files, tiny_llama_dir):
    from alignkit import cli

    for name, entry in CLI_STAGES.items():
        monkeypatch.setitem(cli.STAGES, name, entry)
        assert cli.main([name, "--print-config"]) == 0
    assert "orpo_lambda" in capsys.readouterr().out
    assert cli.main(["dpo", "loss=nope"]) == 2
    assert "is not one of dpo, cdpo" in capsys.readouterr().err
    for bad, message in (("beta=nan", "beta must be in (0, inf), got nan"), ("tau=inf", "tau must be in (0, inf)"),
                         ("gamma=nan", "gamma must be in [0, inf)"), ("orpo_lambda=-1", "orpo_lambda must be in [0"),
                         ("lambda_d=-1", "lambda_d must be in (0, inf)"), ("lambda_u=nan", "lambda_u must be in"),
                         ("data.max_length=1", "data.max_length must be in [2, inf), got 1")):
        assert cli.main(["dpo", bad]) == 2  # beta=nan failed at step 1 as a "non-finite loss ... lower train.lr"
        assert message in capsys.readouterr().err
    assert cli.main(["dpo", "loss=nope"]) == 2
    assert "is not one of dpo, cdpo" in capsys.readouterr().err
    out = tmp_path / "cli-run"
    code = cli.main(["dpo", f"model.path={tiny_llama_dir}", f"data.train={pair_files[0]}", "data.eval=null",
                     "loss=ipo", "train.max_steps=2", "train.report_to=[]", "kl.samples=0", f"output_dir={out}"])
    assert code == 0 and (out / "model" / "config.json").is_file() and (out / "reference_logps.pt").is_file()


def test_kl_prompts_too_long_for_the_context_fail_before_training(tmp_path, capsys, pair_files, tiny_llama_dir):
    """They failed after training, in the KL step before the save, so the trained model was lost (and the
    message named sampling.max_new_tokens, a key DPO does not have)."""
    from alignkit import cli

    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "review " + " ".join(["food"] * 600)}])
    out = tmp_path / "run"
    code = cli.main(["dpo", f"model.path={tiny_llama_dir}", f"data.train={pair_files[0]}", "data.eval=null",
                     "train.max_steps=1", "train.report_to=[]", f"kl.prompts={long}", "kl.samples=1",
                     "kl.max_new_tokens=4", f"output_dir={out}"])
    assert code == 2 and "with kl.max_new_tokens=4 the model would read" in capsys.readouterr().err
    assert not (out / "reference_logps.pt").exists() and not (out / "model").exists()


def test_two_processes_log_the_metrics_of_one(tmp_path, pair_files, tiny_llama_dir):
    """Under two processes the logged metrics were rank 0's alone (held-out accuracy 1.09 = 6 hits / 5.5), and a
    held-out file of one pair (no row for rank 1) hung the run in DDP's buffer broadcast."""
    import os
    import socket
    import subprocess
    import sys

    write_jsonl(tmp_path / "one.jsonl", make_pairs(1, seed=1))
    args = ["dpo", f"model.path={tiny_llama_dir}", f"data.train={pair_files[0]}", "train.max_steps=2",
            "train.lr=1e-3", "train.batch_size=8", "train.report_to=[]", "kl.samples=0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = {"single": [sys.executable, "-m", "alignkit.cli"],
              "ddp": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                      "-m", "alignkit.cli"]}
    logs = {}
    for name, prefix in launch.items():
        for stem, eval_file in (("eval", pair_files[1]), ("one", tmp_path / "one.jsonl")):
            micro = 8 if name == "single" else 4
            out = tmp_path / f"{name}-{stem}"
            run = subprocess.run([*prefix, *args, f"data.eval={eval_file}", f"train.micro_batch_size={micro}",
                                  f"output_dir={out}"], capture_output=True, text=True, env=env, timeout=240)
            assert run.returncode == 0, run.stderr[-3000:]
            logs[out.name] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for stem in ("eval", "one"):
        single, ddp = logs[f"single-{stem}"], logs[f"ddp-{stem}"]
        assert [sorted(x) for x in single] == [sorted(x) for x in ddp]
        for a, b in zip(single, ddp):
            for key in a:
                if key not in ("tokens_per_s", "eval/tokens_per_s") and a[key] is not None:
                    assert b[key] == pytest.approx(a[key], abs=1e-4), (stem, key)
    assert 0.5 < logs["ddp-eval"][-1]["eval/rewards/accuracy"] <= 1.0


def test_logged_logps_are_what_each_loss_reads(tmp_path):
    """logps/chosen was the summed log-prob for every loss; SimPO, ORPO and IPO read per-token means (as TRL logs)."""
    tok, rows = _pairs(tmp_path, 4)
    model = tiny_llama(seed=3)
    batch = _spec_algorithm("dpo", tok, Reference()).prepare(rows)
    with torch.no_grad():
        sums, counts = pair_logps(model, batch)
    for loss, expected in (("dpo", sums), ("simpo", sums / counts), ("orpo", sums / counts)):
        _, metrics = _spec_algorithm(loss, tok, Reference()).loss(model, batch, normaliser=4)
        assert float(metrics["logps/chosen"]) == pytest.approx(float(expected[:, 0].mean()), rel=1e-5)
        assert float(metrics["logps/rejected"]) == pytest.approx(float(expected[:, 1].mean()), rel=1e-5)


def test_a_pairs_margin_is_not_taken_silently(tmp_path, caplog):
    """The pairs format's `margin` is read by `alignkit rm` only; the DPO family dropped it without a word."""
    tok = tiny_tokenizer()
    pairs = make_pairs(3)
    pairs[1]["margin"] = 0.5
    load_pairs(str(write_jsonl(tmp_path / "m.jsonl", pairs)), tok, 64)
    assert "'margin' of 1 pairs (first " in caplog.text and "m.jsonl:2)" in caplog.text


def test_the_reference_cache_is_keyed_by_the_dtype_that_scored_it(tmp_path, pair_files, tiny_llama_dir, caplog,
                                                                    monkeypatch):
    """The key held the config's `model.dtype` string: `auto` scored by a float32 base on one machine and a bf16 base
    on another (a GPU's) read the same cache (5.9e-3 nats apart, a step-1 margin that should be 0)."""
    import logging
    import shutil

    caplog.set_level(logging.INFO)
    _run(tmp_path, pair_files, "dpo", lora=2, steps=1, model=tiny_llama_dir)
    cache = tmp_path / "run-dpo" / "reference_logps.pt"
    shutil.copy(cache, tmp_path / "float32.pt")
    shutil.rmtree(tmp_path / "run-dpo")
    (tmp_path / "run-dpo").mkdir()
    shutil.copy(tmp_path / "float32.pt", cache)  # the same run where `auto` gives a bf16 base (a GPU's)
    monkeypatch.setattr("alignkit.models.load.resolve_dtype", lambda name, trained=False: torch.float32 if trained
                        else torch.bfloat16)
    caplog.clear()
    _run(tmp_path, pair_files, "dpo", lora=2, steps=1, model=tiny_llama_dir)
    assert "computing reference log-probs" in caplog.text
