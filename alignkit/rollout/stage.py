"""`alignkit generate`: sample completions for a prompt file and write them as JSONL."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from alignkit.config import option
from alignkit.data.preferences import prompt_of
from alignkit.models.load import ModelConfig, load_causal_lm, load_tokenizer
from alignkit.rollout.generate import SamplingConfig, generate_text, sampling_generator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerateConfig:
    model: ModelConfig = option(ModelConfig(), "Model to sample from")
    prompts: str = option("demo", "JSONL of {prompt} or {messages} rows; 'demo' = embedded held-out review prompts")
    output: str | None = option(None, "Where to write {prompt, completion, ...} JSONL; null = print the first "
                                "`show` samples only")
    sampling: SamplingConfig = option(SamplingConfig(), "Decoding settings")
    batch_size: int = option(16, "Prompts per generation batch", low=1)
    max_prompts: int | None = option(None, "Use only the first N prompts", low=1)
    chat_template: bool = option(True, "Wrap prompts in the tokenizer's chat template")
    show: int = option(3, "Print this many samples at the end")


def sample_rows(model, tokenizer, rows: list[dict], sampling: SamplingConfig, batch_size: int, chat: bool,
                desc: str = "generate") -> list[dict]:
    """Each input row with a `completion` added, generated in batches with a progress bar; one generator
    (seeded by `sampling.seed`) runs through all batches, so equal prompts in different batches get
    different samples."""
    out = []
    generator = sampling_generator(sampling, next(model.parameters()).device)
    for i in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch"):
        batch = rows[i : i + batch_size]
        texts = generate_text(model, tokenizer, [prompt_of(r) for r in batch], sampling, chat=chat,
                              generator=generator)
        out.extend({**r, "completion": t} for r, t in zip(batch, texts))
    return out


def read_prompts(path: str, demo_split: str, limit: int | None = None) -> list[dict]:
    """Prompt rows from a file, or from the embedded review prompts (`demo_split`) when `path` is 'demo'."""
    from alignkit.data.jsonl import PROMPT_SCHEMA, read_rows

    if path == "demo":
        from alignkit.tasks.demo_data import build_demo_data

        path = str(build_demo_data()[demo_split])
    return read_rows(path, PROMPT_SCHEMA)[:limit]


def run_generate(cfg: GenerateConfig) -> str | None:
    from alignkit.data.jsonl import check_output, write_jsonl

    check_output(cfg.output, cfg.prompts)
    tokenizer = load_tokenizer(cfg.model.path)  # a wrong model path fails before any other work
    rows = read_prompts(cfg.prompts, "prompts_eval", cfg.max_prompts)
    model = load_causal_lm(cfg.model, trainable=False)
    done = sample_rows(model, tokenizer, rows, cfg.sampling, cfg.batch_size, cfg.chat_template)
    for row in done[: cfg.show]:
        print(f"--- {prompt_of(row)}\n{row['completion']}\n")
    if cfg.output:
        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(cfg.output, done)
        return cfg.output
    return None
