"""`alignkit eval`: sample a policy on held-out prompts and measure it; one JSON of metrics and samples.

    alignkit eval policy=runs/ppo/model reference=runs/sft/model proxy.model=runs/rm/model prompts=demo

Metrics (flat keys, so reports and tables read them alike):
- `reward/<name>` (+ `_std`, `_stderr`) for each reward source: `gold` (true quality; VADER by default),
  `proxy` (what the policy was trained on);
  `reward/gap` = proxy - gold (same units only when the two share a scale) and `reward/correlation`
  (Pearson of gold and proxy over the samples).
- with a reference policy: `win_rate/<name>` (ties count 1/2), `reference/reward/<name>`, the KL
  (`kl`, `kl_std`, `kl_stderr`, `kl_min`, `kl_max`; see `eval.policy`) and `calibration/proxy/*`: how well
  the proxy's Bradley-Terry probability sigmoid((r(y) - r(y_ref)) / gain) predicts which of the policy's and
  the reference's completion the gold judge prefers (log loss, Brier, ECE, reliability table).
- with a reference policy and an LLM judge (`judge=ai-judge:MODEL[@PRINCIPLE]`): `win_rate/judge` (+ `_stderr`,
  `_mean_prob`, `_same_letter_rate`): the judge compares each policy completion with the reference policy's
  completion for the same prompt, in both orders (`rewards.ai_judge.win_rate`).
- `entropy` (nats per token), `perplexity` under the base model, `perplexity/policy`.
- `text/*`: distinct-1/2, unique-1/2, entropy-1/2, MSSTR, length; with reference texts in the prompt rows
  (`references_field`), BLEU, chrF, ROUGE-1/2/L and BERTScore P/R/F1 (`eval.text`, `eval.bertscore`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from alignkit.config import option, to_dict
from alignkit.data.jsonl import PROMPT_SCHEMA, Field, write_json
from alignkit.errors import UserError
from alignkit.rewards.base import RewardConfig
from alignkit.rollout.generate import SamplingConfig


KIND = "alignkit.eval"  # marks the JSON files the report reads
FORMAT = 1


@dataclass(frozen=True)
class GoldRewardConfig(RewardConfig):
    judge: str | None = option("vader", "Gold judge of the completion text: 'vader' or 'package.module:text_function'")


@dataclass(frozen=True)
class EvalSampling(SamplingConfig):
    seed: int | None = option(0, "Seed of the sampling random generator; null = torch's global generator")


@dataclass(frozen=True)
class EvalConfig:
    policy: str = option("smollm2", "Policy to evaluate: a model directory (a run's model/), or 'smollm2'")
    reference: str | None = option(None, "Reference policy (e.g. the SFT model) for KL, win rates, calibration and "
                                   "before/after samples; null = none")
    base: str | None = option(None, "Model whose perplexity of the completions is reported; null = the reference "
                              "(the policy when there is none)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option("auto", "Weight dtype of the models")
    prompts: str = option("demo", "JSONL of {prompt} or {messages} rows (+ reward fields, references); "
                          "'demo' = embedded held-out review prompts")
    max_prompts: int | None = option(64, "Use only the first N prompts", low=1)
    gold: GoldRewardConfig = option(GoldRewardConfig(), "Gold reward (true quality); unset every source for none")
    proxy: RewardConfig = option(RewardConfig(), "Proxy reward the policy was optimised for (e.g. proxy.model="
                                 "runs/rm/model); unset = none")
    judge: str | None = option(None, "LLM judge of a pairwise win rate against the reference policy: "
                               "'ai-judge:MODEL[@PRINCIPLE]' (e.g. ai-judge:smollm2@helpful); null = none")
    references_field: str = option("reference", "Prompt-row field with reference text(s) for BLEU, chrF, ROUGE and "
                                   "BERTScore; rows without it are left out of those")
    bertscore_model: str | None = option("minilm", "BERTScore encoder ('minilm' = embedded all-MiniLM-L6-v2); "
                                         "null = no BERTScore")
    bertscore_idf: bool = option(False, "Weight BERTScore tokens by idf over the references (needs >= 2)")
    msstr_segment: int = option(100, "Segment length (words) of the MSSTR diversity metric")
    sampling: EvalSampling = option(EvalSampling(), "Decoding of the evaluated completions; the KL uses them at "
                                    "temperature 1 without top-k/top-p, else draws its own such samples")
    batch_size: int = option(16, "Sequences per generation / scoring batch", low=1)
    chat_template: bool = option(True, "Wrap prompts in the tokenizer's chat template")
    method: str | None = option(None, "Method name shown in the report (e.g. ppo); null = the run directory's name")
    step: int | None = option(None, "Training step of this policy (its point on the report's curves); null = final",
                              low=0)
    output: str | None = option(None, "JSON to write; null = <run>/eval/{final|step-N}.json when policy is a "
                                "run's model/ directory, else eval.json")
    show: int = option(2, "Print this many samples at the end")

    def validate(self):
        self.sampling.validate()
        if self.msstr_segment < 1:
            raise UserError(f"msstr_segment must be >= 1, got {self.msstr_segment}")
        if self.judge is not None:
            if not self.judge.startswith("ai-judge:"):
                raise UserError(f"judge must be 'ai-judge:MODEL[@PRINCIPLE]', got '{self.judge}'")
            if self.reference is None:
                raise UserError("judge compares the policy with a reference policy: set reference too")

    def output_path(self) -> Path:
        if self.output:
            return Path(self.output)
        name = f"step-{self.step}.json" if self.step is not None else "final.json"
        policy = Path(self.policy)
        return policy.parent / "eval" / name if policy.name == "model" and policy.is_dir() else Path("eval.json")


def as_reward(source):
    """A reward source from a source object, a RewardConfig, or a spec (RM dir, 'vader', 'module:function')."""
    if isinstance(source, RewardConfig):
        from alignkit.rewards.base import build_reward

        return build_reward(source)
    if isinstance(source, str):
        from alignkit.algorithms.best_of_n import load_reward

        return load_reward(source)
    return source


def _load(path, dtype: str):
    from alignkit.models.load import ModelConfig, load_causal_lm

    return load_causal_lm(ModelConfig(path=path, dtype=dtype), trainable=False)


def _located(path: str | None) -> str | None:
    """A model directory as its absolute path (the report matches a run's reference with another run's policy by
    it, whichever way each was spelled); an alias or a hub name as given."""
    return str(Path(path).resolve()) if path and Path(path).is_dir() else path


def run_eval(cfg: EvalConfig) -> str:
    """Evaluate `cfg.policy` and write the JSON; returns its path."""
    from alignkit.algorithms.best_of_n import prompt_rows
    from alignkit.data.jsonl import check_output
    from alignkit.models.load import load_tokenizer

    check_output(cfg.output_path(), cfg.prompts)
    tokenizer = load_tokenizer(cfg.policy)  # a wrong path fails before any other work
    schema = dataclasses.replace(PROMPT_SCHEMA, optional={cfg.references_field: Field("references")})
    rows = prompt_rows(cfg.prompts, cfg.max_prompts, schema=schema)  # a bad reference fails before the sampling
    rewards = {name: as_reward(c) for name, c in (("gold", cfg.gold), ("proxy", cfg.proxy)) if c.sources}
    judge = as_reward(cfg.judge) if cfg.judge else None
    policy = _load(cfg.policy, cfg.dtype)
    reference = _load(cfg.reference, cfg.dtype) if cfg.reference else None
    base = _load(cfg.base, cfg.dtype) if cfg.base and cfg.base != cfg.reference else None
    bertscore = None
    if cfg.bertscore_model and any(cfg.references_field in r for r in rows):
        from alignkit.eval.bertscore import BERTScorer

        bertscore = BERTScorer(cfg.bertscore_model, idf=cfg.bertscore_idf)
    result = evaluate_policy(policy, rows, tokenizer=tokenizer, reference=reference, base=base, rewards=rewards,
                             sampling=cfg.sampling, batch_size=cfg.batch_size, chat_template=cfg.chat_template,
                             references_field=cfg.references_field, bertscore=bertscore,
                             msstr_segment=cfg.msstr_segment, judge=judge)
    out = cfg.output_path()
    run_dir = out.parent.parent if out.parent.name == "eval" else None
    result.update(policy=_located(cfg.policy), reference=_located(cfg.reference), step=cfg.step,
                  method=cfg.method or (run_dir.name if run_dir else Path(cfg.policy).name), config=to_dict(cfg))
    write_json(out, result)
    _print_summary(result, cfg.show)
    return str(out)


def _print_summary(result: dict, show: int) -> None:
    m = result["metrics"]
    keys = [k for k in ("reward/gold", "reward/proxy", "win_rate/gold", "win_rate/judge", "kl", "entropy",
                        "perplexity", "text/distinct-2", "text/bleu", "text/bertscore_f1") if m.get(k) is not None]
    print("  ".join(f"{k} {m[k]:.4g}" for k in keys))
    for s in result["samples"][:show]:
        print(f"--- {s['prompt']}")
        if "reference_completion" in s:
            print(f"  before: {s['reference_completion']}")
        print(f"  after:  {s['completion']}\n")


# ------------------------------------------------------------------------------------------- the Python API


def generate_seqs(model, tokenizer, prompts: list, sampling: SamplingConfig, batch_size: int, chat_template: bool):
    """One completion per prompt: [(prompt_ids, completion_ids)], sampled in batches with one generator."""
    from alignkit.algorithms.policy_kl import sample_sequences
    from alignkit.rollout.generate import sampling_generator

    generator = sampling_generator(sampling, next(model.parameters()).device)
    seqs = []
    for i in range(0, len(prompts), batch_size):
        seqs += sample_sequences(model, tokenizer, prompts[i : i + batch_size], sampling, chat_template, generator)
    return seqs


def evaluate_policy(policy, prompts, *, tokenizer=None, reference=None, base=None, rewards: dict | None = None,
                    sampling: SamplingConfig | None = None, batch_size: int = 16, chat_template: bool = True,
                    references_field: str = "reference", bertscore=None, msstr_segment: int = 100,
                    judge=None) -> dict:
    """Sample `policy` on `prompts` and measure it (see the module docstring); returns
    `{"kind", "format", "metrics": {...}, "calibration": {...}, "samples": [...]}`.

    policy / reference / base: a model directory or a loaded causal LM (reference may also be an
    `algorithms.reference.Reference`, e.g. `Reference()` for a LoRA policy with its adapter disabled);
    prompts: prompt rows, or a prompt file ('demo' = the embedded held-out prompts);
    rewards: name -> reward source, `RewardConfig`, or spec ('vader', an RM dir); `gold` and `proxy` are
    the names with a meaning (gap, calibration); bertscore: a `BERTScorer`, 'minilm', or None;
    judge: an LLM judge (`rewards.ai_judge.AIJudgeReward` or its 'ai-judge:...' spec) for a pairwise win
    rate against the reference policy's completions (needs `reference`).
    """
    from alignkit.algorithms.best_of_n import prompt_rows
    from alignkit.algorithms.policy_kl import decode, pad_id
    from alignkit.algorithms.reference import Reference
    from alignkit.data.preferences import prompt_of
    from alignkit.eval.policy import perplexity, score_sequences
    from alignkit.models.load import on_device_of

    if isinstance(policy, str):
        from alignkit.models.load import load_tokenizer

        tokenizer = tokenizer or load_tokenizer(policy)
        policy = _load(policy, "auto")
    if tokenizer is None:
        raise ValueError("pass the tokenizer with a loaded policy")
    rows = prompt_rows(prompts, None) if isinstance(prompts, str) else list(prompts)
    if not rows:
        raise ValueError("no prompts to evaluate on")
    if isinstance(reference, str):
        reference = _load(reference, "auto")
    if reference is not None and not isinstance(reference, Reference):
        reference = Reference(reference)  # it runs on the policy's device
    sampling = sampling or EvalSampling()
    texts = [prompt_of(r) for r in rows]
    seqs = generate_seqs(policy, tokenizer, texts, sampling, batch_size, chat_template)
    scores = score_sequences(policy, seqs, pad_id(tokenizer), batch_size, entropy=True)
    samples = [{**r, "completion": c, "tokens": int(n), "logp": float(lp)}
               for r, c, n, lp in zip(rows, decode(tokenizer, seqs), scores["tokens"], scores["logps"])]
    tokens = scores["tokens"].sum().clamp_min(1)
    metrics = {"prompts": len(rows), "tokens": float(scores["tokens"].mean()),
               "entropy": float(scores["entropy"].sum() / tokens),
               "perplexity/policy": perplexity(scores["logps"], scores["tokens"])}
    base_logps = scores["logps"]
    if reference is not None:
        base_logps = _reference_metrics(policy, reference, tokenizer, texts, seqs, scores, samples, metrics,
                                        sampling, batch_size, chat_template)
    if base is not None:
        base = on_device_of(_load(base, "auto") if isinstance(base, str) else base, policy)
        base_logps = score_sequences(base, seqs, pad_id(tokenizer), batch_size)["logps"]
    metrics["perplexity"] = perplexity(base_logps, scores["tokens"])
    calibration = _reward_metrics({n: as_reward(s) for n, s in (rewards or {}).items()}, rows, samples, metrics)
    if judge is not None:
        if reference is None:
            raise UserError("the LLM-judge win rate compares the policy with a reference policy: pass reference")
        metrics.update(_judge_metrics(as_reward(judge), texts, samples))
    metrics.update(_text_metrics(samples, references_field, bertscore, msstr_segment))
    return {"kind": KIND, "format": FORMAT, "metrics": metrics, "calibration": calibration, "samples": samples}


def _reference_metrics(policy, reference, tokenizer, texts, seqs, scores, samples, metrics, sampling, batch_size,
                       chat_template) -> torch.Tensor:
    """Reference completions ("before") on the samples, the KL metrics; returns log pi_ref of the samples (N,)."""
    from alignkit.algorithms.policy_kl import decode
    from alignkit.algorithms.policy_kl import pad_id
    from alignkit.eval.policy import is_own_distribution, kl_metrics, reference_logps, score_sequences

    pad = pad_id(tokenizer)
    ref_seqs = reference.run(policy, lambda m: generate_seqs(m, tokenizer, texts, sampling, batch_size, chat_template))
    for sample, text in zip(samples, decode(tokenizer, ref_seqs)):
        sample["reference_completion"] = text
    ref_logps = reference_logps(policy, reference, seqs, pad, batch_size)
    if is_own_distribution(sampling):
        stats, kl = kl_metrics(scores["logps"], ref_logps)
        for sample, value in zip(samples, kl.tolist()):
            sample["kl"] = value
    else:  # the evaluated samples are not from pi itself: draw temperature-1 samples for an unbiased KL
        own = dataclasses.replace(sampling, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_beams=1)
        kl_seqs = generate_seqs(policy, tokenizer, texts, own, batch_size, chat_template)
        stats, _ = kl_metrics(score_sequences(policy, kl_seqs, pad, batch_size)["logps"],
                              reference_logps(policy, reference, kl_seqs, pad, batch_size))
    metrics.update(stats)
    metrics["kl_on"] = "eval samples" if is_own_distribution(sampling) else "separate temperature-1 samples"
    metrics["reference/tokens"] = sum(len(c) for _, c in ref_seqs) / max(len(ref_seqs), 1)
    return ref_logps


def _reward_metrics(sources: dict, rows: list[dict], samples: list[dict], metrics: dict) -> dict:
    """reward/<name>, win rates against the reference completions, gold-proxy gap, proxy calibration."""
    from alignkit.algorithms.best_of_n import score_rows
    from alignkit.eval.reward import comparison_metrics, describe, pearson, win_rate

    has_ref = bool(samples) and "reference_completion" in samples[0]
    scores, ref_scores = {}, {}
    for name, source in sources.items():
        scores[name] = score_rows(source, rows, [s["completion"] for s in samples], f"the {name} reward")
        stats = describe(scores[name])
        metrics.update({f"reward/{name}": stats["mean"], f"reward/{name}_std": stats["std"],
                        f"reward/{name}_stderr": stats["stderr"]})
        for sample, value in zip(samples, scores[name].tolist()):
            sample[name] = value
        if has_ref:
            ref_scores[name] = score_rows(source, rows, [s["reference_completion"] for s in samples],
                                          f"the {name} reward")
            metrics[f"reference/reward/{name}"] = float(ref_scores[name].mean())
            metrics[f"win_rate/{name}"] = win_rate(scores[name], ref_scores[name])
            for sample, value in zip(samples, ref_scores[name].tolist()):
                sample[f"reference_{name}"] = value
    calibration = {}
    if "gold" in scores and "proxy" in scores:
        metrics["reward/gap"] = metrics["reward/proxy"] - metrics["reward/gold"]
        metrics["reward/correlation"] = pearson(scores["gold"], scores["proxy"])
        if has_ref:  # P(policy beats reference) = sigmoid(raw proxy difference) against the gold judge's verdict
            delta = (scores["proxy"] - ref_scores["proxy"]) / getattr(sources["proxy"], "gain", 1.0)
            g = scores["gold"] - ref_scores["gold"]
            label = torch.where(g > 0, 1.0, torch.where(g < 0, 0.0, 0.5)).double()
            calibration["proxy"] = comparison_metrics(delta, label)
            metrics.update({f"calibration/proxy/{k}": calibration["proxy"][k]
                            for k in ("accuracy", "log_loss", "brier", "ece")})
    return calibration


def _judge_metrics(judge, prompts: list, samples: list[dict]) -> dict:
    """win_rate/judge*: the LLM judge's verdicts on (policy completion, reference completion) pairs."""
    from alignkit.rewards.ai_judge import win_rate

    out = win_rate(judge.judge, prompts, [s["completion"] for s in samples],
                   [s["reference_completion"] for s in samples], judge.question)
    return {"win_rate/judge": out["win_rate"], "win_rate/judge_stderr": out["stderr"],
            "win_rate/judge_mean_prob": out["mean_prob"], "win_rate/judge_same_letter_rate": out["same_letter_rate"]}


def _text_metrics(samples: list[dict], references_field: str, bertscore, segment: int) -> dict:
    """Diversity and length of the completions (and of the reference's); overlap with reference texts."""
    from alignkit.eval.text import bleu_chrf, diversity, rouge

    out = diversity([s["completion"] for s in samples], segment)
    if samples and "reference_completion" in samples[0]:
        before = diversity([s["reference_completion"] for s in samples], segment)
        out.update({f"reference/{k}": v for k, v in before.items()})
    with_refs = [s for s in samples if s.get(references_field)]
    if with_refs:
        hyps, refs = [s["completion"] for s in with_refs], [s[references_field] for s in with_refs]
        out["text/references"] = len(with_refs)
        out.update(bleu_chrf(hyps, refs))
        out.update(rouge(hyps, refs))
        if isinstance(bertscore, str):
            from alignkit.eval.bertscore import BERTScorer

            bertscore = BERTScorer(bertscore)
        if bertscore is not None:
            prf = bertscore.score(hyps, refs)
            out.update({f"text/bertscore_{k}": float(v.mean()) for k, v in prf.items()})
    return out
