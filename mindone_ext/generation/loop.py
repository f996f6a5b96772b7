"""The autoregressive loop shared by every generating model: prefill once, then one compiled
decode step per token, stopping rows at their stop tokens as the reference does."""
import numpy as np

from .sampling import Sampler


def generate_tokens(runner, cache, embeds, input_ids, attention_mask, position_ids, rope_deltas,
                    max_new_tokens, sampling, eos_token_ids, pad_token_id, on_token=None):
    """Returns the new tokens (B, n) as int64; finished rows are filled with `pad_token_id`.

    `on_token(step, tokens, hidden)` is called after each token, for callers that need the
    hidden states (the Talker) or stream text."""
    sampler = Sampler(sampling)
    eos = np.asarray(sorted(eos_token_ids or []), np.int64)
    seen = np.asarray(input_ids, np.int64)
    unfinished = np.ones(seen.shape[0], bool)
    logits, hidden = runner.prefill(cache, embeds, position_ids, attention_mask)
    new = []
    for step in range(max_new_tokens):
        tokens = sampler(logits, seen).astype(np.int64)
        tokens = np.where(unfinished, tokens, pad_token_id)
        new.append(tokens)
        seen = np.concatenate([seen, tokens[:, None]], 1)
        if on_token is not None:
            on_token(step, tokens, hidden)
        unfinished &= ~np.isin(tokens, eos)
        if not unfinished.any() or step == max_new_tokens - 1:
            break
        positions = np.broadcast_to(cache.length + rope_deltas.reshape(1, -1, 1), (3, len(tokens), 1))
        logits, hidden = runner.decode(cache, tokens, positions)
    return np.stack(new, 1) if new else np.zeros((seen.shape[0], 0), np.int64)
