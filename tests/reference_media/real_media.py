"""Real media made by the tools users make media with: espeak-ng speaks, sox converts rates,
channels and formats, ffmpeg encodes video (H.264, MJPEG), AAC, MP3, Vorbis and images. No array
is synthesized here: every file comes out of a real encoder."""
import os
import shutil
import subprocess

TOOLS = ("espeak-ng", "sox", "ffmpeg")


def missing_tools():
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def run(*command):
    subprocess.run(command, check=True, capture_output=True)


def ffmpeg(*args):
    run("ffmpeg", "-loglevel", "error", "-y", *args)


def speech(folder, text, name="speech.wav", voice="en"):
    """espeak-ng's voice (22.05 kHz mono, 16-bit)."""
    path = os.path.join(folder, name)
    run("espeak-ng", "-v", voice, "-w", path, text)
    return path


def convert(source, path, rate=None, channels=None, bits=None, encoding=None, effects=()):
    """sox `source` -> `path` (format from the extension) at `rate` / `channels` / `bits` /
    `encoding` (e.g. floating-point), then sox's `effects`."""
    out = []
    if encoding:
        out += ["-e", encoding]
    if bits:
        out += ["-b", str(bits)]
    if rate:
        out += ["-r", str(rate)]
    if channels:
        out += ["-c", str(channels)]
    run("sox", source, *out, path, *effects)
    return path


def stereo(left, right, path):
    """Two different recordings as the two channels (the longer one sets the length)."""
    run("sox", "-M", left, right, path)
    return path


def encode_audio(source, path, *codec):
    """ffmpeg `source` -> `path` with the codec arguments given (AAC in MP4, Vorbis in Ogg)."""
    ffmpeg("-i", source, *codec, path)
    return path


def video(path, width, height, rate, seconds, audio=None, codec=("-c:v", "libx264", "-pix_fmt", "yuv420p")):
    """A test-card video (moving, coloured, with text) at any size: drawn at an even size, then
    scaled, so odd sizes come out exactly. `audio`: a file to mux in as its AAC soundtrack."""
    args = ["-f", "lavfi", "-i", f"testsrc2=size=320x240:rate={rate}"]
    if audio:
        args += ["-i", audio]
    args += ["-t", str(seconds), "-vf", f"scale={width}:{height}", *codec]
    if audio:
        args += ["-c:a", "aac", "-shortest"]
    ffmpeg(*args, path)
    return path


def image(path, width, height, pixel_format, source="testsrc2"):
    """One frame of a test card as an image file (PNG / JPEG by extension) in `pixel_format`
    (rgba with a transparency gradient, gray, pal8, rgb24, ...)."""
    filters = f"scale={width}:{height},format={pixel_format}"
    if pixel_format == "rgba":
        filters = f"scale={width}:{height},format=rgba,geq=r='r(X,Y)':g='g(X,Y)':b='b(X,Y)':a='255*X/W'"
    ffmpeg("-f", "lavfi", "-i", f"{source}=size=320x240:rate=1", "-frames:v", "1", "-vf", filters, path)
    return path


def frames(video_path, folder, count, name="frame"):
    """The first `count` frames of a video as PNG files (what users pass as a frame list)."""
    pattern = os.path.join(folder, f"{name}_%03d.png")
    ffmpeg("-i", video_path, "-frames:v", str(count), pattern)
    return [pattern % (i + 1) for i in range(count)]


def decoded_frames(video_path, path, count, width, height):
    """The first `count` frames of a video, scaled to width x height by ffmpeg, as uint8 (T, H,
    W, 3) in an .npy file (frames a user decoded themselves)."""
    import numpy as np

    raw = subprocess.run(["ffmpeg", "-loglevel", "error", "-i", video_path, "-frames:v", str(count), "-vf",
                          f"scale={width}:{height}", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         check=True, capture_output=True).stdout
    np.save(path, np.frombuffer(raw, np.uint8).reshape(count, height, width, 3))
    return path
