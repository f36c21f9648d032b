"""A trained reward model as a reward source, and `alignkit score` (add a `reward` field to a JSONL).

    rm = RewardModel("runs/rm/model")
    rm.score(["Write a review."], ["Loved it!"])          # tensor([1.73]): normalised reward

The directory is any one-label `AutoModelForSequenceClassification`; an `alignkit_reward.json` next to
the weights (written by `alignkit rm`) gives the text encoding used in training and the gain and bias
of the normalisation (reward = gain * head output + bias: mean 0, std 1 on the reference completions).
Without it, prompts are rendered with the chat template when the tokenizer has one and rewards are raw.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from alignkit.config import option
from alignkit.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 1024


class RewardModel:
    """Reward source `score(prompts, completions, **row_fields) -> (B,)` backed by a reward-model directory."""

    def __init__(self, path: str | Path, normalize: bool = True, batch_size: int = 16, device: str | None = None):
        from transformers import AutoConfig, AutoModelForSequenceClassification

        from alignkit.data.reward_text import RewardEncoder
        from alignkit.models.load import default_device, from_pretrained, load_tokenizer, resolve_dtype, resolve_path
        from alignkit.models.reward import load_metadata

        path = resolve_path(str(path))
        self.meta = load_metadata(path)
        tokenizer = load_tokenizer(path)
        tokenizer.padding_side = "right"
        max_length = self.meta.get("max_length") or min(tokenizer.model_max_length, DEFAULT_MAX_LENGTH)
        self.encoder = RewardEncoder(tokenizer, self.meta.get("chat_template", True), max_length)
        self.device = torch.device(device) if device else default_device()
        labels = from_pretrained(AutoConfig, path, "a reward model's config").num_labels  # before loading weights
        if labels != 1:
            raise UserError(f"{path} is not a reward model: it has {labels} outputs (num_labels), a reward model has "
                            "one (e.g. the model/ directory of alignkit rm)")
        try:
            model = from_pretrained(AutoModelForSequenceClassification, path, "a reward model",
                                    dtype=resolve_dtype("auto"))
        except ValueError as e:
            raise UserError(f"could not load a reward model from '{path}': {str(e).splitlines()[0]}") from None
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.encoder.pad_id
        else:  # the head reads the last token that is not the config's pad id: pad with that one (the model's own)
            self.encoder.pad_id = model.config.pad_token_id
        self.model = model.to(self.device).eval()
        self.gain, self.bias = (self.meta.get("gain", 1.0), self.meta.get("bias", 0.0)) if normalize else (1.0, 0.0)
        self.batch_size = batch_size

    @torch.no_grad()
    def raw(self, prompts: Sequence, completions: Sequence[str]) -> torch.Tensor:
        """Head outputs (B,) float32, computed in batches of similar length."""
        from alignkit.models.reward import reward_forward

        encoded = [self.encoder.encode(p, c) for p, c in zip(prompts, completions)]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))
        out = torch.empty(len(encoded), dtype=torch.float32)
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            batch = {k: v.to(self.device) for k, v in self.encoder.collate([encoded[i] for i in index]).items()}
            out[index] = reward_forward(self.model, batch).cpu()
        return out

    def score(self, prompts: Sequence, completions: Sequence[str], **row_fields) -> torch.Tensor:
        """Normalised rewards (B,): gain * raw + bias."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        return self.raw(prompts, completions) * self.gain + self.bias

    __call__ = score


@dataclass(frozen=True)
class ScoreConfig:
    model: str = option("runs/rm/model", "Reward model directory (alignkit rm's output, or any one-label "
                        "AutoModelForSequenceClassification)")
    input: str | None = option(None, "JSONL of {prompt|messages, completion} rows to score")
    output: str | None = option(None, "Where to write the rows with the reward added; null = beside the input "
                                "(rows.jsonl -> rows.scored.jsonl)")
    field: str = option("reward", "Name of the added field (not prompt, messages or completion)")
    normalize: bool = option(True, "Apply the stored gain and bias (mean 0, std 1 on the reference set); false = raw")
    batch_size: int = option(16, "Texts per forward pass", low=1)

    def validate(self):
        if not self.field or self.field in ("prompt", "messages", "completion"):
            raise UserError(f"field={self.field!r} would overwrite the rows' own text; name the added field otherwise")


def run_score(cfg: ScoreConfig) -> str:
    from alignkit.data.jsonl import check_io, iter_rows, no_rows, write_jsonl
    from alignkit.data.preferences import prompt_of
    from alignkit.data.schema import Field, Schema

    output = cfg.output or (cfg.input and str(Path(cfg.input).with_suffix("")) + ".scored.jsonl")
    check_io(cfg.input, output, "input=FILE.jsonl (rows with prompt or messages, and completion)")
    schema = Schema(what="a row to score", variants=({"prompt": Field("str"), "completion": Field("str")},
                                                      {"messages": Field("messages"), "completion": Field("str")}))
    located = list(iter_rows(cfg.input, schema))
    if not located:
        raise no_rows(cfg.input)
    clash = next((where for where, r in located if cfg.field in r), None)
    if clash is not None:
        raise UserError(f"{clash}: the row already has a field '{cfg.field}', which the scores would overwrite; "
                        f"name the added field otherwise (field=...)")
    rows = [r for _, r in located]
    rm = RewardModel(cfg.model, cfg.normalize, cfg.batch_size)
    rewards = rm.score([prompt_of(r) for r in rows], [r["completion"] for r in rows]).tolist()
    if rm.encoder.truncated:
        log.warning("%d texts were longer than the reward model's max_length and were cut", rm.encoder.truncated)
    write_jsonl(output, [{**r, cfg.field: v} for r, v in zip(rows, rewards)])
    t = torch.tensor(rewards)
    log.info("scored %d rows: mean %.4f, std %.4f -> %s", len(rows), t.mean(), t.std(unbiased=False), output)
    return output
