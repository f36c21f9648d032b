"""Tokenised preference data for the DPO family: pairs, and unpaired rows for KTO.

A tokenised pair is `{"prompt_ids", "chosen_ids", "rejected_ids", "label", "prompt"}`: chosen and
rejected share one prompt. An unpaired (KTO) row holds `seqs`, two (prompt_ids, completion_ids)
sequences: its own and a mismatched one (its prompt with another prompt's completion, for KTO's
reference point). Tokenisation reuses the SFT machinery (`alignkit.data.sft.tokenize_sft`), so the
prompt is tokenised exactly as at generation time and the completion ends with the end-of-turn /
EOS token the model must learn to emit.

Batches put prompts LEFT-padded to the longest prompt P and completions RIGHT-padded to the longest
completion A, so every completion starts at column P: the model needs logits for the completion
positions only, which on a 49k-token vocabulary is most of the memory. `collate_sequences` lays out
independent sequences (N, P + A); `collate_pairs` lays out the prompts once (B, P) and the
completions (2B, A) interleaved chosen, rejected, chosen, ..., for a forward pass that runs each
prompt once for both of its completions (`algorithms.reference.pair_logps`).

Unpaired rows (KTO, Ethayarajh et al. 2024), one completion judged good or bad:

    {"prompt": "Review X.", "completion": "Loved it.", "label": true}
    {"messages": [{"role": "user", "content": "Review X."}], "completion": "Meh.", "label": false}

A pairs or rankings file also works for KTO: every chosen completion becomes a desirable row and
every rejected one an undesirable row.
"""

from __future__ import annotations

import logging
import random
from typing import Sequence

import torch

from alignkit.data.jsonl import iter_rows
from alignkit.data.preferences import (
    PAIR_SCHEMA,
    RANKING_SCHEMA,
    preference_kind,
    prompt_of,
    rankings_to_pairs,
    read_located,
)
from alignkit.data.schema import Field, Schema, _prompt_messages
from alignkit.data.sft import IGNORE_INDEX, tokenize_sft
from alignkit.errors import UserError

log = logging.getLogger(__name__)

UNPAIRED_SCHEMA = Schema(
    what="an unpaired (KTO) row",
    variants=(
        {"prompt": Field("str"), "completion": Field("str", nonempty=True), "label": Field("bool")},
        {"messages": Field("messages", check=_prompt_messages), "completion": Field("str", nonempty=True),
         "label": Field("bool")},
    ),
)

Seq = tuple[list[int], list[int]]  # (prompt_ids, completion_ids)


def tokenize_completion(prompt, completion: str, tokenizer, max_length: int, chat_template: bool,
                        where: str = "row") -> Seq | None:
    """(prompt_ids, completion_ids) of one prompt (text or messages) and completion; None if nothing is left.

    The completion is the final run of target tokens of `tokenize_sft` (it ends with EOS / the
    end-of-turn token); the whole sequence is cut to `max_length` from the right. A prompt that fills
    `max_length` leaves nothing (an earlier assistant turn of a message prompt is not the completion).
    """
    row = ({"messages": [*prompt, {"role": "assistant", "content": completion}]} if not isinstance(prompt, str)
           else {"prompt": prompt, "completion": completion})
    example = tokenize_sft(row, tokenizer, 1 << 30, chat_template, where=where)  # whole: the boundary, then the cut
    if example is None:
        return None
    ids, labels = example["input_ids"], example["labels"]
    start = max(i for i, label in enumerate(labels) if label == IGNORE_INDEX) + 1
    if start >= min(len(ids), max_length):
        return None
    return ids[:start], ids[start:max_length]


def _warn_dropped(path, dropped: int, total: int, max_length: int) -> None:
    if dropped == total:
        raise UserError(f"{path}: every row is empty after truncation to max_length={max_length}; "
                        "raise data.max_length or shorten the prompts")
    if dropped:
        log.warning("%s: dropped %d of %d rows with no completion token left within max_length=%d",
                    path, dropped, total, max_length)


def _pair_rows(path) -> list[tuple[str, dict]]:
    """("file:line", pair) of a pairs or rankings file (a ranking expands to all its untied pairs)."""
    if preference_kind(path) == "pairs":
        located = read_located(path, PAIR_SCHEMA)
        with_margin = [where for where, row in located if row.get("margin")]
        if with_margin:
            log.warning("%s: the DPO-family losses take no margin; the 'margin' of %d pairs (first %s) is left "
                        "unused (alignkit rm uses it)", path, len(with_margin), with_margin[0])
        return located
    return [(where, pair) for where, row in read_located(path, RANKING_SCHEMA) for pair in rankings_to_pairs([row])]


def load_pairs(path, tokenizer, max_length: int, chat_template: bool = True) -> list[dict]:
    """Tokenised pairs `{prompt_ids, chosen_ids, rejected_ids, label, prompt}` of a pairs or rankings file."""
    located, out = _pair_rows(path), []
    for where, row in located:
        prompt = prompt_of(row)
        chosen, rejected = (tokenize_completion(prompt, row[side], tokenizer, max_length, chat_template, where)
                            for side in ("chosen", "rejected"))
        if chosen is None or rejected is None:
            continue
        if chosen[0] != rejected[0]:
            raise UserError(f"{where}: the prompt tokenises differently before chosen and before rejected (an "
                            "empty prompt with neither a chat template nor a BOS token?); give every pair a prompt")
        out.append({"prompt_ids": chosen[0], "chosen_ids": chosen[1], "rejected_ids": rejected[1],
                    "label": row.get("label"), "prompt": prompt})
    _warn_dropped(path, len(located) - len(out), len(located), max_length)
    return out


def _unpaired_rows(path) -> list[tuple[str, dict]]:
    first = next(iter_rows(path, None), (None, {}))[1]
    if "chosen" in first or "ranking" in first:
        pairs = _pair_rows(path)
        for where, row in pairs:
            if row.get("label") is not None:
                raise UserError(f"{where}: a pair with a soft label ('label') cannot be split into KTO's desirable "
                                "(chosen) and undesirable (rejected) rows; drop the labels, or use loss=dpo or cdpo")
        return [(where, {**row, "completion": row[side], "label": side == "chosen"})
                for where, row in pairs for side in ("chosen", "rejected")]
    return list(iter_rows(path, UNPAIRED_SCHEMA))


def load_unpaired(path, tokenizer, max_length: int, chat_template: bool = True, seed: int = 0) -> list[dict]:
    """Tokenised KTO rows `{"seqs": [completion, mismatched], "desirable": bool}`.

    The mismatched sequence pairs the row's prompt with the completion of the row before it in a
    seeded shuffle whose prompt differs (a rotation, so every completion is used about once), which
    fixes it per row and lets its reference log-prob be cached like the others. A pairs or rankings
    file is split into desirable (chosen) and undesirable (rejected) rows.
    """
    located = _unpaired_rows(path)
    if len(located) < 2:
        raise UserError(f"{path}: KTO needs at least 2 rows (the reference point pairs prompts with other completions)")
    prompts = [prompt_of(row) for _, row in located]
    order = list(range(len(located)))
    random.Random(seed).shuffle(order)
    other = {}
    for i, row in enumerate(order):
        back = next((k for k in range(1, min(len(order), 64)) if prompts[order[i - k]] != prompts[row]), 1)
        other[row] = order[i - back]  # the completion of another prompt (of the same only if there is no other)
    out = []
    for i, (where, row) in enumerate(located):
        prompt = prompts[i]
        mismatched = located[other[i]][1]["completion"]
        seqs = [tokenize_completion(prompt, text, tokenizer, max_length, chat_template, where)
                for text in (row["completion"], mismatched)]
        if None not in seqs:
            out.append({"seqs": seqs, "desirable": bool(row["label"]), "prompt": prompt})
    _warn_dropped(path, len(located) - len(out), len(located), max_length)
    return out


def collate_sequences(seqs: Sequence[Seq], pad_id: int, prefix: str = "") -> dict[str, torch.Tensor]:
    """Left-padded prompts + right-padded completions (see the module docstring).

    Returns `input_ids (N, P + A)`, `attention_mask (N, P + A)`, `completion_ids (N, A)` and
    `completion_mask (N, A)` (True on completion tokens), each key with `prefix` in front.
    """
    n = len(seqs)
    p = max(len(prompt) for prompt, _ in seqs)
    a = max(len(completion) for _, completion in seqs)
    input_ids = torch.full((n, p + a), pad_id, dtype=torch.long)  # (N, T)
    attention_mask = torch.zeros((n, p + a), dtype=torch.long)  # (N, T)
    for i, (prompt, completion) in enumerate(seqs):
        input_ids[i, p - len(prompt) : p + len(completion)] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[i, p - len(prompt) : p + len(completion)] = 1
    return {
        prefix + "input_ids": input_ids,
        prefix + "attention_mask": attention_mask,
        prefix + "completion_ids": input_ids[:, p:],  # (N, A)
        prefix + "completion_mask": attention_mask[:, p:].bool(),  # (N, A)
    }


def collate_pairs(rows: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pairs sharing their prompt: `prompt_ids (B, P)` / `prompt_mask (B, P)` left-padded, and
    `completion_ids (2B, A)` / `completion_mask (2B, A)` right-padded, rows chosen_0, rejected_0, chosen_1, ..."""
    prompts = collate_sequences([(r["prompt_ids"], []) for r in rows], pad_id)
    completions = collate_sequences([([], r[side]) for r in rows for side in ("chosen_ids", "rejected_ids")], pad_id)
    return {"prompt_ids": prompts["input_ids"], "prompt_mask": prompts["attention_mask"],
            "completion_ids": completions["completion_ids"], "completion_mask": completions["completion_mask"]}


def prompt_ids(prompt, tokenizer, chat_template: bool = True, where: str = "row") -> list[int]:
    """Token ids of a prompt (text or messages) as the policy sees it before its completion.

    The same ids `tokenize_completion` puts before a completion: the chat template with the
    generation prompt when used, else BOS (if the tokenizer adds one) + the prompt text.
    """
    probe = tokenize_completion(prompt, "x", tokenizer, 1 << 30, chat_template, where)
    return probe[0]

