"""Constitutional AI and RLAIF: constitutions, prompt construction, (A)/(B) probabilities, order swapping,
soft labels through the reward-model and DPO data paths, file formats and the CLI group."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from alignkit.algorithms.constitutional import (
    CAILabelConfig,
    ReviseConfig,
    agreement_report,
    critique_messages,
    labelled_pair,
    report_path,
    revise,
    revision_messages,
    run_cai_label,
    run_cai_revise,
)
from alignkit.data.constitution import Principle, load_constitution, sample_principles
from alignkit.errors import UserError
from alignkit.feedback.ai_judge import (
    ANSWER_PREFIX,
    Comparison,
    JudgeConfig,
    PairwiseJudge,
    answer_probs,
    comparison_request,
    judge_context,
)
from alignkit.models.load import ModelConfig
from alignkit.models.tiny import tiny_llama, tiny_tokenizer
from alignkit.rewards.ai_judge import AIJudgeReward, win_rate
from alignkit.rollout.generate import SamplingConfig

from conftest import write_jsonl

P = Principle(name="kind", critique="Was that kind?", revision="Say it kindly.", comparison="Which is kinder?")


@pytest.fixture(scope="module")
def judge():
    return PairwiseJudge(tiny_llama(), tiny_tokenizer(), JudgeConfig(batch_size=3))


# ------------------------------------------------------------------------------------------- constitutions

def test_default_constitution_and_selection():
    names = [p.name for p in load_constitution()]
    assert names == ["helpful", "honest", "harmless", "positive"]
    (positive,) = load_constitution(None, ["positive"])
    assert positive.comparison == "Which of these responses is more positive and enthusiastic?"
    assert "\n" not in positive.critique  # folded YAML, whitespace normalised
    with pytest.raises(UserError, match="principles: 'kindness' is not in .*constitution.yaml"):
        load_constitution(None, ["kindness"])
    with pytest.raises(UserError, match="principles: an empty list selects none"):  # it meant all of them
        load_constitution(None, [])


@pytest.mark.parametrize("text, message", [
    ("principles:\n  - {name: a, critique: c, revision: r}\n", r"c.yaml: principles\[0\]\.comparison: missing"),
    ("principles:\n  - {name: a, critique: c, revision: r, comparison: q, tone: x}\n",
     r"c.yaml: principles\[0\]: unknown key 'tone'"),
    ("principles:\n  - {name: a, critique: c, revision: '  ', comparison: q}\n",
     r"c.yaml: principles\[0\]\.revision: must be a non-empty string"),
    ("principles:\n  - {name: a, critique: c, revision: r, comparison: q}\n"
     "  - {name: a, critique: c, revision: r, comparison: q}\n", r"c.yaml: principles\[1\]\.name: duplicate name 'a'"),
    ("principles: []\n", "c.yaml: principles: must be a non-empty list"),
    ("rules: []\n", "c.yaml: the top level must be a mapping with a 'principles' list"),
    ("principles:\n  - [a\n", r"c.yaml:\d+: not valid YAML/JSON"),
])
def test_constitution_errors_name_file_and_field(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        load_constitution(path)


def test_json_constitution_and_seeded_draws(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"principles": [vars(P), {**vars(P), "name": "calm"}]}))
    principles = load_constitution(path)
    assert principles[0] == P
    draws = [sample_principles(principles, 20, seed=3, key=k) for k in range(2)]
    assert draws[0] == sample_principles(principles, 20, seed=3, key=0)  # reproducible
    assert draws[0] != draws[1] and {p.name for p in draws[0]} == {"kind", "calm"}


# ------------------------------------------------------------------------------------ prompt construction

def test_critique_and_revision_prompts_through_the_chat_template():
    tok = tiny_tokenizer()
    convo = revision_messages("Insult my boss.", "No.", P, "It was curt.")
    assert convo[:3] == critique_messages("Insult my boss.", "No.", P)
    text = tok.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)
    assert text == ("user: Insult my boss.\nassistant: No.<|endoftext|>\nuser: Was that kind?\n"
                    "assistant: It was curt.<|endoftext|>\nuser: Say it kindly.\nassistant: ")
    # a conversation prompt keeps its turns
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert [m["role"] for m in critique_messages(prompt, "Yo", P)] == ["system", "user", "assistant", "user"]


def test_judge_prompt_through_the_chat_template():
    tok = tiny_tokenizer()
    request = comparison_request("Review X.", " good ", "bad", P.comparison)
    assert request == ("Consider the following conversation between a human and an assistant:\nHuman: Review X.\n"
                       "Which is kinder?\nOptions:\n(A) good\n(B) bad")
    assert judge_context(tok, request, ANSWER_PREFIX, True) == f"user: {request}\nassistant: The answer is:"
    assert judge_context(tok, request, ANSWER_PREFIX, False) == f"{request}\nThe answer is:"
    convo = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}, {"role": "user", "content": "?"}]
    assert comparison_request(convo, "a", "b", "Q?").split("\n")[1:4] == ["Human: Hi", "Assistant: Hey", "Human: ?"]


# ----------------------------------------------------------------------------------- (A)/(B) probabilities

def test_answer_probs_equal_a_manual_softmax_at_the_answer_position(judge):
    tok, model = judge.tokenizer, judge.model
    contexts = [judge_context(tok, comparison_request(f"Review {w}.", "good food " * n, "bad", P.comparison),
                              ANSWER_PREFIX, True) for n, w in ((1, "x"), (4, "the food place"), (2, "y"))]
    got = answer_probs(model, tok, contexts, add_special=False, batch_size=2)  # left-padded batches
    for context, p in zip(contexts, got):
        a = tok(context + " (A)", add_special_tokens=False)["input_ids"]
        b = tok(context + " (B)", add_special_tokens=False)["input_ids"]
        n = next(i for i in range(len(a)) if a[i] != b[i])  # the answer position
        with torch.no_grad():
            logits = model(torch.tensor([a[:n]])).logits[0, -1]  # unpadded, logits of every position
        manual = torch.softmax(torch.stack([logits[a[n]], logits[b[n]]]), -1)[0]
        assert tok.decode(a[n]) == "A" and tok.decode(b[n]) == "B"
        assert float(p) == pytest.approx(float(manual), abs=1e-5)
    assert not torch.allclose(got, torch.full_like(got, 0.5), atol=1e-4)  # a random model is not indifferent


def test_both_orders_are_judged_and_averaged(judge):
    prompts, a, b = ["Review x.", "Review y."], ["good good", "the food"], ["bad", "service was bad"]
    q = [P.comparison] * 2
    c = judge.compare(prompts, a, b, q)
    assert torch.allclose(c.p_ab, judge.letter_probs(prompts, a, b, q)[0], atol=1e-6)
    assert torch.allclose(c.p_ba, judge.letter_probs(prompts, b, a, q)[0], atol=1e-6)
    assert torch.allclose(c.prob, 0.5 * (c.p_ab + 1 - c.p_ba))
    swapped = judge.compare(prompts, b, a, q)  # presenting the pair the other way round changes nothing
    assert torch.allclose(swapped.prob, 1 - c.prob, atol=1e-6)
    # a judge that always says (A) with 0.8 picks by position: its averaged label is exactly 1/2
    biased = Comparison(torch.tensor([0.8, 0.8]), torch.tensor([0.8, 0.3]))
    assert biased.prob.tolist() == pytest.approx([0.5, 0.75]) and biased.same_letter.tolist() == [True, False]


def test_chain_of_thought_clamps_probabilities():
    cfg = JudgeConfig(chain_of_thought=True, rationale=SamplingConfig(max_new_tokens=3, do_sample=False))
    judge = PairwiseJudge(tiny_llama(seed=1), tiny_tokenizer(), cfg)
    c = judge.compare(["Review x."] * 3, ["good", "bad", "a"], ["bad", "good", "the"], [P.comparison] * 3)
    assert len(c.rationales) == 3 and all(len(r) == 2 for r in c.rationales)
    for p in (c.p_ab, c.p_ba):
        assert bool(((p >= 0.4) & (p <= 0.6)).all())


def test_agreement_report_hand_computed():
    p_ab = torch.tensor([0.9, 0.7, 0.2, 0.6])  # P(A) with a as (A)
    p_ba = torch.tensor([0.2, 0.6, 0.3, 0.4])  # P(A) with b as (A)
    gap = torch.tensor([1.0, 1.0, -0.5, 0.0])  # gold g(a) - g(b); the last pair is a gold tie
    r = agreement_report(p_ab, p_ba, gap)
    # letters (A, B), (A, A), (B, B), (A, B): pairs 1 and 2 pick by position; P(a > b) = .85, .55, .45, .6
    assert r["same_letter_rate"] == 0.5 and r["letter_a_rate"] == 4 / 8
    assert (r["gold_pairs"], r["gold_ties_left_out"]) == (3, 1)
    assert r["agreement_order_ab"] == pytest.approx(3 / 3)  # picks a, a, b: all right
    assert r["agreement_order_ba"] == pytest.approx(1 / 3)  # 1 - p_ba = 0.8, 0.4, 0.7 -> a, b, a
    assert r["agreement_swapped"] == pytest.approx(3 / 3)  # 0.85, 0.55, 0.45 -> a, a, b
    assert r["agreement_consistent"] == pytest.approx(1.0)  # pair 0 is the only consistent, non-tied one
    assert r["mean_confidence_single_order"] == pytest.approx((0.8 + 0.4 + 0.6 + 0.2) / 4)


# ------------------------------------------------------------------------------------- soft-label losses

def test_soft_label_losses_hand_computed():
    from alignkit.losses.preference import dpo_loss
    from alignkit.losses.reward import bradley_terry_loss

    # r_w - r_l = ln 3, so sigmoid = 3/4; label 0.7: -(0.7 ln 3/4 + 0.3 ln 1/4)
    expected = -(0.7 * math.log(0.75) + 0.3 * math.log(0.25))
    loss, _ = bradley_terry_loss(torch.tensor([math.log(3)]), torch.tensor([0.0]), label=torch.tensor([0.7]))
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    # DPO: beta h = 0.5 * ((0 - -2 ln 3) - 0) = ln 3 with the same label
    t = torch.tensor
    loss, _ = dpo_loss(t([0.0]), t([0.0]), t([-2 * math.log(3)]), t([0.0]), beta=0.5, label=t([0.7]))
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    # label 0.5 is indifferent: the loss is ln 2 + |d| / 2 at d = 0 -> ln 2, and symmetric in the sides
    loss, _ = bradley_terry_loss(torch.tensor([1.3]), torch.tensor([0.2]), label=torch.tensor([0.5]))
    flipped, _ = bradley_terry_loss(torch.tensor([0.2]), torch.tensor([1.3]), label=torch.tensor([0.5]))
    assert float(loss) == pytest.approx(float(flipped))


SOFT_PAIRS = [{"prompt": "review ab", "chosen": "ab is good", "rejected": "ab is bad", "label": 0.7},
              {"prompt": "review cd", "chosen": "cd was great food", "rejected": "cd bad", "label": 0.55}]


def test_reward_model_data_path_passes_soft_labels(tmp_path, tiny_llama_dir):
    from alignkit.algorithms.reward_model import RewardModeling, load_groups
    from alignkit.data.reward_text import RewardEncoder
    from alignkit.models.reward import load_reward_model, reward_forward

    encoder = RewardEncoder(tiny_tokenizer(), True, 64)
    groups = load_groups(str(write_jsonl(tmp_path / "soft.jsonl", SOFT_PAIRS)), encoder, False)
    algorithm = RewardModeling(encoder)
    batch = algorithm.prepare(groups)
    assert batch["label"].tolist() == pytest.approx([0.7, 0.55])
    torch.manual_seed(0)
    model = load_reward_model(ModelConfig(path=tiny_llama_dir), encoder.pad_id).eval()
    batch = {k: v.to(model.device) for k, v in batch.items()}
    with torch.no_grad():
        loss, _ = algorithm.loss(model, batch, 2.0)
        r = reward_forward(model, batch)
    d = (r[batch["winners"]] - r[batch["losers"]]).cpu()
    y = torch.tensor([0.7, 0.55])
    assert float(loss) == pytest.approx(float((-(y * F.logsigmoid(d) + (1 - y) * F.logsigmoid(-d))).mean()), rel=1e-5)


def test_dpo_data_path_passes_soft_labels(tmp_path):
    from alignkit.algorithms.dpo import PairPreference
    from alignkit.algorithms.reference import Reference, pair_logps
    from alignkit.data.preference_tokens import load_pairs
    from alignkit.losses.preference import PREFERENCE_LOSSES

    tok = tiny_tokenizer()
    rows = load_pairs(str(write_jsonl(tmp_path / "soft.jsonl", SOFT_PAIRS)), tok, 64)
    policy, ref = tiny_llama(seed=0), tiny_llama(seed=1)
    algorithm = PairPreference(PREFERENCE_LOSSES["dpo"], {"beta": 0.5}, tok.pad_token_id, Reference(ref))
    batch = algorithm.prepare(rows)
    assert batch["label"].tolist() == pytest.approx([0.7, 0.55])
    with torch.no_grad():
        loss, _ = algorithm.loss(policy, batch, 2.0)
        (pc, pr), (rc, rr) = pair_logps(policy, batch)[0].unbind(-1), pair_logps(ref, batch)[0].unbind(-1)
    z = 0.5 * ((pc - rc) - (pr - rr))
    y = torch.tensor([0.7, 0.55])
    assert float(loss) == pytest.approx(float((-(y * F.logsigmoid(z) + (1 - y) * F.logsigmoid(-z))).mean()), rel=1e-5)


# ---------------------------------------------------------------------------------- stages and file formats

def test_labelled_pair_orders_sides_and_label():
    base = {"prompt": "p", "chosen_gold": 0.1, "rejected_gold": 0.9, "id": 4}
    row = labelled_pair(base, "a", "b", p_ab=0.3, p_ba=0.6, prob=0.35, principle="kind")
    assert (row["chosen"], row["rejected"], row["label"]) == ("b", "a", pytest.approx(0.65))
    assert (row["chosen_gold"], row["rejected_gold"], row["ai_chosen_is_a"]) == (0.9, 0.1, False)
    kept = labelled_pair(base, "a", "b", p_ab=0.7, p_ba=0.4, prob=0.65, principle="kind")
    assert (kept["chosen"], kept["label"], kept["chosen_gold"]) == ("a", 0.65, 0.1)


def test_pairs_to_judge_drops_old_verdicts_and_gives_unique_ids(tmp_path):
    """An input pair's margin stayed on the pair when the judge swapped its sides (the old loser then 'won by 2');
    a set with id 1 and the set on row 1 without one shared the prompt id 1, an output dpo refused to read."""
    from alignkit.algorithms.constitutional import pairs_to_judge

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 2.0,
                                                    "label": 0.9, "topic": "food"}])
    assert pairs_to_judge(str(pairs)) == [({"prompt": "p", "topic": "food"}, "a", "b")]
    sets = [{"prompt": "p", "completions": ["a", "b"], "id": 1}, {"prompt": "q", "completions": ["c", "d"]}]
    with pytest.raises(UserError, match="rows 1 and 2 both get the prompt id 1"):
        pairs_to_judge(str(write_jsonl(tmp_path / "clash.jsonl", sets)))
    sets = [{"prompt": "p", "completions": ["a", "b", "c"], "gold": [0.1, 0.2, 0.3], "margin": 1, "topic": "food"}]
    (base, a, b), *_ = pairs_to_judge(str(write_jsonl(tmp_path / "sets.jsonl", sets)))
    assert (a, b) == ("a", "b")
    assert base == {"prompt": "p", "topic": "food", "prompt_id": 0, "id": "0:0-1", "chosen_gold": 0.1,
                    "rejected_gold": 0.2}
    copies = write_jsonl(tmp_path / "copies.jsonl", [{"prompt": "p", "completions": ["a", "b", "a"]}])
    assert [(a, b) for _, a, b in pairs_to_judge(str(copies))] == [("a", "b"), ("b", "a")]  # no judge call for a-a


def test_cai_label_writes_pairs_that_rm_and_dpo_read(tmp_path, tiny_llama_dir):
    from alignkit.algorithms.reward_model import load_groups
    from alignkit.data.preference_tokens import load_pairs
    from alignkit.data.preferences import read_pairs
    from alignkit.data.reward_text import RewardEncoder

    sets = [{"prompt": "review ab", "completions": ["ab good", "ab bad", "ab the food"]},
            {"prompt": "review cd", "completions": ["cd great", "cd was bad"], "prompt_id": "cd"}]
    out = tmp_path / "ai" / "pairs.jsonl"
    cfg = CAILabelConfig(judge=JudgeConfig(model=ModelConfig(path=tiny_llama_dir)), input=str(write_jsonl(
        tmp_path / "sets.jsonl", sets)), output=str(out), gold="vader", principles=["positive", "helpful"])
    assert run_cai_label(cfg) == str(out)
    rows = read_pairs(out)
    assert len(rows) == 3 + 1 and [r["id"] for r in rows] == ["0:0-1", "0:0-2", "0:1-2", "cd:0-1"]
    for r in rows:
        assert 0.5 <= r["label"] <= 1 and r["principle"] in ("positive", "helpful")
        p_a = 0.5 * (r["ai_p_ab"] + 1 - r["ai_p_ba"])  # P(a > b)
        assert r["label"] == pytest.approx(p_a if r["ai_chosen_is_a"] else 1 - p_a)
    report = json.loads(report_path(out).read_text())
    assert report["pairs"] == 4 and report["gold"] == "vader" and 0 <= report["same_letter_rate"] <= 1
    tok = tiny_tokenizer()
    assert [r["label"] for r in load_pairs(str(out), tok, 64)] == [r["label"] for r in rows]
    groups = load_groups(str(out), RewardEncoder(tok, True, 64), False)
    assert [g["label"][0] for g in groups] == pytest.approx([r["label"] for r in rows])
    with pytest.raises(UserError, match="set both input="):
        run_cai_label(CAILabelConfig())


def test_cai_label_refuses_no_pairs_and_a_non_finite_gold(tmp_path, tiny_llama_dir, monkeypatch):
    """Copies of one text only: torch.cat of nothing (a traceback); a gold judge's NaN: agreement 0.000, exit 0."""
    import math
    import sys
    import types

    judge = JudgeConfig(model=ModelConfig(path=tiny_llama_dir))
    copies = write_jsonl(tmp_path / "copies.jsonl", [{"prompt": "r0", "completions": ["a", "a"]}])
    with pytest.raises(UserError, match="copies.jsonl: no pairs to judge"):
        run_cai_label(CAILabelConfig(judge=judge, input=str(copies), output=str(tmp_path / "o.jsonl")))
    monkeypatch.setitem(sys.modules, "nan_gold", types.SimpleNamespace(f=lambda text: math.nan))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "r", "chosen": "good", "rejected": "bad"}])
    with pytest.raises(UserError, match="the gold judge .*not finite|the gold judge.*nan"):
        run_cai_label(CAILabelConfig(judge=judge, input=str(pairs), output=str(tmp_path / "o.jsonl"), gold="nan_gold:f"))
    assert not (tmp_path / "o.jsonl").exists()


def test_revise_writes_nothing_when_every_revision_is_empty(tmp_path, tiny_llama_dir, monkeypatch):
    """traces.jsonl was written before the check: beside an earlier run's sft.jsonl, from another run."""
    import alignkit.algorithms.constitutional as cai

    monkeypatch.setattr(cai, "revise", lambda *a, **k: [{"prompt": "p", "response": "", "revision": "", "rounds": []}])
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "review ab"}])
    with pytest.raises(UserError, match="every final revision is empty"):
        run_cai_revise(ReviseConfig(model=ModelConfig(path=tiny_llama_dir), prompts=str(prompts),
                                    output_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run" / "traces.jsonl").exists()


def test_revise_traces_and_sft_dataset(tmp_path, tiny_llama_dir):
    from alignkit.data.jsonl import SFT_SCHEMA, read_rows

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"review {w}", "id": i}
                                                 for i, w in enumerate(["ab", "cd", "the food"])])
    cfg = ReviseConfig(model=ModelConfig(path=tiny_llama_dir), prompts=str(prompts), rounds=2, batch_size=2,
                       sampling=SamplingConfig(max_new_tokens=4, min_new_tokens=2, seed=0),
                       output_dir=str(tmp_path / "run"))
    sft_path = run_cai_revise(cfg)
    assert "rounds: 2" in (tmp_path / "run" / "config.yaml").read_text()
    traces = [json.loads(line) for line in (tmp_path / "run" / "traces.jsonl").read_text().splitlines()]
    assert [t["id"] for t in traces] == [0, 1, 2] and all(len(t["rounds"]) == 2 for t in traces)
    names = {p.name for p in load_constitution()}
    for i, t in enumerate(traces):
        assert [r["principle"] for r in t["rounds"]] == [p.name for p in sample_principles(load_constitution(), 2, 0, i)]
        assert {r["principle"] for r in t["rounds"]} <= names and t["response"]
        assert t["revision"] == (t["rounds"][1]["revision"] or t["rounds"][0]["revision"] or t["response"])
    sft = read_rows(sft_path, SFT_SCHEMA)
    assert [(s["prompt"], s["completion"]) for s in sft] == [(t["prompt"], t["revision"]) for t in traces]


def test_revise_is_independent_of_batch_size():
    model, tok = tiny_llama(), tiny_tokenizer()
    rows = [{"prompt": f"review {w}"} for w in ("ab", "cd", "ef")]
    greedy = SamplingConfig(max_new_tokens=3, do_sample=False)
    one, three = (revise(model, tok, rows, load_constitution(), 1, greedy, batch_size=b, seed=5) for b in (1, 3))
    assert one == three


def test_ai_judge_reward_source_and_win_rate(judge):
    reward = AIJudgeReward(judge, P.comparison)
    prompts, ys, refs = ["Review x.", "Review y."], ["good good", "bad"], ["bad", "good good"]
    scores = reward.score(prompts, ys, reference=refs, other=[1, 2])
    assert torch.allclose(scores, judge.compare(prompts, ys, refs, [P.comparison] * 2).prob.float())
    assert scores.shape == (2,) and float(scores.sum()) == pytest.approx(1.0, abs=1e-5)  # the same pair both ways
    with pytest.raises(UserError, match="'reference' text field"):
        reward.score(prompts, ys)
    result = win_rate(judge, prompts, ys, refs, P.comparison)
    assert result["n"] == 2 and result["win_rate"] == pytest.approx(0.5)  # one of the two mirrored pairs wins
    assert result["stderr"] == pytest.approx(0.5 / math.sqrt(2))


def test_a_tie_of_the_judge_is_half_a_win():
    """p_ab == p_ba is a tie; float rounding made a quarter of them P = 0.49999997, a loss. Ties also leave the
    standard error (of scores 0, 1/2, 1) below the binomial one."""
    from alignkit.feedback.ai_judge import Comparison

    q = torch.rand(100_000, generator=torch.Generator().manual_seed(0))
    assert (Comparison(q, q).prob == 0.5).all()
    tied = Comparison(torch.tensor([0.3, 0.6, 0.8]), torch.tensor([0.3, 0.6, 0.2]))

    class Judge:
        def compare(self, *args):
            return tied

    result = win_rate(Judge(), ["p"] * 3, ["a"] * 3, ["b"] * 3, "?")
    assert result["win_rate"] == pytest.approx(2 / 3)  # two ties (1/2 each) and a win
    assert result["stderr"] == pytest.approx(math.sqrt((2 * (1 / 6) ** 2 + (1 / 3) ** 2) / 3 / 3))


def test_best_of_n_loads_the_ai_judge(tiny_llama_dir):
    from alignkit.algorithms.best_of_n import load_reward

    reward = load_reward(f"ai-judge:{tiny_llama_dir}@positive")
    assert isinstance(reward, AIJudgeReward)
    assert reward.question == "Which of these responses is more positive and enthusiastic?"
    with pytest.raises(UserError, match="principles: 'nice' is not in"):
        load_reward(f"ai-judge:{tiny_llama_dir}@nice")


def test_cli_cai_group(capsys):
    from alignkit.cli import main

    assert main(["cai", "revise", "--print-config", "rounds=3"]) == 0
    assert "rounds: 3" in capsys.readouterr().out
    assert main(["cai", "label", "--print-config", "principles=[positive]"]) == 0
    assert "principles: [positive]" in capsys.readouterr().out
    assert main(["cai"]) == 2 and "alignkit cai {revise,label}" in capsys.readouterr().err
    assert main(["cai", "label", "input=x.jsonl", "output=y.jsonl", "constitution=/nope.yaml"]) == 2
    assert "alignkit cai label: error: /nope.yaml: constitution file not found" in capsys.readouterr().err
