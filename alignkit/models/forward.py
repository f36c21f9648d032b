"""Teacher-forced forwards of a causal LM over prompt + continuation, computing each prompt once.

Online RL scores a group of G responses to one prompt (GRPO, RLOO), DPO a chosen and a rejected
completion of one prompt. Running every (prompt, continuation) as its own sequence repeats the
prompt's layers G times. `prefix_forward` runs each distinct prompt once, keeps its key/value cache,
repeats the cache rows for the continuations, and runs the continuations over it:

    pass 1: prompts (U, P), left-padded  ─► cache (U), logits of the last prompt position
    pass 2: continuations (N, A - 1) over cache[index] (N)  ─► logits of continuation positions

The logits at the last prompt position predict continuation token 0, those at continuation position
t predict token t + 1, so the last continuation token is never fed. Gradients flow back through the
cache into the prompt pass: the result equals N full sequences (to float rounding) at the cost of
U * P + N * (A - 1) tokens instead of N * (P + A).
"""

from __future__ import annotations

import functools
import inspect

import torch
import transformers
from packaging.version import Version

from alignkit.models.load import base_model

# transformers 5.24 renamed the forward argument and output field `past_key_values` to `cache` (the old
# name still works there, with a deprecation warning).
CACHE = "cache" if Version(transformers.__version__) >= Version("5.24.0.dev0") else "past_key_values"


def prefill_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids (B, T) for a left-padded batch: 0 at each row's first real token; pads get 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


@functools.lru_cache(maxsize=64)
def _accepts_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def keep_logits(model, n: int) -> dict:
    """Forward kwargs asking for the logits of the last n positions only (when the model supports it):
    the output layer is a large share of a small model's compute (SmolLM2: 28M of 135M parameters)."""
    return {"logits_to_keep": n} if _accepts_logits_to_keep(type(base_model(model))) else {}


def with_cache(cache) -> dict:
    """Forward kwargs that read and extend the key/value `cache`."""
    return {CACHE: cache, "use_cache": True}


def unique_prompts(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, index): the row of the first occurrence of each distinct prompt (U,), and for each of
    the B rows the position of its prompt among them (B,), so that `prompt_ids[first][index] == prompt_ids`."""
    key = torch.cat([prompt_ids, prompt_mask.long()], dim=1)
    _, index = torch.unique(key, dim=0, return_inverse=True)
    rows = torch.arange(len(index), device=index.device)
    first = torch.full((int(index.max()) + 1,), len(index), dtype=torch.long, device=index.device)
    first = first.scatter_reduce(0, index, rows, reduce="amin")
    return first, index


def prefix_forward(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, index: torch.Tensor,
                   ids: torch.Tensor, mask: torch.Tensor, hidden: bool = False):
    """Logits (N, A, V) predicting each continuation token `ids` (N, A) (right-padded, `mask` True on real
    tokens) after prompt `index[n]` of `prompt_ids` (U, P) (left-padded); with `hidden`, also the last
    hidden states (N, A, H) at the same positions (the state before each token), else None."""
    prompt_mask = prompt_mask.long()
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=prefill_positions(prompt_mask),
                use_cache=True, output_hidden_states=hidden, **keep_logits(model, 1))
    logits = [out.logits[:, -1:][index]]
    states = [out.hidden_states[-1][:, -1:][index]] if hidden else None
    if ids.shape[1] > 1:
        cache = getattr(out, CACHE)
        cache.batch_select_indices(index)  # each prompt's keys and values once per continuation
        full = torch.cat([prompt_mask[index], mask[:, :-1].long()], dim=1)  # (N, P + A - 1)
        positions = prefill_positions(full)[:, prompt_ids.shape[1] :]
        rest = model(input_ids=ids[:, :-1], attention_mask=full, position_ids=positions, output_hidden_states=hidden,
                     **with_cache(cache))
        logits.append(rest.logits)
        if hidden:
            states.append(rest.hidden_states[-1])
    return torch.cat(logits, dim=1), (torch.cat(states, dim=1) if hidden else None)
