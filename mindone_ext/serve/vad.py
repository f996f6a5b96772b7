"""Where the user's turn starts and ends, from the audio alone.

WebRTC's voice activity detector (the `webrtcvad-wheels` package, Google's GMM detector) marks
each 30 ms frame voiced or not. A turn starts at `start_frames` voiced frames in a row and ends
after `end_silence` seconds without voice; the `pre_roll` seconds before the start are kept, since
the detector needs a few frames to be sure and the first syllable is in them.
"""
from dataclasses import dataclass

import numpy as np
import webrtcvad

SAMPLE_RATE = 16000
FRAME = 480  # 30 ms at 16 kHz, one of the three frame sizes the detector takes


@dataclass
class VadSettings:
    aggressiveness: int = 2  # 0 (keeps most as speech) .. 3 (strictest)
    start_frames: int = 3  # voiced 30 ms frames in a row that start a turn
    end_silence: float = 0.6  # seconds without voice that end it
    pre_roll: float = 0.3  # seconds kept from before the start


@dataclass
class SpeechStarted:
    audio: np.ndarray  # the pre-roll and the voiced frames so far, float32


@dataclass
class SpeechContinues:
    audio: np.ndarray


@dataclass
class SpeechStopped:
    audio: np.ndarray  # the rest of the turn, up to the end of the silence that ended it


class TurnDetector:
    """Feed 16-bit PCM as it arrives; get SpeechStarted / SpeechContinues / SpeechStopped events
    whose audio, joined, is the user's turn."""

    def __init__(self, settings=None):
        self.settings = settings or VadSettings()
        self.vad = webrtcvad.Vad(self.settings.aggressiveness)
        self.pending = b""  # bytes short of a whole frame
        self.history = []  # recent frames while silent (the pre-roll), float32
        self.voiced_run = 0
        self.silent_run = 0
        self.speaking = False

    def push(self, pcm):
        """`pcm`: 16-bit little-endian mono bytes at 16 kHz (any length)."""
        data = self.pending + pcm
        whole = len(data) // (2 * FRAME) * 2 * FRAME
        self.pending = data[whole:]
        events, turn = [], []
        for start in range(0, whole, 2 * FRAME):
            frame = data[start:start + 2 * FRAME]
            voiced = self.vad.is_speech(frame, SAMPLE_RATE)
            samples = np.frombuffer(frame, "<i2").astype(np.float32) / 32768
            if self.speaking:
                turn.append(samples)
                self.silent_run = 0 if voiced else self.silent_run + 1
                if self.silent_run * FRAME >= self.settings.end_silence * SAMPLE_RATE:
                    events.append(SpeechStopped(np.concatenate(turn)))
                    self.speaking, turn, self.voiced_run, self.silent_run = False, [], 0, 0
                continue
            self.history.append(samples)
            keep = int(self.settings.pre_roll * SAMPLE_RATE / FRAME) + self.settings.start_frames
            del self.history[:-keep]
            self.voiced_run = self.voiced_run + 1 if voiced else 0
            if self.voiced_run >= self.settings.start_frames:
                events.append(SpeechStarted(np.concatenate(self.history)))
                self.speaking, self.history, self.silent_run = True, [], 0
        if self.speaking and turn:
            events.append(SpeechContinues(np.concatenate(turn)))
        return events
