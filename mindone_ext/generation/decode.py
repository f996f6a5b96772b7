"""Static-cache decoding for a Qwen2Decoder + head: a bucketed prefill and a fixed-shape decode
step, each compiled once per shape with `mindspore.jit` and reused for every token."""
import weakref

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from ..nn.kv_cache import StaticCache
from ..nn.decoder import head_dim_of

PREFILL_BUCKET = 32  # smallest prompt bucket
CACHE_BUCKET = 128  # smallest cache bucket


def round_up(n, multiple):
    return -(-n // multiple) * multiple


def bucket(n, smallest):
    """Round `n` up to one of 8 sizes per power of two (at most 12.5% padding), so that a
    handful of compiled shapes serve every length."""
    step = max(smallest, (1 << max(int(n) - 1, 1).bit_length()) // 8)
    return round_up(n, step)


class CompiledDecoder:
    """Owns the compiled graphs for one decoder: `input_proj` (optional) -> decoder -> `head`.
    The graphs are pure functions of (input embeddings, positions, valid slots, write position,
    cache buffers) -> (float32 logits of the last position, hidden states, buffers)."""

    def __init__(self, decoder, head, config, input_proj=None):
        self.decoder, self.head = decoder, head
        self.num_layers = config.num_hidden_layers
        self.kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        self._caches = []  # weak references to the caches handed out

        def step(embeds, position_ids, valid, start, last_index, layers):
            if input_proj is not None:
                embeds = input_proj(embeds)
            hidden, presents = decoder(embeds, position_ids, valid, layers, start)
            last = ops.gather(hidden, last_index, 1)
            return head(last)[:, 0].astype(ms.float32), hidden, presents

        self._step = ms.jit(step)  # compiled once per input shape: each prompt bucket, and one token

    def allocate(self, batch, slots, dtype):
        cache = StaticCache.allocate(self.num_layers, batch, self.kv_heads, bucket(slots, CACHE_BUCKET),
                                     self.head_dim, dtype)
        self._caches = [ref for ref in self._caches if ref() is not None] + [weakref.ref(cache)]
        return cache

    def caches_in_use(self):
        """Caches allocated here and not yet released (a closed stream must leave none)."""
        return sum(1 for ref in self._caches if ref() is not None and ref().layers)

    def reserve(self, cache, slots):
        """Make room for `slots` tokens in all, growing the cache (to a bucketed size) if needed."""
        if slots > cache.slots:
            cache.grow(bucket(slots, CACHE_BUCKET))

    def prefill(self, cache, embeds, position_ids, attention_mask):
        """Write a left-padded prompt (B, T, E) at slots 0..T-1 (see `extend`)."""
        cache.length = 0
        return self.extend(cache, embeds, position_ids, attention_mask)

    def extend(self, cache, embeds, position_ids, attention_mask=None):
        """Write (B, T, E) at slots cache.length.. : a prompt, or the next piece of one (a
        conversation prefilled as it arrives). Returns last-token logits (B, V) as numpy and the
        piece's hidden states (B, T, H). The piece is right-padded to a bucket length with invalid
        slots so a handful of graphs serve all lengths and offsets."""
        b, t, e = embeds.shape
        start = cache.length
        if start + t > cache.slots:
            raise ValueError(f"the KV cache is full ({cache.slots} slots, {start} used, {t} more asked)")
        padded = min(bucket(t, PREFILL_BUCKET), cache.slots - start)
        if padded > t:
            embeds = ops.cat((embeds, ops.zeros((b, padded - t, e), embeds.dtype)), 1)
            position_ids = np.concatenate([position_ids, np.zeros((3, b, padded - t), position_ids.dtype)], -1)
        cache.valid[:, start:start + t] = 1 if attention_mask is None else attention_mask
        logits, hidden, cache.layers = self._step(
            embeds, Tensor(position_ids, ms.int32), Tensor(cache.valid), Tensor(start, ms.int32),
            Tensor([t - 1], ms.int32), ms.mutable(cache.layers))
        cache.length = start + t
        return logits.asnumpy(), hidden[:, :t]

    def decode(self, cache, embeds, position_ids):
        """One token per row (embeds (B, 1, E)) at slot `cache.length`."""
        if cache.length >= cache.slots:
            raise ValueError(f"the KV cache is full ({cache.slots} slots)")
        cache.valid[:, cache.length] = 1
        logits, hidden, cache.layers = self._step(
            embeds, Tensor(position_ids, ms.int32), Tensor(cache.valid), Tensor(cache.length, ms.int32),
            Tensor([0], ms.int32), ms.mutable(cache.layers))
        cache.length += 1
        return logits.asnumpy(), hidden
