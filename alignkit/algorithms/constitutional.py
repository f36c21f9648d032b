"""Constitutional AI (Bai et al. 2022): critique -> revision (SL-CAI), and RLAIF preference labels.

    alignkit cai revise --config ...   # responses, critiques, revisions -> traces + an SFT dataset
    alignkit sft data.train=runs/cai_revise/sft.jsonl
    alignkit cai label  --config ...   # AI-judged soft labels -> pairs for `alignkit rm` / `alignkit dpo`

Supervised stage, for each prompt x (every turn rendered with the model's chat template):

    y_0 ~ pi(. | x)
    for r = 1..R, with a principle c_r drawn at random (seeded per prompt):
        critique_r ~ pi(. | x, y_{r-1}, critique request of c_r)
        y_r        ~ pi(. | x, y_{r-1}, critique request, critique_r, revision request of c_r)

The conversation the model sees at round r is [user: x, assistant: y_{r-1}, user: critique request,
assistant: critique_r, user: revision request]; each round starts again from x and the latest revision
(an empty revision keeps the previous response). `traces.jsonl` keeps every step; `sft.jsonl` holds
{prompt, completion = y_R}, the format `alignkit sft` reads.

RLAIF stage: every pair (a, b) is judged by `feedback.ai_judge.PairwiseJudge` on a principle drawn
per pair, in both orders; the output pair has chosen = the preferred response and the soft label
`label` = P(chosen > rejected) in [0.5, 1] (the pair format's soft-label field, which the
Bradley-Terry loss of `alignkit rm` and the dpo / cdpo losses of `alignkit dpo` use). `<output>
.report.json` has the position-bias rate and, with `gold` set, the agreement with a gold judge.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from alignkit.config import option, save_config, to_dict
from alignkit.data.constitution import Principle, load_constitution, sample_principles
from alignkit.data.jsonl import check_io, check_output, iter_rows, write_json, write_jsonl
from alignkit.data.preferences import (
    carried_fields, distinct_pairs, gold_scores, prompt_fields, prompt_of, read_completion_sets, read_pairs,
    set_prompt_ids,
)
from alignkit.errors import UserError
from alignkit.eval.reward import gold_agreement
from alignkit.feedback.ai_judge import JudgeConfig, PairwiseJudge
from alignkit.models.load import ModelConfig
from alignkit.rollout.generate import SamplingConfig, generate_text, sampling_generator

log = logging.getLogger(__name__)

RED_TEAM_PROMPTS = Path(__file__).resolve().parent.parent / "data" / "red_team_prompts.jsonl"


# ---------------------------------------------------------------------------------------- critique / revision

def as_messages(prompt) -> list[dict]:
    """A prompt (text or messages) as a list of messages."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def critique_messages(prompt, response: str, principle: Principle) -> list[dict]:
    """[prompt..., assistant: response, user: critique request]."""
    return [*as_messages(prompt), {"role": "assistant", "content": response},
            {"role": "user", "content": principle.critique}]


def revision_messages(prompt, response: str, principle: Principle, critique: str) -> list[dict]:
    """The critique conversation, the critique, then the revision request."""
    return [*critique_messages(prompt, response, principle), {"role": "assistant", "content": critique},
            {"role": "user", "content": principle.revision}]


class _Sampler:
    """Chat-template generation in batches; one generator (seeded by `sampling.seed`) runs through them all."""

    def __init__(self, model, tokenizer, sampling: SamplingConfig, batch_size: int):
        self.model, self.tokenizer, self.sampling, self.batch_size = model, tokenizer, sampling, batch_size
        self.generator = sampling_generator(sampling, next(model.parameters()).device)

    def __call__(self, conversations: Sequence[list[dict]], desc: str) -> list[str]:
        out: list[str] = []
        for i in tqdm(range(0, len(conversations), self.batch_size), desc=desc, unit="batch"):
            texts = generate_text(self.model, self.tokenizer, conversations[i : i + self.batch_size],
                                  self.sampling, chat=True, generator=self.generator)
            out += [t.strip() for t in texts]
        return out


def revise(model, tokenizer, rows: Sequence[dict], principles: Sequence[Principle], rounds: int,
           sampling: SamplingConfig, batch_size: int = 16, seed: int = 0) -> list[dict]:
    """Each row with `response` (y_0), `rounds` [{principle, critique, revision}] and `revision` (y_R)."""
    prompts = [prompt_of(r) for r in rows]
    draws = [sample_principles(principles, rounds, seed, i) for i in range(len(rows))]
    sample = _Sampler(model, tokenizer, sampling, batch_size)
    responses = sample([as_messages(p) for p in prompts], "response")
    current, traces = list(responses), [[] for _ in rows]
    for r in range(rounds):
        critiques = sample([critique_messages(p, y, d[r]) for p, y, d in zip(prompts, current, draws)],
                           f"critique {r + 1}/{rounds}")
        revisions = sample([revision_messages(p, y, d[r], c) for p, y, d, c in zip(prompts, current, draws, critiques)],
                           f"revision {r + 1}/{rounds}")
        for trace, d, c, y in zip(traces, draws, critiques, revisions):
            trace.append({"principle": d[r].name, "critique": c, "revision": y})
        current = [y or old for y, old in zip(revisions, current)]
    return [{**row, "response": y0, "rounds": t, "revision": y}
            for row, y0, t, y in zip(rows, responses, traces, current)]


def sft_row(trace: dict) -> dict | None:
    """The SFT example of a trace: {prompt, completion} or {messages} ending with the final revision."""
    if not trace["revision"]:
        return None
    if isinstance(prompt_of(trace), str):
        return {"prompt": trace["prompt"], "completion": trace["revision"]}
    return {"messages": [*trace["messages"], {"role": "assistant", "content": trace["revision"]}]}


@dataclass(frozen=True)
class ReviseConfig:
    model: ModelConfig = option(ModelConfig(), "Chat model that answers, critiques and revises")
    prompts: str = option("red-team", "JSONL of {prompt} or {messages} rows; 'red-team' = the shipped red-team "
                          "prompts (64), 'demo' = embedded review prompts")
    constitution: str | None = option(None, "Constitution YAML/JSON; null = the default "
                                      "(alignkit/data/constitution.yaml)")
    principles: list[str] | None = option(None, "Use only these principles (by name); null = all")
    rounds: int = option(1, "Critique -> revision rounds per prompt (R); each draws a principle at random")
    sampling: SamplingConfig = option(SamplingConfig(max_new_tokens=96, temperature=0.7, seed=0),
                                      "Decoding of responses, critiques and revisions")
    batch_size: int = option(16, "Conversations per generation batch", low=1)
    max_prompts: int | None = option(None, "Use only the first N prompts", low=1)
    seed: int = option(0, "Seed of the principle draws")
    output_dir: str = option("runs/cai_revise", "Writes traces.jsonl (every step) and sft.jsonl (final revisions)")

    def validate(self):
        if self.rounds < 1:
            raise UserError(f"rounds must be >= 1, got {self.rounds}")


def read_prompt_rows(path: str, limit: int | None) -> list[dict]:
    from alignkit.rollout.stage import read_prompts

    return read_prompts(str(RED_TEAM_PROMPTS) if path == "red-team" else path, "prompts_train", limit)


def run_cai_revise(cfg: ReviseConfig) -> str:
    """Sample, critique and revise; returns the SFT dataset path (`output_dir/sft.jsonl`)."""
    from alignkit.models.load import load_causal_lm, load_tokenizer

    check_output(cfg.output_dir, cfg.prompts, directory=True)
    principles = load_constitution(cfg.constitution, cfg.principles)
    tokenizer = load_tokenizer(cfg.model.path)
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"model.path={cfg.model.path}: the tokenizer has no chat template; critique and revision "
                        "are conversations, so use a chat model")
    rows = read_prompt_rows(cfg.prompts, cfg.max_prompts)
    model = load_causal_lm(cfg.model, trainable=False)
    traces = revise(model, tokenizer, rows, principles, cfg.rounds, cfg.sampling, cfg.batch_size, cfg.seed)
    out = Path(cfg.output_dir)
    sft = [s for s in map(sft_row, traces) if s is not None]
    if not sft:  # before anything is written: the traces of this run beside an earlier run's SFT data
        raise UserError("every final revision is empty; raise sampling.max_new_tokens or check the model")
    save_config(to_dict(cfg), out / "config.yaml")
    write_jsonl(out / "traces.jsonl", traces)
    write_jsonl(out / "sft.jsonl", sft)
    changed = sum(t["revision"] != t["response"] for t in traces)
    log.info("%d prompts, %d round(s): %d revisions differ from the first response; SFT data: %s",
             len(traces), cfg.rounds, changed, out / "sft.jsonl")
    return str(out / "sft.jsonl")


# ------------------------------------------------------------------------------------------------ RLAIF labels

def pairs_to_judge(path: str) -> list[tuple[dict, str, str]]:
    """(base row, a, b) per comparison: a pairs file (a = chosen, b = rejected; the old label and margin dropped)
    or completion sets {prompt|messages, completions: [K]} (every C(K, 2) pair of different texts, a = the earlier
    one; prompt ids and carried fields as in `rankings_to_pairs`, a per-completion `gold` list as chosen_gold /
    rejected_gold)."""
    first = next(iter_rows(path, None), (None, {}))[1]
    if "chosen" in first or "rejected" in first:
        drop = ("chosen", "rejected", "label", "margin")
        return [({k: v for k, v in row.items() if k not in drop}, row["chosen"], row["rejected"])
                for row in read_pairs(path)]
    out = []
    rows = read_completion_sets(path)
    for row, pid in zip(rows, set_prompt_ids(rows, path)):
        extra, gold = carried_fields(row), gold_scores(row)
        for i, j in distinct_pairs(row):
            base = {**prompt_fields(row), **extra, "prompt_id": pid, "id": f"{pid}:{i}-{j}"}
            if gold:
                base.update(chosen_gold=gold[i], rejected_gold=gold[j])
            out.append((base, row["completions"][i], row["completions"][j]))
    return out


def labelled_pair(base: dict, a: str, b: str, p_ab: float, p_ba: float, prob: float, principle: str) -> dict:
    """The pair with chosen = the preferred one and `label` = P(chosen > rejected) >= 0.5.

    `ai_p_ab` / `ai_p_ba` are P(A) with a, resp. b, shown as (A); when b wins, the base row's
    `chosen_*` / `rejected_*` fields (e.g. gold scores) are swapped along with the texts.
    """
    a_wins = prob >= 0.5
    if not a_wins:
        base = {_swap_side(k): v for k, v in base.items()}
    chosen, rejected = (a, b) if a_wins else (b, a)
    return {**base, "chosen": chosen, "rejected": rejected, "label": prob if a_wins else 1.0 - prob,
            "principle": principle, "ai_p_ab": p_ab, "ai_p_ba": p_ba, "ai_chosen_is_a": a_wins}


def _swap_side(key: str) -> str:
    for x, y in (("chosen_", "rejected_"), ("rejected_", "chosen_")):
        if key.startswith(x):
            return y + key[len(x):]
    return key


def agreement_report(p_ab: torch.Tensor, p_ba: torch.Tensor, gold_gap: torch.Tensor | None = None) -> dict:
    """Position bias of the judge and, given gold gaps g(a) - g(b), its agreement with the gold judge.

    same_letter_rate: share of pairs whose preferred letter is the same in both orders (picks by
    position); letter_a_rate: share of single-order judgements that pick (A) (0.5 = no letter bias).
    Agreement (pairs with a gold tie left out; a judge tie counts 1/2): `agreement_order_ab` uses
    only the order with a as (A), `agreement_order_ba` only the swapped one, `agreement_swapped`
    the average of both orders (the label written), `agreement_consistent` the average on the pairs
    where the two orders agree.
    """
    p_ab, p_ba = p_ab.double(), p_ba.double()
    prob = 0.5 * (p_ab + 1 - p_ba)  # P(a > b), both orders
    same = (p_ab > 0.5) == (p_ba > 0.5)
    report = {"pairs": len(p_ab), "same_letter_rate": float(same.double().mean()),
              "letter_a_rate": float(torch.cat([p_ab > 0.5, p_ba > 0.5]).double().mean()),
              "mean_confidence_single_order": float((2 * (p_ab - 0.5).abs()).mean()),
              "mean_confidence_swapped": float((2 * (prob - 0.5).abs()).mean())}
    if gold_gap is None:
        return report
    keep = gold_gap != 0

    def agree(p_a_wins: torch.Tensor, mask=None) -> float:
        mask = torch.ones_like(keep) if mask is None else mask
        return gold_agreement(p_a_wins[mask] - 0.5, gold_gap[mask])["agreement"]

    report.update(gold_pairs=int(keep.sum()), gold_ties_left_out=int((~keep).sum()),
                  agreement_order_ab=agree(p_ab), agreement_order_ba=agree(1 - p_ba),
                  agreement_swapped=agree(prob), agreement_consistent=agree(prob, ~same))
    return report


@dataclass(frozen=True)
class CAILabelConfig:
    judge: JudgeConfig = option(JudgeConfig(), "The feedback model and how it answers")
    input: str | None = option(None, "Pairs {prompt|messages, chosen, rejected} (relabelled) or completion sets "
                               "{prompt|messages, completions: [K]} (all C(K,2) pairs); 'demo' = held-out demo "
                               "review pairs")
    output: str | None = option(None, "Labelled pairs JSONL (soft `label`); the report goes beside it "
                                "(ai_pairs.jsonl -> ai_pairs.report.json)")
    constitution: str | None = option(None, "Constitution YAML/JSON; null = the default "
                                      "(alignkit/data/constitution.yaml)")
    principles: list[str] | None = option(None, "Use only these principles (by name); one is drawn per pair")
    max_pairs: int | None = option(None, "Label only the first N pairs", low=1)
    chunk: int = option(64, "Pairs judged between progress updates")
    seed: int = option(0, "Seed of the principle draws")
    gold: str | None = option(None, "Gold judge to report agreement with (e.g. 'vader'); null = none")

    def validate(self):
        if self.chunk < 1:
            raise UserError(f"chunk must be >= 1, got {self.chunk}")


def report_path(output: str | Path) -> Path:
    """`runs/x/pairs.jsonl` -> `runs/x/pairs.report.json`."""
    path = Path(output)
    return path.with_name(path.name.rsplit(".", 1)[0] + ".report.json")


def label_pairs(judge: PairwiseJudge, items: Sequence[tuple[dict, str, str]], principles: Sequence[Principle],
                seed: int = 0, chunk: int = 64) -> tuple[list[dict], torch.Tensor, torch.Tensor]:
    """Labelled pairs and the P(A) tensors (N,) of both orders; principle i is drawn with key i."""
    draws = [sample_principles(principles, 1, seed, i)[0] for i in range(len(items))]
    rows, p_ab, p_ba = [], [], []
    for s in tqdm(range(0, len(items), chunk), desc="judge", unit="chunk"):
        part, drawn = items[s : s + chunk], draws[s : s + chunk]
        c = judge.compare([prompt_of(base) for base, _, _ in part], [a for _, a, _ in part],
                          [b for _, _, b in part], [d.comparison for d in drawn])
        for (base, a, b), d, x, y, p in zip(part, drawn, c.p_ab.tolist(), c.p_ba.tolist(), c.prob.tolist()):
            rows.append(labelled_pair(base, a, b, x, y, p, d.name))
        p_ab.append(c.p_ab)
        p_ba.append(c.p_ba)
    return rows, torch.cat(p_ab), torch.cat(p_ba)


def run_cai_label(cfg: CAILabelConfig) -> str:
    """Judge every pair of `input` in both orders; write soft-labelled pairs and the report."""
    from alignkit.feedback.ai_judge import load_pairwise_judge
    from alignkit.rewards.gold import load_judge

    check_io(cfg.input, cfg.output, "both input=PAIRS_OR_COMPLETIONS.jsonl (or input=demo) and output=LABELLED.jsonl")
    principles = load_constitution(cfg.constitution, cfg.principles)
    gold = load_judge(cfg.gold) if cfg.gold else None
    path = cfg.input
    if path == "demo":
        from alignkit.tasks.preference_demo import build_preference_demo

        path = str(build_preference_demo()["pairs_eval"])
    items = pairs_to_judge(path)[: cfg.max_pairs]
    if not items:
        raise UserError(f"{path}: no pairs to judge (every completion set holds copies of one text)")
    gap = None
    if gold is not None:  # before the judge's work: a non-finite gold score is refused
        from alignkit.algorithms.best_of_n import score_rows

        bases = [base for base, _, _ in items]
        gap = (score_rows(gold, bases, [a for _, a, _ in items], "the gold judge")
               - score_rows(gold, bases, [b for _, _, b in items], "the gold judge"))
    judge = load_pairwise_judge(cfg.judge)
    rows, p_ab, p_ba = label_pairs(judge, items, principles, cfg.seed, cfg.chunk)
    report = {"input": path, "judge": cfg.judge.model.path, "principles": [p.name for p in principles],
              "chain_of_thought": cfg.judge.chain_of_thought, "gold": cfg.gold, **agreement_report(p_ab, p_ba, gap)}
    write_jsonl(cfg.output, rows)
    write_json(report_path(cfg.output), report)
    agreement = (f"; agreement with {cfg.gold}: single order {report['agreement_order_ab']:.3f}, both orders "
                 f"{report['agreement_swapped']:.3f}" if gold is not None else "")
    log.info("%d pairs labelled; same letter in both orders (position bias) on %.3f%s", len(rows),
             report["same_letter_rate"], agreement)
    return cfg.output
