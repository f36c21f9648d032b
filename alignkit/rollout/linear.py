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
module's `forward` only (the model's own code around it runs unchanged, including LoRA wrappers,
whose frozen `base_layer` is a plain `nn.Linear`), and only for float32 weights on the CPU.

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


def _eligible(module) -> bool:
    if type(module) is not torch.nn.Linear or "forward" in module.__dict__:  # e.g. accelerate hooks
        return False
    w = module.weight
    return w.device.type == "cpu" and w.dtype == torch.float32 and w.numel() >= MIN_NUMEL


def _packed_forward(module: torch.nn.Linear, packed: torch.Tensor):
    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs or x.dtype != torch.float32:  # not the plain float32 call we packed for
            return torch.nn.functional.linear(x, module.weight, module.bias)
        flat = x.reshape(-1, x.shape[-1]).contiguous()  # (N, in)
        out = torch.ops.mkldnn._linear_pointwise(flat, packed, module.bias, "none", [], "")  # (N, out)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    return forward


@contextlib.contextmanager
def fast_linears(model, enabled: bool = True):
    """Within the block (no grad), `model`'s large float32 CPU `nn.Linear` layers run through oneDNN."""
    modules = [m for m in model.modules() if _eligible(m)] if enabled and _available() else []
    try:
        for m in modules:
            m.forward = _packed_forward(m, torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), None))
        yield len(modules)
    finally:
        for m in modules:
            m.__dict__.pop("forward", None)
