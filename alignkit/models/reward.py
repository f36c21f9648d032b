"""Reward models: any HF causal LM or encoder with a scalar head, as `AutoModelForSequenceClassification`.

We build the model with transformers' own sequence-classification class (`num_labels=1`), so the
saved directory loads with `AutoModelForSequenceClassification` and scores exactly as in training:

- causal LMs (Llama, Qwen, GPT-2, ...): the head (`score`, a bias-free linear layer) reads the hidden
  state of the last non-pad token (transformers finds the rightmost token that is not `pad_token_id`);
- BERT-style encoders (the embedded MiniLM): the head (`classifier`) reads the pooled [CLS] token
  (the pretrained dense + tanh pooler over position 0), the class's standard pooling.

Implementation details, each with its reason:
1. A new head is initialised N(0, std = 1 / sqrt(d + 1)) with zero bias (Stiennon et al. 2020; "The N
   implementation details of RLHF with PPO"), so initial rewards have unit-scale variance.
2. Dropout is switched off, in the config and in LoRA's adapters: the chosen and rejected forwards must see
   the same network, otherwise dropout noise enters r_w - r_l (TRL's reward trainer does the same).
3. `config.pad_token_id` is set from the tokenizer: transformers needs it to find the last token.
4. Reward normalisation (gain, bias) lives in `alignkit_reward.json` next to the weights, with the
   text encoding used in training; `rewards.reward_model.RewardModel` applies both at scoring time.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from alignkit.errors import UserError
from alignkit.models.load import (
    LoraConfig, ModelConfig, add_lora, default_device, disable_dropout, from_pretrained, resolve_dtype,
)

log = logging.getLogger(__name__)

METADATA = "alignkit_reward.json"
HEAD_NAMES = ("score", "classifier")


def _without_dropout(config) -> None:
    for key, value in config.to_dict().items():
        if isinstance(value, float) and ("dropout" in key or key.endswith("pdrop")):
            setattr(config, key, 0.0)


def _head_module(model) -> torch.nn.Module:
    """The scalar head (`score` or `classifier`; under LoRA its trained copy)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name in HEAD_NAMES:
        module = getattr(base, name, None)
        if module is not None:
            trained = getattr(module, "modules_to_save", None)  # a PEFT-wrapped head: its trained copy
            return trained["default"] if trained is not None else module
    raise UserError(f"cannot find the reward head of {type(base).__name__} (looked for {', '.join(HEAD_NAMES)})")


def reward_head(model) -> torch.nn.Linear:
    """The output layer of the scalar head (the last Linear inside it)."""
    linears = [m for m in _head_module(model).modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise UserError(f"the reward head of {type(model).__name__} has no linear layer")
    return linears[-1]


def load_reward_model(cfg: ModelConfig, pad_token_id: int | None, lora: LoraConfig | None = None,
                      freeze_layers: int = 0):
    """A one-output `AutoModelForSequenceClassification` from a causal LM, an encoder or a reward model, on
    `default_device()`.

    A head that the checkpoint lacks (any backbone that is not already a sequence classifier) is
    initialised N(0, 1 / sqrt(d + 1)); an existing reward model keeps its head and continues.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    lora_r = lora.r if lora is not None else 0
    config = from_pretrained(AutoConfig, cfg.path, "a model config", num_labels=1)
    has_head = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    _without_dropout(config)
    if pad_token_id is not None:
        config.pad_token_id = pad_token_id
    try:
        model = from_pretrained(AutoModelForSequenceClassification, cfg.path, "a reward-model backbone",
                                config=config, dtype=resolve_dtype(cfg.dtype, trained=not lora_r))
    except ValueError as e:
        raise UserError(f"'{cfg.path}' has no sequence-classification class in transformers: "
                        f"{str(e).splitlines()[0]}") from None
    if not has_head:
        head = reward_head(model)
        torch.nn.init.normal_(head.weight, std=1.0 / (head.in_features + 1) ** 0.5)
        if head.bias is not None:
            torch.nn.init.zeros_(head.bias)
    model.to(default_device())
    if lora_r:
        model = add_reward_lora(model, lora)
        disable_dropout(model)  # lora.dropout
        if reward_head(model).weight.dtype != torch.float32:  # a bf16 base (`auto` on a GPU): as PEFT's adapters
            _float32_head(model)
    if freeze_layers:
        freeze_bottom(model, freeze_layers)
    return model.train()


def add_reward_lora(model, lora: LoraConfig):
    """LoRA on the backbone; the head trains in full (PEFT's SEQ_CLS task keeps it in `modules_to_save`)."""
    head_name = next(n for n in HEAD_NAMES if hasattr(model, n))
    return add_lora(model, lora, task_type="SEQ_CLS", modules_to_save=[head_name])


def _float32_inputs(module, args):
    return tuple(a.float() if torch.is_floating_point(a) else a for a in args)


def _float32_head(model) -> None:
    """A LoRA reward model's head trains in full, so it keeps float32 master weights on a bf16 base, as PEFT keeps
    the adapters (it does not upcast `modules_to_save`: AdamW's small updates to a bf16 head round away). The states
    it reads are cast to float32, so it also runs outside autocast (the final evaluation)."""
    head = _head_module(model).float()
    head.register_forward_pre_hook(_float32_inputs)


def transformer_blocks(model) -> torch.nn.ModuleList:
    """The list of transformer blocks: the longest ModuleList whose length is the configured layer count."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers]
    if not lists:
        raise UserError(f"cannot find the transformer blocks of {type(model).__name__} to freeze")
    return lists[0]


def freeze_bottom(model, n: int) -> None:
    """Freeze every parameter before block `n` (the embeddings and blocks 0..n-1).

    Nothing below block n then needs gradients, so the backward pass stops there: training costs
    about (forward of all blocks + backward of the top ones).
    """
    blocks = transformer_blocks(model)
    if not 0 <= n <= len(blocks):
        raise UserError(f"freeze_layers must be between 0 and {len(blocks)} (the model's blocks), got {n}")
    trained = {id(p) for block in blocks[n:] for p in block.parameters()}
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    past_embeddings = False
    for param in model.parameters():  # registration order: embeddings, blocks, final norm, head
        if id(param) in trained or (past_embeddings and id(param) not in in_blocks):
            break  # block n, or (n = every block) the final norm
        past_embeddings = past_embeddings or id(param) in in_blocks
        param.requires_grad_(False)


def reward_forward(model, batch: dict, chunk: int = 0) -> torch.Tensor:
    """Rewards (N,) float32 of a right-padded batch (`input_ids`, `attention_mask`, `token_type_ids`?).

    With `chunk` > 0 the rows run `chunk` at a time, each chunk cut to its own longest row: on a batch
    sorted by length this removes most of the padding compute.
    """
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch]
    n = batch["input_ids"].shape[0]
    step = chunk if chunk > 0 else n
    lengths = batch["attention_mask"].sum(-1)  # (N,)
    out = []
    for start in range(0, n, step):
        width = int(lengths[start : start + step].max())
        out.append(model(**{k: batch[k][start : start + step, :width] for k in keys}).logits[:, 0].float())
    return torch.cat(out)


def load_metadata(model_dir: str | Path) -> dict:
    """The reward model's `alignkit_reward.json`, or {} for a reward model trained elsewhere."""
    path = Path(model_dir) / METADATA
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e}); delete it or retrain the reward model") from None
