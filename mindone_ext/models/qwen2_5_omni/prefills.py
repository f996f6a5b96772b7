"""Running the requests of a conversation's turn, an answer's start or its close, one by one.

What a turn, an answer's start or an answer's close prefills is written as a generator of
requests: ExtendRequests (generation/decode.py: a piece for a cache) and EncodeRequests (below: a
part of the media for an encoder), each sent back its result. `prefill_now` runs them as they
come; the voice server runs those of several conversations together (serve/engine.py)."""
from typing import NamedTuple


class EncodeRequest(NamedTuple):
    """A part of a prompt's media for `encoder` to encode: its `inputs` (the audio encoder's: log-mel
    features (num_mel_bins, frames); the vision encoder's: (pixel rows, (t, h, w))) and the
    number of embeddings it gives, `tokens`. Sent back the embeddings; the voice server encodes
    the parts waiting together in one call per encoder (`encoder.encode_clips`)."""
    encoder: object
    inputs: object
    tokens: int


def run_request(request):
    """A request by itself: an ExtendRequest's (logits, hidden), an EncodeRequest's embeddings."""
    if isinstance(request, EncodeRequest):
        return request.encoder.encode_clips([request.inputs])[0]
    return request.cache.pool.runner.extend(request.cache, request.embeds, request.positions)


def prefill_now(steps):
    """Run a generator of requests, each as it comes (an error is thrown back into the generator,
    so its turn rewinds) -> the generator's return value. `()`: nothing to run."""
    try:
        request = next(iter(steps))
        while True:
            try:
                done = run_request(request)
            except Exception as error:  # noqa: BLE001  (raised again by the generator, after its turn rewinds)
                request = steps.throw(error)
            else:
                request = steps.send(done)
    except StopIteration as end:
        return end.value
