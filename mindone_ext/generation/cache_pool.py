"""The KV caches the compiled decoder steps write: rows of a CachePool, whose buffers (Parameters)
the steps write in place (see nn.kv_cache). The rows of one batch (or one conversation) are a pool
of their own; in the voice server one row per conversation of a pool shared by all
(CompiledDecoder.use_pool), decoded together. Caches come in powers of two (cache_slots), so a
pool compiles few step graphs whatever lengths it holds.
"""
from typing import NamedTuple

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, ops

from ..nn.kv_cache import step_mask
from ..utils.notice import compiling

MIN_CACHE_SLOTS = 256


def cache_slots(n):
    """Slots for a cache that must hold `n` tokens: the next power of two, at least MIN_CACHE_SLOTS."""
    return max(MIN_CACHE_SLOTS, 1 << max(int(n) - 1, 0).bit_length())


class TokenLookup(NamedTuple):
    """A decode step's input still to be looked up: the rows `ids` (B, 1) of `embedding` (an
    nn.Embedding), `plus` (B, 1, E) added when given. The step's graph looks them up itself (one
    graph call a token instead of two: a separate lookup took ~0.15-0.4 ms a call) and returns
    them beside its logits."""
    embedding: object
    ids: np.ndarray
    plus: object = None


class CachePool:
    """Rows of KV cache buffers that one set of compiled steps serves; each row has its own
    length. A step over every row in order reads the buffers as they are; a step over some rows
    (a shared pool: conversations come and go) gathers them, padded with a last, spare row to a
    power of two. Either way only the new slots are written, in place: the buffers are
    Parameters (PoolBuffers), given to the compiled steps as inputs, so pools of one shape share
    their graphs (a grown pool runs the graphs of its new shape)."""

    def __init__(self, runner, rows, dtype, slots=MIN_CACHE_SLOTS, spare=False):
        self.runner, self.rows, self.dtype = runner, rows, dtype
        self.spare = rows if spare else None
        total = rows + bool(spare)
        self.valid = np.zeros((total, 0), np.int32)
        self.lengths = np.zeros(total, np.int64)
        self.free = list(range(rows))
        self.buffers = None
        self.grow(slots)

    @property
    def slots(self):
        return self.valid.shape[1]

    @property
    def in_use(self):
        return self.rows - len(self.free)

    @property
    def nbytes(self):
        """Memory of the buffers (the spare row included)."""
        return self.valid.shape[0] * self.runner.row_bytes(self.slots, self.dtype)

    def take(self, slots):
        """One free row, as a cache with room for `slots` tokens."""
        if not self.free:
            raise CacheFull(f"all {self.rows} rows of the {self.runner.name}'s cache pool are in use")
        self.grow(slots)
        return PoolCache(self, [self.free.pop(0)])

    def take_all(self):
        rows, self.free = self.free, []
        return rows

    def give_back(self, rows):
        self.valid[rows] = 0
        self.lengths[rows] = 0
        self.free.extend(rows)

    def grow(self, slots):
        """At least `slots` slots per row, the written ones kept."""
        if slots <= self.slots:
            return
        total = self.valid.shape[0]
        old, self.buffers = self.buffers, PoolBuffers(self.runner, total, slots, self.dtype)
        if old is not None:
            self.buffers.load(old)
        self.valid = np.concatenate([self.valid, np.zeros((total, slots - self.slots), np.int32)], 1)

    def run(self, rows, embeds, position_ids, starts, last, padded_rows=1):
        """One compiled step over `rows`: embeds (n, T, E) written at slots starts[i].. of row
        rows[i]; the logits are those of token last[i] of row i (`last` a list, or one index for all).
        A shared pool's step runs at least `padded_rows` rows (padding rows may already be in
        `embeds`). `embeds` may instead be a TokenLookup of one token a row, which the step looks
        up and returns third."""
        lookup = isinstance(embeds, TokenLookup)
        n, t = len(rows), 1 if lookup else embeds.shape[1]
        last = [last] * n if np.ndim(last) == 0 else list(last)
        whole = self.spare is None  # such a pool's caches are all its rows, stepped together
        width = n if whole else max(1 << (n - 1).bit_length(), padded_rows)
        missing = width - (n if lookup else embeds.shape[0])
        source = _lookup_inputs(embeds, missing) if lookup else _padded(embeds, missing)
        if missing > 0:
            position_ids = np.concatenate([position_ids, np.zeros((3, missing, t), position_ids.dtype)], 1)
        rows = np.asarray(list(rows) + [self.spare] * (width - n))
        starts = np.asarray(list(starts) + [self.slots] * (width - n))
        pick, slots = self._write_plan(rows, starts, t)
        # pieces attend to the slots up to their rows' furthest end, rounded up to a power of two
        # (one graph per size: a long prompt's early pieces do not attend to the whole cache, nor
        # short conversations' pieces to a pool a long one grew); a decode step to all
        span = self.slots if t == 1 else min(self.slots, cache_slots(int(starts[:n].max()) + t))
        shape = (width, t, span)
        graph = (whole, self.buffers.view, shape, lookup)  # pools of one shape share their graphs
        rows_note = f" for {width} rows" if width > 1 else ""
        new = None if graph in self.runner.graphs_run else \
            f"the {self.runner.name} for {t} token(s) x {span} cache slots{rows_note}"
        self.runner.graphs_run.add(graph)
        self.runner.shapes.add(shape)
        with compiling(new):
            outputs = self.runner.run_step(self.buffers, whole, (
                source, Tensor(position_ids, ms.int32), Tensor(step_mask(self.valid[rows, :span], starts, t)),
                Tensor(np.arange(width, dtype=np.int32) * t + np.asarray(last + [0] * (width - n), np.int32)),
                Tensor(rows.astype(np.int32)), Tensor(pick), Tensor(slots)))
        return (outputs[0].asnumpy()[:n],) + tuple(out[:n] if width > n else out for out in outputs[1:])

    def _write_plan(self, rows, starts, t):
        """Where a step's new keys go: for each (row, KV head, token), the flat index of the new
        vector it takes (`pick`) and of the buffer slot it is written to (`slots`). A token past
        its row's last slot repeats the row's last token within it; padding rows (start at the
        end) write slot 0 of the spare row, which nothing reads."""
        width, heads = len(rows), self.runner.kv_heads
        token = np.minimum(np.arange(t)[None], np.clip(self.slots - 1 - starts, 0, t - 1)[:, None])  # (width, T)
        slot = np.where(starts[:, None] < self.slots, starts[:, None] + token, 0)
        head = np.arange(heads)[None, :, None]
        pick = (np.arange(width)[:, None, None] * heads + head) * t + token[:, None, :]
        slots = (rows[:, None, None] * heads + head) * self.slots + slot[:, None, :]
        return pick.reshape(-1).astype(np.int32), slots.reshape(-1).astype(np.int32)


def _padded(rows, missing):
    """`rows` (a tensor) followed by `missing` rows of zeros."""
    return rows if missing <= 0 else ops.cat((rows, ops.zeros((missing,) + tuple(rows.shape[1:]), rows.dtype)))


def _lookup_inputs(lookup, missing):
    """A step's (table, ids[, plus]) for `lookup`, with `missing` padding rows (id 0, nothing added);
    the table is the Parameter itself, read where it lies."""
    ids = np.asarray(lookup.ids, np.int32)
    if missing > 0:
        ids = np.concatenate([ids, np.zeros((missing,) + ids.shape[1:], np.int32)])
    source = (lookup.embedding.weight, Tensor(ids))
    return source if lookup.plus is None else source + (_padded(lookup.plus, missing),)


class PoolBuffers:
    """A pool's key and value buffers per layer, each (rows x KV heads x slots, head size) (flat:
    see nn.kv_cache), Parameters: the one kind of graph input MindSpore's compiled graphs (loaded
    ones too) write in place without copying the whole buffer (measured: a Tensor over the same
    storage is copied, ~50 ms for 512 MB on this CPU)."""

    def __init__(self, runner, rows, slots, dtype):
        self.view = (rows, runner.kv_heads, slots, runner.head_dim)

        def buffer(name, i):
            return Parameter(ops.zeros((rows * runner.kv_heads * slots, runner.head_dim), dtype),
                             name=f"{runner.name}_pool{id(self)}_{name}{i}", requires_grad=False)

        self.keys = tuple(buffer("keys", i) for i in range(runner.num_layers))
        self.values = tuple(buffer("values", i) for i in range(runner.num_layers))

    def load(self, old):
        """Copy what `old` (as many rows, fewer slots) holds into the first slots, in place."""
        for mine, theirs in zip(self.keys + self.values, old.keys + old.values):
            before = theirs.reshape(old.view)
            after = ops.zeros(self.view[:2] + (self.view[2] - old.view[2], self.view[3]), before.dtype)
            ops.assign(mine, ops.cat((before, after), 2).reshape(mine.shape))


class CacheFull(RuntimeError):
    """Every row of a cache pool is taken."""


class PoolCache:
    """A cache: some rows of a CachePool (a batch's sequences, or one conversation's row), all
    at the same length (prompts are left padded)."""

    def __init__(self, pool, rows):
        self.pool, self.rows = pool, rows
        self.released = False

    @property
    def length(self):
        return int(self.pool.lengths[self.rows[0]])

    @length.setter
    def length(self, value):
        self.pool.lengths[self.rows] = value

    @property
    def valid(self):
        """(rows, slots) int32, 1 where a slot holds a real token; a view callers write into."""
        first = self.rows[0]
        return self.pool.valid[first:first + len(self.rows)]

    @property
    def slots(self):
        return self.pool.slots

    def grow(self, slots):
        """Room for `slots` tokens: a shared pool grows every row; a cache in a pool of its own
        moves to a (kept or new) pool of the larger size, leaving this one for the next cache of
        its size (a pool grown in place would be lost to that size, and a new one made each time)."""
        pool = self.pool
        if pool.spare is not None or slots <= pool.slots:
            pool.grow(slots)
            return
        bigger = pool.runner.free_pool(pool.rows, slots, pool.dtype)
        rows = bigger.take_all()
        bigger.buffers.load(pool.buffers)
        bigger.valid[:, :pool.slots] = pool.valid
        bigger.lengths[:] = pool.lengths
        pool.give_back(self.rows)
        self.pool, self.rows = bigger, rows

    def truncate(self, length):
        """Forget the slots from `length` on (they are overwritten by the next writes)."""
        self.pool.valid[self.rows, length:] = 0
        self.length = length

    def release(self):
        if not self.released:
            self.released = True
            self.pool.give_back(self.rows)
