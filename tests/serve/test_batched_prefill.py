"""Conversations' turns that reach the engine together are prefilled as one batched step, their
audio clips encoded in one call (Engine.call_steps), and answers that end together keep their ends
in one batch: each conversation ends with what its turns give alone, a turn that fails fails alone,
and a failed batch (prefill or encoding) rewinds every turn in it and leaves the conversations
usable."""
import asyncio

import numpy as np
import pytest

from mindone_ext import Qwen2_5OmniForConditionalGeneration
from mindone_ext.generation.decode import PREFILL_CHUNK, ROWS_TOGETHER, CompiledDecoder
from mindone_ext.models.qwen2_5_omni.audio_encoder import Qwen2_5OmniAudioEncoder
from mindone_ext.models.qwen2_5_omni.session import ConversationSession
from mindone_ext.models.qwen2_5_omni.streaming import AudioChunk
from mindone_ext.serve.engine import PREFILL_BUDGET, Engine, Finished
from tests.serve.conftest import drain

QUESTIONS = ["hi", "what is the weather like in Paris tomorrow morning, and should I take an umbrella or a coat "
             "when I go out to buy bread and a newspaper before work?", "and then?"]


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    """A model of this module's own: its Thinker gets a shared pool, as in the server."""
    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(tiny_checkpoint)
    model.thinker_runner().use_pool(8, model.cache_dtype)
    return model


def speech(seconds, seed):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.2 * np.sin(2 * np.pi * (180 + 40 * seed) * t) + 1e-3 * rng.standard_normal(len(t))).astype(np.float32)


def turns_alone(model, processor, i):
    session = ConversationSession(model, processor)
    session.ask(QUESTIONS[i])
    session.begin_audio()
    session.feed_audio(speech(1.1 + 0.3 * i, i)[:16000])
    session.feed_audio(speech(1.1 + 0.3 * i, i)[16000:])
    session.end_audio()
    return session


async def turns_together(engine, sessions):
    async def each(call, arguments):
        return await asyncio.gather(*(engine.call_steps(getattr(s, call), *a) for s, a in zip(sessions, arguments)),
                                    return_exceptions=True)

    asked = await each("ask_steps", [(q,) for q in QUESTIONS])
    begun = await each("begin_audio_steps", [()] * 3)
    fed = await each("feed_audio_steps", [(speech(1.1 + 0.3 * i, i)[:16000],) for i in range(3)])
    fed += await each("feed_audio_steps", [(speech(1.1 + 0.3 * i, i)[16000:],) for i in range(3)])
    ended = await each("end_audio_steps", [()] * 3)
    return asked + begun + fed + ended


def batch_sizes(monkeypatch, owner, name):
    """A list that receives, at each call of owner.name(requests), how many requests it ran together."""
    sizes, method = [], getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda self, requests: sizes.append(len(requests)) or method(self, requests))
    return sizes


def assert_same_conversation(got, want):
    np.testing.assert_array_equal(got.ids, want.ids)
    assert got.cache.length == want.cache.length
    assert float(np.abs(got.logits - want.logits).max()) <= 1e-5


def test_turns_arriving_together_prefill_together_and_equal_each_alone(model, processor, monkeypatch):
    alone = [turns_alone(model, processor, i) for i in range(3)]
    batches = batch_sizes(monkeypatch, CompiledDecoder, "extend_requests")
    encoded = batch_sizes(monkeypatch, Qwen2_5OmniAudioEncoder, "encode_clips")

    async def scenario():
        engine = Engine(max_active=2, max_queue=2, batched=True)
        try:
            sessions = [await engine.call(ConversationSession, model, processor) for _ in range(3)]
            return sessions, await turns_together(engine, sessions)
        finally:
            engine.stop()

    sessions, results = asyncio.run(scenario())
    assert not [r for r in results if isinstance(r, Exception)]
    for got, want in zip(sessions, alone):
        assert_same_conversation(got, want)
    assert max(batches) == 3  # the three turns' pieces reached the decoder together
    assert encoded == [3] * 3  # and their clips the encoder, at each call that brings audio
    # one step (its 3 rows padded to ROWS_TOGETHER)
    assert any(rows == ROWS_TOGETHER and tokens > 1 for rows, tokens, _ in model.thinker_runner().shapes)
    for session in sessions + alone:
        session.close()


@pytest.mark.parametrize("failing", [(CompiledDecoder, "extend_requests"), (Qwen2_5OmniAudioEncoder, "encode_clips")])
def test_a_failed_turn_fails_alone_and_a_failed_batch_rewinds_every_turn_in_it(model, processor, monkeypatch,
                                                                               failing):
    async def scenario():
        engine = Engine(max_active=2, max_queue=2, batched=True)
        try:
            sessions = [await engine.call(ConversationSession, model, processor) for _ in range(3)]
            for s in sessions:
                await engine.call_steps(s.begin_audio_steps)
            bad = speech(0.5, 0)
            bad[100] = np.nan
            pieces = [speech(1.0, 1), bad, speech(1.0, 2)]
            one_failed = await asyncio.gather(*(engine.call_steps(s.feed_audio_steps, p)
                                                for s, p in zip(sessions, pieces)), return_exceptions=True)
            lengths = [s.cache.length for s in sessions]
            for s in sessions[1:2]:  # the failed turn was rewound: it opens again
                await engine.call_steps(s.begin_audio_steps)
            starts = [s.turn_start for s in sessions]

            def broken(runner, requests):
                raise RuntimeError("a batch that fails")

            monkeypatch.setattr(*failing, broken)
            all_failed = await asyncio.gather(*(engine.call_steps(s.feed_audio_steps, speech(1.0, 3 + i))
                                                for i, s in enumerate(sessions)), return_exceptions=True)
            rewound = [(s.cache.length, s.audio) for s in sessions]
            monkeypatch.undo()
            after = await asyncio.gather(*(engine.call_steps(s.ask_steps, "and now?") for s in sessions),
                                         return_exceptions=True)
            return sessions, one_failed, lengths, starts, all_failed, rewound, after
        finally:
            engine.stop()

    sessions, one_failed, lengths, starts, all_failed, rewound, after = asyncio.run(scenario())
    assert one_failed[0] is None and one_failed[2] is None
    assert isinstance(one_failed[1], ValueError) and "NaN" in str(one_failed[1])
    assert lengths[0] > starts[0] and lengths[2] > starts[2]  # their audio went in
    assert all(isinstance(r, RuntimeError) and "a batch that fails" in str(r) for r in all_failed)
    assert rewound == [(start, None) for start in starts]  # each conversation back to before its turn
    assert after == [None] * 3 and all(s.logits is not None for s in sessions)
    for session in sessions:
        session.close()


def test_answers_ending_together_keep_their_ends_in_one_batch(model, processor, monkeypatch):
    """Conversations' answers that end in the same round close together: each conversation's
    keeping its answer (its last token and the turn's end) is prefilled in one batched step, and
    each conversation is then what it is alone, ready for its next turn."""
    answer = dict(max_new_tokens=4, eos_token_id=[], return_audio=False)

    def alone(question):
        session = ConversationSession(model, processor)
        session.ask(question)
        text = [e.token_id for e in session.respond(**answer) if hasattr(e, "token_id")]
        return session, text

    alone = [alone(q) for q in QUESTIONS]
    batches = batch_sizes(monkeypatch, CompiledDecoder, "extend_requests")

    async def scenario():
        engine = Engine(max_active=3, max_queue=0, batched=True)
        try:
            sessions = [await engine.call(ConversationSession, model, processor) for _ in QUESTIONS]
            for session, question in zip(sessions, QUESTIONS):
                await engine.call(session.ask, question)
            runs = [engine.submit(lambda s=s: s.answer(**answer)) for s in sessions]
            events = await asyncio.gather(*(drain(run) for run in runs))
            closing = list(batches)
            next_turns = await asyncio.gather(*(engine.call_steps(s.ask_steps, "and then?") for s in sessions))
            return sessions, events, closing, next_turns
        finally:
            engine.stop()

    sessions, events, closing, next_turns = asyncio.run(scenario())
    assert closing == [3]  # the three answers' ends, one batched step
    for session, run, (want, text) in zip(sessions, events, alone):
        assert isinstance(run[-1], Finished) and [e.token_id for e in run if hasattr(e, "token_id")] == text
        want.ask("and then?")
        assert_same_conversation(session, want)
    assert next_turns == [None] * 3
    for session, _ in alone:
        session.close()
    for session in sessions:
        session.close()


def round_order(monkeypatch):
    """A list that receives the tokens of each batched prefill call and "round" at each round of answers."""
    order = []
    extend, answers_round = CompiledDecoder.extend_requests, Engine._round
    monkeypatch.setattr(CompiledDecoder, "extend_requests", lambda self, requests: order.append(
        sum(r.embeds.shape[1] for r in requests)) or extend(self, requests))
    monkeypatch.setattr(Engine, "_round", lambda self, running: order.append("round") or answers_round(self, running))
    return order


def tokens_between_rounds(order):
    """The tokens prefilled (numbers) or encoded (("encoded", tokens), media_encoding's) between two
    rounds, from the long prompt's first encoded part or full prefill part to its last full part."""
    first = next(i for i, item in enumerate(order) if item == PREFILL_CHUNK or isinstance(item, tuple))
    last = len(order) - 1 - order[::-1].index(PREFILL_CHUNK)
    runs, tokens = [], 0
    for item in order[first:last + 1]:
        if item == "round":
            runs, tokens = runs + [tokens] * (tokens > 0), 0
        else:
            tokens += item[1] if isinstance(item, tuple) else item
    return runs + [tokens]


def media_encoding(monkeypatch, order):
    """`order` receives ("encoded", tokens) at each call of the audio encoder's encode_clips."""
    encode = Qwen2_5OmniAudioEncoder.encode_clips

    def recorded(self, clips):
        out = encode(self, clips)
        order.append(("encoded", sum(o.shape[0] for o in out)))
        return out
    monkeypatch.setattr(Qwen2_5OmniAudioEncoder, "encode_clips", recorded)


def token_ids(events):
    return [e.token_id for e in events if hasattr(e, "token_id")]


async def two_conversations(engine, model, processor):
    """Two conversations opened on the engine's thread, the first asked QUESTIONS[0] (its answer is
    the one in progress in the tests below)."""
    speaking, typing = [await engine.call(ConversationSession, model, processor) for _ in range(2)]
    await engine.call(speaking.ask, QUESTIONS[0])
    return speaking, typing


def answer_alone(model, processor):
    """The token ids of the answer in progress when it runs alone."""
    speaking = ConversationSession(model, processor)
    speaking.ask(QUESTIONS[0])
    tokens = token_ids(speaking.respond(**LONG_ANSWER))
    speaking.close()
    return tokens


LONG_TURN = " ".join(f"word{i}" for i in range(400))  # 3171 tokens: 25 parts of at most 128
LONG_ANSWER = dict(max_new_tokens=48, eos_token_id=[], return_audio=False)


def test_a_long_turn_prefills_between_the_steps_of_an_answer_in_progress(model, processor, monkeypatch):
    """A long typed turn arriving while another conversation's answer is being made runs in parts:
    at most PREFILL_BUDGET of its tokens between two rounds of the answer's steps (a long prompt
    does not stall answers in progress); both conversations end as they do alone."""
    def alone():
        speaking = ConversationSession(model, processor)
        speaking.ask(QUESTIONS[0])
        tokens = [e.token_id for e in speaking.respond(**LONG_ANSWER) if hasattr(e, "token_id")]
        typing = ConversationSession(model, processor)
        typing.ask(LONG_TURN)
        return speaking, tokens, typing

    want_speaking, want_tokens, want_typing = alone()
    parts = len(want_typing.embeds)
    assert parts >= 2 * PREFILL_BUDGET // PREFILL_CHUNK  # the turn needs several passes
    order = round_order(monkeypatch)

    async def scenario():
        engine = Engine(max_active=2, max_queue=0, batched=True)
        try:
            speaking, typing = await two_conversations(engine, model, processor)
            order.clear()
            run = engine.submit(lambda: speaking.answer(**LONG_ANSWER))
            turn = await engine.call_steps(typing.ask_steps, LONG_TURN)
            return speaking, typing, turn, await drain(run)
        finally:
            engine.stop()

    speaking, typing, turn, events = asyncio.run(scenario())
    assert turn is None and isinstance(events[-1], Finished)
    assert [e.token_id for e in events if hasattr(e, "token_id")] == want_tokens
    assert_same_conversation(typing, want_typing)
    want_speaking.ask("and then?")
    speaking.ask("and then?")
    assert_same_conversation(speaking, want_speaking)
    runs = tokens_between_rounds(order)
    assert len(runs) >= 2 and max(runs) <= PREFILL_BUDGET, order
    for session in (speaking, typing, want_speaking, want_typing):
        session.close()


def test_a_conversation_closed_during_its_long_turn_leaves_its_rows_alone(model, processor):
    """A client gone while its long turn is part-way (its connection's handler cancelled, the
    conversation closed): the turn's remaining parts do not run (its rows may be another
    conversation's by then), the turn ends with an error, and a new conversation is what it is alone."""
    want = ConversationSession(model, processor)
    want.ask(QUESTIONS[1])

    async def scenario():
        engine = Engine(max_active=2, max_queue=0, batched=True)
        try:
            speaking, typing = await two_conversations(engine, model, processor)
            run = engine.submit(lambda: speaking.answer(**LONG_ANSWER))
            turn = asyncio.ensure_future(engine.call_steps(typing.ask_steps, LONG_TURN))
            await asyncio.sleep(0)  # the turn's call is queued before the close
            await engine.call(typing.close)
            error = await asyncio.gather(turn, return_exceptions=True)
            newcomer = await engine.call(ConversationSession, model, processor)
            await engine.call_steps(newcomer.ask_steps, QUESTIONS[1])
            await drain(run)
            await engine.call(speaking.close)
            return error[0], newcomer
        finally:
            engine.stop()

    error, newcomer = asyncio.run(scenario())
    assert isinstance(error, ValueError) and "the conversation is closed" in str(error), error
    assert_same_conversation(newcomer, want)
    newcomer.close()
    want.close()


SHORT = dict(max_new_tokens=4, eos_token_id=[], return_audio=False)


def answered_beside_another(model, processor, order, **prompt):
    """An answer to `prompt` (an HTTP request's: model.answer, SHORT) submitted while a conversation's
    answer is being made (`order` cleared as both start). Returns the conversation's answer alone,
    with the other beside it, and the other's (token ids)."""
    alone = answer_alone(model, processor)

    async def scenario():
        engine = Engine(max_active=2, max_queue=0, batched=True)
        try:
            speaking = await engine.call(ConversationSession, model, processor)
            await engine.call(speaking.ask, QUESTIONS[0])
            order.clear()
            first = engine.submit(lambda: speaking.answer(**LONG_ANSWER))
            second = engine.submit(lambda: model.answer(**prompt, **SHORT))
            events = await asyncio.gather(drain(first), drain(second))
            await engine.call(speaking.close)
            return events
        finally:
            engine.stop()

    beside, other = asyncio.run(scenario())
    return alone, token_ids(beside), token_ids(other)


def test_a_long_prompt_of_an_answer_prefills_between_the_steps_of_another(model, processor, monkeypatch):
    """An answer with a prompt of its own (an HTTP request's) prefills it in parts too: at most
    PREFILL_BUDGET tokens between two rounds of the answer in progress; both answers' tokens are
    those they have alone."""
    prompt = np.array([[401] + [10 + i % 380 for i in range(1000)] + [402]])  # the tiny vocabulary: 438
    want = token_ids(model.generate_stream(input_ids=prompt, **SHORT))
    order = round_order(monkeypatch)
    alone, beside, got = answered_beside_another(model, processor, order, input_ids=prompt)
    assert beside == alone and got == want
    runs = tokens_between_rounds(order)
    assert len(runs) >= 2 and max(runs) <= PREFILL_BUDGET, order


def test_the_audio_of_an_answer_is_encoded_in_parts_between_the_steps_of_another(model, processor, tiny_checkpoint,
                                                                                  monkeypatch):
    """An answer whose prompt has long audio (an HTTP request's) encodes it in parts (media_parts.py)
    counted in the same budget: at most PREFILL_BUDGET tokens encoded or prefilled between two rounds
    of the answer in progress; both answers' tokens are those they have alone (the audio encoded whole)."""
    from tests.models.qwen2_5_omni.multimodal_inputs import AUDIO, build

    inputs = build(tiny_checkpoint, ["Listen: " + AUDIO + " and answer."], (3000,), seed=3)  # 750 audio tokens
    want = model.generate(**inputs, **SHORT)[0, inputs["input_ids"].shape[1]:].asnumpy().tolist()
    order = round_order(monkeypatch)
    media_encoding(monkeypatch, order)
    alone, beside, got = answered_beside_another(model, processor, order, **inputs)
    assert beside == alone and got == want
    encoded = [item[1] for item in order if isinstance(item, tuple)]
    assert len(encoded) >= 30 and sum(encoded) == 750, order  # parts of 4 windows: 20 tokens each
    runs = tokens_between_rounds(order)
    assert len(runs) >= 3 and max(runs) <= PREFILL_BUDGET, order
    # a call counts at least PREFILL_CHUNK: 4 encoder calls between two rounds, not 25 small ones
    gaps = "".join("e" if isinstance(item, tuple) else "|" if item == "round" else "" for item in order).split("|")
    assert max(len(gap) for gap in gaps) == PREFILL_BUDGET // PREFILL_CHUNK, order


def test_the_talker_prompt_of_a_long_conversation_prefills_between_the_steps_of_another(model, processor,
                                                                                        monkeypatch):
    """A spoken answer's Talker prompt is the whole conversation (here a 3171-token turn and more):
    it prefills in parts between rounds too, at most PREFILL_BUDGET tokens between two rounds of
    the answer in progress; both answers' text, and the spoken one's audio, are what they are alone."""
    spoken = dict(spk="Ethan", max_new_tokens=6, eos_token_id=[], talker_max_new_tokens=12, seed=3)
    model.talker_runner().use_pool(2, model.cache_dtype)

    def outcome(events):
        events = list(events)
        audio = [np.asarray(e.audio) for e in events if isinstance(e, AudioChunk)]
        return token_ids(events), np.concatenate(audio)

    typing = ConversationSession(model, processor)
    typing.ask(LONG_TURN)
    want_text, want_audio = outcome(typing.respond(**spoken))
    typing.close()
    want_speaking = answer_alone(model, processor)
    order = round_order(monkeypatch)

    async def scenario():
        engine = Engine(max_active=2, max_queue=0, batched=True)
        try:
            speaking, typing = await two_conversations(engine, model, processor)
            await engine.call_steps(typing.ask_steps, LONG_TURN)
            order.clear()
            first = engine.submit(lambda: speaking.answer(**LONG_ANSWER))
            second = engine.submit(lambda: typing.answer(**spoken))
            events = await asyncio.gather(drain(first), drain(second))
            for session in (speaking, typing):
                await engine.call(session.close)
            return events
        finally:
            engine.stop()

    got_speaking, got_spoken = asyncio.run(scenario())
    text, audio = outcome(got_spoken)
    assert token_ids(got_speaking) == want_speaking and text == want_text
    assert audio.shape == want_audio.shape and float(np.abs(audio - want_audio).max()) <= 1e-5
    runs = tokens_between_rounds(order)
    assert len(runs) >= 2 and max(runs) <= PREFILL_BUDGET, order
