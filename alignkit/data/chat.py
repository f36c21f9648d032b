"""Locate assistant turns in a conversation rendered by a tokenizer's chat template.

The text of assistant turn i is what rendering `messages[: i + 1]` adds to rendering `messages[:i]`
with the generation prompt; this works for any template whose renderings of prefixes are prefixes
of the full rendering (ChatML, Llama 3, Gemma, Mistral, plain ones) and needs no `{% generation %}`
markers. A template that renders a turn otherwise once later turns follow (Phi-3 ends a conversation
with EOS, Qwen3 gives only the last turn its think block) needs only its generation prompts to be
prefixes: each turn then ends at its end-of-turn token. Rows are refused where the full rendering lacks
a turn's text (Qwen3 strips the think block that an earlier turn's content holds) or a message
(Mistral's template puts a system message into the last user turn only, which a training rendering
never has). Within a turn the targets run from the start of the content through the first special
token after it (the end-of-turn token: `<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, EOS, ...);
what follows it (a newline before the next turn) is context, not a target.
"""

from __future__ import annotations

from typing import Sequence

from alignkit.errors import UserError


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def without_eos_text(message: dict, eos: str | None) -> dict:
    """An assistant turn whose text ends with the EOS text loses it: the template (or we) end the turn, and
    a second EOS would be trained (as on the plain path, a completion that ends with EOS keeps just one)."""
    content = message.get("content")
    if message.get("role") != "assistant" or not eos or not isinstance(content, str) or not content.endswith(eos):
        return message
    return {**message, "content": content[: -len(eos)]}


def render(tokenizer, messages: Sequence[dict], generation_prompt: bool, where: str) -> str:
    """The template's text for `messages` (no tokenisation); a template error becomes a UserError."""
    try:
        text = tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as e:  # jinja raises e.g. "Conversation roles must alternate user/assistant"
        detail = " ".join(str(e).split())[:300]
        raise UserError(
            f"{where}: the tokenizer's chat template rejected this conversation ({detail}); "
            "fix the roles or order of the messages"
        ) from None
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


def _target_length(span: str, content: str, specials: Sequence[str]) -> tuple[int, bool]:
    """Characters of `span` that are targets, and whether an end-of-turn token closes them: through the first special
    token after the content or, where the template rewrote the content (Qwen3's think block), through the span's
    last special token (a special token inside the rewritten content would cut the targets short)."""
    core = content.strip()
    found = span.find(core) if core else 0
    if found < 0:
        ends = [span.rfind(token) + len(token) for token in specials if token in span]
        return (max(ends), True) if ends else (len(span), False)
    starts = [(span.find(token, found + len(core)), len(token)) for token in specials]
    starts = [(pos, length) for pos, length in starts if pos >= 0]
    if not starts:
        return len(span), False
    pos, length = min(starts, key=lambda s: (s[0], -s[1]))  # the first; at one position the longest
    return pos + length, True


def _not_prefix(where: str) -> UserError:
    return UserError(
        f"{where}: the chat template renders earlier turns differently once later turns follow, so the "
        "assistant turns cannot be located; use {prompt, completion} rows"
    )


def assistant_pieces(
    tokenizer, messages: Sequence[dict], specials: Sequence[str], where: str = "row"
) -> tuple[list[tuple[str, bool]], bool]:
    """Split the rendered conversation into (text, is_target) pieces, targets = assistant turns.

    Messages after the last assistant turn are left out (they would teach nothing). Returns the
    pieces and whether the last assistant turn ends with an end-of-turn token (if not, the caller
    appends EOS so the model learns to stop).
    """
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise UserError(f"{where}: the messages have no assistant turn, so there is nothing to train on")
    messages = list(messages[: last + 1])
    full = render(tokenizer, messages, False, where)
    pieces: list[tuple[str, bool]] = []
    pos, closed = 0, False
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], True, where) if i else _opening_prefix(tokenizer, full, where)
        if not (full.startswith(before) and pos <= len(before)):
            raise _not_prefix(where)
        through = full if i == last else render(tokenizer, messages[: i + 1], False, where)
        # a template may render a turn otherwise once others follow (Phi-3 ends a conversation with EOS, Qwen3 gives
        # the last turn a think block): then the turn ends at the first end-of-turn token after its content
        alone = full.startswith(through) and len(through) >= len(before)
        span = full[len(before) : len(through) if alone else len(full)]
        if not alone and message["content"].strip() not in span:
            raise _not_prefix(where)
        n, closed = _target_length(span, message["content"], specials)
        if not (alone or closed):
            raise _not_prefix(where)
        pieces += [(full[pos : len(before)], False), (span[:n], True)]
        pos = len(before) + n
    if pos < len(full):
        pieces.append((full[pos:], False))
    return pieces, closed


def end_of_turn_id(tokenizer) -> int | None:
    """The token that closes an assistant turn in the tokenizer's chat template (`<|im_end|>`, `<|eot_id|>`,
    `<end_of_turn>`, ...), which SFT trains the model to emit; None without a template or such a token. A base
    checkpoint's EOS (e.g. Qwen2.5's `<|endoftext|>`) is another token, so generation must stop at this one too."""
    from alignkit.data.encode import special_token_strings

    if not has_chat_template(tokenizer):
        return None
    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    specials = special_token_strings(tokenizer)
    try:
        pieces, closed = assistant_pieces(tokenizer, probe, specials)
    except UserError:
        return None
    target = next(text for text, is_target in pieces if is_target)
    token = next((t for t in specials if target.endswith(t)), None) if closed else None
    return None if token is None else tokenizer.convert_tokens_to_ids(token)


def _opening_prefix(tokenizer, full: str, where: str) -> str:
    """Text before the content of a conversation that opens with the assistant.

    Templates refuse to render no messages, so the generation prompt is found as what
    `add_generation_prompt` adds after a one-message conversation, and located in `full`.
    """
    probe = [{"role": "user", "content": "x"}]
    with_prompt = render(tokenizer, probe, True, where)
    without = render(tokenizer, probe, False, where)
    header = with_prompt[len(without) :] if with_prompt.startswith(without) else ""
    pos = full.find(header) if header else -1
    return full[: pos + len(header)] if pos >= 0 else ""
