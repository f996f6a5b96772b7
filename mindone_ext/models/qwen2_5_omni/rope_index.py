"""TMRoPE position ids (3, B, T) and rope deltas, computed on the host with numpy.

Mirrors the reference's `get_rope_index`: text advances all three axes together; an image or
video grid gets (time, row, column) ids, time at `position_id_per_seconds` per second of video;
audio advances like text; with `use_audio_in_video`, a video's frames and its audio track are
interleaved in chunks of `seconds_per_chunk`. Each segment starts one past the largest id so far.
Padding (attention_mask 0) gets id 1. The delta is (largest id + 1 - real length): what decoding
adds to a token's index to get its position.
"""
from dataclasses import dataclass

import numpy as np


@dataclass
class RopeTokens:
    image: int
    video: int
    audio: int
    vision_start: int
    audio_start: int
    merge: int
    per_second: int = 25
    seconds_per_chunk: float = 2.0

    @classmethod
    def from_config(cls, c):
        """From the Thinker's config (merge size in its vision config) or the Talker's (its own)."""
        merge = c.vision_config.spatial_merge_size if hasattr(c, "vision_config") else c.spatial_merge_size
        return cls(c.image_token_index, c.video_token_index, c.audio_token_index, c.vision_start_token_id,
                   c.audio_start_token_id, merge, c.position_id_per_seconds, c.seconds_per_chunk)


def text_rope_index(attention_mask):
    mask = np.asarray(attention_mask).astype(np.int64)
    positions = np.cumsum(mask, -1) - 1
    positions[mask == 0] = 1
    position_ids = np.broadcast_to(positions, (3,) + positions.shape).copy()
    deltas = positions.max(-1, keepdims=True) + 1 - mask.sum(-1, keepdims=True)
    return position_ids, deltas


def audio_tokens(frames):
    """Mel frames -> audio tokens (the encoder's stride-2 conv, then 2x pooling)."""
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


def vision_ids(start, t_index, grid_h, grid_w, merge):
    h, w = grid_h // merge, grid_w // merge
    t = np.repeat(np.asarray(t_index, np.int64), h * w)
    rows = np.tile(np.repeat(np.arange(h), w), len(t_index))
    cols = np.tile(np.arange(w), h * len(t_index))
    return np.stack([t, rows, cols]) + start


def chunk_bounds(time_ids, tokens_per_chunk, start=0):
    """Cut monotone time ids into runs whose (id - start) fall in successive chunks of
    `tokens_per_chunk` (the reference's `get_chunked_index`)."""
    bounds, begin, chunk = [], 0, 1
    for i, value in enumerate(time_ids):
        if value - start >= chunk * tokens_per_chunk:
            bounds.append((begin, i))
            begin, chunk = i, chunk + 1
    bounds.append((begin, len(time_ids)))
    return bounds


def _sequence_ids(tokens, spec, images, videos, audios, seconds_per_grid, use_audio_in_video):
    """Position ids (3, L) for one unpadded sequence; `images`/`videos`/`audios` are iterators
    over that sequence's grids, grids and frame counts, consumed in order."""
    parts, cursor = [], 0

    def next_start():
        return parts[-1].max() + 1 if parts else 0

    def add_text(n):
        if n:
            parts.append(np.broadcast_to(np.arange(n), (3, n)) + next_start())

    def time_index(grid_t, seconds):
        # float32 arithmetic then truncation, as the reference
        return (np.arange(grid_t, dtype=np.float32) * np.float32(seconds) * np.float32(spec.per_second)).astype(np.int64)

    starts = np.flatnonzero(tokens == spec.vision_start)
    after = tokens[starts + 1] if len(starts) else np.zeros(0, np.int64)
    n_images = int((after == spec.image).sum())
    n_videos = int((after == (spec.audio_start if use_audio_in_video else spec.video)).sum())
    n_audios = int((tokens == spec.audio_start).sum())
    remaining = {"image": n_images, "video": n_videos, "audio": n_audios}
    total = n_images + n_audios if use_audio_in_video else n_images + n_videos + n_audios
    token_list = tokens.tolist()

    def find(token, kind):
        if remaining[kind] > 0 and token in token_list[cursor:]:
            return token_list.index(token, cursor)
        return len(token_list) + 1

    for _ in range(total):
        ends = {"image": find(spec.image, "image"), "video": find(spec.video, "video"),
                "audio": find(spec.audio, "audio")}
        first = min(ends.values())
        if first == ends["audio"]:
            add_text(first - cursor - 1)
            add_text(1)  # <|audio_bos|>
            n = int(audio_tokens(next(audios)))
            add_text(n)
            add_text(1)  # <|audio_eos|>
            cursor, remaining["audio"] = first + n + 1, remaining["audio"] - 1
        elif first == ends["image"]:
            add_text(first - cursor - 1)
            add_text(1)
            t, h, w = next(images)
            parts.append(vision_ids(next_start(), time_index(t, 1), h, w, spec.merge))
            n = t * h * w // spec.merge**2
            add_text(1)
            cursor, remaining["image"] = first + n + 1, remaining["image"] - 1
        elif not use_audio_in_video:
            add_text(first - cursor - 1)
            add_text(1)
            t, h, w = next(videos)
            parts.append(vision_ids(next_start(), time_index(t, next(seconds_per_grid)), h, w, spec.merge))
            n = t * h * w // spec.merge**2
            add_text(1)
            cursor, remaining["video"] = first + n + 1, remaining["video"] - 1
        else:
            add_text(first - cursor - 2)
            start = next_start()
            parts += [np.full((3, 1), start), np.full((3, 1), start)]  # <|vision_bos|><|audio_bos|> share an id
            start = next_start()
            n_audio = int(audio_tokens(next(audios)))
            audio_ids = np.broadcast_to(np.arange(n_audio), (3, n_audio)) + start
            t, h, w = next(videos)
            video = vision_ids(start, time_index(t, next(seconds_per_grid)), h, w, spec.merge)
            per_chunk = int(spec.per_second * spec.seconds_per_chunk)
            video_chunks = chunk_bounds(video[0], per_chunk, start)
            audio_chunks = chunk_bounds(audio_ids[0], per_chunk, start)
            for j in range(max(len(video_chunks), len(audio_chunks))):
                if j < len(video_chunks):
                    parts.append(video[:, video_chunks[j][0]:video_chunks[j][1]])
                if j < len(audio_chunks):
                    parts.append(audio_ids[:, audio_chunks[j][0]:audio_chunks[j][1]])
            start = next_start()
            parts += [np.full((3, 1), start), np.full((3, 1), start)]  # <|audio_eos|><|vision_eos|>
            n_video = t * h * w // spec.merge**2
            cursor = first + n_audio + n_video + 2
            remaining["audio"] -= 1
            remaining["video"] -= 1
    add_text(len(token_list) - cursor)
    return np.concatenate(parts, 1) if parts else np.zeros((3, 0), np.int64)


def get_rope_index(spec, input_ids, image_grid_thw=None, video_grid_thw=None, attention_mask=None,
                   use_audio_in_video=False, audio_seqlens=None, second_per_grids=None):
    """The reference's `get_rope_index`: position_ids (3, B, T) and deltas (B, 1), int64."""
    input_ids = np.asarray(input_ids, np.int64)
    mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
    if image_grid_thw is None and video_grid_thw is None:
        return text_rope_index(mask)
    images = iter(np.asarray(image_grid_thw if image_grid_thw is not None else np.zeros((0, 3)), np.int64).tolist())
    videos = iter(np.asarray(video_grid_thw if video_grid_thw is not None else np.zeros((0, 3)), np.int64).tolist())
    audios = iter(np.asarray(audio_seqlens if audio_seqlens is not None else [], np.int64).tolist())
    if second_per_grids is None:
        second_per_grids = np.ones(len(np.asarray(video_grid_thw if video_grid_thw is not None else [])))
    seconds = iter(np.asarray(second_per_grids, np.float32).tolist())
    position_ids = np.ones((3,) + input_ids.shape, np.int64)
    deltas = []
    for i in range(input_ids.shape[0]):
        keep = mask[i] == 1
        ids = _sequence_ids(input_ids[i][keep], spec, images, videos, audios, seconds, use_audio_in_video)
        position_ids[:, i, keep] = ids
        deltas.append(ids.max() + 1 - keep.sum())
    return position_ids, np.asarray(deltas, np.int64).reshape(-1, 1)

