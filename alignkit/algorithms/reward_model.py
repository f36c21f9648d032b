"""Reward-model training on human (or simulated) preferences, on the engine; evaluation; normalisation.

    alignkit rm --config examples/rm_minilm_vader.yaml

Writes to `output_dir`: `model/` (loads with `AutoModelForSequenceClassification`; its
`alignkit_reward.json` holds the normalisation and the text encoding), `adapter/` with LoRA,
`eval.json` (held-out metrics), `metrics.jsonl`, `config.yaml` and checkpoints.

Implementation details:
1. One batch element (one unit of loss normalisation) is a pair, or with `data.kwise` all the
   comparisons of one prompt (InstructGPT); every completion of a micro-batch goes through one
   concatenated forward pass, each distinct completion of a prompt once.
2. Held-out metrics are per comparison (accuracy, log loss, ECE of sigmoid(r_w - r_l)), so pairwise
   and K-wise runs are comparable; they are computed after training on the main process over the whole
   eval set. The engine also reports eval/loss every `train.eval_every` steps when that is set.
3. Normalisation: gain and bias such that the rewards of the reference completions (the distinct
   completions of the eval set; the first REFERENCE_MAX training groups without one) have mean 0 and
   (population) std 1; stored in `alignkit_reward.json`, applied by `rewards.reward_model.RewardModel`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from alignkit.algorithms.sft import check_output_dir
from alignkit.config import option, to_dict
from alignkit.data.jsonl import write_json
from alignkit.data.preferences import comparison_groups, read_preferences
from alignkit.data.reward_text import RewardEncoder
from alignkit.engine.config import TrainConfig
from alignkit.engine.loop import Engine, chunks
from alignkit.errors import UserError
from alignkit.eval.reward import comparison_metrics, gold_agreement
from alignkit.losses.reward import kwise_loss
from alignkit.models.load import LoraConfig, ModelConfig, check_context, load_tokenizer, save_model
from alignkit.models.reward import METADATA, load_reward_model, reward_forward

log = logging.getLogger(__name__)

REFERENCE_MAX = 1000  # training groups used as the normalisation reference when there is no eval set
DEMO = {"demo": "pairs_train", "demo-rankings": "rankings_train", "demo-large": "rankings_large"}


@dataclass(frozen=True)
class RMDataConfig:
    train: str = option("demo", "Preferences: pairs or rankings JSONL (see alignkit/data/preferences.py); 'demo' = "
                        "simulated VADER pairs of the embedded reviews, 'demo-rankings' = K=4 rankings of them, "
                        "'demo-large' = K=8 rankings of the drug reviews and of 6,883 airline tweets")
    eval: str | None = option("demo", "Held-out pairs or rankings; 'demo' = held-out demo pairs; null = no evaluation")
    kwise: bool = option(False, "One batch element per prompt with all its comparisons (InstructGPT K-wise); "
                         "false = one per pair (rankings are split into their C(K,2) pairs)")
    max_length: int = option(512, "Longest tokenised prompt + completion; longer texts lose the start of the prompt "
                             "(their first token and their end are kept)", low=2)
    chat_template: bool = option(True, "Render prompt + completion with the tokenizer's chat template when it has one; "
                                 "otherwise the tokenizer's text-pair encoding")
    max_rows: int | None = option(None, "Use only the first N training elements (pairs, or prompts with kwise)", low=1)


@dataclass(frozen=True)
class RewardModelConfig:
    model: ModelConfig = option(ModelConfig(path="minilm"), "Backbone: causal LM (e.g. the SFT model), encoder "
                                "('minilm', the embedded all-MiniLM-L6-v2) or a reward model to continue")
    lora: LoraConfig = option(LoraConfig(), "LoRA on the backbone (r = 0: full fine-tuning); the head always trains")
    freeze_layers: int = option(0, "Freeze the embeddings and the first N transformer blocks (cheaper backward)")
    data: RMDataConfig = option(RMDataConfig(), "Preference data")
    centering: float = option(0.0, "Reward centering: adds c (r_w + r_l)^2 to the loss (Eisenstein et al. 2023: 0.01)")
    forward_chunk: int = option(16, "Completions per forward pass: a micro-batch is sorted by length and run in "
                                "chunks this big, each padded only to its own longest text; 0 = all at once")
    normalize: bool = option(True, "Store gain and bias giving the reference rewards mean 0 and std 1")
    train: TrainConfig = option(TrainConfig(batch_size=32, micro_batch_size=16, lr=5e-5),
                                "Optimisation and run settings")
    output_dir: str = option("runs/rm", "Run directory: model/, eval.json, metrics.jsonl, checkpoints/")

    def validate(self):
        if self.freeze_layers < 0:
            raise UserError(f"freeze_layers must be >= 0, got {self.freeze_layers}")
        if self.forward_chunk < 0:
            raise UserError(f"forward_chunk must be >= 0, got {self.forward_chunk}")
        if self.centering < 0:
            raise UserError(f"centering must be >= 0, got {self.centering}")


class RewardModeling:
    """Bradley–Terry / K-wise reward-model loss; one unit = one batch element (see implementation detail 1)."""

    def __init__(self, encoder: RewardEncoder, centering: float = 0.0, chunk: int = 0):
        self.encoder = encoder
        self.centering = centering
        self.chunk = chunk

    def units(self, row) -> int:
        return 1

    def prepare(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Collate groups: completions (N, T) sorted by length (`order`: their rows in the groups' order)
        and the comparisons `winners`, `losers` (indices into the sorted rows), `group` (M,)."""
        seqs = [s for row in rows for s in row["seqs"]]
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]["input_ids"]))
        position = [0] * len(seqs)
        for p, i in enumerate(order):
            position[i] = p
        batch = self.encoder.collate([seqs[i] for i in order])
        batch["order"] = torch.tensor(order, dtype=torch.long)  # (N,) row of each sorted completion in `seqs`
        index = {k: [] for k in ("winners", "losers", "group", "margin", "label")}
        offset = 0
        for g, row in enumerate(rows):
            index["winners"] += [position[offset + w] for w in row["winners"]]
            index["losers"] += [position[offset + l] for l in row["losers"]]
            index["group"] += [g] * len(row["winners"])
            index["margin"] += row["margin"]
            index["label"] += row["label"]
            offset += len(row["seqs"])
        for key, values in index.items():
            batch[key] = torch.tensor(values, dtype=torch.float32 if key in ("margin", "label") else torch.long)
        return batch

    def loss(self, model, batch, normaliser: float):
        rewards = reward_forward(model, batch, self.chunk)  # (N,)
        loss, metrics = kwise_loss(rewards, batch["winners"], batch["losers"], batch["group"], batch["margin"],
                                   batch["label"], self.centering, normaliser)
        return loss, {**metrics, "tokens_seen": int(batch["attention_mask"].sum())}


def load_groups(path: str, encoder: RewardEncoder, kwise: bool) -> list[dict]:
    """Read a pairs/rankings file into tokenised batch elements `{seqs, winners, losers, margin, label}`."""
    kind, rows = read_preferences(path)
    groups = comparison_groups(kind, rows, kwise)
    if not groups:
        raise UserError(f"{path}: no comparisons left (every ranking is a full tie, or ranks copies of one text)")
    cache: dict[tuple[str, str], dict] = {}
    out = []
    for g in groups:
        prompt_key = json.dumps(g["prompt"], sort_keys=True)
        seqs = []
        for text in g["completions"]:
            if (prompt_key, text) not in cache:
                cache[(prompt_key, text)] = encoder.encode(g["prompt"], text, where=str(path))
            seqs.append(cache[(prompt_key, text)])
        out.append({"seqs": seqs, **{k: g[k] for k in ("winners", "losers", "margin", "label", "gold")}})
    return out


@torch.no_grad()
def evaluate_groups(model, algorithm: RewardModeling, groups: list[dict], batch_size: int,
                    device) -> tuple[dict, torch.Tensor]:
    """Per-comparison metrics over `groups` and the rewards (U,) of their distinct completions.

    When every group carries gold scores (simulated labels), `metrics["gold"]` adds the agreement of
    the rewards with the gold order (`eval.reward.gold_agreement`) and their Pearson correlation with
    the gold scores over the distinct completions (None when either is constant).
    """
    was_training = model.training
    model.eval()
    deltas, labels, unique = [], [], {}  # unique: tokens of a distinct completion -> (reward, gold score)
    with_gold = all(g["gold"] is not None for g in groups)
    ordered = sorted(groups, key=lambda g: max(len(s["input_ids"]) for s in g["seqs"]))  # less padding
    for part in chunks(ordered, batch_size):
        batch = {k: v.to(device) for k, v in algorithm.prepare(part).items()}
        rewards = reward_forward(model, batch, algorithm.chunk)
        deltas.append(rewards[batch["winners"]] - rewards[batch["losers"]])
        labels.append(batch["label"])
        seqs = [s for g in part for s in g["seqs"]]
        golds = [x for g in part for x in g["gold"]] if with_gold else [None] * len(seqs)
        for i, r in zip(batch["order"].tolist(), rewards.tolist()):
            unique[tuple(seqs[i]["input_ids"])] = (r, golds[i])
    model.train(was_training)
    rewards = torch.tensor([r for r, _ in unique.values()], dtype=torch.float64)
    delta = torch.cat(deltas).cpu()
    metrics = comparison_metrics(delta, torch.cat(labels).cpu())
    metrics.update(reward_mean=float(rewards.mean()), reward_std=float(rewards.std(unbiased=False)))
    if with_gold:
        gaps = torch.tensor([g["gold"][w] - g["gold"][l] for g in ordered for w, l in zip(g["winners"], g["losers"])],
                            dtype=torch.float64)
        gold = torch.tensor([g for _, g in unique.values()], dtype=torch.float64)
        varied = bool(rewards.std() > 0 and gold.std() > 0)
        pearson = float(torch.corrcoef(torch.stack([rewards, gold]))[0, 1]) if varied else None
        metrics["gold"] = {**gold_agreement(delta, gaps), "pearson": pearson}
    return metrics, rewards


def normalisation(rewards: torch.Tensor) -> tuple[float, float]:
    """(gain, bias) with gain * r + bias of mean 0 and population std 1 over `rewards`."""
    std = float(rewards.std(unbiased=False))
    gain = 1.0 / std if std > 0 else 1.0
    return gain, -float(rewards.mean()) * gain


def _data_paths(cfg: RMDataConfig) -> tuple[str, str | None]:
    if cfg.train not in DEMO and cfg.eval != "demo":
        return cfg.train, cfg.eval
    from alignkit.tasks.preference_demo import build_preference_demo

    demo = build_preference_demo()
    train = str(demo[DEMO[cfg.train]]) if cfg.train in DEMO else cfg.train
    return train, (str(demo["pairs_eval"]) if cfg.eval == "demo" else cfg.eval)


def _ceiling(eval_path: str | None) -> float | None:
    from alignkit.feedback.simulated import ceiling_path

    path = ceiling_path(eval_path) if eval_path else None
    return json.loads(path.read_text())["ceiling"] if path is not None and path.is_file() else None


def _finish(cfg: RewardModelConfig, model, tokenizer, algorithm, groups, eval_path, device) -> dict:
    """Evaluate on `groups`, normalise and save (main process); returns the metrics."""
    metrics, rewards = evaluate_groups(model, algorithm, groups, cfg.train.micro_batch_size, device)
    gain, bias = normalisation(rewards) if cfg.normalize else (1.0, 0.0)
    metrics["ceiling"] = _ceiling(eval_path)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    meta = {"format": 1, "gain": gain, "bias": bias, "backbone": cfg.model.path, "architecture": type(base).__name__,
            "reference": f"{len(rewards)} distinct completions of {eval_path or 'the training data'}",
            "chat_template": algorithm.encoder.chat, "max_length": cfg.data.max_length,
            "eval": metrics if eval_path else None}
    out = Path(cfg.output_dir)
    if eval_path:  # before model/, which marks the run finished (a restart removes an eval.json without it)
        write_json(out / "eval.json", metrics)
    save_model(model, tokenizer, out, files={METADATA: meta})  # the normalisation lands with the weights
    return metrics


def run_rm(cfg: RewardModelConfig) -> Path:
    """Train, evaluate, normalise and save; returns the reward model directory (`output_dir/model`)."""
    out = Path(cfg.output_dir)
    # validates batch sizes before anything is read or written
    engine = Engine(cfg.train, out, results=("eval.json",))
    check_output_dir(out, cfg.train.resume)
    engine.accelerator.wait_for_everyone()
    tokenizer = load_tokenizer(cfg.model.path)
    tokenizer.padding_side = "right"  # saved with the model: BERT pools position 0, so no left padding
    encoder = RewardEncoder(tokenizer, cfg.data.chat_template, cfg.data.max_length)
    train_path, eval_path = _data_paths(cfg.data)
    train = load_groups(train_path, encoder, cfg.data.kwise)[: cfg.data.max_rows]
    held_out = load_groups(eval_path, encoder, cfg.data.kwise) if eval_path else None
    if encoder.truncated:
        log.warning("%d texts were longer than data.max_length=%d and were cut", encoder.truncated, cfg.data.max_length)
    model = load_reward_model(cfg.model, tokenizer.pad_token_id, cfg.lora, cfg.freeze_layers)
    check_context(model, cfg.data.max_length)
    algorithm = RewardModeling(encoder, cfg.centering, cfg.forward_chunk)
    curves = held_out if cfg.train.eval_every else None
    model, _ = engine.fit(model, algorithm, train, curves, to_dict(cfg), desc="rm")
    engine.accelerator.wait_for_everyone()
    if engine.accelerator.is_main_process:
        reference = held_out or train[:REFERENCE_MAX]
        m = _finish(cfg, model, tokenizer, algorithm, reference, eval_path, engine.accelerator.device)
        if held_out:
            ceiling = f" (ceiling {m['ceiling']:.4f})" if m["ceiling"] is not None else ""
            gold = f"; agreement with the gold order {m['gold']['agreement']:.4f}" if "gold" in m else ""
            log.info("held-out: accuracy %.4f%s, log loss %.4f, ECE %.4f over %d comparisons%s", m["accuracy"],
                     ceiling, m["log_loss"], m["ece"], m["comparisons"], gold)
    engine.accelerator.wait_for_everyone()
    return out / "model"
