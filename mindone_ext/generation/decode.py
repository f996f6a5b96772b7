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
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

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

        self.step_function = step  # what a CachePool compiles over its own buffers
        self._step = ms.jit(step)  # compiled once per input shape: a chunk, a small piece, one token
        self.pool = None  # a CachePool: single-row caches are its rows (use_pool)

    def use_pool(self, rows, dtype):
        """From now on, single-row caches are rows of one pool of `rows` rows, whose decode steps
        `decode_many` runs together (the voice server's continuous batching)."""
        self.pool = CachePool(self, rows, dtype)

    def allocate(self, batch, slots, dtype):
        if self.pool is not None and batch == 1 and dtype == self.pool.dtype:
            cache = self.pool.take(cache_slots(slots))
        else:
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

    def decode_requests(self, requests):
        """The decode steps `requests` (generation.DecodeRequest of loops on this runner) ->
        [(logits, hidden)]: in one batched call when their caches are rows of this runner's
        pool, else one by one."""
        caches = [r.loop.cache for r in requests]
        if self.pool is not None and all(isinstance(c, CacheRow) for c in caches):
            return self.decode_many(caches, [r.embeds for r in requests], [r.positions for r in requests])
        return [r.loop.decode(r) for r in requests]

    def decode_many(self, caches, embeds, position_ids):
        """`decode` for several rows of this runner's pool in one compiled step: per cache, its
        embeds (1, 1, E) and positions (3, 1, 1). Returns [(logits (1, V), hidden (1, 1, H))]."""
        for cache in caches:
            if cache.length >= cache.slots:
                raise ValueError(f"the KV cache is full ({cache.slots} slots)")
            cache.valid[:, cache.length] = 1
        logits, hidden = self.pool.run([c.row for c in caches], ops.cat(embeds), np.concatenate(position_ids, 1),
                                       [c.length for c in caches], 0)
        for cache in caches:
            cache.length += 1
        return [(logits[i:i + 1], hidden[i:i + 1]) for i in range(len(caches))]

    def _run(self, cache, embeds, position_ids, start, last):
        if isinstance(cache, CacheRow):
            return cache.pool.run([cache.row], embeds, position_ids, [start], last)
        shape = (embeds.shape[0], embeds.shape[1], cache.slots)
        # the message is made only for a new shape: this runs once per decoded token
        new = None if shape in self.shapes else f"the {self.name} for {shape[1]} token(s) x {shape[2]} cache slots"
        self.shapes.add(shape)
        with compiling(new):
            logits, hidden, cache.layers = self._step(
                embeds, Tensor(position_ids, ms.int32), Tensor(cache.valid), Tensor(start, ms.int32),
                Tensor([last], ms.int32), ms.mutable(cache.layers))
            return logits.asnumpy(), hidden


class CachePool:
    """Rows of one KV cache that conversations share, so that one compiled step decodes many of
    them at once. Each row has its own length; a step gathers the rows it advances, runs the
    decoder on them and writes only their new slots back, in place: the buffers are Parameters
    of a Cell, the one kind of tensor MindSpore's compiled graphs update in place (and that
    binds each compiled graph to them: growing the pool builds new buffers and new graphs).
    A last, spare row takes the padding rows of a step whose row count is rounded up."""

    def __init__(self, runner, rows, dtype):
        self.runner, self.rows, self.dtype = runner, rows, dtype
        self.valid = np.zeros((rows + 1, 0), np.int32)
        self.lengths = np.zeros(rows + 1, np.int64)
        self.free = list(range(rows))
        self.buffers = None
        self.grow(MIN_CACHE_SLOTS)

    @property
    def slots(self):
        return self.valid.shape[1]

    @property
    def in_use(self):
        return self.rows - len(self.free)

    def take(self, slots):
        if not self.free:
            raise CacheFull(f"all {self.rows} rows of the {self.runner.name}'s cache pool are in use")
        self.grow(slots)
        return CacheRow(self, self.free.pop(0))

    def give_back(self, row):
        self.valid[row] = 0
        self.lengths[row] = 0
        self.free.append(row)

    def grow(self, slots):
        """At least `slots` slots per row, the written ones kept."""
        if slots <= self.slots:
            return
        old = self.buffers
        self.buffers = PoolBuffers(self.runner, self.rows + 1, slots, self.dtype, old)
        self.valid = np.concatenate([self.valid, np.zeros((self.rows + 1, slots - self.slots), np.int32)], 1)

    def run(self, rows, embeds, position_ids, starts, last):
        """One compiled step over `rows`: embeds (n, T, E) written at slots starts[i].. of row
        rows[i] (T > 1: one row). Rows are padded with the spare row to a power of two."""
        n, t = embeds.shape[0], embeds.shape[1]
        width = 1 << (n - 1).bit_length()
        spare = self.rows
        rows = list(rows) + [spare] * (width - n)
        starts = np.asarray(list(starts) + [self.slots] * (width - n), np.int64)
        if width > n:
            embeds = ops.cat((embeds, ops.zeros((width - n,) + tuple(embeds.shape[1:]), embeds.dtype)))
            position_ids = np.concatenate([position_ids, np.zeros((3, width - n, t), position_ids.dtype)], 1)
        # the new keys' slots: read from the step's rows, written to the pool's (slots past the
        # end, of padded tokens or padding rows, go to slot 0 of the spare row)
        slot = starts[:, None] + np.arange(t)[None]  # (width, T)
        kept = slot < self.slots
        target = np.where(kept, np.asarray(rows)[:, None], spare)
        read, write = (self._slot_index(first, np.where(kept, slot, 0))
                       for first in (np.broadcast_to(np.arange(width)[:, None], kept.shape), target))
        shape = (width, t, self.slots)
        compiled = self.buffers.shapes  # graphs are bound to the buffers: grown buffers compile anew
        new = None if shape in compiled else f"the {self.runner.name} for {width} row(s) x {t} token(s) x {self.slots} slots"
        compiled.add(shape)
        self.runner.shapes.add(shape)
        with compiling(new):
            logits, hidden = self.buffers.step(
                embeds, Tensor(position_ids, ms.int32), Tensor(self.valid[rows]), Tensor(starts, ms.int32),
                Tensor([last], ms.int32), Tensor(np.asarray(rows, np.int32)), Tensor(read, ms.int32),
                Tensor(write, ms.int32))
        return logits.asnumpy()[:n], hidden[:n] if width > n else hidden

    def _slot_index(self, rows, slots):
        """(row, head, slot) triples of every KV head at rows[i, j], slots[i, j] (both (n, T))."""
        heads = np.arange(self.runner.kv_heads)[None, :, None]
        return np.stack(np.broadcast_arrays(rows[:, None, :], heads, slots[:, None, :]), -1).reshape(-1, 3)


class PoolBuffers(nn.Cell):
    """A pool's key and value buffers (rows, KV heads, slots, head size) per layer, and the
    compiled step over them (see CachePool)."""

    def __init__(self, runner, rows, slots, dtype, old=None):
        super().__init__()
        shape = (rows, runner.kv_heads, slots, runner.head_dim)

        def buffer(name, i):
            data = ops.zeros(shape, dtype)
            if old is not None:  # keep what the rows hold
                before = getattr(old, name)[i]
                data = ops.cat((before, data[:, :, before.shape[2]:]), 2)
            return Parameter(data, name=f"{runner.name}_pool{id(self)}_{name}{i}", requires_grad=False)

        self.keys = ParameterTuple([buffer("keys", i) for i in range(runner.num_layers)])
        self.values = ParameterTuple([buffer("values", i) for i in range(runner.num_layers)])
        self.function = runner.step_function
        self.step = ms.jit(self.run)
        self.shapes = set()  # (rows, tokens, slots) compiled over these buffers

    def run(self, embeds, position_ids, valid, start, last_index, rows, read, write):
        layers = tuple((ops.gather(k, rows, 0), ops.gather(v, rows, 0)) for k, v in zip(self.keys, self.values))
        logits, hidden, presents = self.function(embeds, position_ids, valid, start, last_index, layers)
        for (k, v), (new_k, new_v) in zip(zip(self.keys, self.values), presents):
            ops.scatter_nd_update(k, write, ops.gather_nd(new_k, read))
            ops.scatter_nd_update(v, write, ops.gather_nd(new_v, read))
        return logits, hidden


class CacheFull(RuntimeError):
    """Every row of a cache pool is taken."""


class CacheRow:
    """One conversation's row of a CachePool, used where a StaticCache of batch 1 is."""

    def __init__(self, pool, row):
        self.pool, self.row = pool, row
        self.released = False

    @property
    def length(self):
        return int(self.pool.lengths[self.row])

    @length.setter
    def length(self, value):
        self.pool.lengths[self.row] = value

    @property
    def valid(self):
        return self.pool.valid[self.row:self.row + 1]

    @property
    def slots(self):
        return self.pool.slots

    @property
    def layers(self):
        """Truthy while the row is held (as a StaticCache's buffers are)."""
        return () if self.released else (self.row,)

    def grow(self, slots):
        self.pool.grow(slots)

    def truncate(self, length):
        self.pool.valid[self.row, length:] = 0
        self.length = length

    def release(self):
        if not self.released:
            self.released = True
            self.pool.give_back(self.row)
