"""Media that cost nothing to send and a lot to decode: each is a real file of its format whose
header declares what a decoder would have to produce."""
import io
import struct
import wave
import zlib

import numpy as np


def wav_declaring(rate, seconds_of_bytes):
    """A real WAV file whose header declares `rate` Hz 8-bit audio: 8 KB at 1 Hz is 2 hours."""
    out = io.BytesIO()
    with wave.open(out, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(1)
        f.setframerate(rate)
        f.writeframes(bytes([128]) * seconds_of_bytes)
    return out.getvalue()


def flac_silence(hours):
    """FLAC compresses silence to almost nothing: an hour of 8 kHz is ~650 KB."""
    import av

    out = io.BytesIO()
    with av.open(out, "w", format="flac") as container:
        stream = container.add_stream("flac", rate=8000, layout="mono")
        block = np.zeros((1, 80000), np.int16)
        for i in range(int(hours * 360)):
            frame = av.AudioFrame.from_ndarray(block, format="s16", layout="mono")
            frame.sample_rate, frame.pts = 8000, i * 80000
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out.getvalue()


def png_declaring(width, height):
    """A 1x1 PNG whose header is rewritten to declare width x height (its data does not follow)."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (1, 1)).save(out, "PNG")
    data = bytearray(out.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    return bytes(data)
