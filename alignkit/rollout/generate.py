"""The generation engine: batched KV-cache decoding for any Hugging Face causal LM (plain or PEFT).

`generate` takes left-padded prompts and returns right-padded responses with their masks and the
log-probability of every generated token. It is our own loop around the model's `forward` (not
`model.generate`), for three reasons: the RL trainers need the sampling log-probs, finished rows
should stop costing compute, and `model.generate` spends much of a CPU decode step outside the model.

Implementation details (each measured on the benchmark machine, see `benchmarks/generation.py`):
1. One prefill forward over the prompts, then one forward per new token with a KV cache;
   `position_ids` come from the attention mask (`cumsum - 1`), so left padding shifts nothing and
   learned position embeddings (GPT-2) see the same positions as an unpadded prompt.
2. Only the last position's logits are computed (`logits_to_keep=1`).
3. The cache writes into preallocated buffers (`rollout.cache`) instead of `torch.cat` every step.
4. A row that emits a stop token (EOS, the generation config's EOS ids, the chat template's end of
   turn: `stop_token_ids`) is finished; finished rows are dropped from the batch and the cache once
   they are at least an eighth of the batch, so they stop costing compute (until then they are
   decoded and their tokens discarded).
5. Sampling inverts the CDF with one uniform per row (`rollout.sampling`), not `torch.multinomial`.
6. On the CPU, the large float32 linear layers (the output layer above all) run through oneDNN
   with weights prepacked once per call, LoRA adapters merged into the packed copy (`rollout.linear`).
7. On the CPU, a decode step of a Llama, Mistral or Qwen2 model with full attention (no sliding window) runs as
   our own few dozen tensor operations over the layers' weights (`rollout.decode_step`; equal to the model's
   forward to float rounding), not through transformers' modules, whose Python is most of a small model's
   step; the prompt pass and every other model go through the model's `forward`.
8. The model runs in eval mode under `torch.inference_mode()`; its training mode is restored after
   and the returned tensors are ordinary tensors (usable as inputs to a later autograd pass).
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from alignkit.config import option
from alignkit.data.chat import render
from alignkit.errors import UserError
from alignkit.models.forward import keep_logits, prefill_positions, unique_prompts, with_cache
from alignkit.models.load import base_model, context_length, unwrap
from alignkit.rollout.cache import make_cache
from alignkit.rollout.decode_step import decode_step
from alignkit.rollout.linear import fast_linears
from alignkit.rollout.sampling import TokenChooser


@dataclass(frozen=True)
class SamplingConfig:
    """How to decode: greedy (`do_sample: false`), sampling, or beam search (`num_beams > 1`)."""

    max_new_tokens: int = option(64, "Maximum number of tokens to generate per prompt (EOS included)")
    min_new_tokens: int = option(0, "Stop tokens (EOS, end of turn) are suppressed until this many tokens have been "
                                    "generated")
    do_sample: bool = option(True, "Sample from the distribution; false = greedy (or beam search if num_beams > 1)")
    temperature: float = option(1.0, "Divide logits by this before sampling; log-probs are reported at it too")
    top_k: int = option(0, "Sample only among the k most likely tokens; 0 = off")
    top_p: float = option(1.0, "Nucleus sampling: smallest set of tokens with this much probability; 1.0 = off")
    num_beams: int = option(1, "Beam search width when > 1 (deterministic; returns the best beam)")
    seed: int | None = option(None, "Seed of the sampling random generator; null = torch's global generator")

    def validate(self) -> None:
        """Raise UserError naming the first field with an invalid value."""
        if self.max_new_tokens < 1:
            raise UserError(f"sampling.max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise UserError(
                f"sampling.min_new_tokens: must be between 0 and max_new_tokens ({self.max_new_tokens}), "
                f"got {self.min_new_tokens}"
            )
        if self.do_sample and not self.temperature > 0:
            raise UserError(f"sampling.temperature: must be > 0 when sampling, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"sampling.top_k: must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"sampling.top_p: must be in (0, 1], got {self.top_p}")
        if self.num_beams < 1:
            raise UserError(f"sampling.num_beams: must be >= 1, got {self.num_beams}")
        if self.num_beams > 1 and self.do_sample:
            raise UserError("sampling.num_beams: beam search is deterministic; set do_sample: false to use it")


@dataclass
class Generation:
    """The output of `generate`. Shapes: B prompts, A = the longest response (<= max_new_tokens)."""

    response_ids: torch.Tensor  # (B, A) long, right-padded with pad_token_id
    response_mask: torch.Tensor  # (B, A) bool, True on generated tokens including the EOS that ended a row
    logps: torch.Tensor  # (B, A) float32 log-prob of each token under log_softmax(logits / T); 0 where masked

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) number of generated tokens per row."""
        return self.response_mask.sum(-1)


@contextlib.contextmanager
def inference(model):
    """Eval mode + `torch.inference_mode()` for the block; the model's training mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _eos_tensor(eos_token_id, device) -> torch.Tensor | None:
    if eos_token_id is None:
        return None
    ids = [int(eos_token_id)] if isinstance(eos_token_id, numbers.Integral) else [int(i) for i in eos_token_id]
    return torch.tensor(ids, dtype=torch.long, device=device) if ids else None


def sampling_generator(cfg: SamplingConfig, device, generator=None) -> torch.Generator | None:
    """`generator` if given, else one seeded from `cfg.seed`, else None (torch's global generator). Callers that
    sample in batches make one and pass it to every batch, so that batches draw different samples."""
    if generator is not None or cfg.seed is None:
        return generator
    return torch.Generator(device=device).manual_seed(cfg.seed)


def _config(model):
    return getattr(base_model(model), "config", None)


def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cfg: SamplingConfig,
    *,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int | None,
    generator: torch.Generator | None = None,
) -> Generation:
    """Decode responses to left-padded prompts `input_ids` (B, P) with `attention_mask` (B, P).

    `eos_token_id` ends a row (an int, a list of ids, or None to always generate `max_new_tokens`);
    `pad_token_id` fills response positions after the end (defaults to the first EOS id, else 0).
    Sampling uses `generator` if given, else one seeded from `cfg.seed`, else torch's global one.
    Greedy and beam search report log-probs at temperature 1.
    """
    cfg.validate()
    if getattr(getattr(unwrap(model), "active_peft_config", None), "is_prompt_learning", False):
        raise UserError("prompt-learning PEFT adapters (prompt or prefix tuning) cannot generate here: alignkit's "
                        "decoding passes its own key/value cache and attention mask; use LoRA")
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask must both be (B, P)")
    empty = (attention_mask.sum(-1) == 0).nonzero()
    if len(empty):
        raise UserError(f"prompt {int(empty[0])} of the batch has no tokens: an empty prompt needs a tokenizer that "
                        "adds a start token (BOS); give it some text")
    context = context_length(model)
    fed = input_ids.shape[1] + cfg.max_new_tokens - 1  # the last new token is never fed back
    if context is not None and fed > context:
        raise UserError(f"the longest prompt is {input_ids.shape[1]} tokens; with sampling.max_new_tokens="
                        f"{cfg.max_new_tokens} the model would read {fed} positions, more than its context of "
                        f"{context}: shorten the prompts or lower sampling.max_new_tokens")
    eos = _eos_tensor(eos_token_id, input_ids.device)
    if pad_token_id is None:
        pad_token_id = int(eos[0]) if eos is not None else 0
    with inference(model), fast_linears(model) as products:
        if cfg.num_beams > 1:
            from alignkit.rollout.beam import beam_search

            out = beam_search(model, input_ids, attention_mask, cfg, eos, pad_token_id, keep_logits(model, 1))
        else:
            chooser = TokenChooser(
                do_sample=cfg.do_sample,
                temperature=cfg.temperature,
                top_k=cfg.top_k,
                top_p=cfg.top_p,
                min_new_tokens=cfg.min_new_tokens,
                eos_ids=eos,
                generator=sampling_generator(cfg, input_ids.device, generator),
            )
            out = _decode(model, input_ids, attention_mask, cfg.max_new_tokens, chooser, pad_token_id, products)
    return Generation(*(t.clone() for t in out))  # clones are ordinary tensors, not inference tensors


def _decode(model, input_ids, attention_mask, max_new: int, choose: TokenChooser, pad_id: int, products: dict):
    """The decode loop; returns (response_ids, response_mask, logps) trimmed to the longest response."""
    b, p = input_ids.shape
    device = input_ids.device
    response_ids = torch.full((b, max_new), pad_id, dtype=torch.long, device=device)
    logps = torch.zeros(b, max_new, dtype=torch.float32, device=device)
    lengths = torch.full((b,), max_new, dtype=torch.long, device=device)
    extra = keep_logits(model, 1)
    cache = make_cache(_config(model), p + max_new)
    mask = attention_mask.long()
    first, index = unique_prompts(input_ids, mask)  # the samples of a group share a prompt: prefill it once
    shared = len(first) < b
    prefill = first if shared else torch.arange(b, device=device)
    logits = model(input_ids=input_ids[prefill], attention_mask=mask[prefill],
                   position_ids=prefill_positions(mask[prefill]), **with_cache(cache),
                   **extra).logits[:, -1, :]
    if shared:
        cache.batch_select_indices(index)
        logits = logits[index]
    step_fn = decode_step(model, cache, products, p + max_new) if max_new > 1 else None
    padded = bool((mask == 0).any())
    rows = torch.arange(b, device=device)  # original row of each batch row
    position = mask.sum(-1, keepdim=True)  # (b, 1) position id of the next token
    done = torch.zeros(b, dtype=torch.bool, device=device)  # finished but still in the batch
    for step in range(max_new):
        tokens, token_logps = choose(logits, step)
        logits = None  # free the logits before the next forward
        new = ~done  # rows that were still generating
        response_ids[rows[new], step] = tokens[new]
        logps[rows[new], step] = token_logps[new]
        if choose.eos_ids is not None:
            ended = torch.isin(tokens, choose.eos_ids) & ~done
            lengths[rows[ended]] = step + 1
            done = done | ended
        if step + 1 == max_new or bool(done.all()):
            break
        if 8 * int(done.sum()) >= done.numel():  # drop finished rows from batch and cache
            keep = (~done).nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            rows, mask, position, tokens, done = rows[keep], mask[keep], position[keep], tokens[keep], done[keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        if step_fn is not None:
            logits = step_fn(tokens, position.squeeze(-1), mask if padded else None)
        else:
            logits = model(input_ids=tokens.unsqueeze(-1), attention_mask=mask, position_ids=position,
                           **with_cache(cache), **extra).logits[:, -1, :]
        position = position + 1
    width = int(lengths.max())
    response_mask = torch.arange(max_new, device=device) < lengths.unsqueeze(-1)
    response_ids = response_ids.masked_fill(~response_mask, pad_id)
    logps = logps.masked_fill(~response_mask, 0.0)
    return response_ids[:, :width], response_mask[:, :width], logps[:, :width]


def _is_message(m) -> bool:
    return isinstance(m, dict) and {"role", "content"} <= m.keys()


def _prompt_text(tokenizer, prompt, chat: bool) -> tuple[str, bool]:
    """(text, is_templated) for a string prompt or a list of {"role", "content"} messages."""
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if isinstance(prompt, str):
        if not (chat and has_template):
            return prompt, False
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, (list, tuple)) or not all(_is_message(m) for m in prompt):
        raise UserError(f"a prompt must be a string or a list of {{'role', 'content'}} messages, got {prompt!r:.80}")
    if not has_template:
        raise UserError("the tokenizer has no chat template, so message-list prompts cannot be rendered; "
                        "pass plain string prompts or use a tokenizer with a chat_template")
    return render(tokenizer, prompt, True, "prompt"), True  # a template's error is one line


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS, any EOS ids in the model's generation config, and the chat template's end-of-turn
    token (what SFT trains a model to end a reply with; a base checkpoint's config does not list it)."""
    from alignkit.data.chat import end_of_turn_id

    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    gen_cfg = getattr(model, "generation_config", None)
    extra = getattr(gen_cfg, "eos_token_id", None)
    for i in [*([extra] if isinstance(extra, int) else list(extra or [])), end_of_turn_id(tokenizer)]:
        if i is not None and i not in ids:
            ids.append(i)
    return ids


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (input_ids (B, P), attention_mask (B, P)), padded on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


def generate_text(model, tokenizer, prompts: Sequence, cfg: SamplingConfig, chat: bool = True,
                  generator: torch.Generator | None = None) -> list[str]:
    """Completions (special tokens removed) for string prompts or lists of {"role", "content"} messages.

    With `chat` and a tokenizer that has a chat template, a string becomes one user message; message
    lists always go through the template (with the generation prompt appended). A tokenizer without
    a pad token pads with its EOS token (padding is masked, so the choice does not matter).
    """
    if isinstance(prompts, str):  # would be read as one prompt per character
        raise TypeError("prompts must be a sequence of prompts; wrap a single prompt in a list")
    if not prompts:
        return []
    rows = []
    for prompt in prompts:
        text, templated = _prompt_text(tokenizer, prompt, chat)
        rows.append(tokenizer(text, add_special_tokens=not templated)["input_ids"])
    eos = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    input_ids, attention_mask = left_pad(rows, pad_id)
    device = next(model.parameters()).device
    out = generate(model, input_ids.to(device), attention_mask.to(device), cfg,
                   eos_token_id=eos or None, pad_token_id=pad_id, generator=generator)
    ids = [row[mask].tolist() for row, mask in zip(out.response_ids.cpu(), out.response_mask.cpu())]
    return tokenizer.batch_decode(ids, skip_special_tokens=True)
