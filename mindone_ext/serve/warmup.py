"""The server's warm-up: spoken turns through its engine before it takes its first client.

A process's first call of each compiled graph builds its kernels (on a CPU ~0.5 s over the graphs
one spoken answer uses, on an Ascend card seconds), and answers decoded, encoded or vocoded
together use graphs of their own (their rows padded to a power of two). The warm-up pays for
these before the port opens, so the first client gets a warm answer and a load balancer sends no
one to a cold process: rounds of 1, 2, 4, ... spoken turns at once, up to max_active, each going
as a client's turn does (a conversation of its own, the audio fed in frames and ended, answered in
the default voice with at most TEXT_TOKENS and SPEECH_TOKENS, the conversation closed). What is
left is only what the graphs keep; answers of other lengths and longer conversations may still
meet a few shapes for the first time.
"""
import asyncio
import time

from ..models.qwen2_5_omni.session import ConversationFull, ConversationSession
from ..utils.audio import speech_like
from ..utils.graph_cache import StoredGraph
from .engine import Failed, Finished
from .options import AUDIO_IN_RATE, AnswerSettings

TURN_SECONDS = 5.0  # a spoken question: two whole audio encoder windows (2 s) and part of another
FRAME_SECONDS = 0.5  # the audio arrives in frames of this length, as the example client sends it
# An answer's graphs are the same at every text token: a short answer meets them all; its speech
# is long enough for the streamed chunks of 1, 2, 4 and 8 DiT blocks (12 codes each) and a last one
TEXT_TOKENS, SPEECH_TOKENS = 16, 200


class WarmupFailed(RuntimeError):
    """A warm-up turn failed: a model that cannot answer it would fail every client, so the
    server does not start."""


def warmup_rounds(options):
    """Answers at once in each round: the powers of two below max_active, then max_active
    (each turn holds a conversation: at most max_sessions)."""
    most, counts = min(options.max_active, options.max_sessions), [1]
    while counts[-1] * 2 < most:
        counts.append(counts[-1] * 2)
    return counts + [most] if most > 1 else counts


async def warm_up(engine, model, processor, options):
    """Run the warm-up rounds; returns (answers at once per round, seconds, graphs it added).
    Raises WarmupFailed naming what failed."""
    began, graphs = time.monotonic(), StoredGraph.held
    rounds = warmup_rounds(options)
    seconds = min(TURN_SECONDS, options.max_audio_seconds)  # a turn clients may send
    clip = speech_like(seconds, AUDIO_IN_RATE)
    try:
        for count in rounds:
            await asyncio.gather(*(_spoken_turn(engine, model, processor, options, clip) for _ in range(count)))
    except ConversationFull:  # refused before any work: a client's turn with its answer needs as much
        raise WarmupFailed(f"the warm-up's spoken turn ({seconds:g} s of audio and an answer of up to {TEXT_TOKENS} "
                           f"tokens) does not fit in --max_context_tokens {options.max_context_tokens}: raise it, or "
                           "serve without the warm-up (--no_warmup)") from None
    except Exception as e:
        raise WarmupFailed(f"the warm-up's spoken turn failed: {type(e).__name__}: {e}") from e
    return rounds, time.monotonic() - began, StoredGraph.held - graphs


async def _spoken_turn(engine, model, processor, options, clip):
    settings = AnswerSettings.defaults(options)
    settings.audio = model.has_talker
    settings.seed = 0  # the Talker samples: the same answers, so the same graphs, at every start
    settings.max_new_tokens = min(settings.max_new_tokens, TEXT_TOKENS)
    settings.talker_max_new_tokens = min(settings.talker_max_new_tokens, SPEECH_TOKENS)
    session = await engine.call(lambda: ConversationSession(model, processor, max_tokens=options.max_context_tokens,
                                                            answer_room=settings.max_new_tokens,
                                                            keep_talker_cache=False))
    generation = None
    try:
        await engine.call_steps(session.begin_audio_steps)
        frame = int(FRAME_SECONDS * AUDIO_IN_RATE)
        for start in range(0, len(clip), frame):
            await engine.call_steps(session.feed_audio_steps, clip[start:start + frame])
        await engine.call_steps(session.end_audio_steps)
        kwargs = settings.generate_kwargs()
        generation = engine.submit(lambda: session.answer(tokenizer=processor.tokenizer, **kwargs))
        while True:
            event = await generation.events.get()
            if isinstance(event, Failed):
                raise event.error
            if isinstance(event, Finished):
                break
    finally:  # (interrupted: the answer stops before its conversation's rows are freed)
        if generation is not None:
            await engine.cancel(generation)
        await engine.call(session.close)
