"""ConversationSession: audio prefilled piece by piece equals the one-shot prefill of the whole
clip; turns stay in the cache; answers equal generate() on the same conversation."""
import numpy as np
import pytest

from mindone_ext.models.qwen2_5_omni.audio_encoder import output_lengths
from mindone_ext.models.qwen2_5_omni.session import SYSTEM_PROMPT, ConversationSession
from mindone_ext.models.qwen2_5_omni.streaming import AudioChunk, TextDelta
from tests.conftest import max_abs_diff, snr_db


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    from mindone_ext import Qwen2_5OmniProcessor

    return Qwen2_5OmniProcessor.from_pretrained(tiny_checkpoint)


def crescendo(seconds=1.37, seed=0):
    """Quiet, then loud: the loud part moves the features' clamp (max - 8) after quiet windows
    were already prefilled."""
    rng = np.random.default_rng(seed)
    n = int(seconds * 16000)
    t = np.arange(n) / 16000
    wave = 0.3 * np.sin(2 * np.pi * 220 * t) * np.minimum(1, (t / seconds) ** 6) + 1e-5 * rng.standard_normal(n)
    return wave.astype(np.float32)


def one_shot(model, processor, conversation_text, audio):
    inputs = processor(conversation_text, audio=audio)
    return inputs, model.thinker(**inputs).logits.asnumpy()[:, -1]


def session_with_audio(model, processor, wave, piece, text=""):
    session = ConversationSession(model, processor)
    session.begin_audio()
    for i in range(0, len(wave), piece):
        session.feed_audio(wave[i:i + piece])
    session.end_audio(text)
    return session


@pytest.mark.parametrize("piece", [3200, 1234, 16000])  # one encoder window (tiny: 20 frames), unaligned, > clip
def test_audio_fed_in_pieces_equals_the_one_shot_prefill(our_model, processor, piece):
    wave = crescendo()
    session = session_with_audio(our_model, processor, wave, piece, text="What is this?")
    conversation = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
                    {"role": "user", "content": [{"type": "audio", "audio": "x"}, {"type": "text", "text": "What is this?"}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs, want = one_shot(our_model, processor, text, [wave])
    np.testing.assert_array_equal(session.ids, inputs["input_ids"])
    assert max_abs_diff(session.logits, want) <= 1e-4
    if piece < len(wave):
        assert session.rewinds > 0  # the loud end re-did windows prefilled with the quiet clamp


def test_turns_stay_in_the_cache_and_answers_equal_generate(our_model, processor):
    wave = crescendo(0.9, seed=1)
    session = session_with_audio(our_model, processor, wave, 2000)
    first_turn = session.ids.copy()
    features = processor("", audio=[wave])
    media = {k: features[k] for k in ("input_features", "feature_attention_mask")}
    want = our_model.generate(input_ids=first_turn, max_new_tokens=6, eos_token_id=[], return_audio=False, **media)
    events = list(session.respond(max_new_tokens=6, eos_token_id=[], return_audio=False))
    assert [e.token_id for e in events] == want[0, first_turn.shape[1]:].tolist()
    cached = session.cache.length
    session.ask("And then?")
    assert session.cache.length > cached  # the first turn was not prefilled again
    assert session.ids.shape[1] == session.cache.length
    logits = our_model.thinker(input_ids=session.ids, **media).logits.asnumpy()[:, -1]
    assert max_abs_diff(session.logits, logits) <= 1e-4
    prompt = session.ids.copy()
    second = list(session.respond(max_new_tokens=5, eos_token_id=[], return_audio=False))
    want = our_model.generate(input_ids=prompt, max_new_tokens=5, eos_token_id=[], return_audio=False, **media)
    assert [e.token_id for e in second] == want[0, prompt.shape[1]:].tolist()


def test_a_spoken_answer_in_a_session_matches_generate(our_model, processor):
    wave = crescendo(0.6, seed=2)
    session = session_with_audio(our_model, processor, wave, 4000)
    features = processor("", audio=[wave])
    media = {k: features[k] for k in ("input_features", "feature_attention_mask")}
    args = dict(spk="Ethan", max_new_tokens=30, eos_token_id=[], talker_do_sample=False, talker_max_new_tokens=40,
                seed=1)
    ids, wav = our_model.generate(input_ids=session.ids, **args, **media)
    events = list(session.respond(**args))
    assert [e.token_id for e in events if isinstance(e, TextDelta)] == ids[0, -30:].tolist()
    audio = np.concatenate([e.audio for e in events if isinstance(e, AudioChunk)])
    assert audio.shape == wav.shape
    assert snr_db(audio, wav) >= 30


def test_session_errors_drop_the_turn_and_the_conversation_goes_on(our_model, processor):
    session = ConversationSession(our_model, processor)
    system = session.ids.copy()
    with pytest.raises(ValueError, match="begin_audio\\(\\) first"):
        session.feed_audio(np.zeros(100, np.float32))
    session.begin_audio()
    with pytest.raises(ValueError, match="an audio turn is open"):
        session.ask("hi")
    limit = processor.feature_extractor.n_samples  # 300 s in the released config
    bad = [(np.array([0.0, np.nan], np.float32), "NaN or infinite"),
           (np.zeros(limit + 1, np.float32), f"at most {limit // 16000} s")]
    for samples, message in bad:
        session.feed_audio(np.full(4000, 0.1, np.float32))  # a window or more is prefilled...
        assert session.cache.length > system.shape[1]
        with pytest.raises(ValueError, match=message):
            session.feed_audio(samples)
        # ...and rewound with the failed turn: the conversation is as before it, ready for the next
        np.testing.assert_array_equal(session.ids, system)
        assert session.cache.length == system.shape[1] and session.audio is None
        with pytest.raises(ValueError, match="nothing to answer"):
            next(session.respond(max_new_tokens=2, return_audio=False))
        session.begin_audio()
    with pytest.raises(ValueError, match="the audio turn is empty"):
        session.end_audio()
    session.ask("Still there?")  # a typed turn after the failed ones is answered
    answer = [e.token_id for e in session.respond(max_new_tokens=3, eos_token_id=[], return_audio=False)]
    assert len(answer) == 3
    before = session.ids.copy()
    session.ask("And now?")
    with pytest.raises(TypeError, match="unsupported arguments: bogus"):  # an answer that fails: its turn goes
        next(session.respond(max_new_tokens=3, bogus=1))
    np.testing.assert_array_equal(session.ids, before)
    assert session.cache.length == before.shape[1]


def test_a_conversation_refuses_what_does_not_fit_before_encoding_it(our_model, processor):
    session = ConversationSession(our_model, processor, max_tokens=160, answer_room=20)
    start = session.cache.length
    with pytest.raises(ValueError, match="over its limit of 160 tokens"):
        session.ask("word " * 200)
    assert session.cache.length == start  # nothing of it was prefilled
    session.begin_audio()
    with pytest.raises(ValueError, match="the audio so far needs"):
        session.feed_audio(np.full(16000 * 10, 0.1, np.float32))  # 250 audio tokens
    assert session.cache.length == start
    session.ask("Hi")
    with pytest.raises(ValueError, match="an answer of up to 200 tokens"):
        next(session.respond(max_new_tokens=200, return_audio=False))
    assert session.cache.length == start
    session.ask("Hi")
    assert len(list(session.respond(max_new_tokens=20, eos_token_id=[], return_audio=False))) == 20
    assert session.cache.length <= 160



def spoken_prompt(processor, text=""):
    content = [{"type": "audio", "audio": "x"}] + ([{"type": "text", "text": text}] if text else [])
    conversation = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
                    {"role": "user", "content": content}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


def test_every_audio_length_near_the_encoder_windows_equals_the_one_shot_prefill(our_model, processor):
    """A turn ending 1-2 frames past a window once crashed (the remainder pools to no token).
    Every frame offset from 2 before to 3 after each of the first two window boundaries (one
    window and several), plus half a frame, fed whole and in unaligned pieces."""
    hop = processor.feature_extractor.hop_length
    window = 2 * our_model.config.thinker_config.audio_config.n_window * hop  # samples per encoder window
    rng = np.random.default_rng(3)
    text = spoken_prompt(processor)
    lengths = sorted({k * window + frames * hop + extra for k in (1, 2) for frames in range(-2, 4)
                      for extra in (0, hop // 2)})
    for n in lengths:
        wave = (0.2 * rng.standard_normal(n)).astype(np.float32)
        inputs, want = one_shot(our_model, processor, text, [wave])
        for piece in (n, 1000):
            session = session_with_audio(our_model, processor, wave, piece)
            np.testing.assert_array_equal(session.ids, inputs["input_ids"], err_msg=f"{n} samples, pieces of {piece}")
            assert max_abs_diff(session.logits, want) <= 1e-4, f"{n} samples, pieces of {piece}"
            session.close()


def test_a_turn_in_tiny_pieces_computes_its_features_once_per_window(our_model, processor, monkeypatch):
    """A client may send tiny pieces, from one buffer it refills: the features (of the whole turn
    so far) are computed when a new encoder window's frames are final and at the turn's end, not
    at every piece; the turn equals the one-shot prefill, the louder end's moved clamp re-doing
    the quiet windows as before."""
    import mindone_ext.models.qwen2_5_omni.session as module

    calls, features = [], module.clip_features
    monkeypatch.setattr(module, "clip_features", lambda extractor, samples: calls.append(len(samples))
                        or features(extractor, samples))
    wave = crescendo(0.5, seed=4)
    hop = processor.feature_extractor.hop_length
    windows = len(wave) // (2 * our_model.config.thinker_config.audio_config.n_window * hop)
    session = ConversationSession(our_model, processor)
    session.begin_audio()
    buffer = np.empty(7, np.float32)  # one buffer, refilled for every piece (as a microphone's callback may)
    for i in range(0, len(wave), len(buffer)):
        piece = wave[i:i + len(buffer)]
        buffer[:len(piece)] = piece
        session.feed_audio(buffer[:len(piece)])
    session.end_audio()
    inputs, want = one_shot(our_model, processor, spoken_prompt(processor), [wave])
    np.testing.assert_array_equal(session.ids, inputs["input_ids"])
    assert max_abs_diff(session.logits, want) <= 1e-4
    assert session.rewinds > 0
    assert len(calls) <= windows + 1 and calls[-1] == len(wave), (windows, calls)


@pytest.mark.parametrize("offset", [-2, -1, 0, 1, 2])
def test_a_window_is_prefilled_as_soon_as_its_last_frame_is_final(our_model, processor, offset):
    """Window k's last frame is final once (k * window frames - 1) * hop + n_fft / 2 samples are in:
    fed up to a few samples either side of that count, the window is prefilled exactly from it
    on, and the rest of the turn then equals the one-shot prefill."""
    extractor = processor.feature_extractor
    frames = 2 * our_model.config.thinker_config.audio_config.n_window
    final = (2 * frames - 1) * extractor.hop_length + extractor.n_fft // 2  # the second window's
    wave = (0.2 * np.random.default_rng(5).standard_normal(final + 3000)).astype(np.float32)
    session = ConversationSession(our_model, processor)
    session.begin_audio()
    start = session.cache.length
    session.feed_audio(wave[:final + offset])
    windows = 2 if offset >= 0 else 1
    assert session.audio.pieces[-1][1] == windows
    assert session.cache.length - start == int(output_lengths([windows * frames])[1][0])  # its tokens, no more
    session.feed_audio(wave[final + offset:])
    session.end_audio()
    inputs, want = one_shot(our_model, processor, spoken_prompt(processor), [wave])
    np.testing.assert_array_equal(session.ids, inputs["input_ids"])
    assert max_abs_diff(session.logits, want) <= 1e-4


def test_texts_tokenized_by_the_caller_make_the_same_conversation_without_tokenizing_again(our_model, processor,
                                                                                          monkeypatch):
    """A server tokenizes a conversation's system prompt and typed turns on its preprocessing
    thread (a 1 MiB text: ~0.8 s, which on the model's thread would stall every answer): given
    those tokens, the session tokenizes nothing and holds what it holds when it tokenizes itself."""
    from mindone_ext.models.qwen2_5_omni.prefills import prefill_now
    from mindone_ext.models.qwen2_5_omni.session import system_turn, typed_turn

    prompt, text = "You are terse.", "What is 2 + 2? Grüße, 你好"
    own = ConversationSession(our_model, processor, system_prompt=prompt)
    own.ask(text)
    system_ids = processor.tokenizer(system_turn(prompt))["input_ids"]
    turn_ids = processor.tokenizer(typed_turn(text))["input_ids"]
    monkeypatch.setattr(processor, "tokenizer", None)  # tokenizing now fails
    given = ConversationSession(our_model, processor, system_prompt=prompt, system_ids=system_ids)
    prefill_now(given.ask_steps(text, turn_ids))
    np.testing.assert_array_equal(given.ids, own.ids)
    np.testing.assert_array_equal(given.logits, own.logits)
    own.close()
    given.close()


def test_a_conversation_keeps_its_talker_cache_and_each_answer_prefills_only_what_is_new(our_model, processor,
                                                                                         monkeypatch):
    """The Talker's prompt is the whole conversation (and 2 tokens: the voice's and the first
    answer token's): a session keeps the Talker's cache between spoken answers, and each answer
    prefills only what came after the previous answer's conversation; what it says is what a
    session that prefills the whole prompt each time says (text and waveform), through a failed
    answer, a rewind below what the cache holds, audio turns and another voice."""
    runner = our_model.talker_runner()
    written = []  # tokens of each Talker prefill piece
    extend = runner.extend
    monkeypatch.setattr(runner, "extend", lambda cache, embeds, *a, **k: written.append(embeds.shape[1]) or extend(
        cache, embeds, *a, **k))
    args = dict(spk="Ethan", max_new_tokens=6, eos_token_id=[], talker_do_sample=False, talker_max_new_tokens=30,
                seed=3)

    def conversation(keep):
        session = ConversationSession(our_model, processor, keep_talker_cache=keep)
        said, prefilled, lengths = [], [], []

        def answer(**extra):
            written.clear()
            lengths.append(session.ids.shape[1])
            events = list(session.respond(**{**args, **extra}))
            said.append(([e.token_id for e in events if isinstance(e, TextDelta)],
                         np.concatenate([e.audio for e in events if isinstance(e, AudioChunk)])))
            prefilled.append(sum(written))

        session.begin_audio()
        wave = crescendo(0.6, seed=4)
        for i in range(0, len(wave), 1500):
            session.feed_audio(wave[i:i + 1500])
        session.end_audio()
        answer()
        after_first = session.cache.length
        session.ask("And then?")
        answer()
        session.ask("Say it again.")
        with pytest.raises(TypeError, match="unsupported arguments: bogus"):  # fails: its turn is dropped
            next(session.respond(**args, bogus=1))
        session.ask("Once more?")
        answer()
        session.rewind(after_first)  # back to before the second question, below what the Talker's cache holds
        session.ask("Something else.")
        answer()
        session.begin_audio()
        session.feed_audio(crescendo(0.4, seed=5))
        session.end_audio("What was that?")
        answer(spk="Chelsie")  # another voice: only the prompt's tail differs
        session.close()
        return said, prefilled, lengths, after_first, session

    kept, kept_prefilled, lengths, after_first, kept_session = conversation(True)
    fresh, fresh_prefilled, fresh_lengths, _, _ = conversation(False)
    assert lengths == fresh_lengths
    for (tokens, audio), (want_tokens, want_audio) in zip(kept, fresh):
        assert tokens == want_tokens
        np.testing.assert_array_equal(audio, want_audio)
    assert fresh_prefilled == [n + 2 for n in lengths]
    held = [0, lengths[0], lengths[1], after_first, lengths[3]]  # what the Talker's cache held at each answer
    assert kept_prefilled == [n + 2 - h for n, h in zip(lengths, held)]
    assert kept_session.talker.cache is None and runner.caches_in_use() == 0  # closed: freed
