"""Static-cache decoding for a Qwen2Decoder + head: prefill in fixed-size chunks and a
fixed-shape decode step, each compiled once per shape with `mindspore.jit` and reused.

MindSpore's CPU backend keeps every compiled graph (and its activations) allocated for the life of
the process, so the set of shapes is kept small by construction: prompts of any length run as
chunks of PREFILL_CHUNK tokens (a piece of at most SMALL_PIECE tokens in a graph of that width),
and caches come in powers of two. A model then compiles at most 3 graphs per cache size, whatever
prompts it is given, and a prefill's activations are bounded by one chunk.
"""
import weakref

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from ..nn.decoder import head_dim_of
from ..nn.kv_cache import StaticCache
from ..utils.notice import compiling
from ..utils.quiet import quiet_expected_recompiles

PREFILL_CHUNK = 128  # tokens per prefill step
SMALL_PIECE = 32  # a piece this short (a text turn, an audio window) runs in a graph of this width
MIN_CACHE_SLOTS = 256


quiet_expected_recompiles()


def round_up(n, multiple):
    return -(-n // multiple) * multiple


def bucket(n, smallest):
    """Round `n` up to one of 8 sizes per power of two (at most 12.5% padding), so that a
    handful of compiled shapes serve every length."""
    step = max(smallest, (1 << max(int(n) - 1, 1).bit_length()) // 8)
    return round_up(n, step)


def cache_slots(n):
    """Slots for a cache that must hold `n` tokens: the next power of two, at least MIN_CACHE_SLOTS."""
    return max(MIN_CACHE_SLOTS, 1 << max(int(n) - 1, 0).bit_length())


class CompiledDecoder:
    """Owns the compiled graphs for one decoder: `input_proj` (optional) -> decoder -> `head`.
    The graphs are pure functions of (input embeddings, positions, valid slots, write position,
    cache buffers) -> (float32 logits of the last position, hidden states, buffers)."""

    def __init__(self, decoder, head, config, input_proj=None, name="decoder"):
        self.decoder, self.head, self.name = decoder, head, name
        self.num_layers = config.num_hidden_layers
        self.kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        self._caches = []  # weak references to the caches handed out
        self.shapes = set()  # (batch, tokens, cache slots) of every step run: one compiled graph each

        def step(embeds, position_ids, valid, start, last_index, layers):
            if input_proj is not None:
                embeds = input_proj(embeds)
            hidden, presents = decoder(embeds, position_ids, valid, layers, start)
            last = ops.gather(hidden, last_index, 1)
            return head(last)[:, 0].astype(ms.float32), hidden, presents

        self._step = ms.jit(step)  # compiled once per input shape: a chunk, a small piece, one token

    def allocate(self, batch, slots, dtype):
        cache = StaticCache.allocate(self.num_layers, batch, self.kv_heads, cache_slots(slots),
                                     self.head_dim, dtype)
        self._caches = [ref for ref in self._caches if ref() is not None] + [weakref.ref(cache)]
        return cache

    def caches_in_use(self):
        """Caches allocated here and not yet released (a closed stream must leave none)."""
        return sum(1 for ref in self._caches if ref() is not None and ref().layers)

    def reserve(self, cache, slots):
        """Make room for `slots` tokens in all, growing the cache (to the next size) if needed."""
        if slots > cache.slots:
            cache.grow(cache_slots(slots))

    def prefill(self, cache, embeds, position_ids, attention_mask):
        """Write a left-padded prompt (B, T, E) at slots 0..T-1 (see `extend`)."""
        cache.length = 0
        return self.extend(cache, embeds, position_ids, attention_mask)

    def extend(self, cache, embeds, position_ids, attention_mask=None):
        """Write (B, T, E) at slots cache.length.. : a prompt, or the next piece of one (a
        conversation prefilled as it arrives), in chunks of PREFILL_CHUNK tokens. Returns the last
        token's logits (B, V) as numpy and the piece's hidden states (B, T, H)."""
        b, t, _ = embeds.shape
        if t == 0:
            raise ValueError("nothing to prefill: the piece is empty")
        if cache.length + t > cache.slots:
            raise ValueError(f"the KV cache is full ({cache.slots} slots, {cache.length} used, {t} more asked)")
        mask = np.ones((b, t), np.int32) if attention_mask is None else np.asarray(attention_mask, np.int32)
        hidden = []
        for lo in range(0, t, PREFILL_CHUNK):
            hi = min(t, lo + PREFILL_CHUNK)
            logits, piece = self._extend_chunk(cache, embeds[:, lo:hi], position_ids[..., lo:hi], mask[:, lo:hi])
            hidden.append(piece)
        return logits, hidden[0] if len(hidden) == 1 else ops.cat(hidden, 1)

    def _extend_chunk(self, cache, embeds, position_ids, mask):
        """At most PREFILL_CHUNK tokens, right-padded with invalid slots to SMALL_PIECE or
        PREFILL_CHUNK (padded keys written past the cache's end are dropped by `write_kv`)."""
        b, t, e = embeds.shape
        start = cache.length
        width = SMALL_PIECE if t <= SMALL_PIECE else PREFILL_CHUNK
        if width > t:
            embeds = ops.cat((embeds, ops.zeros((b, width - t, e), embeds.dtype)), 1)
            position_ids = np.concatenate([position_ids, np.zeros((3, b, width - t), position_ids.dtype)], -1)
        cache.valid[:, start:start + t] = mask
        logits, hidden = self._run(cache, embeds, position_ids, start, t - 1)
        cache.length = start + t
        return logits, hidden[:, :t]

    def decode(self, cache, embeds, position_ids):
        """One token per row (embeds (B, 1, E)) at slot `cache.length`."""
        if cache.length >= cache.slots:
            raise ValueError(f"the KV cache is full ({cache.slots} slots)")
        cache.valid[:, cache.length] = 1
        logits, hidden = self._run(cache, embeds, position_ids, cache.length, 0)
        cache.length += 1
        return logits, hidden

    def _run(self, cache, embeds, position_ids, start, last):
        shape = (embeds.shape[0], embeds.shape[1], cache.slots)
        # the message is made only for a new shape: this runs once per decoded token
        new = None if shape in self.shapes else f"the {self.name} for {shape[1]} token(s) x {shape[2]} cache slots"
        self.shapes.add(shape)
        with compiling(new):
            logits, hidden, cache.layers = self._step(
                embeds, Tensor(position_ids, ms.int32), Tensor(cache.valid), Tensor(start, ms.int32),
                Tensor([last], ms.int32), ms.mutable(cache.layers))
            return logits.asnumpy(), hidden
