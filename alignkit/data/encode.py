"""Turn text pieces into token ids with exact boundaries between the pieces.

A training example is a list of pieces, each text (or ready-made ids such as a BOS or EOS) with a
flag saying whether its tokens are targets. Tokenising the pieces one by one would give a token
sequence the model never sees at inference (BPE merges across the prompt/completion boundary, e.g.
"assistant: " + "Sure" is "assistant:", " Sure" as one text); tokenising the joined text and cutting
at character offsets can split a merged token. `encode_pieces` takes the natural tokenisation of the
joined text whenever the tokens of every prefix that ends at a piece boundary are a prefix of it,
so the prompt is tokenised exactly as at generation time; where a merge crosses a boundary it falls
back to tokenising the remaining pieces separately and concatenating (the prompt part stays exactly
the prompt's own tokens, the completion is tokenised on its own).
"""

from __future__ import annotations

from typing import Sequence, Union

Piece = tuple[Union[str, Sequence[int]], bool]  # (text or ids, trained)


def text_ids(tokenizer, text: str) -> list[int]:
    """Ids of `text` without the tokenizer's own special tokens (BOS/EOS are placed explicitly)."""
    if not text:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None:  # the Rust tokenizer directly: same ids, a third of the Python overhead
        return backend.encode(text, add_special_tokens=False).ids
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def leading_special_ids(tokenizer) -> list[int]:
    """The ids a tokenizer puts before plain text by itself (e.g. Llama's BOS); [] for GPT-2 style."""
    probe = "a b"
    plain = text_ids(tokenizer, probe)
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return full[:i]
    return []


def special_token_strings(tokenizer) -> list[str]:
    """Texts of every special token (eos, bos, pad, ChatML/Llama-3 turn markers, ...), longest first."""
    names = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            names.add(str(token))
    if getattr(tokenizer, "eos_token", None):
        names.add(tokenizer.eos_token)
    return sorted((n for n in names if n), key=len, reverse=True)


def merge_pieces(pieces: Sequence[Piece]) -> list[Piece]:
    """Join neighbouring text pieces with the same flag and drop empty ones."""
    out: list[Piece] = []
    for content, trained in pieces:
        if len(content) == 0:
            continue
        if out and isinstance(content, str) and isinstance(out[-1][0], str) and out[-1][1] == trained:
            out[-1] = (out[-1][0] + content, trained)
        else:
            out.append((content, trained))
    return out


def _encode_text_run(tokenizer, run: Sequence[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    ids: list[int] = []
    trained: list[bool] = []
    text = ""
    natural = True
    for piece, flag in run:
        if natural:
            whole = text_ids(tokenizer, text + piece)
            natural = whole[: len(ids)] == ids
            new = whole[len(ids) :]
        if not natural:
            new = text_ids(tokenizer, piece)
        text += piece
        ids += new
        trained += [flag] * len(new)
    return ids, trained


def encode_pieces(tokenizer, pieces: Sequence[Piece]) -> tuple[list[int], list[bool]]:
    """Token ids of the pieces and, per token, whether it is a target (see the module docstring).

    Id pieces are used as they are; each run of text pieces between them is tokenised as one text
    with exact boundaries where BPE allows, else piece by piece.
    """
    ids: list[int] = []
    trained: list[bool] = []
    run: list[tuple[str, bool]] = []
    for content, flag in [*merge_pieces(pieces), ([], False)]:  # the empty id piece flushes the last run
        if isinstance(content, str):
            run.append((content, flag))
            continue
        if run:
            run_ids, run_trained = _encode_text_run(tokenizer, run)
            ids += run_ids
            trained += run_trained
            run = []
        ids += list(content)
        trained += [flag] * len(content)
    return ids, trained
