"""Static-cache decoding for a Qwen2Decoder + head: a bucketed prefill and a fixed-shape decode
step, each compiled once per shape with `mindspore.jit` and reused for every token."""
import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from ..nn.kv_cache import StaticCache
from ..nn.decoder import head_dim_of

PREFILL_BUCKET = 32  # prompt lengths are rounded up to a multiple of this
CACHE_BUCKET = 128  # cache sizes are rounded up to a multiple of this


def round_up(n, multiple):
    return -(-n // multiple) * multiple


class CompiledDecoder:
    """Owns the compiled graphs for one (decoder, head) pair. The graphs are pure functions of
    (inputs, positions, valid slots, write position, cache buffers) -> (logits, hidden, buffers)."""

    def __init__(self, decoder, head, config):
        self.decoder, self.head = decoder, head
        self.num_layers = config.num_hidden_layers
        self.kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)

        @ms.jit
        def prefill(embeds, position_ids, valid, start, last_index, layers):
            hidden, presents = decoder(embeds, position_ids, valid, layers, start)
            last = ops.gather(hidden, last_index, 1)
            return head(last)[:, 0].astype(ms.float32), last, presents

        @ms.jit
        def decode(ids, position_ids, valid, start, layers):
            hidden, presents = decoder(decoder.embed_tokens(ids), position_ids, valid, layers, start)
            return head(hidden)[:, 0].astype(ms.float32), hidden, presents

        self._prefill, self._decode = prefill, decode

    def allocate(self, batch, slots, dtype):
        return StaticCache.allocate(self.num_layers, batch, self.kv_heads, round_up(slots, CACHE_BUCKET),
                                    self.head_dim, dtype)

    def prefill(self, cache, embeds, position_ids, attention_mask):
        """Write a left-padded prompt (B, T, H) at slots 0..T-1. Returns last-token logits (B, V)
        as numpy and the last hidden state. The prompt is right-padded to a bucket length with
        invalid slots so a handful of graphs serve all prompt lengths."""
        b, t, h = embeds.shape
        padded = min(round_up(t, PREFILL_BUCKET), cache.slots)
        if padded > t:
            embeds = ops.cat((embeds, ops.zeros((b, padded - t, h), embeds.dtype)), 1)
            position_ids = np.concatenate([position_ids, np.zeros((3, b, padded - t), position_ids.dtype)], -1)
        cache.valid[:, :t] = attention_mask
        logits, hidden, cache.layers = self._prefill(
            embeds, Tensor(position_ids, ms.int32), Tensor(cache.valid), Tensor(0, ms.int32),
            Tensor([t - 1], ms.int32), ms.mutable(cache.layers))
        cache.length = t
        return logits.asnumpy(), hidden

    def decode(self, cache, ids, position_ids):
        """One token per row at slot `cache.length`."""
        if cache.length >= cache.slots:
            raise ValueError(f"the KV cache is full ({cache.slots} slots)")
        cache.valid[:, cache.length] = 1
        logits, hidden, cache.layers = self._decode(
            Tensor(ids.reshape(-1, 1), ms.int32), Tensor(position_ids, ms.int32), Tensor(cache.valid),
            Tensor(cache.length, ms.int32), ms.mutable(cache.layers))
        cache.length += 1
        return logits.asnumpy(), hidden
