"""The autoregressive loop shared by the Thinker and the Talker: prefill once, then one compiled
decode step per token, stopping rows at their stop tokens as the reference does.

`TokenLoop` is the loop as an explicit state, so that whoever runs the decode steps decides how:
one conversation at a time (`TokenLoop.run`), or many conversations' steps batched into one
compiled call (the voice server's batched engine).
"""
from typing import NamedTuple

import numpy as np

from .sampling import Sampler


class Step(NamedTuple):
    """One generated token per row: `tokens` (B,), and the input embeddings and hidden states of
    the step that chose it (the prompt's (B, T, .) for the first, one position (B, 1, .) later)."""
    tokens: np.ndarray
    embeds: object
    hidden: object


class DecodeRequest:
    """The next decode step a loop needs: the input `lookup` (a TokenLookup) at `positions`
    (3, B, 1) into the loop's cache. The step looks its input up itself and leaves it in
    `embeds` (B, 1, E) (the runner's `decode_requests`)."""
    __slots__ = ("loop", "lookup", "positions", "embeds")

    def __init__(self, loop, lookup, positions):
        self.loop, self.lookup, self.positions, self.embeds = loop, lookup, positions, None


class TokenLoop:
    """`embed_next(step, tokens)` gives the input for the token just chosen (a TokenLookup). Finished
    rows get `pad_token_id`; the loop is `done` when every row has stopped or `max_new_tokens`
    tokens were chosen. Use: `first(...)` with the prompt's logits, then while not done,
    `accept(request, logits, hidden)` for each `request()` (`run` does it all, step by step)."""

    def __init__(self, runner, cache, input_ids, rope_deltas, max_new_tokens, sampling, eos_token_ids, pad_token_id,
                 embed_next, suppress_ids=()):
        self.runner, self.cache = runner, cache
        self.rope_deltas = np.asarray(rope_deltas)
        self.max_new_tokens = max_new_tokens
        self.sampler = Sampler(sampling)
        self.eos = np.asarray(sorted(eos_token_ids or []), np.int64)
        self.pad = pad_token_id
        self.embed_next = embed_next
        self.suppress = list(suppress_ids)
        self.seen = np.asarray(input_ids, np.int64)
        self.unfinished = np.ones(self.seen.shape[0], bool)
        self.count = 0  # tokens chosen so far
        self.tokens = None  # the last ones

    @property
    def done(self):
        return self.count >= self.max_new_tokens or not self.unfinished.any()

    def first(self, logits, hidden, embeds):
        """The first token, from the prompt's last logits."""
        return self._choose(logits, embeds, hidden)

    def request(self):
        """The decode step that gives the next token's logits (its input is made now: for the
        Talker, the Thinker's answer token it reads must exist by then)."""
        lookup = self.embed_next(self.count - 1, self.tokens)
        positions = np.broadcast_to(self.cache.length + self.rope_deltas.reshape(1, -1, 1), (3, len(self.tokens), 1))
        return DecodeRequest(self, lookup, positions)

    def decode(self, request):
        """Run `request`'s step by itself -> (logits, hidden)."""
        return self.runner.decode_requests([request])[0]

    def run(self, logits, hidden, embeds):
        """Yields every Step from the prompt's logits on, the decode steps run one by one."""
        yield self.first(logits, hidden, embeds)
        while not self.done:
            request = self.request()
            yield self.accept(request, *self.decode(request))

    def accept(self, request, logits, hidden):
        """The next token, from the logits of `request`'s step."""
        return self._choose(logits, request.embeds, hidden)

    def _choose(self, logits, embeds, hidden):
        if self.done:
            raise RuntimeError("the loop is done: no more tokens")
        if self.suppress:
            logits[:, self.suppress] = -np.inf
        tokens = np.where(self.unfinished, self.sampler(logits, self.seen).astype(np.int64), self.pad)
        self.seen = np.concatenate([self.seen, tokens[:, None]], 1)
        self.unfinished &= ~np.isin(tokens, self.eos)
        self.count += 1
        self.tokens = tokens
        return Step(tokens, embeds, hidden)
