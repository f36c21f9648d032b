"""Beam search, written to pick the same sequence as `transformers`' `model.generate(num_beams=...)`.

The rules follow HF's beam search (transformers 5.x, `early_stopping=False`, `length_penalty=1.0`):
- each step keeps the top K = max(2, 1 + number of EOS ids) * num_beams continuations of all beams
  by accumulated log-probability (temperature 1), so that num_beams unfinished ones always remain;
- a continuation that ends in EOS, or reaches `max_new_tokens`, is a finished hypothesis if it is
  among the top num_beams; its score is sum of log-probs / (generated length ** length_penalty);
  the best num_beams finished hypotheses per prompt are kept;
- a prompt stops accepting hypotheses once its best running beam, scored at the current length,
  cannot beat its worst kept hypothesis; the search ends when no prompt can improve or every
  continuation hit a stop.
The best finished hypothesis per prompt is returned. All prompts stay in the batch until the end
(simpler than the sampling loop; beam search is not on the RL hot path).
"""

from __future__ import annotations

import torch

from alignkit.models.forward import with_cache
from alignkit.rollout.cache import make_cache

NEG = -1.0e9
LENGTH_PENALTY = 1.0


def _gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t (B, N, ...) indexed along dim 1 by index (B, K) -> (B, K, ...)."""
    while index.dim() < t.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(t, index, dim=1)


def _first_forward(model, input_ids, attention_mask, nb, cache, extra):
    from alignkit.rollout.generate import prefill_positions

    mask = attention_mask.long()
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=prefill_positions(mask),
                **with_cache(cache), **extra)
    cache.batch_repeat_interleave(nb)
    logits = out.logits[:, -1, :].float().repeat_interleave(nb, dim=0)  # (B*nb, V)
    return logits, mask.repeat_interleave(nb, dim=0), mask.sum(-1, keepdim=True).repeat_interleave(nb, dim=0)


class _Hypotheses:
    """The best `nb` finished hypotheses per prompt: tokens, per-token log-probs, score, length."""

    def __init__(self, b: int, nb: int, a: int, pad_id: int, device):
        self.tokens = torch.full((b, nb, a), pad_id, dtype=torch.long, device=device)
        self.logps = torch.zeros(b, nb, a, device=device)
        self.scores = torch.full((b, nb), NEG, device=device)
        self.lengths = torch.zeros(b, nb, dtype=torch.long, device=device)
        self.finished = torch.zeros(b, nb, dtype=torch.bool, device=device)

    def add(self, tokens, logps, scores, new_finished, length: int) -> None:
        """Merge candidates (B, K, ...) whose `scores` are NEG unless they finish now; keep the top nb."""
        nb = self.scores.shape[1]
        k = scores.shape[1]
        lengths = torch.full_like(self.lengths[:, :1], length).expand(-1, k)
        merged = torch.cat([self.scores, scores], dim=1)
        top = torch.topk(merged, k=nb, dim=1).indices  # (B, nb)
        self.tokens = _gather(torch.cat([self.tokens, tokens], dim=1), top)
        self.logps = _gather(torch.cat([self.logps, logps], dim=1), top)
        self.scores = _gather(merged, top)
        self.lengths = _gather(torch.cat([self.lengths, lengths], dim=1), top)
        self.finished = _gather(torch.cat([self.finished, new_finished], dim=1), top)


def beam_search(model, input_ids, attention_mask, cfg, eos, pad_id: int, extra: dict):
    """Returns (response_ids, response_mask, logps) of the best beam per prompt; see the module doc."""
    from alignkit.rollout.generate import _config

    b, p = input_ids.shape
    nb, a, device = cfg.num_beams, cfg.max_new_tokens, input_ids.device
    n_eos = 0 if eos is None else eos.numel()
    keep = max(2, 1 + n_eos) * nb
    cache = make_cache(_config(model), p + a)
    logits, mask, position = _first_forward(model, input_ids, attention_mask, nb, cache, extra)
    run_tokens = torch.full((b, nb, a), pad_id, dtype=torch.long, device=device)
    run_logps = torch.zeros(b, nb, a, device=device)
    run_scores = torch.full((b, nb), NEG, device=device)
    run_scores[:, 0] = 0.0  # identical beams at the start: only the first one may expand
    best = _Hypotheses(b, nb, a, pad_id, device)
    open_ = torch.ones(b, 1, dtype=torch.bool, device=device)  # can this prompt still improve?
    for step in range(a):
        logprobs = torch.log_softmax(logits, dim=-1)  # (B*nb, V)
        if step < cfg.min_new_tokens and eos is not None:
            logprobs[:, eos] = float("-inf")
        v = logprobs.shape[-1]
        total = (logprobs.view(b, nb, v) + run_scores.unsqueeze(-1)).view(b, nb * v)
        top_scores, top_index = torch.topk(total, k=keep, dim=1)  # (B, K)
        src, tok = top_index // v, top_index % v
        cand_tokens, cand_logps = _gather(run_tokens, src), _gather(run_logps, src)  # (B, K, A)
        cand_tokens[:, :, step] = tok
        cand_logps[:, :, step] = logprobs.view(b, nb, v)[torch.arange(b, device=device)[:, None], src, tok]
        hits = torch.isin(tok, eos) if eos is not None else torch.zeros_like(tok, dtype=torch.bool)
        if step + 1 == a:
            hits = torch.ones_like(hits)
        new_finished = hits & (torch.arange(keep, device=device) < nb)
        length = step + 1
        scores = top_scores / length**LENGTH_PENALTY + (~open_).float() * NEG + (~new_finished).float() * NEG
        best.add(cand_tokens, cand_logps, scores, new_finished, length)
        running = torch.topk(top_scores + hits.float() * NEG, k=nb, dim=1).indices  # (B, nb)
        run_tokens, run_logps = _gather(cand_tokens, running), _gather(cand_logps, running)
        run_scores = _gather(top_scores + hits.float() * NEG, running)
        worst = torch.where(best.finished, best.scores.min(dim=1, keepdim=True).values, NEG)
        open_ = open_ & (run_scores[:, :1] / length**LENGTH_PENALTY > worst).any(dim=-1, keepdim=True)
        if step + 1 == a or not bool(open_.any()) or bool(hits.all()):
            break
        beam_idx = (_gather(src, running) + torch.arange(b, device=device)[:, None] * nb).view(-1)  # (B*nb,)
        cache.reorder_cache(beam_idx)
        mask = torch.cat([mask, mask.new_ones(b * nb, 1)], dim=-1)
        out = model(input_ids=run_tokens[:, :, step].reshape(-1, 1), attention_mask=mask, position_ids=position,
                    **with_cache(cache), **extra)
        logits = out.logits[:, -1, :].float()
        position = position + 1
    lengths = best.lengths[:, 0]
    width = int(lengths.max())
    response_mask = torch.arange(a, device=device) < lengths.unsqueeze(-1)
    response_ids = best.tokens[:, 0].masked_fill(~response_mask, pad_id)
    logps = best.logps[:, 0].masked_fill(~response_mask, 0.0)
    return response_ids[:, :width], response_mask[:, :width], logps[:, :width]
