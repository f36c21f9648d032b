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

Projections that one module applies to the same input (`SIBLINGS`: attention's q, k, v; a gated
MLP's gate and up) are packed side by side as one product when together they reach `MIN_NUMEL`:
the first of them to be called computes all the outputs and the others take theirs (checked by the
identity of the input tensor). SmolLM2's 192 x 576 k and v projections, too small alone, then ride
along with q, and the gated MLP runs one product instead of two: SmolLM2-135M with LoRA r 16 generated
exactly 24 tokens for 8 prompts of about 10 tokens in 2.53-2.59 s instead of 2.80-2.93 s (two interleaved
runs each).

A PEFT LoRA layer with plain adapters is packed as one product: the frozen weight plus the active
adapters' `get_delta_weight` (W + scaling * B @ A, what `merge_adapter` would write, but into the
packed copy, so the model's weights are never touched). Decoding then skips PEFT's per-layer Python
and the two rank-r products: SmolLM2-135M with LoRA r 16 on all linear layers generated 24 tokens for
8 prompts in 3.5 s instead of 4.1 s (greedy tokens identical, log-probs within 3e-5). With the
adapters disabled (the reference policy) the product is the frozen base weight alone; for adapter
variants such as DoRA the wrapper runs as PEFT wrote it and only its frozen `base_layer` is packed.

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

# Projections that one module applies to the same input (attention, gated MLP), by attribute name.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _plain_linear(module) -> bool:
    if type(module) is not torch.nn.Linear or "forward" in module.__dict__:  # e.g. accelerate hooks
        return False
    w = module.weight
    return w.device.type == "cpu" and w.dtype == torch.float32


def _lora_weight(module) -> torch.Tensor | None:
    """W + the active adapters' deltas for a PEFT LoRA linear with plain adapters on (W alone with the adapters
    disabled, as PEFT then runs the base layer alone); else None."""
    if not hasattr(module, "get_delta_weight") or not isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict):
        return None
    variants = getattr(module, "lora_variant", None)  # DoRA and the like; absent: an unknown PEFT, leave it be
    if variants is None or module.merged or "forward" in module.__dict__ or not _plain_linear(module.base_layer):
        return None
    weight = module.base_layer.weight.detach()
    if module.disable_adapters:
        return weight
    active = [k for k in module.active_adapters if k in module.lora_A]
    if any(k in variants or module.lora_B[k].bias is not None for k in active):
        return None
    for k in active:
        weight = weight + module.get_delta_weight(k).detach()
    return weight


def _product(module):
    """(weight, bias) of the product a plain float32 CPU linear or a packable LoRA linear computes; else None."""
    if module is None:
        return None
    lora = _lora_weight(module)
    if lora is not None:
        return lora, module.base_layer.bias
    return (module.weight.detach(), module.bias) if _plain_linear(module) else None


def _siblings(module) -> list | None:
    """The members of a `SIBLINGS` group of `module` that can be packed as one product, else None."""
    for names in SIBLINGS:
        members = [getattr(module, n, None) for n in names]
        products = [_product(m) for m in members]
        if (all(products) and len({w.shape[1] for w, _ in products}) == 1
                and len({b is None for _, b in products}) == 1 and sum(w.numel() for w, _ in products) >= MIN_NUMEL):
            return list(zip(members, products))
    return None


def _linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1]).contiguous()  # (N, in)
    out = torch.ops.mkldnn._linear_pointwise(flat, packed, bias, "none", [], "")  # (N, out)
    return out.reshape(*x.shape[:-1], out.shape[-1])


class Product:
    """x -> the outputs of the linear layers `members` for x, side by side (..., sum of `sizes`): one float32
    product of their weights concatenated, prepacked for oneDNN when `packed` (else `torch.nn.functional.linear`).
    `pairs` are the members' (weight, bias), from `_product`: all with a bias or none."""

    def __init__(self, members: list, pairs: list, packed: bool):
        self.members = tuple(members)
        weights = [w for w, _ in pairs]
        self.sizes = [w.shape[0] for w in weights]
        weight = torch.cat(weights) if len(weights) > 1 else weights[0]
        self.packed = packed
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, None) if packed else weight
        self.bias = None if pairs[0][1] is None else torch.cat([b for _, b in pairs]).detach()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return _linear(x, self.weight, self.bias)
        return torch.nn.functional.linear(x, self.weight, self.bias)


def product_of(members: tuple, products: dict) -> Product | None:
    """One product for `members` applied to the same input: the packed one `fast_linears` made when it packed
    exactly these layers together, else one packed now (plain `F.linear` without oneDNN); None when a member is
    not a float32 CPU linear layer (or a packable LoRA one), or the members differ in input size or in having a
    bias. (Inside a decode step even the small products ran faster packed than through `F.linear`.)"""
    product = products.get(members[0])
    if product is not None and product.members == members:
        return product
    pairs = [_product(m) for m in members]
    if not all(pairs) or len({w.shape[1] for w, _ in pairs}) > 1 or len({b is None for _, b in pairs}) > 1:
        return None
    return Product(members, pairs, packed=_available())


def _packed_forwards(product: Product) -> list:
    """Forwards for the members of the packed `product`.

    The first member called with an input computes every member's output; the others, called next
    with that same tensor (as attention does q, k, v), take theirs instead of computing it again.
    A call with another input, or a second call for the same output, computes the product afresh.
    (This assumes the model does not modify that input in place between the calls; none does.)
    """
    pending: dict = {}  # "x": the last input, "out": {member: output} not yet taken

    def make(i: int, module):
        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if args or kwargs or x.dtype != torch.float32:  # not the plain float32 call we packed for
                return type(module).forward(module, x, *args, **kwargs)
            if pending.get("x") is x and i in pending["out"]:
                return pending["out"].pop(i)
            outs = [o.contiguous() for o in product(x).split(product.sizes, dim=-1)]
            pending.update(x=x, out={j: o for j, o in enumerate(outs) if j != i})
            return outs[i]

        return forward

    return [make(i, m) for i, m in enumerate(product.members)]


@contextlib.contextmanager
def fast_linears(model):
    """Within the block (no grad), `model`'s large float32 CPU linear layers run through oneDNN. Yields
    {layer: its packed Product} (the decode step of `rollout.decode_step` calls them directly)."""
    products, inside = {}, set()  # inside: layers of a packed group or LoRA wrapper, already handled
    try:
        for m in model.modules() if _available() else ():
            if m in inside:
                continue
            group = _siblings(m)
            if group is None:
                pair = _product(m)
                if pair is None or pair[0].numel() < MIN_NUMEL:
                    continue
                group = [(m, pair)]
            product = Product([member for member, _ in group], [pair for _, pair in group], packed=True)
            for member, forward in zip(product.members, _packed_forwards(product)):
                inside.update(member.modules())
                member.forward = forward
                products[member] = product
        yield products
    finally:
        for m in products:
            m.__dict__.pop("forward", None)
