"""Whisper log-mel features of audio clips, without computing the extractor's padding.

Qwen2.5-Omni's feature extractor pads every clip with silence to its whole window (300 s) and
computes the log-mel of all of it: 0.3-1.8 s a clip on this project's CPU machine, nearly all of
it for silence. A frame depends only on the samples under it, and the clamp (the clip's loudest
frame minus 8) only on the clip, so here the log-mel runs over the clip and a little silence,
and the rest of the window is the last, silent frame repeated: the extractor's full-window output
bit for bit, on its numpy code and on its torch code (tests/models/qwen2_5_omni/test_audio_features.py
sweeps lengths). The silence is at least two FFT windows (one frame after the clip's reach is
wholly silent) and pads the clip to at least a second: with fewer frames, the torch code's
matrix products came out different in the last bit (measured).
"""
import numpy as np


def clip_features(extractor, samples):
    """One clip (mono, 1-D) -> (features (feature_size, F) float32, valid frames): its first
    `valid` frames as the extractor gives them for the clip padded to its whole window, then
    silent frames (at least one)."""
    length = max(len(samples) + 2 * extractor.n_fft, extractor.sampling_rate)
    out = extractor(samples, sampling_rate=extractor.sampling_rate, padding="max_length", max_length=length,
                    return_attention_mask=True, return_tensors="np")
    return out["input_features"][0].astype(np.float32), int(out["attention_mask"][0].sum())


def window_features(extractor, clips):
    """What `extractor(clips, padding="max_length", return_attention_mask=True)` gives, each clip
    padded to the extractor's window: (features (n, feature_size, window frames) float32,
    attention mask (n, window frames) int64)."""
    if extractor.dither or any(np.ndim(clip) != 1 or len(clip) + 2 * extractor.n_fft > extractor.n_samples
                               for clip in clips):
        # dither puts noise in the padding too; a clip that nearly fills the window, or that is not
        # a mono array: all as the extractor does it
        out = extractor(clips, sampling_rate=extractor.sampling_rate, padding="max_length",
                        return_attention_mask=True, return_tensors="np")
        return out["input_features"].astype(np.float32), out["attention_mask"].astype(np.int64)
    frames = extractor.nb_max_frames
    features = np.empty((len(clips), extractor.feature_size, frames), np.float32)
    mask = np.zeros((len(clips), frames), np.int64)
    for i, clip in enumerate(clips):
        computed, valid = clip_features(extractor, clip)
        features[i, :, :computed.shape[1]] = computed
        features[i, :, computed.shape[1]:] = computed[:, -1:]
        mask[i, :valid] = 1
    return features, mask
