"""generate_stream against generate: the same text token for token, the same waveform to within
the Token2Wav chunking (SNR), speech arriving while the Thinker still talks, clean cancellation."""
import numpy as np
import pytest

from mindone_ext.models.qwen2_5_omni.streaming import AudioChunk, TextDecoder, TextDelta
from mindone_ext.models.qwen2_5_omni.token2wav_stream import StreamChunking
from tests.conftest import max_abs_diff, snr_db

PROMPT = np.array([[401, 5, 6, 7, 8, 9, 10, 402, 401, 20, 30, 40]])
ARGS = dict(input_ids=PROMPT, spk="Ethan", max_new_tokens=48, eos_token_id=[], talker_do_sample=False,
            talker_max_new_tokens=60, seed=4)



@pytest.fixture(scope="module")
def whole(our_model):
    return our_model.generate(**ARGS)


def split(events):
    text = [e for e in events if isinstance(e, TextDelta)]
    audio = [e.audio for e in events if isinstance(e, AudioChunk)]
    assert len(text) + len(audio) == len(events)
    return text, audio


def test_streamed_text_and_speech_match_generate(our_model, whole):
    """At the default chunking (other chunkings: test_token2wav_stream.py, on Token2Wav alone)."""
    sequences, wav = whole
    events = list(our_model.generate_stream(**ARGS))
    text, audio = split(events)
    assert [e.token_id for e in text] == sequences[0, PROMPT.shape[1]:].tolist()
    assert len(audio) >= 2
    # speech starts before the Thinker has finished: the Talker follows it token by token
    assert events.index(next(e for e in events if isinstance(e, AudioChunk))) < events.index(text[-1])
    joined = np.concatenate(audio)
    assert joined.dtype == np.float32 and joined.shape == wav.shape
    assert snr_db(joined, wav) >= 45  # the vocoder's look-ahead at the joins (test_token2wav_stream.py)


def test_a_chunk_longer_than_the_answer_gives_the_same_waveform(our_model, whole):
    _, audio = split(list(our_model.generate_stream(chunking=StreamChunking(chunk_blocks=20), **ARGS)))
    assert len(audio) == 1
    assert max_abs_diff(audio[0], whole[1]) <= 1e-5


def test_text_only_stream_decodes_text(our_model, tiny_checkpoint):
    from mindone_ext import Qwen2_5OmniProcessor

    tokenizer = Qwen2_5OmniProcessor.from_pretrained(tiny_checkpoint).tokenizer
    args = dict(ARGS, return_audio=False)
    sequences = our_model.generate(**args)
    text, audio = split(list(our_model.generate_stream(tokenizer=tokenizer, **args)))
    assert audio == []
    assert "".join(e.text for e in text) == tokenizer.decode(sequences[0, PROMPT.shape[1]:], skip_special_tokens=True)


def test_text_deltas_never_split_a_character(tiny_checkpoint):
    from mindone_ext import Qwen2_5OmniProcessor

    tokenizer = Qwen2_5OmniProcessor.from_pretrained(tiny_checkpoint).tokenizer
    sentence = "Grüße, 你好 🎵 — ok"
    ids = tokenizer.encode(sentence)
    assert len(ids) > len(sentence.split())  # some characters take several tokens
    decoder = TextDecoder(tokenizer)
    deltas = [decoder.push(i, final=n == len(ids) - 1) for n, i in enumerate(ids)]
    assert "".join(deltas) == sentence
    assert not any("\ufffd" in d for d in deltas)
    assert TextDecoder(None).push(5) == ""


def test_text_deltas_add_up_to_the_whole_decode_decoding_each_token_a_few_times(tiny_checkpoint):
    """Random ids (special tokens, byte pieces that make invalid UTF-8) and a long multilingual
    text: the deltas join to the tokenizer's decode of all the ids, and each id is decoded a few
    times, not once per later token (8000 tokens: 0.07 s, was 7.0 s)."""
    from mindone_ext import Qwen2_5OmniProcessor

    tokenizer = Qwen2_5OmniProcessor.from_pretrained(tiny_checkpoint).tokenizer

    class Counting:
        decoded = 0

        def decode(self, ids, **kwargs):
            Counting.decoded += len(ids)
            return tokenizer.decode(ids, **kwargs)

    text_ids = tokenizer.encode("Grüße aus Köln, 你好世界 🎵 — the quick brown fox. " * 250)
    cases = [np.random.default_rng(seed).integers(0, len(tokenizer), 2000).tolist() for seed in range(5)]
    for ids in cases + [text_ids]:
        Counting.decoded, decoder = 0, TextDecoder(Counting())
        deltas = [decoder.push(i, final=n == len(ids) - 1) for n, i in enumerate(ids)]
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    assert len(text_ids) > 5000 and Counting.decoded <= 6 * len(text_ids), (len(text_ids), Counting.decoded)


def test_closing_a_stream_frees_its_caches_and_the_model_still_works(our_model, whole):
    stream = our_model.generate_stream(**ARGS)
    for _ in range(20):  # the Talker has started by now
        next(stream)
    assert our_model.thinker_runner().caches_in_use() == 1
    assert our_model.talker_runner().caches_in_use() == 1
    stream.close()
    assert our_model.thinker_runner().caches_in_use() == 0
    assert our_model.talker_runner().caches_in_use() == 0
    sequences, wav = our_model.generate(**ARGS)
    np.testing.assert_array_equal(sequences, whole[0])
    assert max_abs_diff(wav, whole[1]) <= 1e-6


def test_stream_argument_errors(our_model):
    with pytest.raises(ValueError, match="batch size 1"):
        our_model.generate_stream(input_ids=np.ones((2, 3), np.int64), return_audio=False)
    with pytest.raises(TypeError, match="unsupported arguments: num_beams"):
        our_model.generate_stream(input_ids=PROMPT, num_beams=2)
    with pytest.raises(ValueError, match="unknown speaker"):
        our_model.generate_stream(input_ids=PROMPT, spk="Nobody")
