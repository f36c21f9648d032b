"""`alignkit rollout`: sample K completions per prompt from a policy into a file ready for labelling.

Each output row is the prompt row plus `completions` (K sampled texts) and a `prompt_id` (the row's
own, else its `id`, else its 0-based index; no two alike): the completion-set format of `data.preferences`, which
`alignkit label` (simulated labelers) ranks or pairs, and the labelling web app will show to people.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from alignkit.config import option
from alignkit.errors import UserError
from alignkit.models.load import ModelConfig, load_causal_lm, load_tokenizer
from alignkit.rollout.generate import SamplingConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RolloutConfig:
    model: ModelConfig = option(ModelConfig(), "Policy to sample from (e.g. the SFT model)")
    prompts: str = option("demo", "JSONL of {prompt} or {messages} rows; 'demo' = embedded training review prompts")
    output: str = option("runs/rollout/completions.jsonl", "Where to write {prompt, completions: [K], prompt_id} rows")
    k: int = option(4, "Completions per prompt (K >= 2)")
    sampling: SamplingConfig = option(SamplingConfig(max_new_tokens=64, min_new_tokens=1, seed=0),
                                      "Decoding settings (sampling, so the K completions differ)")
    batch_size: int = option(16, "Sequences per generation batch", low=1)
    max_prompts: int | None = option(None, "Use only the first N prompts", low=1)
    chat_template: bool = option(True, "Wrap prompts in the tokenizer's chat template")

    def validate(self):
        if self.k < 2:
            raise UserError(f"k must be >= 2 (a ranking compares at least two completions), got {self.k}")
        if not self.sampling.do_sample:
            raise UserError("sampling.do_sample must be true: greedy decoding gives the K completions of a prompt "
                            "all alike, and there is nothing to rank")


def sample_k(model, tokenizer, rows: list[dict], k: int, sampling: SamplingConfig, batch_size: int,
             chat: bool, where: str = "prompts") -> list[dict]:
    """Each row with `completions` (k samples) and a `prompt_id` (`set_prompt_ids`); rows with an empty sample
    are dropped."""
    from alignkit.data.preferences import set_prompt_ids
    from alignkit.rollout.stage import sample_rows

    ids = set_prompt_ids(rows, where)
    repeated = [row for row in rows for _ in range(k)]
    done = sample_rows(model, tokenizer, repeated, sampling, batch_size, chat, desc=f"rollout x{k}")
    out, empty = [], 0
    for n, (row, pid) in enumerate(zip(rows, ids)):
        texts = [d["completion"] for d in done[n * k : (n + 1) * k]]
        if not all(texts):
            empty += 1
            continue
        out.append({**row, "completions": texts, "prompt_id": pid})
    if empty:
        log.warning("dropped %d of %d prompts with an empty completion (raise sampling.min_new_tokens)",
                    empty, len(rows))
    return out


def run_rollout(cfg: RolloutConfig) -> str:
    from alignkit.data.jsonl import check_output, write_jsonl
    from alignkit.rollout.stage import read_prompts

    check_output(cfg.output, cfg.prompts)
    tokenizer = load_tokenizer(cfg.model.path)  # a wrong model path fails before any other work
    rows = read_prompts(cfg.prompts, "prompts_train", cfg.max_prompts)
    model = load_causal_lm(cfg.model, trainable=False)
    out = sample_k(model, tokenizer, rows, cfg.k, cfg.sampling, cfg.batch_size, cfg.chat_template, cfg.prompts)
    if not out:
        raise UserError("every prompt got an empty completion; raise sampling.min_new_tokens or check the model")
    write_jsonl(cfg.output, out)
    log.info("%d prompts x %d completions -> %s", len(out), cfg.k, cfg.output)
    return cfg.output
