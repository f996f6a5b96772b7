"""A decode step looks its input up itself (a TokenLookup: rows of an embedding table, `plus`
added when given): its logits and hidden states equal those of the same step given the
embeddings looked up op by op, and the embeddings it returns equal those, bit for bit: one
conversation alone and many batched in a shared pool, at every row count around the powers of two
the rows are padded to."""
from types import SimpleNamespace

import numpy as np
from mindspore import Tensor, ops

from mindone_ext.generation import DecodeRequest, TokenLookup
from tests.generation.test_cache_pool import runner_of


def op_by_op(lookup):
    ids = Tensor(np.asarray(lookup.ids, np.int32).reshape(-1))
    embeds = ops.gather(lookup.embedding.weight, ids, 0).reshape(len(lookup.ids), 1, -1)
    return embeds if lookup.plus is None else embeds + lookup.plus


def conversations(model, runner, count):
    """`count` one-row caches, each prefilled with its own short prompt (seeded by its index)."""
    caches = []
    for i in range(count):
        ids = np.random.default_rng(i).integers(0, 400, size=(1, 3 + i))
        cache = runner.allocate(1, ids.shape[1] + 4, model.cache_dtype)
        prepared = model.thinker.prepare_inputs(ids, np.ones_like(ids))
        runner.prefill(cache, prepared.inputs_embeds, prepared.position_ids, np.ones_like(ids))
        caches.append(cache)
    return caches


def lookups(model, count, with_plus, seed):
    rng = np.random.default_rng(seed)
    table, width = model.thinker.model.embed_tokens, model.thinker.model.embed_tokens.weight.shape[1]
    return [TokenLookup(table, rng.integers(0, 400, size=(1, 1)),
                        Tensor(rng.standard_normal((1, 1, width)).astype(np.float32)) if with_plus else None)
            for _ in range(count)]


def assert_equal(got, want):
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_array_equal(got[1].asnumpy(), want[1].asnumpy())


def test_steps_looking_their_input_up_equal_steps_given_it(our_model):
    alone_by_lookup, alone_by_embeds = runner_of(our_model), runner_of(our_model)
    batched_by_lookup, batched_by_embeds = runner_of(our_model, rows=9), runner_of(our_model, rows=9)
    for count in range(1, 10):
        for with_plus in (False, True):
            for by_lookup, by_embeds in ((alone_by_lookup, alone_by_embeds), (batched_by_lookup, batched_by_embeds)):
                if by_lookup is alone_by_lookup and count > 1:
                    continue
                caches, other = conversations(our_model, by_lookup, count), conversations(our_model, by_embeds, count)
                wanted = lookups(our_model, count, with_plus, seed=count)
                positions = [np.full((3, 1, 1), c.length, np.int64) for c in caches]
                requests = [DecodeRequest(SimpleNamespace(cache=c), lookup, p)
                            for c, lookup, p in zip(caches, wanted, positions)]
                got = by_lookup.decode_requests(requests)
                want = by_embeds.decode_many(other, [op_by_op(lookup) for lookup in wanted], positions)
                for g, w, request, lookup in zip(got, want, requests, wanted):
                    assert_equal(g, w)
                    np.testing.assert_array_equal(request.embeds.asnumpy(), op_by_op(lookup).asnumpy())
                for cache in caches + other:
                    cache.release()
    # the batched steps ran as one call per round, padded to powers of two
    assert {shape[0] for shape in batched_by_lookup.shapes if shape[1] == 1} == {1, 2, 4, 8, 16}
