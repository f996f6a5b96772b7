"""Our torch-free processor against the reference Qwen2_5OmniProcessor, and media loading."""
import base64
import os
import sys

import numpy as np
import pytest

from mindone_ext import Qwen2_5OmniProcessor, process_mm_info
from mindone_ext.utils.media import MediaError, load_audio
from tests.conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "examples", "qwen2_5_omni"))
import demo_media  # noqa: E402


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    files = demo_media.demo_files(str(folder))
    files["silent_video"] = demo_media.write_video(str(folder / "silent.mp4"), seconds=2.5, fps=7, width=70,
                                                   height=50, with_audio=False)
    files["stereo_44k"] = demo_media.write_wav(str(folder / "stereo.wav"), demo_media.speech_like(1.3, 44100), 44100, 2)
    return files


@pytest.fixture(scope="module")
def reference_processor(tiny_checkpoint):
    """transformers' Qwen2_5OmniProcessor. Its video processor needs torchvision, which does not
    install beside torch 2.13 here; transformers' torch-free Qwen2VLImageProcessor runs the same
    video algorithm (resize within the video pixel budget, rescale, normalise, temporal padding,
    patch order) and stands in for it."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessor, WhisperFeatureExtractor
    from transformers import Qwen2_5OmniProcessor as Reference
    from transformers.processing_utils import ProcessorMixin

    class VideoStandIn(Qwen2VLImageProcessor):
        def __call__(self, videos=None, fps=None, **kwargs):
            return self.preprocess(images=None, videos=videos, **kwargs)

    video = VideoStandIn(min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28)
    original = ProcessorMixin.check_argument_for_proper_class
    ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: None
    try:
        return Reference(image_processor=Qwen2VLImageProcessor.from_pretrained(tiny_checkpoint), video_processor=video,
                         feature_extractor=WhisperFeatureExtractor.from_pretrained(tiny_checkpoint),
                         tokenizer=AutoTokenizer.from_pretrained(tiny_checkpoint))
    finally:
        ProcessorMixin.check_argument_for_proper_class = original


def conversation(*items, text="What do you hear and see?"):
    return [{"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
            {"role": "user", "content": list(items) + [{"type": "text", "text": text}]}]


@pytest.mark.parametrize("use_audio_in_video", [False, True])
def test_processor_matches_reference(tiny_checkpoint, reference_processor, media, use_audio_in_video):
    ours = Qwen2_5OmniProcessor.from_pretrained(tiny_checkpoint)
    conv = conversation({"type": "audio", "audio": media["stereo_44k"]}, {"type": "image", "image": media["image"]},
                        {"type": "video", "video": media["video"]})
    short = conversation({"type": "image", "image": demo_media.picture(61, 47)}, text="odd")
    texts = [ours.apply_chat_template(c) for c in (conv, short)]
    audios, images, videos, kwargs = process_mm_info([conv, short], use_audio_in_video, return_video_kwargs=True)
    got = ours(texts, audio=audios, images=images, videos=videos, use_audio_in_video=use_audio_in_video, **kwargs)
    want = reference_processor(text=texts, audio=audios, images=images, videos=videos, padding=True,  # one fps for all
                               use_audio_in_video=use_audio_in_video, return_tensors="np", fps=kwargs["fps"][0])
    assert set(got) == {k for k in want if k != "video_second_per_grid"} | {"video_second_per_grid"}
    for key in ("input_ids", "attention_mask", "feature_attention_mask", "image_grid_thw", "video_grid_thw"):
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    for key in ("input_features", "pixel_values", "pixel_values_videos"):
        np.testing.assert_allclose(got[key], want[key], atol=1e-5, err_msg=key)
    np.testing.assert_allclose(got["video_second_per_grid"], want["video_second_per_grid"])


@pytest.mark.parametrize("frames", [5, 7, 10])
def test_video_patches_match_reference_for_odd_frame_counts(reference_processor, frames):
    rng = np.random.default_rng(frames)
    video = rng.integers(0, 256, size=(frames, 57, 95, 3)).astype(np.uint8)  # odd sizes: resized in the processor
    ours = Qwen2_5OmniProcessor(None, None, None, __import__("mindone_ext.models.qwen2_5_omni.processing",
                                                               fromlist=["x"]).VideoPreprocessor())
    patches, grid = ours.video_processor(video)
    want = reference_processor.video_processor(videos=[video], return_tensors="np")
    np.testing.assert_array_equal(grid, want["video_grid_thw"][0])
    np.testing.assert_allclose(patches, want["pixel_values_videos"], atol=1e-5)


def test_audio_sources_resample_and_downmix(media, tmp_path):
    stereo = load_audio(media["stereo_44k"])
    assert stereo.dtype == np.float32 and abs(len(stereo) - 1.3 * 16000) < 400
    with open(media["audio"], "rb") as f:
        data = f.read()
    from_url = load_audio("data:audio/wav;base64," + base64.b64encode(data).decode())
    from_file_url = load_audio("file://" + media["audio"])
    np.testing.assert_array_equal(from_url, from_file_url)
    tone = np.sin(np.arange(8000) / 8000 * 2 * np.pi * 200).astype(np.float32)
    assert len(load_audio((tone, 8000))) == 16000
    assert len(load_audio(tone)) == 8000  # an array alone is taken to be 16 kHz already


def test_bad_media_errors_name_the_file(media, tmp_path):
    missing = str(tmp_path / "nope.wav")
    with pytest.raises(MediaError, match="nope.wav: file not found"):
        process_mm_info(conversation({"type": "audio", "audio": missing}))
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(MediaError, match="empty.wav: file is empty"):
        load_audio(str(empty))
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00garbage" * 10)
    with pytest.raises(MediaError, match="corrupt.wav: (cannot be decoded|corrupt audio|has no audio track)"):
        load_audio(str(corrupt))
    with pytest.raises(MediaError, match="silent.mp4: has no audio track.*use_audio_in_video=True"):
        process_mm_info(conversation({"type": "video", "video": media["silent_video"]}), use_audio_in_video=True)
    with pytest.raises(MediaError, match="unsupported URL scheme 'ftp'"):
        process_mm_info(conversation({"type": "image", "image": "ftp://example.com/a.png"}))


def test_image_over_the_pixel_budget_is_resized_not_refused(tmp_path):
    big = demo_media.write_image(str(tmp_path / "big.png"), 2000, 1500)
    _, images, _ = process_mm_info(conversation({"type": "image", "image": big, "max_pixels": 256 * 28 * 28}))
    w, h = images[0].size
    assert w % 28 == 0 and h % 28 == 0 and w * h <= 256 * 28 * 28 and abs(w / h - 4 / 3) < 0.1


def test_video_sampling_follows_fps_and_frame_bounds(media):
    _, _, videos, kwargs = process_mm_info(conversation({"type": "video", "video": media["silent_video"]}),
                                           return_video_kwargs=True)
    frames = videos[0]
    assert frames.shape[0] == 4 and frames.shape[0] % 2 == 0  # 2.5 s at 2 fps = 5 -> at least 4, even
    assert frames.shape[1] % 28 == 0 and frames.shape[2] % 28 == 0
    assert kwargs["fps"][0] == pytest.approx(4 / 17 * 7)


def test_malformed_conversations_and_media_bombs_get_clear_errors(media, tmp_path):
    from tests.hostile_media import flac_silence, png_declaring, wav_declaring

    assert process_mm_info([]) == (None, None, None)  # no messages, no media
    text_only = [{"role": "user", "content": ["a bare string is text", {"type": "text", "text": "too"}]}]
    assert process_mm_info(text_only) == (None, None, None)
    with pytest.raises(ValueError, match="content item 0: expected a dict"):
        process_mm_info([{"role": "user", "content": [5]}])
    with pytest.raises(ValueError, match="message 0: a message is a dict"):
        process_mm_info(["hello"])
    with pytest.raises(MediaError, match="video_fps must be a positive number, got 0"):
        process_mm_info(conversation({"type": "video", "video": np.zeros((4, 56, 56, 3), np.uint8), "video_fps": 0}))
    for width, height in ((20000, 20000), (9000, 9000)):  # past PIL's own bomb limit, and past ours only
        bomb = tmp_path / f"bomb{width}.png"
        bomb.write_bytes(png_declaring(width, height))
        with pytest.raises(MediaError, match=f"bomb{width}.png: .*pixels allowed"):
            process_mm_info(conversation({"type": "image", "image": str(bomb)}))
    with pytest.raises(MediaError, match="sample rate of 1 Hz is not supported"):
        load_audio(wav_declaring(1, 8000))
    with pytest.raises(MediaError, match="longer than 30 s"):
        load_audio(flac_silence(1), max_seconds=30)
    assert len(load_audio(flac_silence(0.01), max_seconds=60)) == 30 * 16000  # within the limit: three 10 s blocks
