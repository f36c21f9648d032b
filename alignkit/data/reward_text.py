"""What a reward model reads: (prompt, completion) -> token ids, and right-padded batches of them.

With a chat template (`chat_template` and the tokenizer has one) the text is the conversation
prompt + one assistant turn, rendered by the template, exactly as the policy sees it. Otherwise it is
the tokenizer's own text-pair encoding of (prompt, completion): `[CLS] prompt [SEP] completion [SEP]`
with segment ids for BERT-style encoders, plain concatenation for tokenizers without a pair template.
Texts longer than `max_length` keep their first token ([CLS], BOS or the template's opening) and their
last `max_length - 1`, and are counted (`RewardEncoder.truncated`): what is cut is the start of the
prompt, never the end of the completion, where a causal LM's head reads the reward.
Batches are right-padded: BERT-style models pool position 0 ([CLS]) and causal LMs read the last
non-pad token, so right padding is correct for both.
"""

from __future__ import annotations

from typing import Sequence

import torch

from alignkit.data.chat import has_chat_template, render, without_eos_text
from alignkit.errors import UserError


class RewardEncoder:
    def __init__(self, tokenizer, chat_template: bool, max_length: int):
        if max_length < 2:
            raise UserError(f"max_length must be at least 2, got {max_length}")
        self.tokenizer = tokenizer
        self.chat = bool(chat_template) and has_chat_template(tokenizer)
        self.max_length = max_length
        self.pad_id = 0 if tokenizer.pad_token_id is None else int(tokenizer.pad_token_id)
        self.truncated = 0

    def encode(self, prompt: str | Sequence[dict], completion: str, where: str = "row") -> dict:
        """`{"input_ids": [...]}` (plus `token_type_ids` when the tokenizer makes segment ids)."""
        tok = self.tokenizer
        if self.chat:
            messages = list(prompt) if not isinstance(prompt, str) else [{"role": "user", "content": prompt}]
            reply = without_eos_text({"role": "assistant", "content": completion}, tok.eos_token)  # one end token
            text = render(tok, [*messages, reply], False, where)
            enc = tok(text, add_special_tokens=False)
        elif not isinstance(prompt, str):
            raise UserError(f"{where}: a messages prompt needs a chat template, but "
                            + ("chat_template is false" if has_chat_template(tok) else "this tokenizer has none")
                            + "; use a chat model or give the prompt as text")
        else:
            enc = tok(prompt, completion)
        out = {"input_ids": list(enc["input_ids"])}
        if "token_type_ids" in enc:
            out["token_type_ids"] = list(enc["token_type_ids"])
        if len(out["input_ids"]) > self.max_length:
            self.truncated += 1
            out = {k: v[:1] + v[len(v) - self.max_length + 1 :] for k, v in out.items()}
        return out

    def collate(self, encodings: Sequence[dict]) -> dict[str, torch.Tensor]:
        """Right-padded `input_ids (N, T)`, `attention_mask (N, T)` and `token_type_ids (N, T)` if any."""
        longest = max(len(e["input_ids"]) for e in encodings)
        n = len(encodings)
        batch = {"input_ids": torch.full((n, longest), self.pad_id, dtype=torch.long),
                 "attention_mask": torch.zeros((n, longest), dtype=torch.long)}
        if "token_type_ids" in encodings[0]:
            batch["token_type_ids"] = torch.zeros((n, longest), dtype=torch.long)
        for i, e in enumerate(encodings):
            length = len(e["input_ids"])
            batch["input_ids"][i, :length] = torch.as_tensor(e["input_ids"])
            batch["attention_mask"][i, :length] = 1
            if "token_type_ids" in batch:
                batch["token_type_ids"][i, :length] = torch.as_tensor(e["token_type_ids"])
        return batch
