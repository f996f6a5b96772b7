"""Cached decoding for a Qwen2Decoder + head: prefill in fixed-size chunks and a
fixed-shape decode step, each compiled once per shape and machine (utils/graph_cache.py: the
weights and the cache buffers are the graphs' inputs) and reused.

MindSpore's CPU backend keeps every compiled graph (and its activations) allocated for the life of
the process, so the set of shapes is kept small by construction: prompts of any length run as
chunks of PREFILL_CHUNK tokens (a piece of at most SMALL_PIECE tokens in a graph of that width),
caches come in powers of two, and a piece attends to the cache's slots up to its end rounded up to
a power of two. A pool (a cache shape) then compiles at most 2 piece graphs per power of two up
to its size and one decode step, whatever prompts it is given, and a prefill's activations are
bounded by one chunk.

Every cache is rows of a CachePool (generation/cache_pool.py), whose buffers the compiled steps
write in place.
"""
import weakref
from typing import NamedTuple

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from ..nn import ops as P
from ..nn.decoder import head_dim_of
from ..nn.decoder_kernels import DecoderKernels, cached_attention_kernel, rms_norm
from ..nn.decoder_weights import decoder_layer, layer_parts, layer_width, project, projection_parts, projection_width
from ..utils.graph_cache import StoredGraph
from ..utils.quiet import quiet_expected_recompiles
from .cache_pool import CachePool, PoolCache, TokenLookup, cache_slots

PREFILL_CHUNK = 128  # tokens per prefill step
SMALL_PIECE = 32  # a piece this short (a text turn, an audio window) runs in a graph of this width
# Pieces of several caches prefilled as one step: rows x graph width at most this many tokens (the
# step's activations' bound; 4 pieces of PREFILL_CHUNK, 16 of SMALL_PIECE), the rows a power of two
# from ROWS_TOGETHER. A turn's audio and text pieces are short: 16 in one step took 20 ms, in four
# steps of 4 rows 33 ms (the tiny Thinker; a step's cost is mostly its kernels' launches)
STEP_TOKENS = 512
ROWS_TOGETHER = 4


quiet_expected_recompiles()


def round_up(n, multiple):
    return -(-n // multiple) * multiple


def bucket(n, smallest):
    """Round `n` up to one of 8 sizes per power of two (at most 12.5% padding), so that a
    handful of compiled shapes serve every length."""
    step = max(smallest, (1 << max(int(n) - 1, 1).bit_length()) // 8)
    return round_up(n, step)


def piece_width(t):
    """The graph width a piece of `t` (<= PREFILL_CHUNK) tokens is right-padded to."""
    return SMALL_PIECE if t <= SMALL_PIECE else PREFILL_CHUNK


def check_room(cache, t):
    """ValueError unless `cache` can take a piece of `t` (> 0) more tokens."""
    if t == 0:
        raise ValueError("nothing to prefill: the piece is empty")
    if cache.length + t > cache.slots:
        raise ValueError(f"the KV cache is full ({cache.slots} slots, {cache.length} used, {t} more asked)")


class ExtendRequest(NamedTuple):
    """A piece to write after what `cache` (one row) holds: `embeds` (1, T, E) at `positions` (3, 1, T)."""
    cache: object
    embeds: object
    positions: np.ndarray


def prompt_parts(cache, embeds, positions, start=0):
    """A prompt (1, T, E) written from slot `start` (its first `start` tokens are in the cache
    already: a kept prefix) as a generator of ExtendRequests of at most PREFILL_CHUNK tokens, each
    sent back (logits, hidden) (a driver runs other work between them) -> the last logits and the
    hidden states of the tokens written, as `prefill` gives them."""
    if not 0 <= start < embeds.shape[1]:
        raise ValueError(f"a prompt of {embeds.shape[1]} tokens cannot start at slot {start}")
    cache.truncate(start)
    hidden = []
    for lo in range(start, embeds.shape[1], PREFILL_CHUNK):
        part = slice(lo, lo + PREFILL_CHUNK)
        logits, states = yield ExtendRequest(cache, embeds[:, part], positions[..., part])
        hidden.append(states)
    return logits, hidden[0] if len(hidden) == 1 else ops.cat(hidden, 1)


class CompiledDecoder:
    """Owns the compiled graphs for one decoder: `input_proj` (optional) -> decoder -> `head`.
    A step is a pure function of (input embeddings, positions, mask, cache buffers and slots,
    weights) -> (float32 logits of the last position, hidden states) that writes the new keys into
    the buffers in place; it holds no parameter, so it is stored once per machine."""

    def __init__(self, decoder, head, config, input_proj=None, name="decoder"):
        self.decoder, self.head, self.input_proj, self.name = decoder, head, input_proj, name
        self.act = config.hidden_act
        self.num_layers = config.num_hidden_layers
        self.kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        self._caches = []  # weak references to the caches handed out
        self.shapes = set()  # (rows, tokens, attended slots) of every step run
        self.graphs_run = set()  # (whole pool, buffer view, shape, input looked up): one compiled graph each
        self._rotary_spec = (self.head_dim, config.rope_theta, tuple(config.rope_scaling["mrope_section"]))
        self._graphs = {}  # (make-up, whole pool, buffer view, kernels, input kind) -> its StoredGraph
        self.pool = None  # the shared pool: single-row caches are its rows (use_pool)
        # pools of caches taken whole (a batch; one conversation without a shared pool), kept for
        # the next cache of the same shape
        self.pools = []
        self._rotary = decoder.rotary_emb  # no parameters: its table is a constant of the graph
        # the norms, gated units and decode steps' attention as native CPU kernels, for float32
        self.kernels = DecoderKernels.build(decoder.norm.weight.dtype)

    def _step_function(self, make_up, whole, view, kernels, looked_up):
        """The step graph's function for one make-up (`parts`), pool kind, buffer view, set of
        native kernels and input kind: `looked_up` None (input embeddings), else the size of
        the (table, ids[, plus]) tuple the step looks its input up from, returned third."""
        rotary = self._rotary
        proj_kind, layer_kinds, eps, head_kind = make_up
        # where each part's weights start in the flat tuple (computed here: the graph slices by constants)
        bounds = np.cumsum([0 if proj_kind is None else projection_width(proj_kind)]
                           + [layer_width(kind) for kind in layer_kinds]).tolist()

        def step(source, position_ids, mask, last_index, rows, pick, slots, buffers, weights):
            embeds = source
            if looked_up is not None:
                embeds = P.embedding(source[1], source[0])
                if looked_up == 3:
                    embeds = embeds + source[2]
            if proj_kind is not None:
                embeds = project(embeds, weights[:bounds[0]], proj_kind)
            cos, sin = rotary(position_ids, embeds.dtype)
            span = view[2] if embeds.shape[1] == 1 else mask.shape[-1]
            # ops read a whole pool's rows in order without a gather; the native attention reads
            # every row where it lies, so it is given the rows either way
            native = cached_attention_kernel(kernels, embeds.shape[1], mask.shape[-1], layer_kinds[0][:3])
            where = (None if whole and native is None else rows, view, span, pick, slots)
            # with the native attention the layers take their activations as (B * T, E) rows: no
            # reshape around each projection (~20 kernels fewer a graph, each built at a loaded
            # graph's first call in a process); the ops' attention takes (B, T, E)
            layers = len(layer_kinds)
            hidden = embeds if native is None else embeds.reshape(-1, embeds.shape[-1])
            for n in range(layers):
                past = (buffers[n], buffers[layers + n])
                hidden = decoder_layer(hidden, cos, sin, mask, weights[bounds[n]:bounds[n + 1]], layer_kinds[n], past,
                                       where, kernels)
            hidden = rms_norm(hidden, weights[bounds[-1]], eps, kernels.rms_norm)
            flat = hidden if hidden.ndim == 2 else hidden.reshape(-1, hidden.shape[-1])
            # each row's last token (flat indices: rows of a batch end at different tokens) -> logits
            # (B, V), as rows (CPU's StridedSlice copied the Talker's 8448 logits in 0.3 ms a step)
            logits = project(ops.gather(flat, last_index, 0), weights[bounds[-1] + 1:], head_kind).astype(ms.float32)
            if hidden.ndim == 2:
                hidden = hidden.reshape(embeds.shape[:2] + (-1,))
            return (logits, hidden) if looked_up is None else (logits, hidden, embeds)

        return step

    def use_pool(self, rows, dtype):
        """From now on, single-row caches are rows of one pool of `rows` rows, whose decode steps
        `decode_many` runs together (the voice server's continuous batching)."""
        self.pool = CachePool(self, rows, dtype, spare=True)

    def allocate(self, batch, slots, dtype):
        slots = cache_slots(slots)
        if self.pool is not None and batch == 1 and dtype == self.pool.dtype:
            cache = self.pool.take(slots)
        else:
            pool = self.free_pool(batch, slots, dtype)
            cache = PoolCache(pool, pool.take_all())
        self._caches = [ref for ref in self._caches if ref() is not None] + [weakref.ref(cache)]
        return cache

    def free_pool(self, rows, slots, dtype):
        """A pool of exactly this shape with every row free: a kept one, else a new one."""
        for pool in self.pools:
            if (pool.rows, pool.slots, pool.dtype) == (rows, slots, dtype) and pool.in_use == 0:
                return pool
        pool = CachePool(self, rows, dtype, slots)
        self.pools.append(pool)
        return pool

    def row_bytes(self, slots, dtype):
        """Memory of one cache row of `slots` slots: every layer's keys and values."""
        return 2 * self.num_layers * self.kv_heads * slots * self.head_dim * ops.zeros((), dtype).itemsize

    def caches_in_use(self):
        """Caches allocated here and not yet released (a closed stream must leave none)."""
        return sum(1 for ref in self._caches if ref() is not None and not ref().released)

    def parts(self):
        """(make-up, weights): what the step graph is compiled for besides shapes (the input
        projection's, each layer's, the final norm's and the head's kinds, LoRA adapters
        included), and the weights it takes, in order."""
        proj_kind, weights = None, []
        if self.input_proj is not None:
            proj_kind, weights = projection_parts(self.input_proj, training=False)
        layer_kinds = []
        for layer in self.decoder.layers:
            kind, layer_weights, _ = layer_parts(layer, self.act, training=False)
            layer_kinds.append(kind)
            weights += layer_weights
        head_kind, head_weights = projection_parts(self.head, training=False)
        norm = self.decoder.norm
        return (proj_kind, tuple(layer_kinds), float(norm.eps), head_kind), weights + [norm.weight] + head_weights

    def run_step(self, buffers, whole, inputs):
        """The compiled step over `buffers` (PoolBuffers): `inputs` (embeds or a (table, ids[,
        plus]) tuple, position_ids, mask, last_index, rows, pick, slots) -> (logits, hidden[,
        embeds looked up]). Weights and buffers are graph inputs (the buffers written in place),
        so the graph holds no parameter and is stored once per machine (utils/graph_cache.py)."""
        make_up, weights = self.parts()
        looked_up = len(inputs[0]) if isinstance(inputs[0], tuple) else None
        key = (make_up, whole, buffers.view, self.kernels, looked_up)
        if key not in self._graphs:
            self._graphs[key] = StoredGraph(f"{self.name.lower()}_step", self._step_function(*key),
                                            key[:3] + (looked_up,) + self._rotary_spec + self.kernels.libraries)
        # the Parameters themselves: the buffers are written in place without a copy (measured; a
        # Tensor over the same storage is copied whole), the weights read where they lie
        return self._graphs[key](*inputs, buffers.keys + buffers.values, tuple(weights))

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
        check_room(cache, t)
        mask = np.ones((b, t), np.int32) if attention_mask is None else np.asarray(attention_mask, np.int32)
        hidden = []
        for lo in range(0, t, PREFILL_CHUNK):
            hi = min(t, lo + PREFILL_CHUNK)
            logits, piece = self._extend_chunk(cache, embeds[:, lo:hi], position_ids[..., lo:hi], mask[:, lo:hi])
            hidden.append(piece)
        return logits, hidden[0] if len(hidden) == 1 else ops.cat(hidden, 1)

    def _extend_chunk(self, cache, embeds, position_ids, mask):
        """At most PREFILL_CHUNK tokens, right-padded with invalid tokens to SMALL_PIECE or
        PREFILL_CHUNK (padded tokens past the cache's end are not written)."""
        b, t, e = embeds.shape
        start = cache.length
        width = piece_width(t)
        if width > t:
            embeds = ops.cat((embeds, ops.zeros((b, width - t, e), embeds.dtype)), 1)
            position_ids = np.concatenate([position_ids, np.zeros((3, b, width - t), position_ids.dtype)], -1)
        cache.valid[:, start:start + t] = mask
        logits, hidden = cache.pool.run(cache.rows, embeds, position_ids, [start] * b, t - 1)
        cache.length = start + t
        return logits, hidden[:, :t]

    def extend_requests(self, requests):
        """`extend` of each of `requests` (ExtendRequests, at most one per cache) -> [(logits (1, V),
        hidden (1, T, H))]: pieces of at most PREFILL_CHUNK tokens into rows of this runner's shared
        pool run in batched steps (several conversations' turns at once), pieces of one graph width
        together, at most STEP_TOKENS // width of them a step; the others (and a piece left alone)
        one by one. A batched step's rows are a power of two from ROWS_TOGETHER and, as a piece
        alone, it attends to the slots up to its rows' furthest end, rounded up to a power of two:
        a graph per row count, piece width and span (each new shape compiles a graph, which stays
        in memory), and a pool grown by one long conversation does not make every short one's
        pieces attend to all its slots (16 pieces of 5 tokens over a pool of 1024 slots: 14.7 ms a
        step attending to all, 6.6 ms to 256, measured)."""
        if len({id(r.cache) for r in requests}) < len(requests):
            raise ValueError("two pieces for one cache in one batch: the second must wait for the first")
        together = [r for r in requests if self.pool is not None and r.cache.pool is self.pool
                    and len(r.cache.rows) == 1 and 0 < r.embeds.shape[1] <= PREFILL_CHUNK]
        groups = []
        for width in (SMALL_PIECE, PREFILL_CHUNK):
            pieces = [r for r in together if piece_width(r.embeds.shape[1]) == width]
            most = STEP_TOKENS // width
            groups += [pieces[i:i + most] for i in range(0, len(pieces), most)]
        done = {id(r): out for group in groups if len(group) > 1 for r, out in zip(group, self._extend_rows(group))}
        return [done[id(r)] if id(r) in done else self.extend(r.cache, r.embeds, r.positions) for r in requests]

    def _extend_rows(self, requests):
        """`extend_requests`' batch: each piece right-padded to one width (SMALL_PIECE or
        PREFILL_CHUNK), each row's logits those of its own last token."""
        lengths = [r.embeds.shape[1] for r in requests]
        for r, t in zip(requests, lengths):
            check_room(r.cache, t)
        total = sum(lengths)
        width = piece_width(max(lengths))
        rows = max(ROWS_TOGETHER, 1 << (len(requests) - 1).bit_length())
        firsts = np.cumsum([0] + lengths[:-1])
        # the pieces side by side and a zero vector after them, read into the step's rows by one
        # gather (a handful of ops whatever the count: each op outside a graph can cost milliseconds here)
        index = np.full((rows, width), total, np.int32)
        positions = np.zeros((3, rows, width), np.int64)
        for i, (r, t) in enumerate(zip(requests, lengths)):
            index[i, :t] = firsts[i] + np.arange(t)
            positions[:, i, :t] = r.positions[:, 0]
            r.cache.valid[:, r.cache.length:r.cache.length + t] = 1
        side_by_side = ops.cat([r.embeds for r in requests] + [ops.zeros_like(requests[0].embeds[:, :1])], 1)
        embeds = ops.gather(side_by_side[0], Tensor(index.reshape(-1)), 0).reshape(rows, width, -1)
        logits, hidden = self.pool.run([r.cache.rows[0] for r in requests], embeds, positions,
                                       [r.cache.length for r in requests], [t - 1 for t in lengths], padded_rows=rows)
        for r, t in zip(requests, lengths):
            r.cache.length += t
        real = np.concatenate([i * width + np.arange(t) for i, t in enumerate(lengths)]).astype(np.int32)
        states = ops.gather(hidden.reshape(-1, hidden.shape[-1]), Tensor(real), 0).reshape(1, total, -1)
        return [(logits[i:i + 1], piece) for i, piece in enumerate(ops.split(states, lengths, 1))]

    def decode(self, cache, embeds, position_ids):
        """One token per row (embeds (B, 1, E)) at slot `cache.length`."""
        return self.decode_many([cache], [embeds], [position_ids])[0]

    def decode_many(self, caches, embeds, position_ids):
        """One token for each row of `caches` (all of one pool) in one compiled step: per cache,
        its embeds (B, 1, E) and positions (3, B, 1). Returns [(logits (B, V), hidden (B, 1, H))]."""
        return self._step_rows(caches, embeds[0] if len(caches) == 1 else ops.cat(embeds), position_ids)

    def decode_requests(self, requests):
        """The decode steps `requests` (generation.DecodeRequest of loops on this runner) ->
        [(logits, hidden)], each request's `embeds` set to the input its step looked up: in one
        batched call when their caches are rows of this runner's shared pool (and their lookups
        of one table and kind, as a runner's are), else one by one."""
        first = requests[0].lookup
        if len(requests) > 1 and not (self.pool is not None and all(
                r.loop.cache.pool is self.pool and r.lookup.embedding is first.embedding
                and (r.lookup.plus is None) == (first.plus is None) for r in requests)):
            return [out for r in requests for out in self.decode_requests([r])]
        lookup = first if len(requests) == 1 else TokenLookup(  # one request's lookup as it is: this runs per token
            first.embedding, np.concatenate([r.lookup.ids for r in requests]),
            None if first.plus is None else ops.cat([r.lookup.plus for r in requests]))
        outputs = self._step_rows([r.loop.cache for r in requests], lookup, [r.positions for r in requests])
        for request, (_, _, embeds) in zip(requests, outputs):
            request.embeds = embeds
        return [(logits, hidden) for logits, hidden, _ in outputs]

    def _step_rows(self, caches, source, position_ids):
        """One decode step for every row of `caches` (all of one pool) from `source`, their inputs
        side by side (embeds, or a TokenLookup) -> per cache, the step's outputs (logits, hidden[,
        embeds]) of its rows."""
        for cache in caches:
            if cache.length >= cache.slots:
                raise ValueError(f"the KV cache is full ({cache.slots} slots)")
            cache.valid[:, cache.length] = 1
        rows = [row for c in caches for row in c.rows]
        starts = [c.length for c in caches for _ in c.rows]
        # one cache (generate, a session) needs no joining: this runs per token
        positions = position_ids[0] if len(caches) == 1 else np.concatenate(position_ids, 1)
        outputs = caches[0].pool.run(rows, source, positions, starts, 0)
        for cache in caches:
            cache.length += 1
        if len(caches) == 1:
            return [outputs]
        sizes = [len(c.rows) for c in caches]
        # one split, not a slice per cache (~75 us each); by one row (a server's conversations) the fastest
        tensors = [ops.split(out, 1 if max(sizes) == 1 else sizes) for out in outputs[1:]]
        bounds = np.cumsum([0] + sizes).tolist()
        return [(outputs[0][lo:hi],) + parts for lo, hi, parts in zip(bounds[:-1], bounds[1:], zip(*tensors))]
