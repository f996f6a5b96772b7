"""The autoregressive loop shared by the Thinker and the Talker: prefill once, then one compiled
decode step per token, stopping rows at their stop tokens as the reference does.

`TokenLoop` is the loop as an explicit state, so that whoever runs the decode steps decides how:
one conversation at a time (`TokenLoop.run`), or many conversations' steps batched into one
compiled call (the voice server's batched engine).
"""
from typing import NamedTuple

import numpy as np
from mindspore import ops

from .decode import token_embeddings
from .sampling import Sampler


class Step(NamedTuple):
    """One generated token per row: `tokens` (B,), and the input embeddings and hidden states of
    the step that chose it (the prompt's (B, T, .) for the first, one position (B, 1, .) later)."""
    tokens: np.ndarray
    embeds: object
    hidden: object


class TokenLookup(NamedTuple):
    """A decode step's input still to be looked up: the rows `ids` (B, 1) of `embedding` (an
    nn.Embedding), `plus` (B, 1, E) added when given."""
    embedding: object
    ids: np.ndarray
    plus: object = None


class DecodeRequest:
    """The next decode step a loop needs: the input `lookup` (a TokenLookup) at `positions`
    (3, B, 1) into the loop's cache. `embeds` (B, 1, E) looks it up when first asked;
    `look_up_together` does it for the requests of many loops at once."""
    __slots__ = ("loop", "lookup", "positions", "_embeds")

    def __init__(self, loop, lookup, positions):
        self.loop, self.lookup, self.positions, self._embeds = loop, lookup, positions, None

    @property
    def embeds(self):
        if self._embeds is None:
            self._embeds = token_embeddings(*self.lookup)
        return self._embeds


def look_up_together(requests):
    """The inputs of many decode steps looked up in one graph call per embedding table (and per
    kind: with `plus` or without) instead of one per request: a batched server round's 16
    conversations made 32 calls of ~0.15-0.4 ms. The rows are padded to a power of two (one graph
    per power, whatever the batch) and each request gets its own rows, the values of its own
    lookup (a gather and an addition per row). A group whose call fails is left to look up
    alone when its steps run, so that the error fails only the steps it belongs to."""
    groups = {}
    for request in requests:
        if request._embeds is None:
            groups.setdefault((id(request.lookup.embedding), request.lookup.plus is None), []).append(request)
    for group in (g for g in groups.values() if len(g) > 1):
        sizes = [len(request.lookup.ids) for request in group]
        count = sum(sizes)
        padding = (1 << (count - 1).bit_length()) - count
        ids = np.concatenate([request.lookup.ids for request in group] + [np.zeros((padding, 1), np.int64)])
        plus = None
        if group[0].lookup.plus is not None:
            first = group[0].lookup.plus
            plus = ops.cat([request.lookup.plus for request in group]
                           + [ops.zeros((padding,) + tuple(first.shape[1:]), first.dtype)] * bool(padding))
        try:
            rows = ops.split(token_embeddings(group[0].lookup.embedding, ids, plus), sizes + [padding] * bool(padding))
        except Exception:  # noqa: BLE001  (see above)
            continue
        for request, embeds in zip(group, rows):
            request._embeds = embeds


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
        return self.runner.decode(self.cache, request.embeds, request.positions)

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
