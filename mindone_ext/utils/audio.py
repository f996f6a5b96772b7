"""Audio read as Qwen's own utilities read it, and written as the answers' 16-bit WAV.

qwen-omni-utils calls `librosa.load(source, sr=16000)`, which reads with libsndfile (soundfile)
what it can and with FFmpeg the rest (always FFmpeg for a video's soundtrack), averages the
channels and resamples with soxr at high quality. The same libraries in the same order give the
same samples; no torch or librosa is needed.

Declared properties are checked before anything is decoded, and decoding stops at `max_seconds`:
a few KB can declare hours of 1 Hz audio, gigabytes once decoded.
"""
import io
import math
import wave

import numpy as np

from .atomic_file import written_atomically
from .media import MediaError, MediaTooLong, describe, open_container, open_source

SAMPLE_RATE = 16000
AUDIO_RATES = (4000, 384000)  # the sample rates real audio comes at


def speech_like(seconds=2.0, rate=22050, seed=0):
    """Voiced syllables: a wandering pitch with harmonics under a syllable-rate envelope (the
    examples' generated questions, and the voice server's warm-up turn)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    pitch = 140 + 40 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6))
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = np.clip(np.sin(2 * np.pi * 3.0 * t), 0, None) ** 2
    return (0.3 * voice * envelope).astype(np.float32)


def pcm16(samples):
    """Float samples in [-1, 1] (clipped) as 16-bit little-endian PCM bytes."""
    return (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes()


def wav_bytes(samples, rate):
    """A mono 16-bit PCM WAV file's bytes."""
    out = io.BytesIO()
    with wave.open(out, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm16(samples))
    return out.getvalue()


def write_wav(path, samples, rate):
    """A mono 16-bit PCM WAV file, written whole or not at all (an interrupted write leaves nothing)."""
    data = wav_bytes(samples, rate)
    with written_atomically(path) as temporary, open(temporary, "wb") as f:
        f.write(data)


class Pieces:
    """Samples that arrive in pieces (a microphone's, a client's frames), joined only when read:
    joining at every piece would copy all that came before it each time (a 30 s turn sent in
    1-sample frames: ~480000 copies of up to 1.9 MB)."""

    def __init__(self):
        self._pieces, self.count = [], 0

    def add(self, samples):
        # a copy: a microphone's callback may hand over the same buffer, refilled, every time
        self._pieces.append(np.array(samples, np.float32).reshape(-1))
        self.count += len(self._pieces[-1])

    def joined(self):
        """Every sample so far, as one float32 array."""
        if len(self._pieces) != 1:
            self._pieces = [np.concatenate(self._pieces) if self._pieces else np.zeros(0, np.float32)]
        return self._pieces[0]


def load_audio(source, sample_rate=None, what="audio", max_seconds=None, start=0.0, end=None, soundtrack=False):
    """float32 mono samples at 16 kHz.

    `source`: a mono array at `sample_rate` (16 kHz if not given; the reference takes only
    that), a (array, rate) pair, or anything `open_source` takes. `start` / `end` (seconds) cut
    the clip as the reference's audio_start / audio_end do; `soundtrack`: the source is a video
    whose audio track is wanted. A soundtrack or an http(s) URL is decoded by FFmpeg, anything
    else by libsndfile when it can, as the reference does. With `max_seconds`,
    longer audio is refused, by its declared length before decoding or as soon as decoding passes it."""
    if isinstance(source, tuple) and len(source) == 2 and np.isscalar(source[1]):
        source, sample_rate = source
    where = f"{what} {describe(source)}"
    if isinstance(source, np.ndarray):
        rate = sample_rate or SAMPLE_RATE
        check_rate(rate, where)
        samples = np.asarray(source, np.float32)
        samples = to_mono(samples.T if samples.ndim == 2 and samples.shape[0] > samples.shape[1] else samples)
        samples = samples[int(rate * start):None if end is None else int(rate * end)]
        if max_seconds is not None and len(samples) > max_seconds * rate:
            raise MediaTooLong(f"{where}: longer than {max_seconds:g} s")
    else:
        duration = None if end is None else end - start
        data = open_source(source, what)
        samples, rate = None, None
        # the reference hands http(s) URLs and soundtracks to FFmpeg, everything else to libsndfile first
        from_url = isinstance(source, str) and source.lower().startswith(("http://", "https://"))
        if not (soundtrack or from_url):
            samples, rate = _read_with_soundfile(data, start, duration, max_seconds, where)
        if samples is None:
            if isinstance(data, io.BytesIO):
                data.seek(0)
            samples, rate = _read_with_ffmpeg(data, source, what, start, duration, max_seconds)
        samples = to_mono(samples)
    audio = resample(samples, rate)
    if audio.size == 0:
        raise MediaError(f"{where}: contains no audio samples")
    if not np.isfinite(audio).all():
        raise MediaError(f"{where}: contains NaN or infinite samples")
    return audio


def check_rate(rate, where):
    if not AUDIO_RATES[0] <= rate <= AUDIO_RATES[1]:
        raise MediaError(f"{where}: a sample rate of {rate} Hz is not supported "
                         f"({AUDIO_RATES[0]} to {AUDIO_RATES[1]} Hz)")


def to_mono(samples):
    """(channels, samples) -> the channels' mean, as librosa.to_mono (not FFmpeg's mono mix,
    which weighs each of two channels by 1/sqrt(2))."""
    return np.mean(samples, axis=0) if samples.ndim > 1 else samples


def resample(samples, rate):
    """Mono float32 at `rate` -> 16 kHz: soxr at high quality, the length fixed to
    ceil(n * 16000 / rate) as librosa.resample does."""
    import soxr

    if rate == SAMPLE_RATE:
        return np.ascontiguousarray(samples, np.float32)
    out = soxr.resample(samples, rate, SAMPLE_RATE, quality="soxr_hq")
    n = int(np.ceil(len(samples) * float(SAMPLE_RATE) / rate))
    out = out[:n] if len(out) >= n else np.pad(out, (0, n - len(out)))
    return np.asarray(out, np.float32)


def _read_with_soundfile(data, start, duration, max_seconds, where):
    """(channels, samples) float32 and the rate, read as librosa's soundfile path reads them;
    (None, None) when libsndfile does not know the format."""
    import soundfile

    try:
        f = soundfile.SoundFile(data)
    except soundfile.LibsndfileError:
        return None, None
    with f:
        rate = f.samplerate
        check_rate(rate, where)
        first = int(start * rate) if start else 0
        frames = f.frames - first if duration is None else min(int(duration * rate), max(f.frames - first, 0))
        if max_seconds is not None and frames > max_seconds * rate:
            raise MediaTooLong(f"{where}: longer than {max_seconds:g} s ({frames / rate:.1f} s declared)")
        try:
            if first:
                f.seek(first)
            samples = f.read(frames=frames if duration is not None or first else -1, dtype="float32", always_2d=True)
        except (soundfile.LibsndfileError, RuntimeError) as e:
            raise MediaError(f"{where}: corrupt audio ({e})") from None
    return samples.T, rate


def _read_with_ffmpeg(data, source, what, start, duration, max_seconds):
    """(channels, samples) float32 and the rate, as the reference's FFmpeg path (audioread)
    gives them: 16-bit samples at the stream's own rate and channels, scaled by 1/32768."""
    import av

    where = f"{what} {describe(source)}"
    with open_container(data, source, what) as container:
        if not container.streams.audio:
            raise MediaError(f"{where}: has no audio track")
        stream = container.streams.audio[0]
        rate = stream.sample_rate or SAMPLE_RATE
        check_rate(rate, where)
        declared = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
        if max_seconds is not None and declared is not None and declared - start > max_seconds:
            raise MediaTooLong(f"{where}: longer than {max_seconds:g} s ({declared:.1f} s declared)")
        first = int(rate * start)
        last = None if duration is None else first + int(rate * duration)
        limit = None if max_seconds is None else first + math.floor(max_seconds * rate)
        pieces, channels, total = [], None, 0
        try:
            for frame in container.decode(audio=0):
                check_rate(frame.sample_rate, where)
                if channels is None:
                    channels = len(frame.layout.channels)
                    converter = av.AudioResampler(format="s16", layout=frame.layout, rate=frame.sample_rate)
                for converted in converter.resample(frame):
                    pcm = converted.to_ndarray().reshape(-1, channels)  # interleaved s16
                    pieces.append(pcm)
                    total += len(pcm)
                if limit is not None and total > limit and (last is None or last > limit):
                    raise MediaTooLong(f"{where}: longer than {max_seconds:g} s")
                if last is not None and total >= last:
                    break
            for converted in converter.resample(None) if channels else []:  # flush
                pieces.append(converted.to_ndarray().reshape(-1, channels))
        except MediaError:
            raise
        except Exception as e:  # FFmpeg's errors come as many types; all mean the same to a user
            raise MediaError(f"{where}: corrupt audio ({type(e).__name__}: {e})") from None
    if not pieces:
        return np.zeros((1, 0), np.float32), rate
    pcm = np.concatenate(pieces)[first:last]
    return (pcm.astype(np.float32) * np.float32(1 / 32768)).T, rate
