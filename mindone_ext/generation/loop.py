"""The autoregressive loop shared by the Thinker and the Talker: prefill once, then one compiled
decode step per token, stopping rows at their stop tokens as the reference does."""
import numpy as np

from .sampling import Sampler


def iter_tokens(runner, cache, embeds, input_ids, attention_mask, position_ids, rope_deltas, max_new_tokens,
                sampling, eos_token_ids, pad_token_id, embed_next, suppress_ids=(), prefilled=None):
    """Yields, per generated token, (tokens (B,), the step's input embeddings, its hidden states):
    the first step's inputs are the prompt (B, T, .), later ones one token (B, 1, .).

    `embed_next(step, tokens)` gives the (B, 1, E) input for the token just chosen. Finished rows
    get `pad_token_id`. Closing the generator stops decoding. `prefilled` = (logits, hidden) when
    the cache already holds the prompt (a conversation prefilled piece by piece)."""
    sampler = Sampler(sampling)
    eos = np.asarray(sorted(eos_token_ids or []), np.int64)
    seen = np.asarray(input_ids, np.int64)
    unfinished = np.ones(seen.shape[0], bool)
    if prefilled is None:
        logits, hidden = runner.prefill(cache, embeds, position_ids, attention_mask)
    else:
        logits, hidden = prefilled
    step_embeds = embeds
    for step in range(max_new_tokens):
        if len(suppress_ids):
            logits[:, list(suppress_ids)] = -np.inf
        tokens = np.where(unfinished, sampler(logits, seen).astype(np.int64), pad_token_id)
        seen = np.concatenate([seen, tokens[:, None]], 1)
        yield tokens, step_embeds, hidden
        unfinished &= ~np.isin(tokens, eos)
        if not unfinished.any() or step == max_new_tokens - 1:
            return
        step_embeds = embed_next(step, tokens)
        positions = np.broadcast_to(cache.length + rope_deltas.reshape(1, -1, 1), (3, len(tokens), 1))
        logits, hidden = runner.decode(cache, step_embeds, positions)

