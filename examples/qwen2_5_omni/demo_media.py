"""Small synthetic media for the examples and tests: a spoken-like tone sequence, a picture, a
short video with (or without) a sound track. Written with PyAV and Pillow, a few KB each."""
import json
import os

import numpy as np

from mindone_ext.utils.atomic_file import written_atomically
from mindone_ext.utils.audio import speech_like  # noqa: F401  (the examples' and tests' spoken-like audio)


def encode_audio(out, stream, samples, rate, channels=1):
    """Mux `samples` (mono float32) into `stream`, in the codec's frame size, on every channel."""
    import av

    layout = "stereo" if channels == 2 else "mono"
    size = stream.codec_context.frame_size or len(samples)
    for start in range(0, len(samples), size):
        data = np.tile(samples[None, start:start + size], (channels, 1)).astype(np.float32)
        frame = av.AudioFrame.from_ndarray(data, format="fltp", layout=layout)
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)


def write_wav(path, samples, rate=22050, channels=1):
    import av

    with av.open(path, "w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=rate, layout="stereo" if channels == 2 else "mono")
        encode_audio(out, stream, samples, rate, channels)
    return path


def picture(width=200, height=150):
    """A gradient with a few shapes, so resizing has edges to act on."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                      ((x // 20 + y // 20) % 2) * 200], -1).astype(np.uint8)
    image[height // 4:height // 2, width // 4:width // 2] = (250, 30, 30)
    return image


def write_image(path, width=200, height=150):
    from PIL import Image

    Image.fromarray(picture(width, height)).save(path)
    return path


def write_video(path, seconds=3.0, fps=10, width=96, height=72, with_audio=True, rate=22050):
    import av

    with av.open(path, "w") as out:
        video = out.add_stream("mpeg4", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        audio = out.add_stream("aac", rate=rate, layout="mono") if with_audio else None
        base = picture(width, height)
        for i in range(int(seconds * fps)):
            frame = np.roll(base, shift=i * 3, axis=1)
            for packet in video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in video.encode():
            out.mux(packet)
        if audio is not None:
            encode_audio(out, audio, speech_like(seconds, rate), rate)
    return path


def demo_files(folder):
    """A wav, a png and an mp4 with sound in `folder` (created once)."""
    os.makedirs(folder, exist_ok=True)
    files = {"audio": os.path.join(folder, "speech.wav"), "image": os.path.join(folder, "picture.png"),
             "video": os.path.join(folder, "clip.mp4")}
    if not os.path.exists(files["audio"]):
        write_wav(files["audio"], speech_like())
    if not os.path.exists(files["image"]):
        write_image(files["image"])
    if not os.path.exists(files["video"]):
        write_video(files["video"])
    return files


def formula(i):
    """The i-th little LaTeX formula of the demo OCR set."""
    return [f"x^{{{i % 5 + 2}}} + {i}", f"\\frac{{{i}}}{{{i + 1}}}", f"\\sqrt{{{i + 3}}}", f"a_{{{i}}} = {2 * i}"][i % 4]


def write_ocr_dataset(folder, n=16):
    """An image-to-LaTeX set in JSONL (`{"image": "images/3.png", "text": "..."}`): each picture
    shows its formula, drawn with Pillow's default font. Created once."""
    from PIL import Image, ImageDraw

    path = os.path.join(folder, "train.jsonl")
    if os.path.exists(path):
        return path
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    rows = []
    for i in range(n):
        image = Image.new("RGB", (112, 56), (255, 255, 255))
        ImageDraw.Draw(image).text((4, 20), formula(i), fill=(0, 0, 0))
        image.save(os.path.join(folder, "images", f"{i}.png"))
        rows.append({"image": f"images/{i}.png", "text": formula(i)})
    with written_atomically(path) as temporary, open(temporary, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def write_asr_dataset(folder, n=8):
    """A speech-to-text set in JSONL (`{"audio": "audio/3.wav", "transcript": "..."}`) of
    synthetic utterances, one per seed. Created once."""
    path = os.path.join(folder, "train.jsonl")
    if os.path.exists(path):
        return path
    os.makedirs(os.path.join(folder, "audio"), exist_ok=True)
    words = ["hello", "omni", "model", "speech", "ascend", "mind", "spore", "voice"]
    rows = []
    for i in range(n):
        write_wav(os.path.join(folder, "audio", f"{i}.wav"), speech_like(1.0, 16000, seed=i), 16000)
        rows.append({"audio": f"audio/{i}.wav", "transcript": f"{words[i % len(words)]} {words[(3 * i + 1) % len(words)]}"})
    with written_atomically(path) as temporary, open(temporary, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return path
