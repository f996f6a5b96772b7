"""The memory bound of the KV caches and conversation states (serve/memory.py) against the buffers
and states a conversation at the limit really grows, the start-up check against --cache_memory_mb,
and --max_active 0 (answers by memory)."""
from dataclasses import replace

import pytest

from mindone_ext.serve.memory import (MB, cache_bound, cache_pools, check_cache_memory, fit_to_memory, memory_bound,
                                      state_bound)
from mindone_ext.serve.options import ServeOptions

OPTIONS = dict(max_sessions=2, max_active=1, max_context_tokens=600, talker_max_new_tokens=100)


def buffer_bytes(pool):
    return sum(p.nbytes for p in tuple(pool.buffers.keys) + tuple(pool.buffers.values))


def test_a_conversation_at_the_limit_grows_the_caches_to_the_bound_and_no_further(tiny_checkpoint):
    from mindone_ext import Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniProcessor
    from mindone_ext.models.qwen2_5_omni.session import ConversationFull, ConversationSession
    from mindone_ext.serve.app import _caches_in_use

    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(tiny_checkpoint)  # its own: pools are set on it
    processor = Qwen2_5OmniProcessor.from_pretrained(tiny_checkpoint)
    options = ServeOptions(**OPTIONS)
    (thinker, rows, slots), (talker, talker_rows, talker_slots) = cache_pools(model, options)
    for runner, n, _ in cache_pools(model, options):
        runner.use_pool(n, model.cache_dtype)
    # a conversation fills its 600 tokens (the server's sessions are made with max_tokens = the limit)
    session = ConversationSession(model, processor, max_tokens=options.max_context_tokens)
    with pytest.raises(ConversationFull):
        for _ in range(200):
            session.add_text("one more sentence to fill the conversation with. ", "a sentence")
    assert session.cache.length > options.max_context_tokens - 20
    # the longest Talker prompt (the conversation and two tokens) with every codec token
    speech = talker.allocate(1, options.max_context_tokens + 2 + options.talker_max_new_tokens, model.cache_dtype)
    assert (thinker.pool.slots, talker.pool.slots) == (slots, talker_slots) == (1024, 1024)
    for pool, n in ((thinker.pool, rows), (talker.pool, talker_rows)):
        assert pool.nbytes == buffer_bytes(pool) == (n + 1) * pool.runner.row_bytes(pool.slots, model.cache_dtype)
    bound = cache_bound(model, options)
    assert thinker.pool.nbytes + talker.pool.nbytes == bound
    assert _caches_in_use(model) == (2, round(bound / MB, 1))  # what /health reports
    # beside its cache row, the conversation's embeddings and hidden states: one share of the
    # states' bound (a row per conversation and per answer) at the context's length, byte for byte
    states = sum(x.nbytes for x in session.embeds + session.hidden)
    share = state_bound(model, options) / (options.max_sessions + options.max_active)
    assert states == share * session.cache.length / options.max_context_tokens
    assert memory_bound(model, options) == bound + state_bound(model, options)
    speech.release()
    session.close()


def test_limits_whose_caches_exceed_the_budget_are_refused_at_start(our_model):
    bound = memory_bound(our_model, ServeOptions(**OPTIONS))
    assert check_cache_memory(our_model, ServeOptions(**OPTIONS, cache_memory_mb=bound / MB)) == bound
    with pytest.raises(ValueError, match=r"states of 2 conversations and 1 answers at 600 tokens each can take \d+ MB, "
                                         r"more than --cache_memory_mb .*lower --max_context_tokens"):
        check_cache_memory(our_model, ServeOptions(**OPTIONS, cache_memory_mb=bound / MB - 0.01))
    # the bound grows with every limit it depends on
    for more in ({"max_sessions": 3}, {"max_active": 2}, {"max_context_tokens": 1100}, {"talker_max_new_tokens": 500}):
        assert memory_bound(our_model, ServeOptions(**{**OPTIONS, **more})) > bound, more


def test_max_active_0_runs_as_many_answers_as_the_cache_memory_holds(our_model):
    options = ServeOptions(**{**OPTIONS, "max_active": 0})
    one, two = (memory_bound(our_model, ServeOptions(**{**OPTIONS, "max_active": n})) for n in (1, 2))
    each = two - one
    for budget, answers in ((one, 1), (one + 3 * each - 1, 3), (one + 3 * each, 4)):
        fitted = fit_to_memory(our_model, replace(options, cache_memory_mb=budget / MB))
        assert fitted.max_active == answers
        assert memory_bound(our_model, fitted) <= budget < memory_bound(our_model, replace(fitted, max_active=answers + 1))
    with pytest.raises(ValueError, match=r"holds no answer's KV caches and states next to 2 conversations at 600 tokens"):
        fit_to_memory(our_model, replace(options, cache_memory_mb=(one - 1) / MB))
    with pytest.raises(ValueError, match="--max_active 0 .* needs --cache_memory_mb"):
        fit_to_memory(our_model, options)
    assert fit_to_memory(our_model, ServeOptions(**OPTIONS)) == ServeOptions(**OPTIONS)  # a count stays a count
