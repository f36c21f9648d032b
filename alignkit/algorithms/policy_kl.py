"""Sampling completions for held-out prompts, and the sample-based KL of a policy to its reference.

    KL(pi || pi_ref) = E_{x ~ prompts, y ~ pi(.|x)} [log pi(y|x) - log pi_ref(y|x)]       (sequence level)

estimated with one sample of the policy per prompt at temperature 1 with no top-k/top-p filtering
(the policy's own distribution; any other sampler gives a biased estimate). Both log-probs are
computed by teacher forcing with the same code (`reference.sequence_logps`), so a policy equal to
its reference gives exactly 0.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from alignkit.algorithms.reference import Reference, sequence_logps
from alignkit.data.preference_tokens import Seq, collate_sequences, prompt_ids
from alignkit.rollout.generate import SamplingConfig, generate, stop_token_ids


def pad_id(tokenizer) -> int:
    return 0 if tokenizer.pad_token_id is None else int(tokenizer.pad_token_id)


def sample_sequences(model, tokenizer, prompts: Sequence, sampling: SamplingConfig, chat_template: bool = True,
                     generator: torch.Generator | None = None) -> list[Seq]:
    """One sampled completion per prompt (text or messages): [(prompt_ids, completion_ids), ...].

    Prompts are tokenised as in training (`preference_tokens.prompt_ids`); a completion keeps the
    EOS that ended it.
    """
    ids = [prompt_ids(p, tokenizer, chat_template) for p in prompts]
    device = next(model.parameters()).device
    batch = collate_sequences([(p, []) for p in ids], pad_id(tokenizer))
    out = generate(model, batch["input_ids"].to(device), batch["attention_mask"].to(device), sampling,
                   eos_token_id=stop_token_ids(model, tokenizer) or None, pad_token_id=pad_id(tokenizer),
                   generator=generator)
    responses = [row[mask].tolist() for row, mask in zip(out.response_ids.cpu(), out.response_mask.cpu())]
    return list(zip(ids, responses))


def decode(tokenizer, seqs: Sequence[Seq]) -> list[str]:
    """The completion texts, special tokens (EOS, end of turn) removed."""
    return [tokenizer.decode(completion, skip_special_tokens=True).strip() for _, completion in seqs]


@torch.no_grad()
def policy_kl(policy, reference: Reference, tokenizer, prompts: Sequence, max_new_tokens: int = 64,
              batch_size: int = 16, chat_template: bool = True, seed: int = 0) -> dict:
    """Sample-based sequence-level KL(policy || reference) on `prompts` (see the module docstring).

    Returns `{"kl": mean, "kl_stderr": standard error, "samples": [{prompt, completion, kl, tokens}]}`.
    """
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0)
    generator = torch.Generator(device=next(policy.parameters()).device).manual_seed(seed)
    device = next(policy.parameters()).device
    was_training = policy.training
    policy.eval()
    samples = []
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i : i + batch_size])
        seqs = sample_sequences(policy, tokenizer, chunk, sampling, chat_template, generator)
        batch = {k: v.to(device) for k, v in collate_sequences(seqs, pad_id(tokenizer)).items()}
        policy_logps, lengths = sequence_logps(policy, batch)
        kl = policy_logps - reference.run(policy, lambda m: sequence_logps(m, batch)[0])  # (N,)
        for prompt, text, value, n in zip(chunk, decode(tokenizer, seqs), kl.tolist(), lengths.tolist()):
            samples.append({"prompt": prompt, "completion": text, "kl": value, "tokens": n})
    policy.train(was_training)
    values = torch.tensor([s["kl"] for s in samples], dtype=torch.float64)
    stderr = float(values.std() / math.sqrt(len(values))) if len(values) > 1 else float("nan")
    return {"kl": float(values.mean()), "kl_stderr": stderr, "samples": samples}
