"""The Rollout: what every online algorithm (PPO, GRPO, RLOO, REINFORCE) learns from, and its collection.

    prompts ─► generate (policy, sampling)  ─► response_ids, response_mask, old_logps
            ─► decode ─► reward.score(prompts, completions, **row_fields) ─► scores (length penalty)
                      (─► monitor.score ─► gold: logged, never optimised)
            ─► reference forward (LoRA: adapter disabled; else a frozen copy) ─► ref_logps
            ─► critic forward (PPO only) ─► values

`old_logps` are the sampler's own log-probs under log_softmax(logits / T): no extra forward pass.
The first minibatch of each update checks them against the training forward (logged as
`logp_diff_max`; it must be ~0, else generation and training disagree and the ratio is biased).
The samples of a group share their prompt's pass, in generation and in every teacher-forced forward
(`models.forward.prefix_forward`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from typing import Callable, Sequence

import torch

from alignkit.data.preference_tokens import prompt_ids
from alignkit.data.preferences import prompt_of
from alignkit.models.forward import prefix_forward, unique_prompts
from alignkit.models.load import is_peft, on_device_of, unwrap
from alignkit.ops.logprobs import token_logps
from alignkit.rollout.generate import SamplingConfig, generate, stop_token_ids


@dataclass
class Rollout:
    """One rollout batch. B responses (prompts x group size), P prompt tokens, A response tokens."""

    prompt_ids: torch.Tensor  # (B, P) long, left-padded
    prompt_mask: torch.Tensor  # (B, P) bool, True on real prompt tokens
    response_ids: torch.Tensor  # (B, A) long, right-padded
    response_mask: torch.Tensor  # (B, A) bool, True on generated tokens (EOS included)
    old_logps: torch.Tensor  # (B, A) float32, log pi_old(a_t) at the sampling temperature; 0 where masked
    ref_logps: torch.Tensor  # (B, A) float32, log pi_ref(a_t); 0 where masked (or everywhere if unused)
    scores: torch.Tensor  # (B,) float32, reward of each whole response
    group: torch.Tensor  # (B,) long, index of the prompt each response answers
    values: torch.Tensor | None = None  # (B, A) float32, V(s_t) before each response token (PPO only)
    gold: torch.Tensor | None = None  # (B,) float32, a monitored reward (logged, never optimised), e.g. a gold judge

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    def rows(self, **extra: torch.Tensor) -> list[dict]:
        """One dict of tensors per response (the engine's rows); `extra` adds per-row fields, e.g. advantages."""
        columns = {f.name: getattr(self, f.name) for f in fields(self)
                   if getattr(self, f.name) is not None and f.name != "gold"}
        columns.update(extra)
        return [{k: v[i] for k, v in columns.items()} for i in range(len(self))]

    def metrics(self) -> dict:
        lengths = self.response_mask.sum(-1).float()
        out = {"score_mean": float(self.scores.mean()), "score_std": float(self.scores.std(unbiased=False)),
               "response_length": float(lengths.mean())}
        if self.gold is not None:
            out["gold_mean"] = float(self.gold.mean())
        return out


def gather_rollout(r: Rollout, state) -> Rollout:
    """The rollouts of all processes (`state`: accelerate's PartialState), each of its own share of the
    prompts, as one Rollout on every process, in process order: prompts left-padded and responses
    right-padded to the widest, group indices offset so that each prompt keeps its own."""
    from accelerate.utils import gather, pad_across_processes

    groups = int(r.group.max()) + 1  # every process holds the same number of prompts
    out = {}
    for f in fields(r):
        v = getattr(r, f.name)
        if v is None:
            continue
        device, v = v.device, v.to(state.device)  # NCCL gathers on the GPU
        if f.name == "group":
            v = v + state.process_index * groups
        if v.dim() == 2:  # zeros pad: masks False, log-probs and values 0 (ids under a False mask are never read);
            # accelerate's padding turns a bool tensor into int64 (zeros + 0), hence the cast back
            v = pad_across_processes(v, dim=1, pad_first=f.name.startswith("prompt")).to(v.dtype)
        out[f.name] = gather(v).to(device)
    return Rollout(**out)


def stack_rows(rows: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Rows of one rollout (same P and A) back into (b, ...) tensors: a micro-batch."""
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def forward_response(model, batch: dict, temperature: float = 1.0, hidden: bool = False):
    """Teacher-forced logits (B, A, V) of the response tokens and, with `hidden`, the last hidden states
    (B, A, H) at the same positions (the states before each token). Responses that share a prompt (a
    GRPO/RLOO group) share one pass over it (`models.forward.prefix_forward`)."""
    first, index = unique_prompts(batch["prompt_ids"], batch["prompt_mask"])
    logits, states = prefix_forward(model, batch["prompt_ids"][first], batch["prompt_mask"][first], index,
                                    batch["response_ids"], batch["response_mask"], hidden)
    if temperature != 1.0:
        logits = logits / temperature
    return logits, states


def response_logps(model, batch: dict, temperature: float = 1.0) -> torch.Tensor:
    logits, _ = forward_response(model, batch, temperature)
    return token_logps(logits, batch["response_ids"]).masked_fill(~batch["response_mask"], 0.0)


def reference_context(policy, reference):
    """The reference forward: a separate frozen model, else the policy with its LoRA adapter disabled."""
    if reference is not None:
        return on_device_of(reference, policy), contextlib.nullcontext()
    if not is_peft(policy):
        raise ValueError("a policy without a LoRA adapter needs a separate frozen reference model")
    return unwrap(policy), unwrap(policy).disable_adapter()


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs], dtype=torch.long)
    mask = torch.tensor([[False] * (width - len(s)) + [True] * len(s) for s in seqs])
    return ids, mask


def _ended(gen, eos_ids: set[int]) -> torch.Tensor:
    last = (gen.response_mask.sum(-1) - 1).clamp_min(0)
    tokens = gen.response_ids.gather(1, last.unsqueeze(1)).squeeze(1)
    return torch.tensor([int(t) in eos_ids for t in tokens.tolist()]) & (gen.response_mask.sum(-1) > 0).cpu()


@torch.no_grad()
def collect_rollout(policy, tokenizer, rows: list[dict], reward, sampling: SamplingConfig, *, group_size: int = 1,
                    reference=None, need_ref: bool = True, value_fn: Callable | None = None,
                    no_eos_penalty: float | None = None, chat_template: bool = True,
                    generator: torch.Generator | None = None, monitor=None, rescore: bool = False) -> Rollout:
    """Sample `group_size` responses to each prompt row and score them: a Rollout of len(rows) * group_size.

    `monitor`: a second reward source (e.g. the gold judge) whose scores go to `Rollout.gold`, logged only.
    `rescore`: take `old_logps` from a teacher-forced forward (the training forward's kernels) instead of
    the sampler's. Under bf16 the sampler's cached decoding and the full forward differ by about 1e-2 in
    log-prob, which PPO's ratio would read as a policy change; in float32 they agree to about 1e-5.
    """
    from alignkit.rewards.base import checked_scores, length_penalty, row_fields

    device = next(unwrap(policy).parameters()).device
    rows = [row for row in rows for _ in range(group_size)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = _left_pad([prompt_ids(prompt_of(r), tokenizer, chat_template) for r in rows], pad_id)
    ids, mask = ids.to(device), mask.to(device)
    stops = stop_token_ids(unwrap(policy), tokenizer)  # the tokenizer's EOS and the model's end-of-turn ids
    gen = generate(policy, ids, mask, sampling, eos_token_id=stops or None, pad_token_id=pad_id, generator=generator)
    texts = tokenizer.batch_decode(gen.response_ids.masked_fill(~gen.response_mask, pad_id), skip_special_tokens=True)
    extra = row_fields(rows)
    prompts = [prompt_of(r) for r in rows]
    scores = checked_scores(reward.score(prompts, texts, **extra), prompts, texts).float()
    scores = length_penalty(scores, _ended(gen, set(stops)), no_eos_penalty)
    group = torch.arange(len(rows) // group_size).repeat_interleave(group_size)
    out = Rollout(ids, mask, gen.response_ids, gen.response_mask, gen.logps, torch.zeros_like(gen.logps),
                  scores.to(device), group.to(device))
    if monitor is not None:
        out.gold = monitor.score(prompts, texts, **extra).float().cpu()
    batch = {"prompt_ids": ids, "prompt_mask": mask, "response_ids": gen.response_ids,
             "response_mask": gen.response_mask}
    if rescore:
        out.old_logps = response_logps(policy, batch, sampling.temperature)
    if need_ref:
        model, context = reference_context(policy, reference)
        with context:
            out.ref_logps = response_logps(model, batch, sampling.temperature)
    if value_fn is not None:
        out.values = value_fn(batch).float().masked_fill(~gen.response_mask, 0.0)
    return out
