"""Load policies and tokenizers from Hugging Face directories (or hub names), wire LoRA, save results.

With LoRA, the reference model of every later stage is the same base with the adapter switched off
(`with model.disable_adapter(): ...`), so no second copy of the weights is ever loaded.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from alignkit.config import check_interval, option
from alignkit.data.jsonl import make_readable, write_json
from alignkit.errors import UserError

log = logging.getLogger(__name__)

# LoRA targets by architecture when the user names none: every linear layer of attention and MLP.
_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_FUSED_QKV = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]  # GPT-NeoX, Falcon, Bloom
LORA_TARGETS = {
    **dict.fromkeys(("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text"), _LLAMA_LIKE),
    **dict.fromkeys(("gpt_neox", "falcon", "bloom"), _FUSED_QKV),
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "bert": ["query", "key", "value", "dense"],
}


@dataclass(frozen=True)
class ModelConfig:
    path: str = option("smollm2", "HF model directory, hub name, or 'smollm2' (the embedded SmolLM2-135M-Instruct)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "Weight dtype: auto = bfloat16 on a GPU that supports it (float32 for weights trained in full), "
        "float32 on a CPU"
    )


@dataclass(frozen=True)
class LoraConfig:
    r: int = option(0, "LoRA rank; 0 trains all weights (full fine-tuning)")
    alpha: float = option(32.0, "LoRA scaling numerator (the update is scaled by alpha / r)")
    dropout: float = option(0.0, "Dropout on the LoRA input")
    target_modules: list[str] | None = option(None, "Module names to adapt; null = all attention and MLP linears")

    def validate(self):
        if self.r < 0:
            raise UserError(f"lora.r must be >= 0, got {self.r}")
        check_interval("lora.alpha", self.alpha, 0, None, "()")  # 0 trains an adapter that does nothing
        check_interval("lora.dropout", self.dropout, 0, 1, "[)")


def cpu_processes() -> bool:
    """True for one of several processes (torchrun, `accelerate launch`) on a machine without a GPU. accelerate
    distributes CPU processes only when told to (`cpu=True`); otherwise each would train alone on every batch."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def process_state():
    """accelerate's `PartialState` of this process: its rank, the number of processes and its device."""
    from accelerate import PartialState

    return PartialState(cpu=cpu_processes())


def default_device() -> torch.device:
    """This process's accelerator, where every stage loads its models (the GPU of this rank under torchrun,
    else the one GPU, MPS, or the CPU)."""
    return process_state().device


def resolve_dtype(name: str, trained: bool = False) -> torch.dtype:
    """`auto`: bfloat16 on a GPU with native bf16, float32 on a CPU. Without AVX512-BF16 a CPU emulates bf16
    (slow); with it (a Zen 4 EPYC) bf16 matrix products ran 2.4x faster, yet a whole LoRA GRPO step on SmolLM2
    was slower in bf16 (5.7-6.3 s against 4.7-5.4 s; the oneDNN-packed decoding is float32 only).

    Weights that are `trained` in full stay float32 on any device: AdamW steps on bf16 weights round away
    every update below bf16's resolution (about 0.4% of the weight), so full fine-tuning keeps float32
    master weights and computes under bf16 autocast (`train.precision`). A LoRA base is frozen: bf16.
    """
    if name != "auto":
        if trained and name != "float32":
            log.warning("model.dtype=%s for weights trained in full: AdamW's updates below %s's resolution are lost "
                        "(most of them at small learning rates); `auto` keeps float32 weights and computes in bf16 "
                        "under train.precision", name, name)
        return getattr(torch, name)
    native_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if native_bf16 and not trained else torch.float32


def disable_dropout(model) -> None:
    """Set every dropout probability to 0 (as TRL's DPO does by default), LoRA's included: the log-ratios of the
    policy and the reference, or the two rewards of a comparison, must differ by the training, not by dropout.
    Attention modules that apply dropout themselves keep its rate as a number (Llama's `attention_dropout`)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


def resolve_path(path: str | os.PathLike) -> str:
    from alignkit.tasks.embedded import resolve_model

    return resolve_model(path)


def weights_stamp(name: str | os.PathLike) -> str:
    """The identity of a model's weights, for caches of what it computes: its resolved path and, for a local
    directory, the name, size and modification time of each file in it (a model rewritten at the same path
    gets another stamp); a hub name stands for itself."""
    resolved = Path(resolve_path(name))
    if not resolved.is_dir():
        return os.fspath(name)
    files = sorted((f.name, f.stat()) for f in resolved.iterdir() if f.is_file())
    return ";".join([str(resolved.resolve()), *(f"{n}:{st.st_size}:{st.st_mtime_ns}" for n, st in files)])


def from_pretrained(cls, name: str | os.PathLike, what: str, **kwargs):
    """`cls.from_pretrained` on `name` (an alias, a directory or a hub name); a model that cannot be found or
    read is a one-line UserError naming it, not a traceback."""
    resolved = resolve_path(name)
    run = Path(resolved)
    if run.is_dir() and not (run / "config.json").exists() and (run / "model" / "config.json").exists():
        raise UserError(f"'{os.fspath(name)}' is a run directory, not a model; its model is '{run / 'model'}'")
    try:
        return cls.from_pretrained(resolved, **kwargs)
    except OSError as e:
        raise UserError(f"could not load {what} from '{os.fspath(name)}': {str(e).splitlines()[0]}") from None


def load_tokenizer(path: str | os.PathLike):
    """Tokenizer with a pad token (eos when it has none) and left padding, for generation."""
    from transformers import AutoTokenizer

    try:
        tok = from_pretrained(AutoTokenizer, path, "a tokenizer")
    except ValueError as e:  # e.g. a directory of weights without tokenizer files
        raise UserError(f"could not load a tokenizer from '{os.fspath(path)}': {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise UserError(f"tokenizer at {path} has neither a pad nor an eos token; add one to its config")
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_causal_lm(cfg: ModelConfig, lora: LoraConfig | None = None, trainable: bool = True):
    """Causal LM from `cfg.path` on `default_device()`, with a LoRA adapter when `lora.r > 0` (only the
    adapter trains)."""
    from transformers import AutoModelForCausalLM

    lora_r = lora.r if lora is not None else 0
    if trainable and (Path(resolve_path(cfg.path)) / "adapter_config.json").is_file():
        # transformers loads base + adapter (fine to sample or score with), but a trained policy's new LoRA would wrap
        # it: the policy would start from, and its adapter-off reference be, the base without the adapter
        raise UserError(f"'{cfg.path}' is a LoRA adapter: to train from it, give the merged model (an alignkit run's "
                        "model/ beside its adapter/) or merge it first (PEFT's merge_and_unload)")
    try:
        model = from_pretrained(AutoModelForCausalLM, cfg.path, "a causal LM",
                                dtype=resolve_dtype(cfg.dtype, trainable and not lora_r))
    except ValueError as e:  # e.g. T5 or DistilBERT: no causal-LM class
        raise UserError(f"could not load a causal LM from '{cfg.path}': {str(e).splitlines()[0]}") from None
    saved_as = model.config.architectures or []
    if saved_as and all(a.endswith("ForSequenceClassification") for a in saved_as):  # loads, then fails deep inside
        raise UserError(f"'{cfg.path}' holds a {saved_as[0]} (a reward model or classifier), not a causal LM")
    model.to(default_device())
    if not rows_agree(model, [[1, 2, 3, 4], [1, 2, 3, 5]], slice(0, 3), attention_mask=[[1] * 4] * 2):
        raise UserError(f"'{cfg.path}' is not a causal LM: a token's logits change with the tokens after it (an "
                        "encoder such as BERT loads as a language model that looks ahead); give a decoder-only model")
    if lora_r:
        model = add_lora(model, lora)
    model.train(trainable)
    if not trainable:
        model.requires_grad_(False)
    return model


@torch.no_grad()
def rows_agree(model, ids: list[list[int]], positions: slice, **inputs) -> bool:
    """Whether the logits of the rows of `ids` agree at `positions` (in eval mode: no dropout); `inputs` go to the
    forward too. A probe of what a model's attention sees: rows that differ only after (or, packed, before) them."""
    was_training = model.training
    model.eval()
    try:
        ids = torch.tensor(ids, device=model.device)
        inputs = {k: torch.tensor(v, device=model.device) for k, v in inputs.items()}
        logits = model(input_ids=ids, use_cache=False, **inputs).logits[:, positions].float()
    finally:
        model.train(was_training)
    return bool((logits - logits[:1]).abs().max() <= 1e-3 * max(1.0, float(logits.abs().max())))


# PEFT (0.21) reads transformers' deprecated `is_gradient_checkpointing` whenever it wraps a model, a FutureWarning
# that our users can do nothing about.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def add_lora(model, lora: LoraConfig, **peft_options):
    """`model` with a LoRA adapter on `lora.target_modules` (else the model type's defaults); `peft_options` go to
    PEFT's LoraConfig (a reward model's task type and head)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = lora.target_modules or LORA_TARGETS.get(model.config.model_type)
    if not targets:
        raise UserError(
            f"no default LoRA targets for model type '{model.config.model_type}'; set lora.target_modules"
        )
    from transformers.pytorch_utils import Conv1D

    # GPT-2's layers are Conv1D (weights stored transposed): PEFT wants to be told, else it warns and sets it itself
    transposed = any(isinstance(m, Conv1D) for m in model.modules())
    peft_cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              target_modules=list(targets), bias="none", fan_in_fan_out=transposed, **peft_options)
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as e:
        raise UserError(f"lora.target_modules: {str(e).splitlines()[0]}") from None


def unwrap(model):
    """The plain transformers model under DDP / torch.compile wrappers (a PeftModel stays a PeftModel)."""
    while hasattr(model, "module"):
        model = model.module
    return getattr(model, "_orig_mod", model)


def on_device_of(model, like):
    """`model` on the device of `like`'s weights: a frozen reference follows its policy (moved once)."""
    device = next(unwrap(like).parameters()).device
    return model if next(model.parameters()).device == device else model.to(device)


def base_model(model):
    """The transformers model under DDP / torch.compile wrappers and a PEFT wrapper."""
    model = unwrap(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def context_length(model) -> int | None:
    """The positions the model can read (`max_position_embeddings`; GPT-2's `n_positions`), None if unknown."""
    context = getattr(getattr(base_model(model), "config", None), "max_position_embeddings", None)
    return context if isinstance(context, int) else None


def check_context(model, max_length: int, key: str = "data.max_length") -> None:
    """UserError when `key` allows sequences longer than the model's context: a model with learned positions
    (GPT-2, BERT) fails on them with an IndexError, a RoPE model runs past what it was trained on."""
    context = context_length(model)
    if context is not None and max_length > context:
        raise UserError(f"{key}={max_length} is more than the model's context ({context} positions); lower it")


def is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(unwrap(model), PeftModel)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written temp dir to `final`, replacing any old one without a half-written moment."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def save_model(model, tokenizer, out_dir: str | Path, files: dict[str, dict] | None = None) -> Path:
    """Save a loadable HF directory at `out_dir/model` (merged when LoRA) and `out_dir/adapter` (LoRA).

    Both are written to temp dirs first and renamed, so a crash never leaves a half-written model; `files`
    (name -> JSON content, e.g. a reward model's normalisation) go into `model/` before its rename, so they
    arrive with the weights or not at all.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = unwrap(model)
    targets = {}
    if is_peft(model):
        targets["adapter"] = model
        merged = copy.deepcopy(model).merge_and_unload()
        targets["model"] = merged
    else:
        targets["model"] = model
    generation = getattr(targets["model"], "generation_config", None)
    if generation is not None:  # HF's generate stops where ours does: at the template's end-of-turn token too
        from alignkit.rollout.generate import stop_token_ids

        stops = stop_token_ids(targets["model"], tokenizer)
        generation.eos_token_id = stops[0] if len(stops) == 1 else stops or None
    for name, m in targets.items():
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=out_dir))
        try:
            m.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            for file, content in (files or {}).items() if name == "model" else ():
                write_json(tmp / file, content)
            make_readable(tmp)
        except BaseException:  # also Ctrl-C: leave no partial copy behind (a killed one goes when training restarts)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        replace_dir(tmp, out_dir / name)
    return out_dir / "model"
