"""A prompt's media encoded in parts (media_parts.py: an answer's start, which the voice server runs
between rounds) give the embeddings of the media encoded whole, at every length near the parts'
boundaries; an answer that encodes its media in parts says what generate says."""
import numpy as np
import pytest

from mindone_ext.models.qwen2_5_omni.media_parts import AUDIO_PART_WINDOWS, VISION_PART_PATCHES
from mindone_ext.models.qwen2_5_omni.prefills import prefill_now
from tests.conftest import max_abs_diff
from tests.models.qwen2_5_omni.multimodal_inputs import AUDIO, IMAGE, VIDEO, build, case

PART_FRAMES = AUDIO_PART_WINDOWS * 2 * 10  # the tiny audio encoder's windows are 20 frames


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    """A model of this module's own: its encoders run sizes other tests' shared model must not see
    (they check which graphs it built)."""
    from mindone_ext import Qwen2_5OmniForConditionalGeneration

    return Qwen2_5OmniForConditionalGeneration.from_pretrained(tiny_checkpoint)


def in_parts(model, inputs, in_video=False):
    """(embeddings encoded whole, embeddings encoded in parts, the parts' EncodeRequests)."""
    whole = model.thinker.prepare_inputs(**inputs, use_audio_in_video=in_video)
    deferred = model.thinker.prepare_inputs(**inputs, use_audio_in_video=in_video, media_in_parts=True)
    parts = [part for _, _, media in deferred.unencoded[1] for part in media]
    prefill_now(deferred.encode_steps())
    np.testing.assert_array_equal(deferred.position_ids, whole.position_ids)
    assert deferred.unencoded is None
    return whole.inputs_embeds.asnumpy(), deferred.inputs_embeds.asnumpy(), parts


# every frame count near one, two and three parts' boundaries, and the shortest clips (1-2 frames
# give no token; a last part of 1-2 frames is left out)
LENGTHS = sorted({n for k in (1, 2, 3) for n in range(k * PART_FRAMES - 3, k * PART_FRAMES + 4)} | {3, 4, 21, 41})


@pytest.mark.parametrize("frames", LENGTHS)
def test_audio_in_parts_equals_the_clip_encoded_whole(model, tiny_checkpoint, frames):
    inputs = build(tiny_checkpoint, ["a " + AUDIO + " b " + AUDIO], (frames, 57), seed=frames)
    whole, parts, requests = in_parts(model, inputs)
    assert np.abs(whole).mean() > 0.01 and max_abs_diff(parts, whole) <= 1e-5
    cut = [r.inputs.shape[1] for r in requests]
    assert sum(cut) == frames + 57 - (frames % PART_FRAMES if frames % PART_FRAMES < 3 else 0)
    assert all(n == PART_FRAMES for n in cut[:-2]) and sum(r.tokens for r in requests) == \
        int((inputs["input_ids"] == model.thinker.config.audio_token_index).sum())


@pytest.mark.parametrize("grids, cut", [
    ([[1, 32, 32]], [1024]),  # an image of exactly one part's patches
    ([[1, 34, 36]], [1224]),  # larger than a part: a part by itself
    ([[9, 16, 16]], [1024, 1024, 256]),  # a video's frames grouped, four to a part, the rest after
    ([[3, 16, 22]], [704, 352]),  # two frames to a part
    ([[2, 4, 6], [5, 32, 32]], [48] + [1024] * 5),  # two videos: each cut on its own
])
def test_vision_in_parts_equals_the_media_encoded_whole(model, tiny_checkpoint, grids, cut):
    assert VISION_PART_PATCHES == 1024
    videos = build(tiny_checkpoint, [" ".join(["v " + VIDEO] * len(grids))], video_grids=grids,
                   seconds_per_grid=[1.0] * len(grids), seed=len(cut))
    whole, parts, requests = in_parts(model, videos)
    assert [len(r.inputs[0]) for r in requests] == cut
    assert np.abs(whole).mean() > 0.01 and max_abs_diff(parts, whole) <= 1e-5
    images = build(tiny_checkpoint, [" ".join(["i " + IMAGE] * len(grids))],
                   image_grids=[[1, h, w] for _, h, w in grids])
    whole, parts, requests = in_parts(model, images)
    assert len(requests) == len(grids) and max_abs_diff(parts, whole) <= 1e-5


@pytest.mark.parametrize("name", ["audio_image_video", "audio_in_video"])
def test_an_answer_encoding_its_media_in_parts_says_what_generate_says(model, tiny_checkpoint, name):
    inputs, in_video = case(tiny_checkpoint, name)
    args = dict(use_audio_in_video=in_video, max_new_tokens=12, eos_token_id=[], return_audio=False)
    want = model.generate(**inputs, **args)[0, inputs["input_ids"].shape[1]:].asnumpy().tolist()
    assert [e.token_id for e in model.generate_stream(**inputs, **args)] == want


@pytest.mark.parametrize("entry", ["generate_stream", "generate"], ids=["in parts", "whole"])
def test_media_that_do_not_match_their_placeholders_are_refused_before_any_is_encoded(model, tiny_checkpoint,
                                                                                     monkeypatch, entry):
    encoded = []
    for encoder in (model.thinker.audio_tower, model.thinker.visual):
        monkeypatch.setattr(type(encoder), "encode_clips", lambda self, clips: encoded.append(clips))
        monkeypatch.setattr(type(encoder), "__call__", lambda self, *args: encoded.append(args))
    answer = getattr(model, entry)
    inputs, _ = case(tiny_checkpoint, "audio_image_video")
    wrong_audio = dict(inputs, feature_attention_mask=inputs["feature_attention_mask"][:, :-30])
    with pytest.raises(ValueError, match="input_features must be"):
        answer(**wrong_audio)
    fewer = dict(inputs, input_features=inputs["input_features"][:1],
                 feature_attention_mask=inputs["feature_attention_mask"][:1])
    with pytest.raises(ValueError, match="audio features and audio tokens do not match"):
        answer(**fewer)
    short = dict(inputs, pixel_values_videos=inputs["pixel_values_videos"][:-4])
    with pytest.raises(ValueError, match="video pixel values and grid do not match: 44 patch rows, 48 in the grid"):
        answer(**short)
    assert encoded == []
