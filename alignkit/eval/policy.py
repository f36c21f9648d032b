"""Policy metrics from teacher-forced log-probs of sampled completions: KL to the reference, entropy,
perplexity under a base model.

With completions y ~ pi(.|x) of prompts x (one per prompt), A_y tokens each:
    KL(pi || pi_ref) ~= mean_y [log pi(y|x) - log pi_ref(y|x)]          sequence level, nats (k1)
    H(pi)            ~= sum_y sum_t H(pi(.|x, y_<t)) / sum_y A_y        per token, nats, exact over the vocabulary
    PPL_base         =  exp(-sum_y log p_base(y|x) / sum_y A_y)          of the completions (corpus level)
The KL estimate is unbiased only when y is drawn from pi itself (temperature 1, no top-k/top-p); any
other sampler gives a biased number (`algorithms.policy_kl` says the same). The policy and the reference
are scored by the same function, so identical weights give exactly 0.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from alignkit.algorithms.reference import Reference
from alignkit.data.preference_tokens import Seq, collate_sequences
from alignkit.eval.reward import describe
from alignkit.models.forward import keep_logits, prefill_positions
from alignkit.ops.logprobs import token_logps
from alignkit.rollout.generate import SamplingConfig


def is_own_distribution(sampling: SamplingConfig) -> bool:
    """True when samples come from the policy's own distribution (a KL estimate on them is unbiased)."""
    return (sampling.do_sample and sampling.temperature == 1.0 and sampling.top_k == 0 and sampling.top_p == 1.0
            and sampling.num_beams == 1)


@torch.no_grad()
def score_sequences(model, seqs: Sequence[Seq], pad: int, batch_size: int = 16, entropy: bool = False
                    ) -> dict[str, torch.Tensor]:
    """Per sequence (N,) float64: `logps` = sum_t log p(y_t | x, y_<t), `tokens` = A_y and, with `entropy`,
    `entropy` = sum_t H(p(.|x, y_<t)), all from one forward per batch of `batch_size` sequences."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: dict[str, list] = {"logps": [], "tokens": [], "entropy": []}
    for i in range(0, len(seqs), batch_size):
        batch = {k: v.to(device) for k, v in collate_sequences(seqs[i : i + batch_size], pad).items()}
        mask, completion, keep = batch["attention_mask"], batch["completion_ids"], batch["completion_mask"]
        a = completion.shape[1]
        logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=prefill_positions(mask),
                       use_cache=False, **keep_logits(model, a + 1)).logits[:, -(a + 1) : -1].float()  # (b, A, V)
        out["logps"].append(token_logps(logits, completion).masked_fill(~keep, 0.0).sum(-1))
        out["tokens"].append(keep.sum(-1))
        if entropy:
            logp = logits.log_softmax(-1)
            out["entropy"].append((-(logp.exp() * logp).sum(-1)).masked_fill(~keep, 0.0).sum(-1))
    model.train(was_training)
    return {k: torch.cat(v).double().cpu() for k, v in out.items() if v}


def reference_logps(policy, reference: Reference, seqs: Sequence[Seq], pad: int, batch_size: int) -> torch.Tensor:
    """log pi_ref(y|x) (N,) by the same code as the policy's (`score_sequences`)."""
    return reference.run(policy, lambda m: score_sequences(m, seqs, pad, batch_size)["logps"])


def kl_metrics(policy_logps: torch.Tensor, ref_logps: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """kl (mean), kl_std, kl_stderr, kl_min, kl_max of the per-sequence log-ratios, and the ratios (N,)."""
    kl = policy_logps - ref_logps
    return {f"kl{'' if k == 'mean' else '_' + k}": v for k, v in describe(kl).items()}, kl


def perplexity(logps: torch.Tensor, tokens: torch.Tensor) -> float:
    """exp(-sum log p / sum tokens) over all sequences; nan without tokens (every completion empty)."""
    n = float(tokens.sum())
    return math.exp(-float(logps.sum()) / n) if n else float("nan")
