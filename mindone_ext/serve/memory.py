"""The memory of the conversations' state: the most the server's limits let it take, checked at start.

Every conversation's cache is a row of a shared pool (one per decoder), and a pool's rows all
have the slots of its longest conversation (a power of two, see generation.cache_pool). So the
caches can grow to every row at the longest conversation the limits allow: that is the bound,
and the server refuses to start when it exceeds `--cache_memory_mb`, rather than run out of
memory when a long conversation comes. Beside its cache, a conversation keeps its tokens' input
embeddings and the Thinker's hidden states (the Talker's prompt is made of them), as many as
its cache holds: 7B, 8192 tokens, bfloat16: 117 MB a conversation, 25% of its Thinker cache
row; these are in the bound too. With `--max_active 0` it runs as many answers at once as the
budget holds next to the conversations.
"""
from dataclasses import replace

from mindspore import ops

from ..generation.cache_pool import cache_slots

MB = 1 << 20


def context_tokens(model, options):
    """Tokens of the longest conversation or request the server takes."""
    return min(options.max_context_tokens, model.config.thinker_config.text_config.max_position_embeddings)


def cache_pools(model, options):
    """(runner, rows, most slots) of each shared pool the server uses: the Thinker's holds a row
    per open conversation and per answer in progress, the Talker's a row per answer, its prompt
    being the conversation and two tokens more (the speaker's and the first answer token)."""
    context = context_tokens(model, options)
    pools = [(model.thinker_runner(), options.max_sessions + options.max_active, cache_slots(context))]
    if model.has_talker:
        pools.append((model.talker_runner(), options.max_active,
                      cache_slots(context + 2 + options.talker_max_new_tokens)))
    return pools


def cache_bound(model, options):
    """Bytes the KV caches take at most under `options` (a pool also has a spare row)."""
    return sum((rows + 1) * runner.row_bytes(slots, model.cache_dtype) for runner, rows, slots in cache_pools(model, options))


def state_bound(model, options):
    """Bytes the conversations' embeddings and hidden states take at most: each open conversation's,
    and each answer's joined copy of its prompt's (an HTTP request's are its own), at the longest
    conversation allowed."""
    rows = options.max_sessions + options.max_active
    width = 2 * model.config.thinker_config.text_config.hidden_size
    return rows * context_tokens(model, options) * width * ops.zeros((), model.cache_dtype).itemsize


def memory_bound(model, options):
    """Bytes of everything a conversation or an answer holds while it lasts: KV caches and states."""
    return cache_bound(model, options) + state_bound(model, options)


def check_cache_memory(model, options):
    """ValueError naming the limits when their caches and states could exceed `options.cache_memory_mb`."""
    bound = memory_bound(model, options)
    if options.cache_memory_mb is not None and bound > options.cache_memory_mb * MB:
        raise ValueError(
            f"the KV caches and states of {options.max_sessions} conversations and {options.max_active} answers at "
            f"{context_tokens(model, options)} tokens each can take {bound / MB:.0f} MB, more than --cache_memory_mb "
            f"{options.cache_memory_mb:g}: lower --max_context_tokens, --max_sessions or --max_active")
    return bound


def fit_to_memory(model, options):
    """`options`, with max_active 0 replaced by the most answers whose caches and states fit in
    cache_memory_mb next to max_sessions conversations (each answer adds a Thinker and a Talker row)."""
    if options.max_active != 0:
        return options
    if options.cache_memory_mb is None:
        raise ValueError("--max_active 0 (as many answers as the KV cache memory holds) needs --cache_memory_mb")
    budget, without = options.cache_memory_mb * MB, memory_bound(model, options)
    each = memory_bound(model, replace(options, max_active=1)) - without
    answers = int((budget - without) // each)
    if answers < 1:
        raise ValueError(
            f"--cache_memory_mb {options.cache_memory_mb:g} holds no answer's KV caches and states next to "
            f"{options.max_sessions} conversations at {context_tokens(model, options)} tokens each "
            f"({(without + each) / MB:.0f} MB for one answer): lower --max_context_tokens or --max_sessions")
    return replace(options, max_active=answers)
