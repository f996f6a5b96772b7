"""Conversations as rows of one cache pool, decoded together: every row's logits and hidden states
equal its own cache's, decoding alone, as rows join, leave, are reused and the pool grows."""
import numpy as np
import pytest

from mindone_ext.generation.cache_pool import MIN_CACHE_SLOTS, CacheFull
from mindone_ext.generation.decode import CompiledDecoder
from tests.conftest import max_abs_diff


def runner_of(model, rows=None):
    thinker = model.thinker
    runner = CompiledDecoder(thinker.model, thinker.lm_head, model.config.thinker_config.text_config, name="Thinker")
    if rows:
        runner.use_pool(rows, model.cache_dtype)
    return runner


class Conversation:
    """One prompt, then random next-token embeddings, on a given runner."""

    def __init__(self, model, runner, length, seed, slots=None):
        rng = np.random.default_rng(seed)
        self.model, self.runner = model, runner
        self.ids = rng.integers(0, 400, size=(1, length))
        self.rng = rng
        self.cache = runner.allocate(1, slots or length + 8, model.cache_dtype)
        prepared = model.thinker.prepare_inputs(self.ids, np.ones_like(self.ids))
        self.prefill = runner.prefill(self.cache, prepared.inputs_embeds, prepared.position_ids, np.ones_like(self.ids))

    def next_input(self):
        token = self.rng.integers(0, 400, size=(1, 1))
        positions = np.full((3, 1, 1), self.cache.length, np.int64)
        return self.model.thinker.embed(token), positions


def pair(model, pooled, alone, length, seed, slots=None):
    return Conversation(model, pooled, length, seed, slots), Conversation(model, alone, length, seed, slots)


def assert_same(got, want):
    assert max_abs_diff(got[0], want[0]) <= 1e-5
    assert max_abs_diff(np.asarray(got[1]), np.asarray(want[1])) <= 1e-5


def step_all(pooled_runner, pairs):
    inputs = [p.next_input() for p, _ in pairs]
    got = pooled_runner.decode_many([p.cache for p, _ in pairs], [e for e, _ in inputs], [q for _, q in inputs])
    for g, (_, alone), (embeds, positions) in zip(got, pairs, inputs):
        want = alone.runner.decode(alone.cache, embeds, positions)
        assert_same((g[0], g[1].asnumpy()), (want[0], want[1].asnumpy()))


def test_rows_decoded_together_equal_each_alone(our_model):
    pooled, alone = runner_of(our_model, rows=3), runner_of(our_model)
    pairs = [pair(our_model, pooled, alone, n, seed) for seed, n in enumerate((5, 40, 130))]
    for p, a in pairs:
        assert_same((p.prefill[0], p.prefill[1].asnumpy()), (a.prefill[0], a.prefill[1].asnumpy()))
    for _ in range(3):
        step_all(pooled, pairs)  # 3 rows: padded to 4 with the spare row
    pairs[1][0].cache.release()  # a row leaves; a new conversation takes it
    pairs[1][1].cache.release()
    assert pooled.pool.in_use == 2
    pairs[1] = pair(our_model, pooled, alone, 17, 7)
    assert pairs[1][0].cache.rows == [1] and pairs[1][0].cache.length == 17  # nothing of the last one left
    for _ in range(2):
        step_all(pooled, pairs)
    step_all(pooled, pairs[:1])  # one row alone
    step_all(pooled, pairs[1:])
    for p, a in pairs:
        p.cache.release(), a.cache.release()
    assert pooled.pool.in_use == 0


def test_the_pool_grows_keeping_every_row(our_model):
    pooled, alone = runner_of(our_model, rows=2), runner_of(our_model)
    short = pair(our_model, pooled, alone, 9, 1)
    near_end = pair(our_model, pooled, alone, MIN_CACHE_SLOTS - 2, 2, slots=MIN_CACHE_SLOTS)
    assert pooled.pool.slots == MIN_CACHE_SLOTS
    for step in range(4):  # the second row crosses the pool's end at the third step
        for p, a in (short, near_end):
            for c in (p, a):
                c.runner.reserve(c.cache, c.cache.length + 1)
        step_all(pooled, [short, near_end])
    assert pooled.pool.slots == 2 * MIN_CACHE_SLOTS


def test_a_truncated_row_forgets_its_tail_and_a_full_pool_says_so(our_model):
    pooled, alone = runner_of(our_model, rows=1), runner_of(our_model)
    p, a = pair(our_model, pooled, alone, 30, 3)
    step_all(pooled, [(p, a)])
    for c in (p, a):
        c.cache.truncate(20)
    step_all(pooled, [(p, a)])
    with pytest.raises(CacheFull, match="all 1 rows of the Thinker's cache pool are in use"):
        pooled.allocate(1, 10, our_model.cache_dtype)


def test_a_cache_of_its_own_grows_into_a_kept_pool_and_pools_are_reused(our_model):
    """Without a shared pool each cache has a pool of its own, kept for the next cache of its shape
    (its graphs are bound to it). A cache that outgrows its pool moves to one of the larger size,
    a kept one when free: copied in place, so the graphs compiled over it earlier see the rows."""
    own, alone = runner_of(our_model), runner_of(our_model)
    for seed in (1, 2):  # the second conversation reuses both pools, and their compiled steps
        pooled, want = pair(our_model, own, alone, MIN_CACHE_SLOTS - 2, seed, slots=2 * MIN_CACHE_SLOTS)
        pooled.cache.release()
        pooled = Conversation(our_model, own, MIN_CACHE_SLOTS - 2, seed, slots=MIN_CACHE_SLOTS)
        assert pooled.cache.slots == MIN_CACHE_SLOTS
        for _ in range(4):  # crosses the first pool's end at the third step
            own.reserve(pooled.cache, pooled.cache.length + 1)
            step_all(own, [(pooled, want)])
        assert pooled.cache.slots == 2 * MIN_CACHE_SLOTS
        pooled.cache.release(), want.cache.release()
    assert sorted(p.slots for p in own.pools) == [MIN_CACHE_SLOTS, 2 * MIN_CACHE_SLOTS]
    assert own.caches_in_use() == 0


def steps_run(runner):
    """A list that receives (rows, width, slots attended) of each prefill step `runner` runs."""
    steps, run = [], runner.run_step

    def recording(buffers, whole, inputs):
        embeds, _, mask = inputs[:3]
        steps.append((*embeds.shape[:2], mask.shape[-1]))
        return run(buffers, whole, inputs)

    runner.run_step = recording
    return steps


def test_pieces_of_several_rows_prefilled_together_equal_each_alone(our_model):
    """Conversations at different lengths each take a piece of their own length in a batched
    step (pieces of 1 to 32 tokens, then one over 32: the wider graph), as a voice server's turns
    arrive together; the next decode steps then read the same caches as after pieces alone.
    Pieces of one graph width run together: five short ones a step of eight rows, three a step
    padded to four, two wide ones (33 and PREFILL_CHUNK tokens) a step of four of their own; a
    piece too long to batch runs alone beside the batch, in chunks."""
    from mindone_ext.generation.decode import PREFILL_CHUNK, SMALL_PIECE, ExtendRequest

    pooled, alone = runner_of(our_model, rows=5), runner_of(our_model)
    pairs = [pair(our_model, pooled, alone, n, seed, slots=512) for seed, n in enumerate((3, 31, 32, 33, 140))]
    rng = np.random.default_rng(9)
    steps = steps_run(pooled)

    def pieces(lengths):
        out = []
        for (p, _), t in zip(pairs, lengths):
            embeds = our_model.thinker.embed(rng.integers(0, 400, size=(1, t)))
            out.append((embeds, np.broadcast_to(np.arange(p.cache.length, p.cache.length + t), (3, 1, t)).copy()))
        return out

    small, wide = SMALL_PIECE, PREFILL_CHUNK
    for lengths, want_steps in (((1, 32, 7, 2, 5), [(8, small)]),
                                ((33, 1, 20, PREFILL_CHUNK, 3), [(4, small), (4, wide)]),
                                ((2, 17, 5), [(4, small)]),
                                ((4, PREFILL_CHUNK + 5, 1, 9, 2), [(4, small), (1, wide), (1, small)])):
        inputs = pieces(lengths)
        steps.clear()
        got = pooled.extend_requests([ExtendRequest(p.cache, e, q) for (p, _), (e, q) in zip(pairs, inputs)])
        assert [step[:2] for step in steps] == want_steps, lengths
        for (p, a), (embeds, positions), (logits, hidden), t in zip(pairs, inputs, got, lengths):
            want = alone.extend(a.cache, embeds, positions)
            assert hidden.shape == (1, t, want[1].shape[-1]) and p.cache.length == a.cache.length
            assert_same((logits, hidden.asnumpy()), (want[0], want[1].asnumpy()))
        step_all(pooled, pairs)
    with pytest.raises(ValueError, match="one cache"):
        pooled.extend_requests([ExtendRequest(pairs[0][0].cache, *pieces((1,))[0])] * 2)


def test_a_batched_step_attends_to_its_rows_ends_not_the_pools(our_model):
    """A pool grown by a long conversation (1024 slots): pieces batched with a short row attend to
    the slots up to their furthest end, rounded up to a power of two (256 or 512 here), as a piece
    alone does. For every start of the long row's piece near 256, the batch's span is that
    rounding, and a decode step after it (which reads every written slot back) equals each
    conversation's alone."""
    from mindone_ext.generation.cache_pool import cache_slots
    from mindone_ext.generation.decode import SMALL_PIECE, ExtendRequest

    pooled, alone = runner_of(our_model, rows=3), runner_of(our_model)
    grown = pooled.allocate(1, 1024, our_model.cache_dtype)  # the long conversation that grew the pool
    assert pooled.pool.slots == 1024
    steps = steps_run(pooled)
    rng = np.random.default_rng(5)
    edge = MIN_CACHE_SLOTS
    for start in range(edge - SMALL_PIECE - 2, edge + 2):
        pairs = [pair(our_model, pooled, alone, n, seed, slots=512) for seed, n in ((start, start), (start + 1, 3))]
        inputs = [(our_model.thinker.embed(rng.integers(0, 400, size=(1, t))),
                   np.broadcast_to(np.arange(p.cache.length, p.cache.length + t), (3, 1, t)).copy())
                  for (p, _), t in zip(pairs, (7, 20))]
        steps.clear()
        got = pooled.extend_requests([ExtendRequest(p.cache, e, q) for (p, _), (e, q) in zip(pairs, inputs)])
        assert steps == [(4, SMALL_PIECE, cache_slots(start + SMALL_PIECE))], start  # 256, or 512 past the edge
        for (p, a), (embeds, positions), (logits, _) in zip(pairs, inputs, got):
            assert max_abs_diff(logits, alone.extend(a.cache, embeds, positions)[0]) <= 1e-5, start
        step_all(pooled, pairs)
        for p, a in pairs:
            p.cache.release()
            a.cache.release()
    grown.release()


@pytest.mark.parametrize("width", ["short", "wide"])
def test_a_batched_prefill_step_holds_at_most_step_tokens(our_model, width):
    """Around the most pieces one step holds (STEP_TOKENS // width: 16 short, 4 wide) and the
    power-of-two row counts below it: n pieces run as ceil(n / most) steps, each padded to a power
    of two from 4 rows, a piece left over alone; every row's logits equal its piece's alone."""
    from mindone_ext.generation.decode import PREFILL_CHUNK, ROWS_TOGETHER, SMALL_PIECE, STEP_TOKENS, ExtendRequest

    t, graph_width = (5, SMALL_PIECE) if width == "short" else (40, PREFILL_CHUNK)
    most = STEP_TOKENS // graph_width
    counts = sorted({1, 2, 3, 4, 5, most - 1, most, most + 1} | ({7, 8, 9} if width == "short" else set()))
    pooled, alone = runner_of(our_model, rows=most + 1), runner_of(our_model)
    steps = steps_run(pooled)
    rng = np.random.default_rng(11)
    for n in counts:
        pairs = [pair(our_model, pooled, alone, 3, seed, slots=256) for seed in range(n)]
        inputs = [(our_model.thinker.embed(rng.integers(0, 400, size=(1, t))),
                   np.broadcast_to(np.arange(3, 3 + t), (3, 1, t)).copy()) for _ in range(n)]
        steps.clear()
        got = pooled.extend_requests([ExtendRequest(p.cache, e, q) for (p, _), (e, q) in zip(pairs, inputs)])
        full, rest = divmod(n, most)
        want_steps = [(most, graph_width)] * full
        if rest > 1:
            want_steps.append((max(ROWS_TOGETHER, 1 << (rest - 1).bit_length()), graph_width))
        elif rest == 1:
            want_steps.append((1, graph_width))
        assert [step[:2] for step in steps] == want_steps, n
        for (p, a), (embeds, positions), (logits, _) in zip(pairs, inputs, got):
            want = alone.extend(a.cache, embeds, positions)
            assert max_abs_diff(logits, want[0]) <= 1e-5
        for p, a in pairs:
            p.cache.release()
            a.cache.release()
