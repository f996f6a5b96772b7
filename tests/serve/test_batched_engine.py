"""The batched engine: answers whose decode steps run together (rows of the runners' cache pools)
give each conversation exactly what it gets alone, as answers join, leave, fail and are cancelled."""
import asyncio
import time

import numpy as np
import pytest

from mindone_ext import Qwen2_5OmniForConditionalGeneration
from mindone_ext.models.qwen2_5_omni.session import ConversationSession
from mindone_ext.models.qwen2_5_omni.streaming import AudioChunk, TextDelta
from mindone_ext.models.qwen2_5_omni.token2wav_stream import StreamChunking
from mindone_ext.serve.engine import Engine, Failed, Finished, Generation, Started
from tests.serve.conftest import drain

PROMPTS = [np.array([[401, 5, 6, 7, 8, 9, 10, 402]]), np.array([[401, 20, 30, 40, 402]]),
           np.array([[401] + list(range(50, 90)) + [402]])]


def settings(i):
    # answers of different lengths (rows leave at different steps), the Talker sampling, seeded
    return dict(spk="Ethan", max_new_tokens=(6, 11, 3)[i % 3], eos_token_id=[], talker_max_new_tokens=(9, 14, 30)[i % 3],
                seed=i)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    """A model of this module's own: its runners get pools."""
    return Qwen2_5OmniForConditionalGeneration.from_pretrained(tiny_checkpoint)


def outcome(events):
    events = list(events)
    text = [e.token_id for e in events if isinstance(e, TextDelta)]
    audio = [np.asarray(e.audio) for e in events if isinstance(e, AudioChunk)]
    return text, np.concatenate(audio) if audio else np.zeros(0, np.float32)


def assert_same(got, want):
    assert got[0] == want[0]
    assert got[1].shape == want[1].shape and float(np.abs(got[1] - want[1]).max(initial=0)) <= 1e-5


def test_answers_decoded_together_equal_each_alone(model, processor):
    alone = [outcome(model.generate_stream(input_ids=p, **settings(i))) for i, p in enumerate(PROMPTS)]
    session_alone = talk(model, processor)
    model.thinker_runner().use_pool(6, model.cache_dtype)
    model.talker_runner().use_pool(3, model.cache_dtype)

    async def scenario():
        engine, began = Engine(max_active=3, max_queue=4, batched=True), time.monotonic()
        try:
            # 3 at once, a 4th waits for a row and joins while the others decode; a 5th fails at
            # its start; a 6th is cancelled mid-answer
            runs = [engine.submit(lambda p=p, i=i: model.answer(input_ids=p, **settings(i % 3)))
                    for i, p in enumerate(PROMPTS + PROMPTS[:1])]
            broken = engine.submit(lambda: model.answer(input_ids=PROMPTS[0], spk="Nobody"))
            endless = engine.submit(lambda: model.answer(input_ids=PROMPTS[1], spk="Ethan", max_new_tokens=500,
                                                         eos_token_id=[]))
            got = await asyncio.gather(*(drain(r) for r in runs), drain(broken))
            assert await endless.events.get() == Started()
            await endless.events.get()
            await engine.cancel(endless)
            session = await talk_async(engine, model, processor)
            return got, session, dict(engine.busy_seconds), time.monotonic() - began
        finally:
            engine.stop()

    got, session, busy, wall = asyncio.run(scenario())
    for i, events in enumerate(got[:4]):
        assert events[0] == Started() and events[-1] == Finished()
        assert_same(outcome(events[1:-1]), alone[i % 3])
    assert isinstance(got[4][-1], Failed) and "unknown speaker 'Nobody'" in str(got[4][-1].error)
    assert_same(session, session_alone)
    assert model.thinker_runner().pool.in_use == 0 and model.talker_runner().pool.in_use == 0
    for runner in (model.thinker_runner(), model.talker_runner()):  # steps did run batched, looking their inputs up
        assert {shape[0] for _, _, shape, looked_up in runner.graphs_run if looked_up and shape[1] == 1} >= {2, 4}
    # the model thread's time, by what it did: each kind of work happened, no second counted twice
    assert min(busy.values()) > 0 and sum(busy.values()) <= wall, (busy, wall)


def talk(model, processor):
    """Two text turns of a conversation, its second answer's outcome (run alone)."""
    session = ConversationSession(model, processor)
    try:
        for question in ("hello there", "and then?"):
            session.ask(question)
            result = outcome(session.respond(**settings(1)))
        return result
    finally:
        session.close()


async def talk_async(engine, model, processor):
    """talk() through the engine, next to other answers."""
    session = await engine.call(ConversationSession, model, processor)
    other = engine.submit(lambda: model.answer(input_ids=PROMPTS[2], **settings(2)))
    try:
        for question in ("hello there", "and then?"):
            await engine.call(session.ask, question)
            events = await drain(engine.submit(lambda: session.answer(**settings(1))))
            result = outcome(events[1:-1])
        await drain(other)
        return result
    finally:
        await engine.call(session.close)


def test_a_new_answers_first_audio_comes_before_the_audio_of_answers_ahead_of_playback(model, monkeypatch):
    """Playback on a clock 1000x slow (an accelerator's margin): a long answer's speech is far ahead
    of its playback, so while a new answer waits for its first audio, the long one's waits."""
    chunking = StreamChunking(chunk_blocks=1, past_blocks=1, max_chunk_blocks=1)  # a window every 12 codes
    asks = [dict(input_ids=PROMPTS[0], spk="Ethan", max_new_tokens=6, eos_token_id=[], talker_max_new_tokens=90,
                 seed=3),
            dict(input_ids=PROMPTS[1], spk="Chelsie", max_new_tokens=6, eos_token_id=[], talker_max_new_tokens=40,
                 seed=4)]
    alone = [outcome(model.generate_stream(chunking=chunking, **ask)) for ask in asks]
    model.thinker_runner().use_pool(2, model.cache_dtype)
    model.talker_runner().use_pool(2, model.cache_dtype)
    delivered = []  # (generation, event), in the order the model thread delivered them
    deliver = Generation.deliver
    monkeypatch.setattr(Generation, "deliver", lambda g, event: (delivered.append((g, event)), deliver(g, event)))

    async def scenario():
        engine = Engine(max_active=2, max_queue=0, batched=True, clock=lambda: time.monotonic() / 1000)
        try:
            long, events = engine.submit(lambda: model.answer(chunking=chunking, **asks[0])), []
            while not any(isinstance(e, AudioChunk) for e in events):  # the long answer is heard
                events.append(await long.events.get())
            new = engine.submit(lambda: model.answer(chunking=chunking, **asks[1]))
            rest, new_events = await asyncio.gather(drain(long), drain(new))
            return {long: "long", new: "new"}, (events + rest, new_events)
        finally:
            engine.stop()

    names, got = asyncio.run(scenario())
    for events, want in zip(got, alone):
        assert events[0] == Started() and events[-1] == Finished()
        assert_same(outcome(events[1:-1]), want)
    order = [(names[g], type(event).__name__) for g, event in delivered]
    waited = order[order.index(("new", "Started")):order.index(("new", "AudioChunk"))]
    assert ("long", "AudioChunk") not in waited
    # and the long answer had audio to make in that time (codes for windows it made afterwards)
    assert order[order.index(("new", "AudioChunk")):].count(("long", "AudioChunk")) >= 2
