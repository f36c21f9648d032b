"""Faster linear layers for decoding on the CPU: oneDNN with weights prepacked once per call.

At decode shapes (a few dozen rows) `torch.nn.functional.linear` (MKL) on the benchmark machine's
AMD CPU runs well below its matmul peak. The same product through oneDNN with the weight reordered
once into its blocked layout (`torch.ops.mkldnn._reorder_linear_weight` + `_linear_pointwise`, the
path `torch.compile` takes for CPU linears) measured, 2 threads, minimum of repeats:

| rows | layer (out x in) | F.linear | oneDNN packed |
|---|---|---|---|
| 8  | 49152 x 576 (SmolLM2 head) | 44 ms | 9.4 ms |
| 32 | 49152 x 576 | 61 ms | 25 ms |
| 32 | 1536 x 576 (MLP up) | 1.07 ms | 0.80 ms |
| 32 | 576 x 1536 (MLP down) | 1.03 ms | 0.90 ms |
| 32 | 576 x 576 | 0.33 ms | 0.31 ms |
| 32 | 192 x 576, 256 x 256 | 0.12, 0.07 ms | 0.13, 0.09 ms (slower) |

(numpy's OpenBLAS, suggested in BENCHMARK.md, took 31 ms and 88 ms for the head at 8 and 32 rows:
better than F.linear, worse than oneDNN.) So `fast_linears(model)` routes every plain `nn.Linear`
with at least `MIN_NUMEL` weights through oneDNN for the duration of one generation call: the
output layer, and in Llama-like models the MLP and the larger attention projections. It swaps the
module's `forward` only (the model's own code around it runs unchanged), and only for float32 weights
on the CPU.

A PEFT LoRA layer with plain adapters is packed as one product: the frozen weight plus the active
adapters' `get_delta_weight` (W + scaling * B @ A, what `merge_adapter` would write, but into the
packed copy, so the model's weights are never touched). Decoding then skips PEFT's per-layer Python
and the two rank-r products: SmolLM2-135M with LoRA r 16 on all linear layers generated 24 tokens for
8 prompts in 3.5 s instead of 4.1 s (greedy tokens identical, log-probs within 3e-5). With the
adapters disabled (the reference policy), or for adapter variants such as DoRA, the wrapper runs as
PEFT wrote it and only its frozen `base_layer` is packed.

The packed copies are made when the block is entered (about 0.25 s for SmolLM2-135M) and dropped
when it exits, so peak memory during a call is the weights twice over; nothing is kept between
calls, so an optimiser step between two calls can never leave a stale copy. The results are the same
float32 products up to rounding (~1e-6 relative).
"""

from __future__ import annotations

import contextlib

import torch

# Layers with fewer weights than this were not faster through oneDNN (see the table); the tests
# lower it to exercise the path on tiny models.
MIN_NUMEL = 1 << 18


def _available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _plain_linear(module) -> bool:
    if type(module) is not torch.nn.Linear or "forward" in module.__dict__:  # e.g. accelerate hooks
        return False
    w = module.weight
    return w.device.type == "cpu" and w.dtype == torch.float32 and w.numel() >= MIN_NUMEL


def _lora_weight(module) -> torch.Tensor | None:
    """W + the active adapters' deltas for a PEFT LoRA linear with plain adapters on; else None."""
    if not hasattr(module, "get_delta_weight") or not isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict):
        return None
    active = [k for k in module.active_adapters if k in module.lora_A]
    variants = getattr(module, "lora_variant", None)  # DoRA and the like; absent: an unknown PEFT, leave it be
    if (variants is None or module.disable_adapters or module.merged or "forward" in module.__dict__
            or not _plain_linear(module.base_layer)
            or any(k in variants or module.lora_B[k].bias is not None for k in active)):
        return None
    weight = module.base_layer.weight.detach()
    for k in active:
        weight = weight + module.get_delta_weight(k).detach()
    return weight


def _packed_forward(module, weight: torch.Tensor, bias: torch.Tensor | None):
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs or x.dtype != torch.float32:  # not the plain float32 call we packed for
            return type(module).forward(module, x, *args, **kwargs)
        flat = x.reshape(-1, x.shape[-1]).contiguous()  # (N, in)
        out = torch.ops.mkldnn._linear_pointwise(flat, packed, bias, "none", [], "")  # (N, out)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    return forward


@contextlib.contextmanager
def fast_linears(model, enabled: bool = True):
    """Within the block (no grad), `model`'s large float32 CPU linear layers run through oneDNN."""
    patched, inside = [], set()  # inside: the layers of a LoRA wrapper packed as one product
    try:
        for m in model.modules() if enabled and _available() else ():
            if m in inside:
                continue
            lora = _lora_weight(m)
            if lora is not None:
                inside.update(m.modules())
                m.forward = _packed_forward(m, lora, m.base_layer.bias)
            elif _plain_linear(m):
                m.forward = _packed_forward(m, m.weight.detach(), m.bias)
            else:
                continue
            patched.append(m)
        yield len(patched)
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)
