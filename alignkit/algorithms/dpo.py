"""The DPO family on the engine: DPO, cDPO, IPO, SimPO, ORPO (pairs) and KTO (unpaired).

Implementation details, with the reason for each:
1. Chosen and rejected go through the model in ONE concatenated forward pass of 2B completions,
   and the prompt they share runs once before it (its key/value cache is repeated for both):
   the same result as two full sequences per pair, for ~25% less compute when the prompt is as
   long as the completions (`reference.pair_logps`).
2. Prompts are left-padded and completions right-padded, so the model computes logits only for
   completion positions; token log-probs come from logsumexp + gather. No (2B, T, V) log-softmax
   is ever kept.
3. Reference log-probs are computed once per dataset before training and cached in the run
   directory (`reference=cached`, the default; TRL's `precompute_ref_log_probs`): training then
   needs no reference forward at all. `reference=live` scores the reference every step instead.
   With LoRA the reference is the base model with the adapter disabled, never a second copy.
4. Dropout is switched off in the policy (as TRL does by default): otherwise the log-ratio
   log pi - log pi_ref is noisy even before the first update.
5. One unit of loss normalisation is one pair (one row for KTO), so accumulation and data
   parallelism give the gradient of one large batch.
6. SimPO, IPO and ORPO take per-token mean log-probs, DPO/cDPO/KTO sums (see each loss); the
   logged `logps/*` are what the loss reads. Two deliberate differences from TRL 1.16: a chat
   completion ends at the end-of-turn token (TRL also trains the template's newline after it), and
   ORPO's NLL term is the chosen completion's per-token mean (TRL's averages over prompt and
   completion tokens of the batch), so ORPO runs are not comparable with TRL's.
7. KTO's reference point pairs each prompt with another prompt's completion, fixed per row at load
   time (a seeded rotation, as TRL's rotation within the batch), so it can be cached too; the
   policy scores those mismatched pairs without gradient, for the whole global batch before its
   micro-batches (the engine's `batch_inputs` hook), so that the reference point does not depend on
   how the batch is split into micro-batches and processes (TRL's depends on both).
8. At the end the sequence-level KL(policy || reference) is estimated from policy samples on
   held-out prompts (`policy_kl`) and written with the samples to `kl.json`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from alignkit.algorithms.policy_kl import policy_kl
from alignkit.algorithms.reference import Reference, cache_reference, pair_logps, sequence_logps
from alignkit.algorithms.sft import check_output_dir
from alignkit.config import check_interval, option, to_dict
from alignkit.data.jsonl import PROMPT_SCHEMA, read_rows, write_json
from alignkit.data.preference_tokens import collate_pairs, collate_sequences, load_pairs, load_unpaired, prompt_ids
from alignkit.engine.config import TrainConfig
from alignkit.engine.loop import Engine
from alignkit.errors import UserError
from alignkit.losses.preference import PREFERENCE_LOSSES, PreferenceLoss
from alignkit.models.load import (
    LoraConfig, ModelConfig, check_context, context_length, disable_dropout, is_peft, load_causal_lm, load_tokenizer,
    save_model, weights_stamp,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DPODataConfig:
    train: str = option("demo", "Pairs {prompt|messages, chosen, rejected[, label]} or rankings JSONL; KTO also "
                                "takes unpaired {prompt|messages, completion, label: bool}; 'demo' = VADER-labelled "
                                "review pairs")
    eval: str | None = option("demo", "Held-out rows in the same format; 'demo' = held-out review pairs; "
                                      "null = no evaluation")
    max_length: int = option(512, "Longest prompt + completion in tokens; longer ones are cut from the right", low=2)
    chat_template: bool = option(True, "Wrap rows in the tokenizer's chat template (prompt = user turn)")
    max_rows: int | None = option(None, "Use only the first N training rows (quick runs)", low=1)


@dataclass(frozen=True)
class KLEvalConfig:
    prompts: str | None = option(None, "Held-out {prompt} or {messages} JSONL; null = the prompts of data.eval")
    samples: int = option(64, "Prompts to sample one completion each for (0 = no KL estimate)")
    max_new_tokens: int = option(64, "Longest sampled completion")
    batch_size: int = option(16, "Prompts per generation batch", low=1)
    seed: int = option(0, "Seed of the sampler")

    def validate(self):
        for name, low in (("samples", 0), ("max_new_tokens", 1)):
            check_interval(f"kl.{name}", getattr(self, name), low, None)


@dataclass(frozen=True)
class DPOConfig:
    model: ModelConfig = option(ModelConfig(), "Policy to train (usually the SFT model); also the reference")
    lora: LoraConfig = option(LoraConfig(), "LoRA adapter (r = 0: full fine-tuning)")
    data: DPODataConfig = option(DPODataConfig(), "Preference data")
    train: TrainConfig = option(TrainConfig(), "Optimisation and run settings")
    kl: KLEvalConfig = option(KLEvalConfig(), "Sample-based KL(policy || reference) on held-out prompts at the end")
    loss: str = option("dpo", "dpo | cdpo | ipo | simpo | orpo | kto")
    beta: float = option(0.1, "DPO/cDPO/KTO: strength of the implicit KL penalty; SimPO: reward scale (paper: 2-2.5)")
    epsilon: float = option(0.1, "cDPO: assumed probability that a preference label is flipped")
    tau: float = option(0.1, "IPO: regularisation; the mean log-ratio margin is regressed to 1 / (2 tau)")
    gamma: float = option(0.5, "SimPO: target reward margin")
    orpo_lambda: float = option(0.1, "ORPO: weight of the odds-ratio term next to the SFT term")
    lambda_d: float = option(1.0, "KTO: weight of desirable examples")
    lambda_u: float = option(1.0, "KTO: weight of undesirable examples")
    reference: str = option("cached", "cached: reference log-probs computed once before training; live: every step")
    reference_model: str | None = option(None, "Reference policy directory, for the loss (not simpo, orpo) and for "
                                               "kl.json; null = the initial policy (with LoRA: the base with the "
                                               "adapter disabled)")
    output_dir: str = option("runs/dpo", "Run directory: metrics.jsonl, kl.json, reference_logps.pt, model/")

    def validate(self):
        if self.loss not in PREFERENCE_LOSSES:
            raise UserError(f"loss: {self.loss!r} is not one of {', '.join(PREFERENCE_LOSSES)}")
        if self.reference not in ("cached", "live"):
            raise UserError(f"reference: {self.reference!r} is not one of 'cached', 'live'")
        if not 0 <= self.epsilon < 0.5:
            raise UserError(f"epsilon must be in [0, 0.5) (a flip probability), got {self.epsilon}")
        for name, brackets in (("beta", "()"), ("tau", "()"), ("gamma", "[)"), ("orpo_lambda", "[)"),
                               ("lambda_d", "()"), ("lambda_u", "()")):
            check_interval(name, getattr(self, name), 0, math.inf, brackets)  # NaN and inf too: a NaN loss at step 1

    @property
    def spec(self) -> PreferenceLoss:
        return PREFERENCE_LOSSES[self.loss]

    @property
    def hyper(self) -> dict[str, float]:
        """Keyword arguments of the loss function, read from this config through the loss table."""
        return {arg: getattr(self, name) for arg, name in self.spec.hyper.items()}


class _Preference:
    """What pairs and unpaired rows share: units, tokens seen."""

    def __init__(self, spec: PreferenceLoss, hyper: dict, pad_token_id: int, reference: Reference):
        self.spec, self.hyper, self.pad_id, self.reference = spec, hyper, pad_token_id, reference

    def units(self, row) -> int:
        return 1

    def loss(self, model, batch: dict, normaliser: float):
        loss, metrics = self._loss(model, batch, normaliser)
        return loss, {**metrics, "tokens_seen": self.tokens(batch)}


class PairPreference(_Preference):
    """DPO, cDPO, IPO, SimPO, ORPO: each prompt once, then chosen and rejected in one pass of 2B rows."""

    def prepare(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = collate_pairs(rows, self.pad_id)
        if "ref" in rows[0]:
            batch["ref_logps"] = torch.tensor([r["ref"] for r in rows])  # (B, 2)
        if self.spec.soft_labels:
            batch["label"] = torch.tensor([1.0 if r.get("label") is None else float(r["label"]) for r in rows])
        return batch

    def tokens(self, batch: dict) -> int:
        """Non-pad tokens, counting the shared prompt once per sequence (as two full sequences would)."""
        return int(2 * batch["prompt_mask"].sum() + batch["completion_mask"].sum())

    def reference_logps(self, model, batch: dict) -> torch.Tensor:
        return self.reference.run(model, lambda m: pair_logps(m, batch)[0])

    def ref_logps(self, model, batch: dict) -> torch.Tensor:
        """Summed reference log-probs (B, 2) of the batch: cached in the batch, else scored live."""
        cached = batch.get("ref_logps")
        return cached if cached is not None else self.reference_logps(model, batch)

    def _loss(self, model, batch: dict, normaliser: float):
        sums, counts = pair_logps(model, batch)  # (B, 2), (B, 2)
        scale = counts.clamp(min=1) if self.spec.average else torch.ones_like(counts)
        chosen, rejected = (sums / scale).unbind(-1)
        inputs = {"chosen_logps": chosen, "rejected_logps": rejected}
        if self.spec.reference:
            inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = (self.ref_logps(model, batch) / scale).unbind(-1)
        if self.spec.soft_labels:
            inputs["label"] = batch["label"]
        loss, metrics = self.spec.fn(**inputs, **self.hyper, normaliser=normaliser)
        metrics["logps/chosen"] = chosen.detach().sum() / normaliser  # what the loss reads: SimPO's, ORPO's and
        metrics["logps/rejected"] = rejected.detach().sum() / normaliser  # IPO's are per-token means
        return loss, metrics


class UnpairedPreference(_Preference):
    """KTO: each row is one completion labelled desirable or not, plus its mismatched pair."""

    def prepare(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = {**collate_sequences([r["seqs"][0] for r in rows], self.pad_id),
                 **collate_sequences([r["seqs"][1] for r in rows], self.pad_id, prefix="kl_"),
                 "desirable": torch.tensor([r["desirable"] for r in rows])}
        if "ref" in rows[0]:
            batch["ref_logps"] = torch.tensor([r["ref"] for r in rows])  # (B, 2): own, mismatched
        return batch

    def tokens(self, batch: dict) -> int:
        return int(batch["attention_mask"].sum())

    def reference_logps(self, model, batch: dict) -> torch.Tensor:
        return torch.stack([self._reference(model, batch, ""), self._reference(model, batch, "kl_")], dim=-1)

    def _reference(self, model, batch: dict, prefix: str) -> torch.Tensor:
        """Reference log-probs (B,) of the rows' own completions (prefix "") or their mismatched pairs ("kl_")."""
        cached = batch.get("ref_logps")
        if cached is not None:
            return cached[:, 1 if prefix else 0]
        return self.reference.run(model, lambda m: sequence_logps(m, batch, prefix)[0])

    @torch.no_grad()
    def batch_inputs(self, model, batches: list[dict]) -> dict[str, torch.Tensor]:
        """The mismatched pairs' log-probs of every micro-batch: the reference point is the mean over the
        whole global batch (the engine joins these over the processes), not over one micro-batch."""
        pairs = [(sequence_logps(model, b, "kl_")[0].float(), self._reference(model, b, "kl_").float())
                 for b in batches]
        policy, ref = (torch.cat(t) for t in zip(*pairs)) if pairs else (torch.zeros(0), torch.zeros(0))
        return {"kl_policy_logps": policy, "kl_ref_logps": ref}

    def _loss(self, model, batch: dict, normaliser: float):
        sums, _ = sequence_logps(model, batch)  # (B,)
        loss, metrics = self.spec.fn(
            policy_logps=sums, ref_logps=self._reference(model, batch, ""), desirable=batch["desirable"],
            kl_policy_logps=batch["kl_policy_logps"], kl_ref_logps=batch["kl_ref_logps"], **self.hyper,
            normaliser=normaliser,
        )
        metrics["logps"] = sums.detach().sum() / normaliser
        return loss, metrics


def _data_paths(cfg: DPODataConfig) -> tuple[str, str | None]:
    if cfg.train != "demo" and cfg.eval != "demo":
        return cfg.train, cfg.eval
    from alignkit.tasks.preference_demo import build_preference_demo

    demo = build_preference_demo()
    train = str(demo["pairs_train"]) if cfg.train == "demo" else cfg.train
    return train, (str(demo["pairs_eval"]) if cfg.eval == "demo" else cfg.eval)


def _load_rows(cfg: DPOConfig, tokenizer) -> tuple[list[dict], list[dict] | None]:
    d = cfg.data
    train_path, eval_path = _data_paths(d)
    load = {True: load_pairs, False: load_unpaired}[cfg.spec.paired]
    train = load(train_path, tokenizer, d.max_length, d.chat_template)[: d.max_rows]
    evals = load(eval_path, tokenizer, d.max_length, d.chat_template) if eval_path else None
    for path, rows in ((train_path, train), (eval_path, evals or [])):
        if cfg.spec.paired and not cfg.spec.soft_labels and any(r.get("label") is not None for r in rows):
            raise UserError(f"{path}: rows carry soft labels ('label'), which loss={cfg.loss} cannot use; "
                            "use loss=dpo or loss=cdpo, or drop the labels")
    return train, evals


def _reference(cfg: DPOConfig, policy) -> Reference:
    """A separate frozen reference only where one is unavoidable (a given path, or live + full fine-tuning)."""
    if cfg.reference_model:
        return Reference(load_causal_lm(ModelConfig(cfg.reference_model, cfg.model.dtype), trainable=False))
    if cfg.reference == "live" and cfg.spec.reference and not is_peft(policy):
        return Reference(copy.deepcopy(policy).requires_grad_(False).eval())
    return Reference()


def _kl_prompts(cfg: DPOConfig, eval_rows: list[dict] | None) -> list:
    if cfg.kl.prompts:
        from alignkit.data.preferences import prompt_of

        return [prompt_of(r) for r in read_rows(cfg.kl.prompts, PROMPT_SCHEMA)][: cfg.kl.samples]
    unique = {json.dumps(r["prompt"], sort_keys=True): r["prompt"] for r in eval_rows or []}
    return list(unique.values())[: cfg.kl.samples]


def _check_kl_context(cfg: DPOConfig, model, tokenizer, prompts: list) -> None:
    """Before training: the KL samples must fit the model's context (they are drawn after it)."""
    context = context_length(model)
    if not prompts or context is None:
        return
    longest = max(len(prompt_ids(p, tokenizer, cfg.data.chat_template)) for p in prompts)
    if longest + cfg.kl.max_new_tokens - 1 > context:
        raise UserError(f"the longest KL prompt (kl.prompts, or data.eval's prompts) is {longest} tokens; with "
                        f"kl.max_new_tokens={cfg.kl.max_new_tokens} the model would read "
                        f"{longest + cfg.kl.max_new_tokens - 1} positions, more than its context of {context}: "
                        "shorten those prompts, lower kl.max_new_tokens or set kl.samples=0")


def _final_kl(cfg: DPOConfig, model, reference: Reference, tokenizer, prompts: list, out: Path) -> dict | None:
    if not prompts:
        return None
    if reference.model is None and not is_peft(model):  # full fine-tuning scored against the initial weights
        reference = Reference(load_causal_lm(ModelConfig(cfg.model.path, cfg.model.dtype), trainable=False)
                              .to(next(model.parameters()).device))
    k = cfg.kl
    result = policy_kl(model, reference, tokenizer, prompts, k.max_new_tokens, k.batch_size, cfg.data.chat_template,
                       k.seed)
    write_json(out / "kl.json", result)
    log.info("KL(policy || reference) on %d held-out prompts: %.3f +- %.3f nats", len(prompts), result["kl"],
             result["kl_stderr"])
    return result


def run_dpo(cfg: DPOConfig) -> Path:
    """Train with the configured preference loss and save; returns `output_dir/model`."""
    out = Path(cfg.output_dir)
    # validates batch sizes before anything is read or written
    engine = Engine(cfg.train, out, results=("kl.json",))
    check_output_dir(out, cfg.train.resume)
    acc = engine.accelerator
    acc.wait_for_everyone()
    tokenizer = load_tokenizer(cfg.model.path)
    train_rows, eval_rows = _load_rows(cfg, tokenizer)
    engine.steps_per_epoch(len(train_rows))  # too few rows: say so before the reference log-probs are computed
    kl_prompts = _kl_prompts(cfg, eval_rows) if cfg.kl.samples else []  # read now: a bad file fails before training
    model = load_causal_lm(cfg.model, cfg.lora)
    check_context(model, cfg.data.max_length)
    _check_kl_context(cfg, model, tokenizer, kl_prompts)
    disable_dropout(model)
    reference = _reference(cfg, model)
    algorithm = {True: PairPreference, False: UnpairedPreference}[cfg.spec.paired](
        cfg.spec, cfg.hyper, tokenizer.pad_token_id, reference)
    if cfg.spec.reference and cfg.reference == "cached":
        splits = {"train": train_rows, **({"eval": eval_rows} if eval_rows else {})}
        scorer = reference.model if reference.model is not None else model  # LoRA: its frozen base scores
        dtype = next((p.dtype for p in scorer.parameters() if not p.requires_grad), next(scorer.parameters()).dtype)
        reference_id = f"{weights_stamp(cfg.reference_model or cfg.model.path)}|{dtype}|{acc.mixed_precision}"
        with acc.autocast():  # in the training's precision, as a live reference would be
            cache_reference(model, algorithm, splits, out / "reference_logps.pt", reference_id,
                            cfg.train.micro_batch_size, acc.device, acc.is_main_process)
    model, metrics = engine.fit(model, algorithm, train_rows, eval_rows, to_dict(cfg), desc=cfg.loss)
    if metrics:  # KTO's unpaired rows have no preference accuracy
        accuracy = metrics.get("eval/rewards/accuracy")
        log.info("held-out loss %.4f%s", metrics["eval/loss"],
                 "" if accuracy is None else f", preference accuracy {accuracy:.3f}")
    acc.wait_for_everyone()
    if acc.is_main_process:
        save_model(model, tokenizer, out)  # first: a failure of the KL estimate must not lose the trained model
        _final_kl(cfg, model, reference, tokenizer, kl_prompts, out)
    acc.wait_for_everyone()
    return out / "model"
