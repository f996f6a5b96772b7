"""Decode steps' inputs looked up together (a batched server round): one graph call per embedding
table and kind, each request given exactly the rows its own lookup gives."""
import numpy as np
from mindspore import Tensor

from mindone_ext.generation import loop
from mindone_ext.generation.loop import DecodeRequest, TokenLookup, look_up_together
from mindone_ext.nn.layers import Embedding

rng = np.random.default_rng(0)


def table(rows, dim=8):
    embedding = Embedding(rows, dim)
    embedding.weight.set_data(Tensor(rng.standard_normal((rows, dim)).astype(np.float32)))
    return embedding


def requests_of(count, embeddings, with_plus):
    """`count` one-row requests cycling over `embeddings`, each with a (1, 1, 8) `plus` when asked."""
    out = []
    for i in range(count):
        embedding = embeddings[i % len(embeddings)]
        plus = Tensor(rng.standard_normal((1, 1, 8)).astype(np.float32)) if with_plus else None
        ids = rng.integers(0, embedding.weight.shape[0], size=(1, 1))
        out.append(DecodeRequest(None, TokenLookup(embedding, ids, plus), None))
    return out


def alone(request):
    """The request's rows, looked up by themselves (as a request alone does when asked)."""
    return DecodeRequest(None, request.lookup, None).embeds.asnumpy()


def counting_calls(monkeypatch):
    calls = []

    def counted(embedding, ids, plus=None):
        calls.append(len(ids))
        return real(embedding, ids, plus)

    real = loop.token_embeddings
    monkeypatch.setattr(loop, "token_embeddings", counted)
    return calls


def test_requests_get_their_own_rows_in_one_call_per_table_and_kind(monkeypatch):
    thinker, talker = table(40), table(60)
    for count in range(1, 10):  # around the powers of two the rows are padded to
        mixed = requests_of(count, [thinker], False) + requests_of(count, [talker], True)
        want = [alone(r) for r in mixed]
        calls = counting_calls(monkeypatch)
        look_up_together(mixed)
        assert calls == ([] if count == 1 else [1 << (count - 1).bit_length()] * 2), count
        for request, expected in zip(mixed, want):
            got = request.embeds.asnumpy()  # resolved above, or alone now for a group of one
            assert got.shape == (1, 1, 8)
            np.testing.assert_array_equal(got, expected)


def test_a_group_whose_call_fails_is_looked_up_alone(monkeypatch):
    requests = requests_of(3, [table(30)], True)
    want = [alone(r) for r in requests]
    real = loop.token_embeddings

    def failing_together(embedding, ids, plus=None):
        if len(ids) > 1:
            raise RuntimeError("the batched lookup failed")
        return real(embedding, ids, plus)

    monkeypatch.setattr(loop, "token_embeddings", failing_together)
    look_up_together(requests)
    for request, expected in zip(requests, want):
        np.testing.assert_array_equal(request.embeds.asnumpy(), expected)
