"""Sequence log-probabilities of completions, under the policy and under a frozen reference.

`sequence_logps` scores independent sequences laid out by `collate_sequences` (left-padded prompts,
right-padded completions) and asks the model for the logits of the last A + 1 positions only.
`pair_logps` scores pairs laid out by `collate_pairs`: each distinct prompt runs once, then the
chosen and the rejected completions of every pair go through the model together, in one pass of 2B
rows over the prompts' key/value cache (`models.forward.prefix_forward`; gradients flow back through
the cache into the prompt pass). That is the same computation as two full sequences per pair, with
the prompt's layers run once instead of twice (or fewer: pairs from one ranking share a prompt).
Token log-probs come from logsumexp + gather (`ops.logprobs.token_logps`), never a (N, T, V)
log-softmax.

`Reference` runs a scoring function under the reference policy without a second copy of the
weights where possible: with LoRA it is the policy with its adapter disabled. `cache_reference`
computes the reference log-probs of a whole dataset once before training and keeps them in the run
directory, keyed by a fingerprint of the token ids and the reference, so a resumed run reuses them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path
from typing import Callable

import torch

from alignkit.models.forward import keep_logits, prefill_positions, prefix_forward, unique_prompts
from alignkit.models.load import is_peft, on_device_of, unwrap
from alignkit.ops.logprobs import token_logps

log = logging.getLogger(__name__)


def _masked_sums(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logps = token_logps(logits, tokens).masked_fill(~mask, 0.0)  # (N, A)
    return logps.sum(-1), mask.sum(-1)


def sequence_logps(model, batch: dict, prefix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs (N,) float32 of each completion and its number of tokens (N,).

    `batch` holds `{prefix}input_ids`, `attention_mask`, `completion_ids`, `completion_mask`.
    Position ids follow the attention mask, so left padding shifts nothing (also for learned
    absolute positions such as GPT-2's).
    """
    mask = batch[prefix + "attention_mask"]  # (N, T)
    completion = batch[prefix + "completion_ids"]  # (N, A)
    a = completion.shape[1]
    logits = model(
        input_ids=batch[prefix + "input_ids"], attention_mask=mask, position_ids=prefill_positions(mask),
        use_cache=False, **keep_logits(model, a + 1),
    ).logits
    return _masked_sums(logits[:, -(a + 1) : -1], completion, batch[prefix + "completion_mask"])


def pair_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs (B, 2) of [chosen, rejected] of each pair, and their token counts (B, 2).

    `batch` is a `collate_pairs` batch: prompts (B, P) and completions (2B, A), chosen and rejected of
    pair i in rows 2i and 2i + 1. Each distinct prompt runs once (`models.forward.prefix_forward`).
    """
    completion, completion_mask = batch["completion_ids"], batch["completion_mask"]  # (2B, A)
    first, index = unique_prompts(batch["prompt_ids"], batch["prompt_mask"])
    logits, _ = prefix_forward(model, batch["prompt_ids"][first], batch["prompt_mask"][first],
                               index.repeat_interleave(2), completion, completion_mask)
    sums, counts = _masked_sums(logits, completion, completion_mask)
    b = batch["prompt_ids"].shape[0]
    return sums.view(b, 2), counts.view(b, 2)


class Reference:
    """The frozen reference policy pi_ref.

    `model` is a separate frozen model (a `reference_model` path, or a copy of a fully fine-tuned
    policy); when it is None the reference is the policy with its LoRA adapter disabled, or, for a
    policy without an adapter, the policy itself (valid only before its first update: this is how
    `cache_reference` scores a dataset with no second copy).
    """

    def __init__(self, model=None):
        self.model = model

    @torch.no_grad()
    def run(self, policy, score: Callable):
        """`score(model)` with the reference model in place of the policy."""
        if self.model is not None:
            return score(on_device_of(self.model, policy))
        context = unwrap(policy).disable_adapter() if is_peft(policy) else contextlib.nullcontext()
        with context:
            return score(unwrap(policy))


def fingerprint(rows: list[dict], reference_id: str) -> str:
    """A hash of every row's token ids and of the reference's identity."""
    h = hashlib.sha256(reference_id.encode())
    for row in rows:
        h.update(json.dumps([row.get(k) for k in ("prompt_ids", "chosen_ids", "rejected_ids", "seqs")]).encode())
    return h.hexdigest()


@torch.no_grad()
def score_reference(policy, algorithm, rows: list[dict], batch_size: int, device) -> torch.Tensor:
    """Reference log-probs (R, S) of the rows, in micro-batches, by `algorithm.reference_logps`."""
    from tqdm.auto import tqdm

    out = []
    was_training = policy.training
    policy.eval()
    for i in tqdm(range(0, len(rows), batch_size), desc="reference log-probs", unit="batch", leave=False):
        batch = {k: v.to(device) for k, v in algorithm.prepare(rows[i : i + batch_size]).items()}
        out.append(algorithm.reference_logps(policy, batch).float().cpu())
    policy.train(was_training)
    return torch.cat(out)


def cache_reference(policy, algorithm, splits: dict[str, list[dict]], path: Path, reference_id: str,
                    batch_size: int, device, write: bool = True) -> None:
    """Put `row["ref"]` (one float per scored sequence) on every row, from `path` when it matches, else computed.

    The file maps split name -> {fingerprint, logps (R, S)}; it is (re)written when `write` (pass
    True on the main process only).
    """
    stored = {}
    if path.is_file():
        try:
            stored = torch.load(path, weights_only=True)
        except Exception as e:  # a file cut short (a full disk) or not ours: a cache, so compute it again
            log.warning("%s: unreadable (%s); computing the reference log-probs again", path, type(e).__name__)
    for name, rows in splits.items():
        key = fingerprint(rows, reference_id)
        entry = stored.get(name)
        if entry is None or entry["fingerprint"] != key:
            log.info("computing reference log-probs of %d %s rows", len(rows), name)
            entry = {"fingerprint": key, "logps": score_reference(policy, algorithm, rows, batch_size, device)}
            stored[name] = entry
        for row, values in zip(rows, entry["logps"].tolist()):
            row["ref"] = values
    if not write:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-")  # removed by the engine's start if a kill leaves it
    torch.save(stored, tmp)
    tmp.replace(path)
