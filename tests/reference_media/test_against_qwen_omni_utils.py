"""Our process_mm_info + processor against qwen-omni-utils + transformers' processor, on real
media (espeak-ng, sox, ffmpeg): every output of both steps compared, case by case. The reference
runs once, in its own environment and process, for all cases.

Tolerances (the README lists them): ids, masks, grids, image pixels and sample rates exact;
audio exact where libsndfile decodes it (wav, flac, ogg, mp3), within one 16-bit step where
FFmpeg does (AAC, video soundtracks: the reference runs the system's ffmpeg command, we PyAV's
FFmpeg; two FFmpeg builds' AAC decoders differ by ~3e-7); log-mel features 1e-5, and where the
audio differs 1e-4 except at most 0.1% of values (quiet moments, where the log magnifies the
difference) within 5e-3. Video frames: the reference resizes them with torch's float kernel and rounds
to 0-255; our float kernel is within ~1e-4 of torch's, so a value that lands within that of a
half rounds the other way: at most one level, on at most 0.1% of values; pixel values follow
(one level is 1 / (255 * std) = 0.015 there, else 1e-5).
"""
import base64
import functools
import http.server
import json
import os
import subprocess
import threading

import numpy as np
import pytest

from mindone_ext import Qwen2_5OmniProcessor, process_mm_info
from tests.reference_media import real_media as rm
from tests.reference_media.environment import HERE, reference_environ

SPOKEN = "The quick brown fox jumps over the lazy dog. Seven, eight, nine. Is it raining in Paris today?"
OTHER = "Please describe what you see and what you hear, in a few words."


def conv(*items, text="What is in these?"):
    return [{"role": "system", "content": [{"type": "text", "text": "You are Qwen, a virtual human."}]},
            {"role": "user", "content": list(items) + [{"type": "text", "text": text}]}]


def audio(path, **options):
    return {"type": "audio", "audio": path, **options}


def image(path, **options):
    return {"type": "image", "image": path, **options}


def video(path, **options):
    return {"type": "video", "video": path, **options}


# one file, no options: name -> (item maker, file)
ONE_FILE = {
    **{f"audio_wav_{rate}": (audio, f"mono_{rate}") for rate in (8000, 11025, 16000, 22050, 32000, 44100, 48000)},
    "audio_stereo_flac_44100": (audio, "stereo_flac"), "audio_stereo_mp3_48000": (audio, "stereo_mp3"),
    "audio_ogg_vorbis": (audio, "ogg"), "audio_aac_in_mp4": (audio, "aac"), "audio_wav_24bit_96k_stereo": (audio, "wav24"),
    "audio_wav_float32": (audio, "wav_float"), "audio_longer_than_30s": (audio, "long"),
    "image_rgba": (image, "rgba"), "image_gray_jpeg": (image, "gray"), "image_palette": (image, "palette"),
    "image_huge": (image, "huge"), "image_tiny": (image, "tiny"), "image_wide": (image, "wide"),
    "video_landscape": (video, "landscape"), "video_odd_size_444": (video, "odd"), "video_mjpeg_avi": (video, "mjpeg"),
    "video_frame_list": (video, "frame_list"), "video_webm_vp9": (video, "webm"), "video_mkv_no_frame_count": (video, "mkv"),
}

# name -> (conversation from the files, use_audio_in_video)
CASES = {
    **{name: (lambda f, make=make, key=key: conv(make(f[key])), False) for name, (make, key) in ONE_FILE.items()},
    "audio_start_end": (lambda f: conv(audio(f["mono_44100"], audio_start=0.5, audio_end=2.1)), False),
    "audio_start_end_mp3": (lambda f: conv(audio(f["stereo_mp3"], audio_start=1.25, audio_end=3.0)), False),
    "audio_file_url_and_data_url": (lambda f: conv(audio("file://" + f["mono_8000"]), audio(data_url(f["ogg"], "audio/ogg"))),
                                    False),
    "image_pixel_options": (lambda f: conv(image(f["rgba"], min_pixels=50 * 784, max_pixels=60 * 784),
                                           image(f["huge"], max_pixels=64 * 784)), False),
    "image_resized_options": (lambda f: conv(image(f["gray"], resized_height=100, resized_width=230)), False),
    "image_and_audio_over_http": (lambda f: conv(image(f["http"] + "/gray.jpg"), audio(f["http"] + "/stereo.mp3"),
                                                 audio(f["http"] + "/mono_22050.wav")), False),
    "image_data_url_and_file_url": (lambda f: conv(image(data_url(f["rgba"], "image/png")), image("file://" + f["tiny"])),
                                    False),
    "video_landscape_with_audio": (lambda f: conv(video(f["landscape"])), True),
    "video_portrait_with_stereo_audio": (lambda f: conv(video(f["portrait"])), True),
    "video_start_end": (lambda f: conv(video(f["landscape"], video_start=0.4, video_end=2.3)), True),
    "video_nframes": (lambda f: conv(video(f["portrait"], nframes=7)), False),
    "video_fps_and_frame_bounds": (lambda f: conv(video(f["long_video"], fps=0.5, min_frames=6),
                                                  video(f["long_video"], max_frames=16)), False),
    "video_resized_options": (lambda f: conv(video(f["landscape"], resized_height=100, resized_width=150)), False),
    "video_pixel_options": (lambda f: conv(video(f["portrait"], max_pixels=150 * 784),
                                           video(f["landscape"], min_pixels=32 * 784, total_pixels=200 * 784)), False),
    "video_frame_list_options": (lambda f: conv(video(f["frame_list"][:3], sample_fps=1.0, max_pixels=140 * 784)),
                                 False),
    "batch_of_two_conversations": (lambda f: [conv(audio(f["stereo_flac"]), image(f["rgba"])),
                                              conv(video(f["portrait"]), image(f["gray"]), text="And these?")], True),
}

# media given straight to the processors (no process_mm_info): name -> (images, videos) from the files
DIRECT = {
    "processor_images_of_any_size": lambda f: ([f["rgba"], f["gray"], f["tiny"], f["palette"]], []),
    "processor_video_frames_uint8": lambda f: ([], [f["frames_5x57x95"], f["frames_4x640x360"], f["frames_3x50x50"]]),
}

# transformers' own route, as its model card calls it: apply_chat_template(tokenize=True, ...) loads
# the media itself. name -> (conversation(s) from the files, apply_chat_template's arguments)
CHAT = {
    "chat_video_with_its_sound_at_1_fps": (lambda f: conv(video(f["landscape"])),
                                           dict(load_audio_from_video=True, fps=1, use_audio_in_video=True)),
    "chat_path_and_url_keys_at_3_fps": (lambda f: conv({"type": "audio", "path": f["stereo_mp3"]},
                                                       {"type": "image", "url": f["rgba"]},
                                                       {"type": "video", "path": f["odd"]}), dict(fps=3)),
    "chat_batch_every_frame": (lambda f: [conv(image(f["gray"])), conv(audio(f["stereo_flac"]), video(f["mjpeg"]))],
                               {}),
}

# inputs both refuse: name -> (conversation, use_audio_in_video, what our message says)
REFUSED = {
    "video_max_pixels_below_min_pixels": (lambda f: conv(video(f["portrait"], max_pixels=100 * 784)), False,
                                          "min_pixels .* is more than max_pixels"),
    "video_start_after_end": (lambda f: conv(video(f["landscape"], video_start=2.5, video_end=1.0)), False,
                              "video_start=2.5 .. video_end=1.0 holds no frames"),
    "video_nframes_past_the_end": (lambda f: conv(video(f["odd"], nframes=40)), False,
                                   "gives 40 sampled frames: between 2 and 21"),
    "image_aspect_ratio_over_200": (lambda f: conv(image(f["sliver"])), False, "less than 200 times"),
}

FEATURES, FEATURES_FROM_FFMPEG_AUDIO, QUIET_FEATURES, PIXELS = 1e-5, 1e-4, 5e-3, 1e-5
FFMPEG_AUDIO = 1 / 32768  # one 16-bit step
DECODED_BY_FFMPEG = {"audio_aac_in_mp4", "image_and_audio_over_http"}  # and every video soundtrack
ROUNDED_LEVEL, ROUNDED_SHARE = 1.0, 1e-3  # video frames: one level, on at most 0.1% of values
LEVEL_IN_PIXEL_VALUES = 1 / (255 * min(0.26862954, 0.26130258, 0.27577711)) + 1e-5


class QuietFiles(http.server.SimpleHTTPRequestHandler):
    """The media folder over http://, for the URL cases (the reference fetches them itself)."""

    def log_message(self, *args):
        pass


def data_url(path, mime):
    with open(path, "rb") as f:
        return f"data:{mime};base64," + base64.b64encode(f.read()).decode()


@pytest.fixture(scope="module")
def files(tmp_path_factory, reference_env):
    d = str(tmp_path_factory.mktemp("real_media"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietFiles, directory=d))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    f = {"http": f"http://127.0.0.1:{server.server_address[1]}"}
    voice = rm.speech(d, SPOKEN)
    other = rm.speech(d, OTHER, "other.wav", voice="en+f3")
    for rate in (8000, 11025, 16000, 22050, 32000, 44100, 48000):
        f[f"mono_{rate}"] = rm.convert(voice, os.path.join(d, f"mono_{rate}.wav"), rate)
    both = rm.stereo(voice, other, os.path.join(d, "both.wav"))
    f["stereo_flac"] = rm.convert(both, os.path.join(d, "stereo.flac"), 44100)
    f["stereo_mp3"] = rm.convert(both, os.path.join(d, "stereo.mp3"), 48000)
    f["ogg"] = rm.encode_audio(voice, os.path.join(d, "voice.ogg"), "-c:a", "libvorbis", "-q:a", "4")
    f["aac"] = rm.encode_audio(both, os.path.join(d, "voice.m4a"), "-c:a", "aac", "-ar", "44100")
    f["wav24"] = rm.convert(both, os.path.join(d, "hi_res.wav"), 96000, 2, 24)
    f["wav_float"] = rm.convert(voice, os.path.join(d, "float.wav"), bits=32, encoding="floating-point")
    f["long"] = rm.convert(voice, os.path.join(d, "long.wav"), effects=("repeat", "7"))
    f["rgba"] = rm.image(os.path.join(d, "rgba.png"), 61, 47, "rgba")
    f["gray"] = rm.image(os.path.join(d, "gray.jpg"), 200, 150, "gray")
    f["palette"] = rm.image(os.path.join(d, "palette.png"), 100, 80, "pal8")
    f["huge"] = rm.image(os.path.join(d, "huge.jpg"), 5000, 3000, "yuvj420p")
    f["tiny"] = rm.image(os.path.join(d, "tiny.png"), 10, 10, "rgb24")
    f["wide"] = rm.image(os.path.join(d, "wide.png"), 600, 20, "rgb24")
    f["sliver"] = rm.image(os.path.join(d, "sliver.png"), 1000, 4, "rgb24")
    f["landscape"] = rm.video(os.path.join(d, "landscape.mp4"), 320, 240, 30, 3.0, audio=voice)
    f["portrait"] = rm.video(os.path.join(d, "portrait.mp4"), 358, 638, "24000/1001", 2.2, audio=both)
    f["odd"] = rm.video(os.path.join(d, "odd.mp4"), 97, 61, 7, 3, codec=("-c:v", "libx264", "-pix_fmt", "yuv444p"))
    f["mjpeg"] = rm.video(os.path.join(d, "clip.avi"), 160, 90, 25, 2, codec=("-c:v", "mjpeg", "-q:v", "3"))
    f["long_video"] = rm.video(os.path.join(d, "long.mp4"), 64, 48, 10, 40)
    f["webm"] = rm.video(os.path.join(d, "clip.webm"), 200, 150, 25, 3.1,
                         codec=("-c:v", "libvpx-vp9", "-b:v", "200k", "-deadline", "realtime"))
    f["mkv"] = rm.video(os.path.join(d, "clip.mkv"), 150, 200, "24000/1001", 2.5,
                        codec=("-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"))
    f["frame_list"] = rm.frames(f["portrait"], d, 5)
    for count, height, width, source in ((5, 57, 95, "landscape"), (4, 640, 360, "portrait"), (3, 50, 50, "odd")):
        f[f"frames_{count}x{height}x{width}"] = rm.decoded_frames(f[source], os.path.join(d, f"{count}x{height}x{width}.npy"),
                                                               count, width, height)
    yield f
    server.shutdown()


@pytest.fixture(scope="module")
def reference(files, reference_env, tiny_checkpoint, tmp_path_factory):
    """What qwen-omni-utils and transformers' processor give for every case."""
    d = tmp_path_factory.mktemp("reference_out")
    cases = {**CASES, **REFUSED}
    spec = [{"conversation": cases[n][0](files), "use_audio_in_video": cases[n][1]} for n in cases]
    for name, build in DIRECT.items():
        images, videos = build(files)
        spec.append({"conversation": direct_conversation(images, videos), "use_audio_in_video": False,
                     "direct": {"images": images, "videos": videos}})
    for name, (build, arguments) in CHAT.items():
        spec.append({"conversation": build(files), "use_audio_in_video": False, "chat": arguments})
    names = list(cases) + list(DIRECT) + list(CHAT)
    with open(d / "cases.json", "w") as f:
        json.dump(spec, f)
    result = subprocess.run([reference_env, os.path.join(HERE, "run_reference.py"), str(d / "cases.json"),
                             str(d / "out.npz"), tiny_checkpoint], capture_output=True, text=True,
                            env=reference_environ())
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(d / "out.npz") as npz:
        arrays = {key: npz[key] for key in npz.files}
    return {name: {key.split("/", 1)[1]: value for key, value in arrays.items() if key.split("/")[0] == str(i)}
            for i, name in enumerate(names)}


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return Qwen2_5OmniProcessor.from_pretrained(tiny_checkpoint)


@pytest.mark.parametrize("name", list(CHAT))
def test_apply_chat_template_loading_media_matches_the_reference(name, files, reference, processor):
    """transformers' route (media read by its processor with torchcodec: FFmpeg decodes and
    resamples audio, videos whole or sampled by its video processor): ids, masks, grids and pixel
    values exact; features within what two FFmpeg builds' AAC / MP3 decoders differ by."""
    want = {k.split("/", 1)[1]: v for k, v in reference[name].items() if k.startswith("inputs/")}
    assert want, reference[name].get("error")
    build, arguments = CHAT[name]
    got = processor.apply_chat_template(build(files), tokenize=True, return_dict=True, padding=True, **arguments)
    assert set(got) == set(want)
    for key in sorted(want):
        if want[key].dtype.kind in "iub" or key.startswith("pixel_values"):
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        else:
            np.testing.assert_allclose(got[key], want[key], rtol=0, atol=FEATURES_FROM_FFMPEG_AUDIO, err_msg=key)


def direct_conversation(images, videos):
    return conv(*[{"type": "image"} for _ in images], *[{"type": "video"} for _ in videos])


@pytest.mark.parametrize("name", list(DIRECT))
def test_media_given_straight_to_the_processor_match_the_reference(name, files, reference, processor):
    """The processors' own resizing (images within the image processor's budget, videos within
    128 to 768 tokens whatever the configuration files say) on uint8 input: torch's integer
    kernel, reproduced bit for bit."""
    from PIL import Image

    images, videos = DIRECT[name](files)
    want = {k.split("/", 1)[1]: v for k, v in reference[name].items() if k.startswith("inputs/")}
    assert want, reference[name].get("error")
    got = processor(text=processor.apply_chat_template(direct_conversation(images, videos)),
                    images=[Image.open(path) for path in images] or None,
                    videos=[np.load(path) for path in videos] or None)
    assert set(got) == set(want)
    for key in sorted(want):
        if want[key].dtype.kind in "iub":
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        else:
            np.testing.assert_allclose(got[key], want[key], rtol=0, atol=PIXELS, err_msg=key)


def assert_rarely_one_level(ours, expected, close, level, what):
    """Equal within `close`, except at most ROUNDED_SHARE of the values, which are within `level`."""
    assert np.shape(ours) == np.shape(expected), what
    difference = np.abs(np.asarray(ours, np.float64) - expected)
    assert difference.max() <= level, f"{what}: differs by {difference.max()}"
    share = np.mean(difference > close)
    assert share <= ROUNDED_SHARE, f"{what}: {share:.2%} of the values differ by more than {close}"


@pytest.mark.parametrize("name", list(CASES))
def test_media_and_processor_outputs_match_the_reference(name, files, reference, processor):
    build, use_audio_in_video = CASES[name]
    conversation, want = build(files), reference[name]
    assert "error" not in want, f"the reference refused this case: {want.get('error')}"
    audios, images, videos, kwargs = process_mm_info(conversation, use_audio_in_video, return_video_kwargs=True)
    ffmpeg_audio = name in DECODED_BY_FFMPEG or (use_audio_in_video and videos)
    for kind, items in (("audio", audios), ("image", images), ("video", videos)):
        assert len(items or []) == sum(k.startswith(f"{kind}/") for k in want), kind
        for j, item in enumerate(items or []):
            expected, ours = want[f"{kind}/{j}"], np.asarray(item)
            assert ours.shape == expected.shape, f"{kind} {j}: {ours.shape} != {expected.shape}"
            if kind == "video":
                assert_rarely_one_level(ours, expected, 0, ROUNDED_LEVEL, f"video {j}")
            else:
                tolerance = FFMPEG_AUDIO if kind == "audio" and ffmpeg_audio else 0
                np.testing.assert_allclose(ours, expected, rtol=0, atol=tolerance, err_msg=f"{kind} {j}")
    np.testing.assert_allclose(kwargs["fps"], want["fps"], rtol=1e-12)

    batch = isinstance(conversation[0], list)
    text = [processor.apply_chat_template(c) for c in (conversation if batch else [conversation])]
    got = processor(text=text, audio=audios, images=images, videos=videos, padding=True,
                    use_audio_in_video=use_audio_in_video)
    expected = {k.split("/", 1)[1]: v for k, v in want.items() if k.startswith("inputs/")}
    assert set(got) == set(expected)
    for key in sorted(expected):
        if expected[key].dtype.kind in "iub":
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
        elif key == "pixel_values_videos":
            assert_rarely_one_level(got[key], expected[key], PIXELS, LEVEL_IN_PIXEL_VALUES, key)
        elif key == "input_features" and ffmpeg_audio:
            assert_rarely_one_level(got[key], expected[key], FEATURES_FROM_FFMPEG_AUDIO, QUIET_FEATURES, key)
        else:
            tolerance = {"input_features": FEATURES, "pixel_values": PIXELS}.get(key, 1e-6)
            np.testing.assert_allclose(got[key], expected[key], rtol=0, atol=tolerance, err_msg=key)


@pytest.mark.parametrize("name", list(REFUSED))
def test_inputs_the_reference_refuses_are_refused_with_a_clear_error(name, files, reference):
    build, use_audio_in_video, message = REFUSED[name]
    assert "error" in reference[name], "the reference accepts this case now"
    with pytest.raises(ValueError, match=message):  # MediaError is a ValueError too
        process_mm_info(build(files), use_audio_in_video)
