"""Data formats, validation with file:line errors, tokenisation and collation.

Names are imported lazily, so `import alignkit.data` does not load torch or transformers:

- `alignkit.data.jsonl`: `read_jsonl`, `read_rows`, `iter_rows`, `write_jsonl`, `SFT_SCHEMA`, `PROMPT_SCHEMA`
- `alignkit.data.schema`: `Schema`, `Field`, `register_type` (the schema mechanism for new formats)
- `alignkit.data.sft`: `tokenize_sft`, `SFTCollator`, `num_target_tokens`, `pack`, `load_sft_dataset`
- `alignkit.data.encode` / `alignkit.data.chat`: exact token boundaries and assistant-turn spans,
  reusable by other formats (pairs rendered with a chat template)
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "read_jsonl": "jsonl", "read_rows": "jsonl", "iter_rows": "jsonl", "write_jsonl": "jsonl",
    "SFT_SCHEMA": "schema", "PROMPT_SCHEMA": "schema", "Schema": "schema", "Field": "schema",
    "register_type": "schema",
    "tokenize_sft": "sft", "SFTCollator": "sft", "num_target_tokens": "sft", "pack": "sft",
    "load_sft_dataset": "sft", "IGNORE_INDEX": "sft",
    "encode_pieces": "encode", "assistant_pieces": "chat",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'alignkit.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"alignkit.data.{module}"), name)
