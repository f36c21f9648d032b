"""One decode step of a Llama-style model on the CPU, without transformers' per-module Python.

A decode step feeds one token per row. For a small model that is mostly Python and dispatch, not
arithmetic: on the benchmark machine (Zen 4, 2 threads) a step of the tiny benchmark Llama (5.2M
parameters, 8 rows, oneDNN-packed products) took 3.0 ms through the model's `forward`, its products
alone about 0.9 ms. This step computes the same thing with the layers' own weights and the generation's
`BufferLayer` cache: an embedding lookup, then per layer RMSNorm, one product for q/k/v, rotary
embeddings from a table made once per generation (q and k rotated together), the cache write,
`scaled_dot_product_attention`, the output projection, RMSNorm, one product for gate/up, SiLU, the down
projection; then the final norm and the output layer. Within a generation of 32 tokens a step took 1.95 ms.
The products are those of `rollout.linear` (LoRA adapters merged in), all of them oneDNN-packed: inside
the step even the small ones ran faster packed than through `F.linear`. SmolLM2-135M with LoRA r 16
generated 24 tokens for 8 prompts in 1.33 s instead of 1.47-1.77 s.

It is used only where it computes what the model does (log-probs equal to float rounding, about 1e-5 on
SmolLM2; `tests/test_decode_step.py` compares generations with and without it, and the generation tests
compare with `model.generate`). Sampled tokens can still differ where a draw falls within rounding of the
boundary between two tokens, as between any two kernels. The conditions:
- transformers' own classes of one family in `FAMILIES` (Llama, Mistral, Qwen2: pre-norm RMSNorm, rotary
  attention with optional q/k/v biases and grouped key/value heads, a gated MLP), not subclasses or
  remote-code copies, with a SiLU activation and layers in cache order;
- rotary embeddings whose cos/sin depend on the position only (`ROPE_TYPES`);
- an embedding, projections and output layer that are plain float32 CPU layers (or LoRA ones whose
  adapters merge into the product), and a float32 `BufferLayer` cache (full attention only: a sliding
  window, as in Mistral-7B-v0.1, falls back);
- no hooks, no `forward` replaced on any module (accelerate's autocast wrapper, torch.compile), no autocast.
Anything else (other families, GPU, bf16, DoRA, merged adapters) decodes through the model's `forward`.
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.modules import module as nn_module

from alignkit.models.load import base_model
from alignkit.rollout.cache import BufferLayer
from alignkit.rollout.linear import product_of

FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}  # transformers module: class prefix
PARTS = ("ForCausalLM", "Model", "DecoderLayer", "Attention", "MLP", "RMSNorm", "RotaryEmbedding")
ROPE_TYPES = {"default", "linear", "llama3", "yarn"}  # not "dynamic" / "longrope": they depend on the length


@functools.lru_cache(maxsize=1)
def _families() -> dict:
    """{causal LM class: {part: class}} for the supported families, transformers' own classes (not subclasses or
    remote-code copies of the same name, which may compute something else)."""
    out = {}
    for name, prefix in FAMILIES.items():
        module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        classes = {part: getattr(module, prefix + part) for part in PARTS}
        out[classes["ForCausalLM"]] = classes
    return out


def _is(module, cls) -> bool:
    return type(module) is cls


def _modified(model, products: dict) -> bool:
    """Whether anything may change what the model computes beyond its layers' own code: module hooks anywhere
    (accelerate's offloading) or global ones, a `forward` replaced on any module other than the linear layers
    `fast_linears` patched (accelerate's autocast wrapper, torch.compile), autocast."""
    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks or torch.is_autocast_enabled("cpu"):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook") or
               ("forward" in m.__dict__ and m not in products) for m in model.modules())


def _rms(norm, cls) -> tuple[torch.Tensor, float] | None:
    """(weight, eps) of a float32 RMSNorm of the family's own class, else None."""
    if not _is(norm, cls) or norm.weight.dtype != torch.float32:
        return None
    return norm.weight.detach(), norm.variance_epsilon


def _supported(lm, parts: dict, cache) -> bool:
    inner = lm.model
    layers = inner.layers
    config = lm.config
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    return (_is(inner, parts["Model"]) and _is(inner.rotary_emb, parts["RotaryEmbedding"])
            and type(inner.embed_tokens) is torch.nn.Embedding and inner.embed_tokens.weight.dtype == torch.float32
            and config.hidden_act == "silu" and rope in ROPE_TYPES
            and all(_is(layer, parts["DecoderLayer"]) and _is(layer.self_attn, parts["Attention"])
                    and _is(layer.mlp, parts["MLP"]) and layer.self_attn.layer_idx == i  # the cache's order
                    for i, layer in enumerate(layers))
            and len(cache.layers) == len(layers)
            and all(type(c) is BufferLayer and c.keys.dtype == torch.float32 for c in cache.layers))


def decode_step(model, cache, products: dict, positions: int) -> Callable | None:
    """A function (tokens (b,), position ids (b,), attention mask (b, L) or None) -> next-token logits (b, V),
    equal to `model`'s forward of one token per row over `cache` (which it extends), or None where unsupported.

    `cache`: filled by the prompt pass; `products`: the packed products of `rollout.linear.fast_linears`;
    `positions`: how many position ids the generation reads (rotary tables are made for them once)."""
    lm = base_model(model)
    parts = _families().get(type(lm))
    if parts is None or _modified(model, products) or not _supported(lm, parts, cache):
        return None
    inner = lm.model
    steps = []
    for layer, kv in zip(inner.layers, cache.layers):
        a, mlp = layer.self_attn, layer.mlp
        qkv = product_of((a.q_proj, a.k_proj, a.v_proj), products)
        out = product_of((a.o_proj,), products)
        gate_up = product_of((mlp.gate_proj, mlp.up_proj), products)
        down = product_of((mlp.down_proj,), products)
        norms = _rms(layer.input_layernorm, parts["RMSNorm"]), _rms(layer.post_attention_layernorm, parts["RMSNorm"])
        if None in (qkv, out, gate_up, down, *norms):
            return None
        d = a.head_dim
        heads = [size // d for size in qkv.sizes]  # query heads, key/value heads (twice)
        steps.append((norms, qkv, d, heads[0], heads[1], a.scaling, out, gate_up, down, kv))
    final, output = _rms(inner.norm, parts["RMSNorm"]), product_of((lm.lm_head,), products)
    if final is None or output is None:
        return None
    embedding = inner.embed_tokens.weight
    ids = torch.arange(positions).unsqueeze(0)
    cos, sin = (t[0] for t in inner.rotary_emb(embedding[:1], ids))  # (positions, D) each, scaling included
    half = cos.shape[-1] // 2
    sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)  # rotate_half(x) * sin == roll(x, half) * this

    def step(tokens: torch.Tensor, position: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b = tokens.shape[0]
        x = F.embedding(tokens, embedding)  # (b, hidden)
        c, s = cos[position].unsqueeze(1), sin[position].unsqueeze(1)  # (b, 1, D)
        keep = None if mask is None else mask.bool()[:, None, None, :]  # (b, 1, 1, L)
        for (n1, n2), qkv, d, q_heads, kv_heads, scaling, out, gate_up, down, kv in steps:
            y = qkv(F.rms_norm(x, x.shape[-1:], *n1))  # (b, (Q + 2 K) D): Q query heads, K key/value heads
            qk = y[:, : (q_heads + kv_heads) * d].view(b, -1, d)  # (b, Q + K, D): q and k rotate together
            qk = torch.addcmul(qk * c, qk.roll(half, -1), s)
            keys, values = kv.update(qk[:, q_heads:, None], y[:, -kv_heads * d :].view(b, kv_heads, 1, d))
            # query heads [g n, (g + 1) n) read key/value head g (transformers' repeat_kv): (b, K, n, D)
            q = qk[:, :q_heads].view(b, kv_heads, -1, d)
            att = F.scaled_dot_product_attention(q, keys, values, attn_mask=keep, scale=scaling)
            x = x + out(att.reshape(b, -1))
            gate, up = gate_up(F.rms_norm(x, x.shape[-1:], *n2)).split(gate_up.sizes, dim=-1)
            x = x + down(F.silu(gate) * up)
        return output(F.rms_norm(x, x.shape[-1:], *final))

    return step
