"""One decode step of a Llama-style model on the CPU, without transformers' per-module Python.

A decode step feeds one token per row. For a small model that is mostly Python and dispatch, not
arithmetic: on the benchmark machine (Zen 4, 2 threads) a step of the tiny benchmark Llama (5.2M
parameters, 8 rows, oneDNN-packed products) took 3.0 ms through the model's `forward`, its products
alone about 0.9 ms. This step computes the same thing with the layers' own weights and the generation's
`BufferLayer` cache: an embedding lookup, then per layer RMSNorm, one product for q/k/v, rotary
embeddings from a table made once per generation (q and k rotated together), the cache write,
`scaled_dot_product_attention`, the output projection, RMSNorm, one product for gate/up, SiLU, the down
projection; then the final norm and the output layer. Within a generation of 32 tokens a step took
1.95 ms; with the products of `rollout.linear` (oneDNN-packed, LoRA adapters merged), every product
packed (a plain `F.linear` of the small ones measured slower inside the step than in isolation).
SmolLM2-135M with LoRA r 16: 24 tokens for 8 prompts in 1.33 s instead of 1.47-1.77 s, the same tokens.

It is used only where it computes what the model does (logits equal to float rounding; `tests/test_decode_step.py`
compares generations with and without it, and the generation tests compare with `model.generate`):
- every decoder layer of a class in `LAYERS` (Llama, Mistral, Qwen2: pre-norm RMSNorm, rotary attention
  with optional q/k/v biases and grouped key/value heads, a gated MLP) and a SiLU activation;
- rotary embeddings whose cos/sin depend on the position only (`ROPE_TYPES`);
- an embedding, projections and output layer that are plain float32 CPU layers (or LoRA ones whose
  adapters merge into the product), no module hooks, and a `BufferLayer` cache (full attention only).
Anything else (other families, GPU, bf16, DoRA, offloading hooks) decodes through the model's `forward`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from alignkit.models.load import base_model
from alignkit.rollout.cache import BufferLayer
from alignkit.rollout.linear import product_of

LAYERS = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"}
ROPE_TYPES = {"default", "linear", "llama3", "yarn"}  # not "dynamic" / "longrope": they depend on the length


def _wrapped(model, lm) -> bool:
    """Whether running `lm`'s layers directly could skip something: module hooks (accelerate's offloading), a
    forward replaced on the instance (accelerate's autocast wrapper), or autocast itself."""
    hooks = any(m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook") for m in lm.modules())
    return hooks or any("forward" in m.__dict__ for m in (model, lm)) or torch.is_autocast_enabled("cpu")


def _rms(norm) -> tuple[torch.Tensor, float] | None:
    eps = getattr(norm, "variance_epsilon", None)
    if not type(norm).__name__.endswith("RMSNorm") or eps is None or norm.weight.dtype != torch.float32:
        return None
    return norm.weight.detach(), eps


def decode_step(model, cache, products: dict, positions: int) -> Callable | None:
    """A function (tokens (b,), position ids (b,), attention mask (b, L) or None) -> next-token logits (b, V),
    equal to `model`'s forward of one token per row over `cache` (which it extends), or None where unsupported.

    `products`: the packed products of `rollout.linear.fast_linears`; `positions`: how many position ids the
    generation reads (rotary tables are made for them once)."""
    lm = base_model(model)
    inner, head = getattr(lm, "model", None), getattr(lm, "lm_head", None)
    layers = getattr(inner, "layers", None)
    config = getattr(lm, "config", None)
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if (layers is None or head is None or not all(type(layer).__name__ in LAYERS for layer in layers)
            or getattr(config, "hidden_act", None) != "silu" or rope not in ROPE_TYPES
            or type(inner.embed_tokens) is not torch.nn.Embedding or _wrapped(model, lm)
            or len(cache.layers) != len(layers) or not all(type(c) is BufferLayer for c in cache.layers)):
        return None
    steps = []
    for layer, kv in zip(layers, cache.layers):
        a, mlp = layer.self_attn, layer.mlp
        qkv = product_of((a.q_proj, a.k_proj, a.v_proj), products)
        out = product_of((a.o_proj,), products)
        gate_up = product_of((mlp.gate_proj, mlp.up_proj), products)
        down = product_of((mlp.down_proj,), products)
        norms = _rms(layer.input_layernorm), _rms(layer.post_attention_layernorm)
        if None in (qkv, out, gate_up, down, *norms):
            return None
        steps.append((norms, qkv, a.head_dim, a.scaling, out, gate_up, down, kv))
    final, output = _rms(inner.norm), product_of((head,), products)
    embedding = inner.embed_tokens.weight
    if final is None or output is None or embedding.dtype != torch.float32 or embedding.device.type != "cpu":
        return None
    ids = torch.arange(positions).unsqueeze(0)
    cos, sin = (t[0] for t in inner.rotary_emb(embedding[:1], ids))  # (positions, D) each, scaling included
    half = cos.shape[-1] // 2
    sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)  # rotate_half(x) * sin == roll(x, half) * this

    def step(tokens: torch.Tensor, position: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b = tokens.shape[0]
        x = F.embedding(tokens, embedding)  # (b, hidden)
        c, s = cos[position].unsqueeze(1), sin[position].unsqueeze(1)  # (b, 1, D)
        keep = None if mask is None else mask.bool()[:, None, None, :]  # (b, 1, 1, L)
        for (n1, n2), qkv, d, scaling, out, gate_up, down, kv in steps:
            y = qkv(F.rms_norm(x, x.shape[-1:], *n1))  # (b, (Q + 2 K) D): Q query heads, K key/value heads
            q_heads, kv_heads = qkv.sizes[0] // d, qkv.sizes[1] // d
            qk = y[:, : qkv.sizes[0] + qkv.sizes[1]].view(b, -1, d)  # (b, Q + K, D): q and k rotate together
            qk = torch.addcmul(qk * c, qk.roll(half, -1), s)
            keys, values = kv.update(qk[:, q_heads:, None], y[:, -qkv.sizes[2]:].view(b, kv_heads, 1, d))
            # query heads [g n, (g + 1) n) read key/value head g (transformers' repeat_kv): (b, K, n, D)
            q = qk[:, :q_heads].view(b, kv_heads, -1, d)
            att = F.scaled_dot_product_attention(q, keys, values, attn_mask=keep, scale=scaling)
            x = x + out(att.reshape(b, -1))
            gate, up = gate_up(F.rms_norm(x, x.shape[-1:], *n2)).split(gate_up.sizes, dim=-1)
            x = x + down(F.silu(gate) * up)
        return output(F.rms_norm(x, x.shape[-1:], *final))

    return step
