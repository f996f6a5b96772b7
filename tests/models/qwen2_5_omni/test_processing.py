"""Media loading and the processor on their own: sources, errors, limits, sampling. Parity with
the reference on real media is in tests/reference_media."""
import base64
import os
import sys

import numpy as np
import pytest

from mindone_ext import process_mm_info
from mindone_ext.utils.audio import load_audio
from mindone_ext.utils.media import MediaError
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


def conversation(*items, text="What do you hear and see?"):
    return [{"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
            {"role": "user", "content": list(items) + [{"type": "text", "text": text}]}]


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
    frames = videos[0]  # (T, 3, H, W), as the reference returns them
    assert frames.shape[:2] == (4, 3)  # 2.5 s at 2 fps = 5 -> at least 4, even
    assert frames.shape[2] % 28 == 0 and frames.shape[3] % 28 == 0
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
