"""Supervised fine-tuning (instruction tuning / behaviour cloning) on demonstrations."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from alignkit.config import option, to_dict
from alignkit.engine.config import TrainConfig
from alignkit.engine.loop import Engine
from alignkit.errors import UserError
from alignkit.losses.sft import IGNORE, sft_loss
from alignkit.models.load import (
    LoraConfig, ModelConfig, base_model, check_context, load_causal_lm, load_tokenizer, rows_agree, save_model,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SFTDataConfig:
    train: str = option("demo", "Training JSONL ({prompt, completion} or {messages} rows); 'demo' = embedded reviews")
    eval: str | None = option("demo", "Held-out JSONL in the same format; null = no evaluation")
    max_length: int = option(256, "Longest tokenised example; longer ones are cut from the right", low=2)
    chat_template: bool = option(True, "Wrap rows in the tokenizer's chat template (prompt = user turn)")
    packing: bool = option(False, "Concatenate examples into blocks of max_length (fewer pad tokens); each "
                                  "document attends only to itself (refused for models whose masks ignore position "
                                  "ids: OPT, Bloom, MPT)")
    max_rows: int | None = option(None, "Use only the first N training rows (quick runs)", low=1)
    max_eval_rows: int | None = option(None, "Use only the first N held-out rows (cheaper evaluation)", low=1)


@dataclass(frozen=True)
class SFTConfig:
    model: ModelConfig = option(ModelConfig(), "Policy to fine-tune")
    lora: LoraConfig = option(LoraConfig(), "LoRA adapter (r = 0: full fine-tuning)")
    data: SFTDataConfig = option(SFTDataConfig(), "Demonstrations")
    train: TrainConfig = option(TrainConfig(), "Optimisation and run settings")
    output_dir: str = option("runs/sft", "Run directory: metrics.jsonl, checkpoints/, model/ (and adapter/ with LoRA)")


class SFT:
    """Cross-entropy on completion tokens; one unit of loss normalisation = one target token."""

    def __init__(self, pad_token_id: int):
        from alignkit.data.sft import SFTCollator

        self.collate = SFTCollator(pad_token_id)

    def units(self, row) -> int:
        return sum(1 for label in row["labels"][1:] if label != IGNORE)

    def prepare(self, rows):
        return self.collate(rows)

    def loss(self, model, batch, normaliser: float):
        if "position_ids" in batch:  # packed blocks: no attention mask, so the positions separate the documents
            inputs = {"position_ids": batch["position_ids"]}
        else:
            inputs = {"attention_mask": batch["attention_mask"]}
        logits = model(input_ids=batch["input_ids"], use_cache=False, **inputs).logits  # (B, T, V)
        loss, metrics = sft_loss(logits, batch["labels"], normaliser)
        return loss, {"tokens_seen": int(batch["attention_mask"].sum())}

    def eval_metrics(self, mean_loss: float) -> dict:
        return {"ppl": math.exp(min(mean_loss, 50.0))}


def _data_paths(cfg: SFTDataConfig) -> tuple[str, str | None]:
    if cfg.train != "demo" and cfg.eval != "demo":
        return cfg.train, cfg.eval
    from alignkit.tasks.demo_data import build_demo_data

    demo = build_demo_data()
    train = str(demo["sft_train"]) if cfg.train == "demo" else cfg.train
    return train, (str(demo["sft_eval"]) if cfg.eval == "demo" else cfg.eval)


def check_output_dir(out: Path, resume: bool) -> None:
    """A new run may not overwrite one that saved something (its model or a checkpoint); a run that stopped
    before either (say, on a bad reward) can be started again in the same place."""
    kept = next((p for p in ("model", "checkpoints") if (out / p).exists()), None)
    if not resume and kept:
        raise UserError(f"output_dir {out} already holds a run ({kept}/); set train.resume=true to continue it or "
                        "pick another")


def run_sft(cfg: SFTConfig) -> Path:
    """Train and save; returns the directory of the loadable model (`output_dir/model`)."""
    from alignkit.data.sft import load_sft_dataset

    out = Path(cfg.output_dir)
    engine = Engine(cfg.train, out)  # validates batch sizes before anything is read or written
    check_output_dir(out, cfg.train.resume)
    engine.accelerator.wait_for_everyone()
    tokenizer = load_tokenizer(cfg.model.path)
    train_path, eval_path = _data_paths(cfg.data)
    d = cfg.data
    train_rows = load_sft_dataset(train_path, tokenizer, d.max_length, d.chat_template, d.packing, d.max_rows)
    eval_rows = (load_sft_dataset(eval_path, tokenizer, d.max_length, d.chat_template, False, d.max_eval_rows)
                 if eval_path else None)
    model = load_causal_lm(cfg.model, cfg.lora)
    check_context(model, d.max_length)
    # a packed block's documents are told apart by their position ids, which some models (OPT, Bloom, MPT) ignore
    if d.packing and not rows_agree(model, [[1, 2, 3, 4, 5, 6], [7, 8, 9, 4, 5, 6]], slice(3, 6),
                                    position_ids=[[0, 1, 2, 0, 1, 2]] * 2):
        raise UserError(f"data.packing: {base_model(model).config.model_type} models let a packed document attend to "
                        "the one before it (their masks ignore the position ids that restart per document); set "
                        "data.packing=false")
    model, metrics = engine.fit(model, SFT(tokenizer.pad_token_id), train_rows, eval_rows, to_dict(cfg), desc="sft")
    if metrics:
        log.info("held-out loss %.4f, perplexity %.2f", metrics["eval/loss"], metrics["eval/ppl"])
    engine.accelerator.wait_for_everyone()
    if engine.accelerator.is_main_process:
        save_model(model, tokenizer, out)
    engine.accelerator.wait_for_everyone()
    return out / "model"
