"""Running the requests of a conversation's turn, or of an answer's close, one by one.

What a turn or an answer's close prefills is written as a generator of requests: ExtendRequests
(generation/decode.py: a piece for a cache) and EncodeRequests (audio_encoder.py: a clip for the
audio encoder), each sent back its result. `prefill_now` runs them as they come; the voice server
runs those of several conversations together (serve/engine.py)."""
from .audio_encoder import EncodeRequest


def run_request(request):
    """A request by itself: an ExtendRequest's (logits, hidden), an EncodeRequest's embeddings."""
    if isinstance(request, EncodeRequest):
        return request.encoder.encode_clips([request.features])[0]
    return request.cache.pool.runner.extend(request.cache, request.embeds, request.positions)


def prefill_now(steps):
    """Run a generator of requests, each as it comes (an error is thrown back into the generator,
    so its turn rewinds) -> the generator's return value."""
    try:
        request = next(steps)
        while True:
            try:
                done = run_request(request)
            except Exception as error:  # noqa: BLE001  (raised again by the generator, after its turn rewinds)
                request = steps.throw(error)
            else:
                request = steps.send(done)
    except StopIteration as end:
        return end.value
