"""A KV cache that writes into preallocated buffers instead of concatenating at every step.

`transformers.DynamicCache` grows each layer's keys and values with `torch.cat`, which copies the
whole cache at every decode step (O(T^2) memory traffic over a generation). `BufferLayer` allocates
`capacity` positions once and writes each new key/value in place; attention reads a view of the
first `length` positions. Rows are dropped (finished sequences) or reordered (beam search) with one
`index_select` per layer.

Only used for models whose layers are all plain full-attention layers (no sliding window, no
linear attention); `make_cache` falls back to the model's own `DynamicCache` otherwise.
"""

from __future__ import annotations

import functools

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class BufferLayer(DynamicLayer):
    """One layer's keys/values (B, H, capacity, D) of which the first `length` positions are filled."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, n, _ = key_states.shape
        cap = max(self.capacity, n)
        self._k = key_states.new_empty(b, h, cap, key_states.shape[-1])
        self._v = value_states.new_empty(b, value_states.shape[1], cap, value_states.shape[-1])
        self.is_initialized = True

    def _grow(self, needed: int) -> None:
        cap = max(needed, 2 * self._k.shape[2])
        for name in ("_k", "_v"):
            old = getattr(self, name)
            new = old.new_empty(old.shape[0], old.shape[1], cap, old.shape[3])
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)

    def _set_views(self) -> None:
        self.keys = self._k[:, :, : self.length]
        self.values = self._v[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self._k.shape[2]:
            self._grow(end)
        self._k[:, :, self.length : end] = key_states
        self._v[:, :, self.length : end] = value_states
        self.length = end
        self._set_views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        self.length = 0
        self._k = self._v = self.keys = self.values = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        if self.is_initialized and tokens_to_remove:
            self.length = max(0, self.length + tokens_to_remove)
            self._set_views()

    def _select(self, fn) -> None:
        if self.is_initialized:
            self._k, self._v = fn(self._k), fn(self._v)
            self._set_views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(lambda t: t.index_select(0, indices.to(t.device)))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(lambda t: t.repeat_interleave(repeats, dim=0))


def _all_full_attention(config) -> bool:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    types = getattr(text, "layer_types", None)
    if types is not None and any(t != "full_attention" for t in types):
        return False
    return getattr(text, "sliding_window", None) is None


def make_cache(config, capacity: int) -> DynamicCache:
    """A cache for about `capacity` positions: buffer layers when every layer is full attention, else HF's own.

    The buffer layers are created lazily, one per attention layer that calls `update` (like HF's
    `DynamicCache()` without a config); they grow by doubling if `capacity` is exceeded.
    """
    if config is None or not _all_full_attention(config):
        return DynamicCache(config=config)
    cache = DynamicCache()
    cache.layer_class_to_replicate = functools.partial(BufferLayer, capacity)
    return cache
