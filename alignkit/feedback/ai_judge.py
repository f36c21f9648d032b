"""An AI judge for pairwise comparisons (RLAIF: Bai et al. 2022; Lee et al. 2023).

The judge model reads one user turn (through its chat template)

    Consider the following conversation between a human and an assistant:
    Human: <prompt>
    <comparison question of a principle>
    Options:
    (A) <first response>
    (B) <second response>

and its reply is started for it with "The answer is:". With z_A, z_B the logits, at the answer
position, of the tokens where the continuations " (A)" and " (B)" first differ, the soft preference is

    P(A) = exp(z_A) / (exp(z_A) + exp(z_B))                    (normalised over the two answers)

Position bias: language models prefer one letter regardless of content, so every pair is judged in
both orders and the two are averaged,

    P(a > b) = 1/2 [P(A | A=a, B=b) + 1 - P(A | A=b, B=a)]

A judge that picks the same letter in both orders picks by position; the share of such pairs is
the position-bias rate. With `chain_of_thought` the reply starts "Let's think step by step:", the
judge writes a rationale (decoded with `rationale`), then "The answer is:" follows; since such
probabilities are extreme, each order's P(A) is clamped to [0.4, 0.6] (Bai et al. 2022, sec. 4.1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from alignkit.config import option
from alignkit.data.chat import has_chat_template, render
from alignkit.errors import UserError
from alignkit.models.load import ModelConfig
from alignkit.models.forward import keep_logits, prefill_positions
from alignkit.rollout.generate import SamplingConfig, generate, inference, left_pad, stop_token_ids

ANSWERS = (" (A)", " (B)")
ANSWER_PREFIX = "The answer is:"
COT_PREFIX = "Let's think step by step:"
COT_CLAMP = (0.4, 0.6)
ROLE_NAMES = {"system": "System", "user": "Human", "assistant": "Assistant"}


@dataclass(frozen=True)
class JudgeConfig:
    model: ModelConfig = option(ModelConfig(), "Feedback model that answers the (A)/(B) question")
    chat_template: bool = option(True, "Ask through the model's chat template; false = plain text (a base model)")
    batch_size: int = option(8, "Judge prompts per forward pass (each pair costs two: both orders)", low=1)
    chain_of_thought: bool = option(False, "Write a rationale before answering; probabilities clamped to [0.4, 0.6]")
    rationale: SamplingConfig = option(SamplingConfig(max_new_tokens=96, do_sample=False),
                                       "Decoding of the chain-of-thought rationale")


def format_conversation(prompt) -> str:
    """A prompt (text, or a list of messages) as 'Human: ...' / 'Assistant: ...' lines."""
    if isinstance(prompt, str):
        return f"Human: {prompt}"
    return "\n".join(f"{ROLE_NAMES.get(m['role'], m['role'])}: {m['content']}" for m in prompt)


def comparison_request(prompt, first: str, second: str, question: str) -> str:
    """The judge's user turn: the conversation, the principle's question and the two options."""
    return (f"Consider the following conversation between a human and an assistant:\n"
            f"{format_conversation(prompt)}\n{question}\nOptions:\n(A) {first.strip()}\n(B) {second.strip()}")


def judge_context(tokenizer, request: str, reply_start: str, chat_template: bool) -> str:
    """The text the judge continues: the request as a user turn, then the start of its reply."""
    if not chat_template:
        return f"{request}\n{reply_start}"
    if not has_chat_template(tokenizer):
        raise UserError("the judge's tokenizer has no chat template; set judge.chat_template=false for a base model")
    return render(tokenizer, [{"role": "user", "content": request}], True, "judge prompt") + reply_start


def answer_ids(tokenizer, context: str, add_special: bool) -> tuple[list[int], tuple[int, int]]:
    """(ids of `context` + the answers' shared first tokens, (id of A, id of B) at the answer position).

    `context + " (A)"` and `context + " (B)"` are tokenised whole (so merges across the boundary are
    as the model sees them); the answer position is the first token where the two differ.
    """
    a, b = (tokenizer(context + answer, add_special_tokens=add_special)["input_ids"] for answer in ANSWERS)
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if n is None:
        raise UserError(f"the tokenizer cannot tell the answers {ANSWERS[0]!r} and {ANSWERS[1]!r} apart")
    return a[:n], (a[n], b[n])


@torch.no_grad()
def answer_probs(model, tokenizer, contexts: Sequence[str], add_special: bool, batch_size: int = 8) -> torch.Tensor:
    """P(A) (N,) for each context: the softmax over the logits of the A and B answer tokens."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    with inference(model):
        for i in range(0, len(contexts), batch_size):
            ids, choices = zip(*(answer_ids(tokenizer, c, add_special) for c in contexts[i : i + batch_size]))
            input_ids, mask = (t.to(device) for t in left_pad(list(ids), pad_id))  # (B, T)
            logits = model(input_ids=input_ids, attention_mask=mask, position_ids=prefill_positions(mask),
                           **keep_logits(model, 1)).logits[:, -1].float()  # (B, V)
            z = logits.gather(-1, torch.tensor(choices, device=device))  # (B, 2): z_A, z_B
            out.append(z.softmax(-1)[:, 0].cpu())
    return torch.cat(out) if out else torch.zeros(0)


def continue_texts(model, tokenizer, texts: Sequence[str], sampling: SamplingConfig, add_special: bool,
                   batch_size: int = 8) -> list[str]:
    """Sampled continuations of raw texts (already rendered through a chat template, or plain)."""
    device = next(model.parameters()).device
    eos = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    out: list[str] = []
    for i in range(0, len(texts), batch_size):
        rows = [tokenizer(t, add_special_tokens=add_special)["input_ids"] for t in texts[i : i + batch_size]]
        input_ids, mask = left_pad(rows, pad_id)
        gen = generate(model, input_ids.to(device), mask.to(device), sampling, eos_token_id=eos or None,
                       pad_token_id=pad_id)
        ids = [r[m].tolist() for r, m in zip(gen.response_ids.cpu(), gen.response_mask.cpu())]
        out += [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return out


@dataclass
class Comparison:
    """Both-order judgements of N pairs (a, b)."""

    p_ab: torch.Tensor  # (N,) P(A) with a as (A), b as (B)
    p_ba: torch.Tensor  # (N,) P(A) with b as (A), a as (B)
    rationales: list[tuple[str, str]] | None = field(default=None)  # chain of thought per order

    @property
    def prob(self) -> torch.Tensor:
        """(N,) P(a > b) = 1/2 [p_ab + 1 - p_ba]: the position bias cancels. Computed as 1/2 + (p_ab - p_ba) / 2,
        which is exactly 1/2 when p_ab == p_ba (the other order rounded a quarter of such ties below 1/2)."""
        return 0.5 + 0.5 * (self.p_ab - self.p_ba)

    @property
    def same_letter(self) -> torch.Tensor:
        """(N,) bool: the judge picked the same letter in both orders (it chose by position)."""
        return (self.p_ab > 0.5) == (self.p_ba > 0.5)


class PairwiseJudge:
    """Soft pairwise preferences from a causal LM (see the module docstring)."""

    def __init__(self, model, tokenizer, cfg: JudgeConfig = JudgeConfig()):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.add_special = not cfg.chat_template  # a rendered template already holds its special tokens

    def letter_probs(self, prompts: Sequence, firsts: Sequence[str], seconds: Sequence[str],
                     questions: Sequence[str]) -> tuple[torch.Tensor, list[str] | None]:
        """P(A) (N,) with `firsts` as (A), and the rationales in chain-of-thought mode."""
        requests = [comparison_request(p, a, b, q) for p, a, b, q in zip(prompts, firsts, seconds, questions)]
        tok, chat = self.tokenizer, self.cfg.chat_template
        if not self.cfg.chain_of_thought:
            contexts = [judge_context(tok, r, ANSWER_PREFIX, chat) for r in requests]
            return answer_probs(self.model, tok, contexts, self.add_special, self.cfg.batch_size), None
        starts = [judge_context(tok, r, COT_PREFIX, chat) for r in requests]
        rationales = continue_texts(self.model, tok, starts, self.cfg.rationale, self.add_special, self.cfg.batch_size)
        contexts = [f"{s} {r}\n{ANSWER_PREFIX}" for s, r in zip(starts, rationales)]
        p = answer_probs(self.model, tok, contexts, self.add_special, self.cfg.batch_size)
        return p.clamp(*COT_CLAMP), rationales

    def compare(self, prompts: Sequence, a: Sequence[str], b: Sequence[str], questions: Sequence[str]) -> Comparison:
        """Judge every pair (a_i, b_i) in both orders (one batched pass over 2N prompts)."""
        n = len(a)
        if not len(prompts) == n == len(b) == len(questions):
            raise ValueError(f"{len(prompts)} prompts, {n} and {len(b)} completions, {len(questions)} questions: "
                             "give one of each per comparison")
        p, rationales = self.letter_probs([*prompts, *prompts], [*a, *b], [*b, *a], [*questions, *questions])
        pairs = list(zip(rationales[:n], rationales[n:])) if rationales is not None else None
        return Comparison(p[:n], p[n:], pairs)


def load_pairwise_judge(cfg: JudgeConfig) -> PairwiseJudge:
    from alignkit.models.load import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(cfg.model.path)
    return PairwiseJudge(load_causal_lm(cfg.model, trainable=False), tokenizer, cfg)
