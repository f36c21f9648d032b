"""Supervised fine-tuning data: tokenisation with prompt masking, collation, packing, loading.

An example is `{"input_ids": [...], "labels": [...]}` with labels aligned to input_ids (the loss
shifts them: the token at t+1 is predicted from tokens <= t). Labels are IGNORE_INDEX (-100) on the
prompt, on chat-template scaffolding and on the first token (nothing predicts it); they equal the
input id on completion / assistant tokens and on the end-of-sequence or end-of-turn token that
ends them, so the model learns to stop.
"""

from __future__ import annotations

import logging
import os
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from alignkit.data.chat import assistant_pieces, has_chat_template, without_eos_text
from alignkit.data.encode import encode_pieces, leading_special_ids, special_token_strings
from alignkit.data.jsonl import SFT_SCHEMA, iter_rows, no_rows
from alignkit.errors import UserError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
PROGRESS_MIN_ROWS = 1000  # show a progress bar when tokenising more rows than this


@dataclass(frozen=True)
class _Encoder:
    """What tokenisation needs to know about a tokenizer, computed once per tokenizer."""

    chat: bool  # render rows with the tokenizer's chat template
    bos_ids: tuple[int, ...]  # special ids the tokenizer puts before plain text (plain path only)
    specials: tuple[str, ...]  # special token texts that can end an assistant turn
    eos_id: int | None


_ENCODERS: "weakref.WeakKeyDictionary[Any, tuple[tuple, _Encoder]]" = weakref.WeakKeyDictionary()


def _encoder(tokenizer, chat_template: bool) -> _Encoder:
    key = (chat_template, getattr(tokenizer, "chat_template", None), tokenizer.eos_token_id, len(tokenizer))
    try:
        cached = _ENCODERS.get(tokenizer)
    except TypeError:  # an unhashable tokenizer: no cache
        cached = None
    if cached is not None and cached[0] == key:
        return cached[1]
    enc = _Encoder(
        chat=chat_template and has_chat_template(tokenizer),
        bos_ids=tuple(leading_special_ids(tokenizer)),
        specials=tuple(special_token_strings(tokenizer)),
        eos_id=tokenizer.eos_token_id,
    )
    try:
        _ENCODERS[tokenizer] = (key, enc)
    except TypeError:
        pass
    return enc


def _no_eos(where: str) -> UserError:
    return UserError(f"{where}: the tokenizer has no eos token to end completions; set eos_token in its config")


def _pieces(row: dict, enc: _Encoder, where: str, tokenizer) -> list:
    """(text or ids, is_target) pieces of one row, EOS included."""
    if enc.chat:
        messages = row.get("messages") or [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["completion"]},
        ]
        messages = [without_eos_text(m, tokenizer.eos_token) for m in messages]
        pieces, closed = assistant_pieces(tokenizer, messages, enc.specials, where)
        while pieces and not pieces[-1][1]:
            pieces.pop()  # scaffolding after the last end-of-turn token (a newline) teaches nothing
        if not closed:
            if enc.eos_id is None:
                raise _no_eos(where)
            pieces.append(([enc.eos_id], True))
        return pieces
    if row.get("messages") is not None:
        raise UserError(
            f"{where}: a messages row needs a chat template, but "
            + ("data.chat_template is false" if has_chat_template(tokenizer) else "this tokenizer has none")
            + "; set data.chat_template=true with a chat model, or write plain-text rows ({prompt, completion}; "
            "preference pairs: {prompt, chosen, rejected})"
        )
    return [(list(enc.bos_ids), False), (row["prompt"], False), (row["completion"], True)]


def tokenize_sft(
    row: dict, tokenizer, max_length: int, chat_template: bool = True, where: str = "row"
) -> dict | None:
    """Token ids and labels of one SFT row (`{prompt, completion}` or `{messages}`), or None if dropped.

    With `chat_template` and a tokenizer that has one, {prompt, completion} becomes a user turn and an
    assistant turn, and every assistant turn of {messages} is trained through its end-of-turn token.
    Otherwise the text is BOS (if the tokenizer adds one) + prompt + completion + EOS, with nothing in
    between; messages rows then raise UserError. A completion (or assistant turn) that already ends with the
    EOS text is trained with that one EOS, not two. The sequence is cut to `max_length` from the right;
    None when no target token is left (the caller counts and reports drops). `where` ("file:line")
    prefixes errors.
    """
    if max_length < 2:
        raise UserError(f"max_length must be at least 2, got {max_length}")
    enc = _encoder(tokenizer, chat_template)
    ids, trained = encode_pieces(tokenizer, _pieces(row, enc, where, tokenizer))
    if not enc.chat and (not ids or ids[-1] != enc.eos_id or not trained[-1]):
        if enc.eos_id is None:
            raise _no_eos(where)
        ids.append(enc.eos_id)  # a completion that already ends with EOS keeps just that one
        trained.append(True)
    labels = [i if t else IGNORE_INDEX for i, t in zip(ids, trained)]
    labels[0] = IGNORE_INDEX
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None
    return {"input_ids": ids, "labels": labels}


def num_target_tokens(batch: dict | Sequence[dict]) -> int:
    """Target tokens after the shift (labels[:, 1:] != -100): the loss normaliser's unit.

    Accepts a collated batch (tensors) or a list of examples (lists).
    """
    if isinstance(batch, dict):
        return int((torch.as_tensor(batch["labels"])[..., 1:] != IGNORE_INDEX).sum())
    return sum(sum(1 for label in ex["labels"][1:] if label != IGNORE_INDEX) for ex in batch)


class SFTCollator:
    """Right-pad examples into `input_ids (B,T)`, `attention_mask (B,T)`, `labels (B,T)` tensors, and
    `position_ids (B,T)` for packed blocks (`pack`), whose padding is then a sequence of its own (0, 1, ...).

    Padding is `pad_token_id` (0 when the tokenizer has none: masked anyway) / 0 / -100.
    `pad_to_multiple_of` rounds T up (tensor-core friendly shapes on GPUs).
    """

    def __init__(self, pad_token_id: int | None, pad_to_multiple_of: int | None = None):
        self.pad_token_id = 0 if pad_token_id is None else int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("SFTCollator got an empty list of examples")
        longest = max(len(ex["input_ids"]) for ex in examples)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(examples), longest), self.pad_token_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)  # (B, T)
        labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        for b, ex in enumerate(examples):
            n = len(ex["input_ids"])
            input_ids[b, :n] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
            labels[b, :n] = torch.as_tensor(ex["labels"], dtype=torch.long)
            attention_mask[b, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if "position_ids" in examples[0]:  # packed blocks
            batch["position_ids"] = torch.stack([  # (B, T); the padding counts from 0 again
                torch.as_tensor([*ex["position_ids"], *range(longest - len(ex["position_ids"]))]) for ex in examples])
        return batch

    num_target_tokens = staticmethod(num_target_tokens)


def pack(examples: Sequence[dict], max_length: int) -> list[dict]:
    """Concatenate examples and cut the stream into blocks of `max_length` tokens (the last may be shorter).

    The first label of every document is -100, so no position is trained to predict the next
    document's first token from the previous document; blocks without any target are dropped.
    Each block carries `position_ids` that start again at 0 with every document: the model's
    packed-sequence masks (transformers' `find_packed_sequence_indices`, when no attention mask is given)
    then keep each document to its own tokens, so a packed document trains as it would alone.
    """
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for ex in examples:
        if not ex["input_ids"]:
            continue
        ids += list(ex["input_ids"])
        labels += [IGNORE_INDEX, *list(ex["labels"])[1:]]
        positions += range(len(ex["input_ids"]))
    blocks = []
    for start in range(0, len(ids), max_length):
        block_labels = [IGNORE_INDEX, *labels[start + 1 : start + max_length]]
        if any(label != IGNORE_INDEX for label in block_labels):
            blocks.append({"input_ids": ids[start : start + max_length], "labels": block_labels,
                           "position_ids": positions[start : start + max_length]})
    return blocks


def _progress(items: list, desc: str):
    if len(items) <= PROGRESS_MIN_ROWS:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="row")


def load_sft_dataset(
    path: str | os.PathLike, tokenizer, max_length: int, chat_template: bool = True, packing: bool = False,
    max_rows: int | None = None,
) -> list[dict]:
    """Read, validate and tokenise the first `max_rows` rows (None: all) of an SFT file (.jsonl/.json/.parquet/.csv)
    into examples.

    Rows with nothing left to train after truncation are dropped and counted in one warning; a file
    where every row is dropped is a UserError. With `packing`, examples are packed into blocks of
    `max_length` (see `pack`).
    """
    located = list(iter_rows(path, SFT_SCHEMA))
    if not located:
        raise no_rows(path)
    located = located[:max_rows]  # rows, before packing joins them into blocks
    if chat_template and not has_chat_template(tokenizer):
        log.warning("the tokenizer has no chat template; %s is tokenised as plain prompt + completion + eos", path)
    examples, dropped = [], 0
    for where, row in _progress(located, f"tokenise {os.path.basename(str(path))}"):
        example = tokenize_sft(row, tokenizer, max_length, chat_template, where=where)
        if example is None:
            dropped += 1
        else:
            examples.append(example)
    if not examples:
        raise UserError(
            f"{path}: all {len(located)} rows have no completion token left after truncation to "
            f"max_length={max_length}; raise data.max_length or shorten the prompts"
        )
    if dropped:
        log.warning(
            "%s: dropped %d of %d rows whose prompt fills max_length=%d (nothing left to train); "
            "raise data.max_length to keep them", path, dropped, len(located), max_length,
        )
    return pack(examples, max_length) if packing else examples
