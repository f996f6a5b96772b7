"""Prompts of every length prefill in fixed-size chunks through the cache: the same logits and
hidden states as the reference's one-shot forward, and a bounded set of compiled shapes."""
import numpy as np
import pytest
import torch

from mindone_ext.generation.cache_pool import MIN_CACHE_SLOTS, cache_slots
from mindone_ext.generation.decode import PREFILL_CHUNK, SMALL_PIECE
from tests.conftest import max_abs_diff


def reference_forward(reference_model, ids, mask):
    with torch.no_grad():
        out = reference_model.thinker(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                      output_hidden_states=True)
    return out.logits.numpy(), out.hidden_states[-1].numpy()


def prefill(model, ids, mask, pieces=None):
    """Prefill through the runner, all at once or as consecutive pieces of the given sizes."""
    runner, thinker = model.thinker_runner(), model.thinker
    prepared = thinker.prepare_inputs(ids, mask)
    cache = runner.allocate(ids.shape[0], ids.shape[1], thinker.model.embed_tokens.weight.dtype)
    bounds = [int(b) for b in np.cumsum([0] + list(pieces or [ids.shape[1]]))]
    hidden = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        logits, h = runner.extend(cache, prepared.inputs_embeds[:, lo:hi], prepared.position_ids[..., lo:hi],
                                  mask[:, lo:hi])
        hidden.append(h.asnumpy())
    cache.release()
    return logits, np.concatenate(hidden, 1)


def test_every_length_near_the_chunk_boundaries_equals_the_reference(our_model, reference_model):
    rng = np.random.default_rng(0)
    lengths = sorted({n + d for n in (SMALL_PIECE, PREFILL_CHUNK, 2 * PREFILL_CHUNK) for d in (-1, 0, 1)} | {300})
    longest = max(lengths)
    ids_all = rng.integers(0, 400, size=(1, longest))
    for n in lengths:
        ids, mask = ids_all[:, :n], np.ones((1, n), np.int64)
        want_logits, want_hidden = reference_forward(reference_model, ids, mask)
        logits, hidden = prefill(our_model, ids, mask)
        assert max_abs_diff(logits, want_logits[:, -1]) <= 1e-4, n
        assert max_abs_diff(hidden, want_hidden) <= 1e-4, n
    assert np.abs(want_logits).mean() > 0.1


def test_a_left_padded_batch_and_unaligned_pieces_equal_the_reference(our_model, reference_model):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 400, size=(2, 2 * PREFILL_CHUNK + 7))
    mask = np.ones_like(ids)
    ids[1, :150], mask[1, :150] = 400, 0  # the second prompt's first chunk and more is padding
    want_logits, want_hidden = reference_forward(reference_model, ids, mask)
    valid = mask.astype(bool)
    for pieces in (None, [5, PREFILL_CHUNK + 40, PREFILL_CHUNK - 38]):
        logits, hidden = prefill(our_model, ids, mask, pieces)
        assert max_abs_diff(logits, want_logits[:, -1]) <= 1e-4
        assert max_abs_diff(hidden[valid], want_hidden[valid]) <= 1e-4


def test_compiled_shapes_are_bounded_whatever_the_prompt_lengths(our_model):
    runner = our_model.thinker_runner()
    runner.shapes.clear()
    for n in range(1, 600, 37):  # 17 prompt lengths
        ids = np.full((1, n), 7)
        prefill(our_model, ids, np.ones_like(ids))
    slots = {s for _, _, s in runner.shapes}
    assert slots <= {cache_slots(n) for n in range(1, 600)}  # powers of two: 256, 512, 1024
    widths = {t for _, t, _ in runner.shapes}
    assert widths <= {SMALL_PIECE, PREFILL_CHUNK}
    assert len(runner.shapes) <= 2 * len(slots)


@pytest.mark.parametrize("slots", [MIN_CACHE_SLOTS, 2 * MIN_CACHE_SLOTS])
def test_pieces_near_a_power_of_two_equal_the_reference(our_model, reference_model, slots):
    """A piece runs padded to SMALL_PIECE tokens and attends to the cache's slots up to its end,
    rounded up to a power of two. Near such a boundary the padding falls past the cache's last slot
    (a full cache), or the piece crosses into the next power of two (a larger cache). For every
    start of a piece near the boundary, a decode step after it (which reads every written slot
    back from the cache) gives the reference's logits."""
    runner, thinker = our_model.thinker_runner(), our_model.thinker
    edge = MIN_CACHE_SLOTS
    ids = np.random.default_rng(2).integers(0, 400, size=(1, edge + SMALL_PIECE))
    want = reference_forward(reference_model, ids, np.ones_like(ids))[0][0]
    prepared = thinker.prepare_inputs(ids, np.ones_like(ids))
    embeds, positions = prepared.inputs_embeds, prepared.position_ids
    for start in range(edge - SMALL_PIECE - 1, edge - 1):
        end = min(slots - 1, start + SMALL_PIECE - 8)  # the decoded token's slot
        cache = runner.allocate(1, slots, thinker.model.embed_tokens.weight.dtype)
        assert cache.slots == slots
        runner.prefill(cache, embeds[:, :start], positions[..., :start], None)
        runner.extend(cache, embeds[:, start:end], positions[..., start:end])
        logits, _ = runner.decode(cache, embeds[:, end:end + 1], positions[..., end:end + 1])
        cache.release()
        assert max_abs_diff(logits[0], want[end]) <= 1e-4, start
