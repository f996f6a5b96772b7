"""Whisper features computed over a clip and a little silence (audio_features.py) equal the
feature extractor's output for the clip padded to its whole 300 s window, bit for bit, on both
of the extractor's code paths: numpy (transformers without torch, as users install it) and torch."""
import numpy as np
import pytest
from transformers.models.whisper import feature_extraction_whisper

from mindone_ext.models.qwen2_5_omni.audio_features import clip_features, window_features
from mindone_ext.utils.audio import load_audio
from tests.reference_media.real_media import speech


@pytest.fixture(scope="module")
def extractor(tiny_checkpoint):
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor.from_pretrained(tiny_checkpoint)


@pytest.fixture(params=["numpy", "torch"])
def code_path(request, monkeypatch):
    """The extractor takes its torch code when torch is installed, else its numpy code."""
    monkeypatch.setattr(feature_extraction_whisper, "is_torch_available", lambda: request.param == "torch")
    return request.param


def whole_window(extractor, clips):
    out = extractor(clips, sampling_rate=extractor.sampling_rate, padding="max_length", return_attention_mask=True,
                    return_tensors="np")
    return out["input_features"], out["attention_mask"]


def crescendo(seconds, seed):
    """Quiet, then loud: the loud end sets the clamp (the loudest frame minus 8) for the quiet start."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    wave = 0.3 * np.sin(2 * np.pi * 220 * t) * np.minimum(1, (t / seconds) ** 6) + 1e-5 * rng.standard_normal(len(t))
    return wave.astype(np.float32)


def assert_same(got, want):
    features, mask = got
    assert features.dtype == np.float32 and mask.dtype == np.int64
    np.testing.assert_array_equal(features, want[0].astype(np.float32))
    np.testing.assert_array_equal(mask, want[1])


def test_every_length_near_frame_and_window_boundaries(extractor, code_path):
    """Lengths at five phases across a frame (160 samples) near 1 sample, 1, 2.5 and 5 frames, the
    one-second floor, 3 s and 40 s, and each side of three frame boundaries."""
    wave = np.concatenate([crescendo(20.0, seed=1), crescendo(21.0, seed=2)[::-1]])
    lengths = sorted({n for base in (1, 160, 400, 800, 15600, 16000, 48000, 640000)
                      for n in range(base - 3, base + 164, 41) if n > 0}
                     | {160 * k + d for k in (1, 2, 97) for d in (-1, 0, 1)})
    for n in lengths:
        want = whole_window(extractor, [wave[:n]])
        assert_same(window_features(extractor, [wave[:n]]), want)
        features, valid = clip_features(extractor, wave[:n])
        assert valid == want[1].sum(), n
        np.testing.assert_array_equal(features[:, :valid], want[0][0][:, :valid])


def test_a_batch_of_speech_silence_and_a_loud_tone(extractor, code_path, tmp_path):
    """Each clip has its own clamp and its own silent frames: an espeak-ng question, silence (all
    frames at the floor), a full-scale tone and a single sample."""
    question = load_audio(speech(str(tmp_path), "What will the weather be like in Paris tomorrow morning?"))
    tone = np.sin(2 * np.pi * 440 * np.arange(24000) / 16000).astype(np.float32)
    clips = [question, np.zeros(8000, np.float32), tone, np.full(1, 0.5, np.float32)]
    assert_same(window_features(extractor, clips), whole_window(extractor, clips))


def test_what_it_cannot_shortcut_is_left_to_the_extractor(extractor, monkeypatch):
    """A clip the window truncates, and dither (noise in the padding too), run the extractor whole."""
    long_clip = crescendo(300.1, seed=3)
    assert_same(window_features(extractor, [long_clip, long_clip[:100]]), whole_window(extractor, [long_clip, long_clip[:100]]))
    import torch

    def seeded(function, *args):  # the dither's noise: numpy's or torch's generator, by code path
        np.random.seed(0)
        torch.manual_seed(0)
        return function(*args)

    monkeypatch.setattr(extractor, "dither", 1e-3)
    clip = crescendo(1.3, seed=4)
    assert_same(seeded(window_features, extractor, [clip]), seeded(whole_window, extractor, [clip]))
