"""Video frames decoded with FFmpeg (PyAV), keeping only the frames that are asked for, each
resized as soon as it is decoded: memory holds the kept frames at their final size and one frame
in flight, however long the video (a 10-minute 1080p clip at 30 fps is ~100 GB of frames).
"""
import io

import numpy as np

from .media import MediaError, describe, open_container, open_source


def read_frames(source, plan, what="video"):
    """`plan(total_frames, fps, height, width)` -> (frame indices wanted, in any order, repeats
    allowed; a function applied to each wanted frame, uint8 (H, W, 3), as it is decoded).
    Returns those frames, stacked in the order asked. The frame count and rate given to `plan`
    are those decord (the reference's reader) reports: the stream's declared count and average
    rate."""
    data = open_source(source, what)
    where = f"{what} {describe(source)}"
    with open_container(data, source, what) as container:
        stream = _video_stream(container, where)
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        if fps <= 0:
            raise MediaError(f"{where}: unknown frame rate")
        total = stream.frames or _count_frames(container, stream)
        height, width = stream.codec_context.height, stream.codec_context.width
    if total <= 0 or not height or not width:
        raise MediaError(f"{where}: contains no frames")
    indices, transform = plan(total, fps, height, width)
    wanted = {}
    for position, index in enumerate(int(i) for i in indices):
        wanted.setdefault(index, []).append(position)
    frames = None
    if isinstance(data, io.BytesIO):
        data.seek(0)
    with open_container(data, source, what) as container:
        stream = _video_stream(container, where)
        stream.thread_type = "AUTO"  # FFmpeg's own threads decode ahead while frames are resized here
        try:
            for index, frame in enumerate(container.decode(stream)):
                if index in wanted:
                    pixels = transform(frame.to_ndarray(format="rgb24"))
                    if frames is None:
                        frames = np.empty((len(indices),) + pixels.shape, pixels.dtype)
                    for position in wanted.pop(index):
                        frames[position] = pixels
                    if not wanted:
                        break
        except Exception as e:  # FFmpeg's errors come as many types; all mean the same to a user
            raise MediaError(f"{where}: corrupt video ({type(e).__name__}: {e})") from None
    if wanted:
        raise MediaError(f"{where}: declares {total} frames but frame {min(wanted)} could not be decoded")
    return frames


def _video_stream(container, where):
    if not container.streams.video:
        raise MediaError(f"{where}: has no video track")
    return container.streams.video[0]


def _count_frames(container, stream):
    """Frames of a stream whose header does not say: its packets, counted without decoding."""
    return sum(1 for packet in container.demux(stream) if packet.size)
