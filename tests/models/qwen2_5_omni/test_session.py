"""ConversationSession: audio prefilled piece by piece equals the one-shot prefill of the whole
clip; turns stay in the cache; answers equal generate() on the same conversation."""
import numpy as np
import pytest

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


def test_session_errors(our_model, processor):
    session = ConversationSession(our_model, processor)
    with pytest.raises(ValueError, match="begin_audio\\(\\) first"):
        session.feed_audio(np.zeros(100, np.float32))
    session.begin_audio()
    with pytest.raises(ValueError, match="an audio turn is open"):
        session.ask("hi")
    with pytest.raises(ValueError, match="NaN or infinite"):
        session.feed_audio(np.array([0.0, np.nan], np.float32))
    limit = processor.feature_extractor.n_samples  # 300 s in the released config
    with pytest.raises(ValueError, match=f"at most {limit // 16000} s"):
        session.feed_audio(np.zeros(limit + 1, np.float32))
    with pytest.raises(ValueError, match="the audio turn is empty"):
        session.end_audio()
