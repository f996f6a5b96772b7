"""The decoder step's native CPU kernels (kernels/decoder_step.cc) against the same functions as
MindSpore ops, which are Ascend's path and were held to the reference before the kernels came (the
decoders' reference tests, e.g. tests/generation, now run the kernels on the CPU). The RMS norm and
the SiLU-gated unit over widths and magnitudes; a decode step's and a prompt piece's attention over
grouped-query shapes, rows read out of order, a padding row, every start near a row's first and
last slot (a piece also running past the last), and the keys and values they write; op by op and
inside a compiled graph; then a compiled decoder's prefills and decode steps with the kernels and
with ops, in a shared pool and a whole one."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Parameter, Tensor

from types import SimpleNamespace

from mindone_ext.generation.cache_pool import CachePool
from mindone_ext.generation.decode import CompiledDecoder
from mindone_ext.nn import ops as P
from mindone_ext.nn.decoder import attend
from mindone_ext.nn.decoder_kernels import (PIECE_MACS, DecoderKernels, cached_attention, cached_attention_kernel,
                                            gated_unit, rms_norm)
from mindone_ext.nn.device import on_ascend
from mindone_ext.nn.kv_cache import step_mask
from tests.conftest import max_abs_diff

pytestmark = pytest.mark.skipif(on_ascend(), reason="the native kernels are the CPU target's; Ascend runs the ops")
rng = np.random.default_rng(11)


@pytest.fixture(scope="module")
def kernels():
    built = DecoderKernels.build(ms.float32)
    assert built.libraries, "this machine builds the native kernels (CI installs g++)"
    assert DecoderKernels.build(ms.float16) == DecoderKernels(), "float32 only: other dtypes run the ops"
    return built


def relative(got, want):
    return max_abs_diff(got, want) / max(1.0, float(np.abs(want).max()))


@pytest.mark.parametrize("shape", [(1, 1, 32), (4, 1, 64), (2, 7, 896), (1, 3, 3584)])
@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 300.0])
def test_rms_norm(kernels, shape, magnitude):
    x = (rng.standard_normal(shape) * magnitude).astype(np.float32)
    weight = Tensor(rng.uniform(-2, 2, shape[-1]).astype(np.float32))
    got = rms_norm(Tensor(x), weight, 1e-6, kernels.rms_norm).asnumpy()
    want = P.rms_norm(Tensor(x), weight, 1e-6).asnumpy()
    assert got.shape == want.shape and relative(got, want) <= 2e-6


def test_silu_gate(kernels):
    gate = np.concatenate([rng.uniform(-100, 100, 500), rng.standard_normal(500), [0.0, -0.0, 88.8, -88.8]])
    gate = gate.astype(np.float32).reshape(2, 1, -1)
    up = rng.standard_normal(gate.shape).astype(np.float32)
    got = gated_unit(Tensor(gate), Tensor(up), "silu", kernels.silu_gate).asnumpy()
    want = gated_unit(Tensor(gate), Tensor(up), "silu").asnumpy()
    assert np.isfinite(got).all() and relative(got, want) <= 1e-6
    # another activation runs the ops whatever the kernels
    assert max_abs_diff(gated_unit(Tensor(gate), Tensor(up), "gelu", kernels.silu_gate).asnumpy(),
                        gated_unit(Tensor(gate), Tensor(up), "gelu").asnumpy()) == 0


def test_a_kernel_given_another_dtype_fails_rather_than_misreads_it(kernels):
    """A cache may be allocated in another dtype than the decoder's float32 weights."""
    (q, k, v, cos, sin, mask), biases, buffers, step, _ = decode_case(2, 1, 16)
    half = tuple(Parameter(Tensor(b.astype(np.float16)), name=f"h{i}", requires_grad=False)
                 for i, b in enumerate(buffers))
    with pytest.raises(RuntimeError, match="DecodeAttention"):
        cached_attention(q, k, v, biases, cos, sin, mask, (2, 1, 16, False), half, step,
                         kernels.decode_attention).asnumpy()
    with pytest.raises(RuntimeError, match="RMSNorm"):
        rms_norm(Tensor(np.ones((2, 8), np.float16)), Tensor(np.ones(8, np.float16)), 1e-6, kernels.rms_norm).asnumpy()


SLOTS = 8
# (row of the buffer, start): out of order, the first and last slots and those beside them, a
# padding row (its start past the last slot, nothing valid: attends uniformly, writes slot 0 of
# the spare row, which nothing reads)
ROWS = [(3, 0), (0, 1), (5, SLOTS - 2), (1, SLOTS - 1), (2, 4), (6, SLOTS)]


def decode_case(heads, kv_heads, dim):
    """Inputs of one decode step over a pool of 7 rows (the last the spare one): q, k, v as projected
    without their biases, cos, sin, mask; the biases; the buffers; the step's plan, as CachePool.run
    makes it; the flat slots written."""
    b, total = len(ROWS), 7
    rows = np.array([r for r, _ in ROWS], np.int32)
    starts = np.array([s for _, s in ROWS])
    valid = (rng.random((total, SLOTS)) < 0.6).astype(np.int32)
    valid[0, 0] = 0  # a row whose only seen key is the new one (its start is 0 anyway)
    valid[6] = 0
    for r, s in ROWS:
        if s < SLOTS:
            valid[r, s] = 1
    angles = rng.uniform(-50, 50, (b, 1, dim)).astype(np.float32)
    inputs = [Tensor(rng.standard_normal((b, 1, n * dim)).astype(np.float32)) for n in (heads, kv_heads, kv_heads)]
    inputs += [Tensor(np.cos(angles)), Tensor(np.sin(angles)), Tensor(step_mask(valid[rows], starts, 1))]
    biases = tuple(Tensor(rng.standard_normal(n * dim).astype(np.float32)) for n in (heads, kv_heads, kv_heads))
    buffers = [rng.standard_normal((total * kv_heads * SLOTS, dim)).astype(np.float32) for _ in range(2)]
    head = np.arange(kv_heads)[None, :]
    slot = np.where(starts < SLOTS, starts, 0)[:, None]
    slots = ((rows[:, None] * kv_heads + head) * SLOTS + slot).reshape(-1).astype(np.int32)
    step = (Tensor(rows), (total, kv_heads, SLOTS, dim), SLOTS, Tensor(np.arange(b * kv_heads, dtype=np.int32)),
            Tensor(slots))
    return inputs, biases, buffers, step, slots


def piece_case(heads, kv_heads, dim, tokens):
    """Inputs of one prompt piece of `tokens` per row over a pool of 7 rows (the last the spare
    one), its rows and starts those of ROWS: as decode_case, the plan CachePool.run makes (a piece
    attends to the slots up to its longest row's end, at most the buffer's)."""
    b, total = len(ROWS), 7
    rows = np.array([r for r, _ in ROWS], np.int32)
    starts = np.array([s for _, s in ROWS])
    valid = (rng.random((total, SLOTS)) < 0.6).astype(np.int32)
    valid[6] = 0
    for r, s in ROWS:  # the piece's own slots hold real tokens
        valid[r, s:s + tokens] = 1
    angles = rng.uniform(-50, 50, (b, tokens, dim)).astype(np.float32)
    inputs = [Tensor(rng.standard_normal((b, tokens, n * dim)).astype(np.float32)) for n in (heads, kv_heads, kv_heads)]
    inputs += [Tensor(np.cos(angles)), Tensor(np.sin(angles)), Tensor(step_mask(valid[rows], starts, tokens))]
    biases = tuple(Tensor(rng.standard_normal(n * dim).astype(np.float32)) for n in (heads, kv_heads, kv_heads))
    buffers = [rng.standard_normal((total * kv_heads * SLOTS, dim)).astype(np.float32) for _ in range(2)]
    pool = SimpleNamespace(slots=SLOTS, runner=SimpleNamespace(kv_heads=kv_heads))
    pick, slots = CachePool._write_plan(pool, rows, starts, tokens)
    step = (Tensor(rows), (total, kv_heads, SLOTS, dim), SLOTS, Tensor(pick), Tensor(slots))
    return inputs, biases, buffers, step, slots


@pytest.mark.parametrize("heads,kv_heads,dim", [(2, 1, 16), (4, 2, 16), (3, 3, 64), (7, 1, 128)])
@pytest.mark.parametrize("tokens", [1, 2, 3, 5])
@pytest.mark.parametrize("compiled", [False, True])
def test_cached_attention(kernels, heads, kv_heads, dim, tokens, compiled):
    """A decode step (one token a row) and prompt pieces of 2-5 tokens, every start of ROWS: the
    last ones run past the buffer's last slot (tokens beyond it repeat the last written one). The
    kernel given q, k, v as (B * T, width) rows (a compiled step's layers) gives the same, as rows."""
    case = decode_case if tokens == 1 else lambda *a: piece_case(*a, tokens)
    inputs, biases, buffers, step, written = case(heads, kv_heads, dim)
    shape = (heads, kv_heads, dim, False)
    native = cached_attention_kernel(kernels, tokens, SLOTS, shape)
    assert native is (kernels.decode_attention if tokens == 1 else kernels.piece_attention) and native is not None
    results = []
    for kernel, as_rows in ((native, False), (native, True), (None, False)):
        past = tuple(Parameter(Tensor(b.copy()), name=f"p{i}", requires_grad=False) for i, b in enumerate(buffers))

        def run(q, k, v, cos, sin, mask, biases, keys, values):
            if kernel is None:
                return attend(q + biases[0], k + biases[1], v + biases[2], cos, sin, mask, shape, (keys, values), step)
            if as_rows:
                q, k, v = (x.reshape(-1, x.shape[-1]) for x in (q, k, v))
            return cached_attention(q, k, v, biases, cos, sin, mask, shape, (keys, values), step, kernel)

        out = (ms.jit(run) if compiled else run)(*inputs, biases, *past)
        assert out.ndim == 3 - as_rows
        results.append((out.asnumpy().reshape(inputs[0].shape), past[0].asnumpy(), past[1].asnumpy()))
    for got, as_rows in zip(results[0], results[1]):
        np.testing.assert_array_equal(as_rows, got)
    (got, got_keys, got_values), _, (want, want_keys, want_values) = results
    assert got.shape == want.shape == (len(ROWS), tokens, heads * dim)
    # a piece's padding row (the last) differs: nothing reads it (its start is past the buffer)
    real = len(ROWS) - (tokens > 1)
    assert max_abs_diff(got[:real], want[:real]) <= 1e-5
    # the biased rotated new keys and the biased values land in the same slots; no other slot moves
    assert max_abs_diff(got_keys, want_keys) <= 1e-6 and max_abs_diff(got_values, want_values) == 0
    for after, before in ((want_keys, buffers[0]), (want_values, buffers[1])):
        assert set(np.flatnonzero(np.abs(after - before).max(-1) > 0)) == set(written)


def test_long_pieces_attend_with_ops():
    """The piece kernel reads every key once per query (no tiling): beyond PIECE_MACS a large
    model's prompt runs MindSpore's batched products."""
    built = DecoderKernels(piece_attention="piece", decode_attention="decode")
    assert cached_attention_kernel(built, 128, PIECE_MACS // 128 // 64, (4, 2, 16)) == "piece"
    assert cached_attention_kernel(built, 128, PIECE_MACS // 128 // 64 + 1, (4, 2, 16)) is None
    assert cached_attention_kernel(built, 128, 256, (14, 2, 64)) == "piece"  # the 0.5B's first pieces
    assert cached_attention_kernel(built, 128, 512, (14, 2, 64)) is None
    assert cached_attention_kernel(built, 1, 1 << 20, (4, 2, 16)) == "decode"
    assert cached_attention_kernel(DecoderKernels(), 2, 8, (4, 2, 16)) is None


def conversations(model, runner, lengths, seed):
    """A cache per prompt length on `runner` (rows of its shared pool), prefilled; then the same
    random next tokens each step: [(cache, prefill, rng)]."""
    made = []
    for i, n in enumerate(lengths):
        ids = np.random.default_rng(seed + i).integers(0, 400, size=(1, n))
        cache = runner.allocate(1, n + 8, model.cache_dtype)
        prepared = model.thinker.prepare_inputs(ids, np.ones_like(ids))
        made.append((cache, runner.prefill(cache, prepared.inputs_embeds, prepared.position_ids, np.ones_like(ids))))
    return made


@pytest.mark.parametrize("pooled", [True, False])
def test_a_decoder_with_the_kernels_equals_it_with_ops(our_model, kernels, pooled):
    thinker = our_model.thinker
    config = our_model.config.thinker_config.text_config
    runners = [CompiledDecoder(thinker.model, thinker.lm_head, config, name="Thinker") for _ in range(2)]
    assert runners[0].kernels == kernels
    runners[1].kernels = DecoderKernels()
    lengths = (5, 31, 33, 130)  # one piece, both piece widths, two chunks
    outputs = []
    for runner in runners:
        if pooled:
            runner.use_pool(3, our_model.cache_dtype)  # 3 rows a step: padded with the spare one
            made = conversations(our_model, runner, lengths[:3], seed=0)
        else:  # a batch of 2 in a pool of its own, stepped whole
            ids = np.random.default_rng(0).integers(0, 400, size=(2, 40))
            mask = np.ones_like(ids)
            mask[1, :9] = 0
            cache = runner.allocate(2, 48, our_model.cache_dtype)
            prepared = thinker.prepare_inputs(ids, mask)
            made = [(cache, runner.prefill(cache, prepared.inputs_embeds, prepared.position_ids, mask))]
        got = [(logits, hidden.asnumpy()) for _, (logits, hidden) in made]
        tokens = np.random.default_rng(1)
        for _ in range(3):
            caches = [cache for cache, _ in made]
            embeds = [thinker.embed(tokens.integers(0, 400, size=(len(c.rows), 1))) for c in caches]
            positions = [np.full((3, len(c.rows), 1), c.length, np.int64) for c in caches]
            got += [(logits, hidden.asnumpy()) for logits, hidden in runner.decode_many(caches, embeds, positions)]
        outputs.append(got)
        for cache, _ in made:
            cache.release()
    for (logits, hidden), (want_logits, want_hidden) in zip(*outputs):
        assert max_abs_diff(logits, want_logits) <= 1e-5 and max_abs_diff(hidden, want_hidden) <= 1e-5
    assert np.abs(outputs[1][-1][0]).mean() > 0.1
