"""Hearing and seeing against the PyTorch reference: encoders, TMRoPE position ids, merged
prompts, and generation after a multimodal prompt."""
import contextlib

import numpy as np
import pytest
import torch

from mindone_ext.models.qwen2_5_omni.audio_encoder import output_lengths
from mindone_ext.nn.encoder_kernels import EncoderKernels
from tests.conftest import max_abs_diff
from tests.models.qwen2_5_omni.multimodal_inputs import CASES, case

TORCH_KEYS = ("input_ids", "attention_mask", "input_features", "feature_attention_mask", "pixel_values",
              "image_grid_thw", "pixel_values_videos", "video_grid_thw", "video_second_per_grid")


def to_torch(inputs):
    return {k: torch.tensor(v) for k, v in inputs.items() if k in TORCH_KEYS}


def run_op_by_op(encoder, *inputs):
    """The encoder's output in training mode, where its layers run op by op through the cells."""
    encoder.set_train(True)
    try:
        return encoder(*inputs).asnumpy()
    finally:
        encoder.set_train(False)


@contextlib.contextmanager
def attention_through(encoder, path):
    """An encoder through its native kernels ("native", the CPU's default) or through MindSpore's
    ops alone ("ops": Ascend's path, and the CPU's with native kernels off)."""
    kernels = encoder.kernels
    if path == "native" and kernels.segment_attention is None:
        pytest.skip("the native kernels are the CPU target's")
    if path == "ops":  # (the stored graphs told apart by the libraries they call)
        encoder.use_kernels(EncoderKernels())
    try:
        yield encoder
    finally:
        encoder.use_kernels(kernels)


@pytest.fixture(params=["native", "ops"])
def visual(our_model, request):
    with attention_through(our_model.thinker.visual, request.param) as encoder:
        yield encoder


def test_audio_encoder_several_windows_two_lengths(our_model, reference_model):
    rng = np.random.default_rng(3)
    lens = np.array([57, 23, 40])  # windows of 20 frames: 20+20+17, 20+3, 20+20
    feats = rng.standard_normal((128, lens.sum())).astype(np.float32)
    got = our_model.thinker.audio_tower(feats, lens).asnumpy()
    tower = reference_model.thinker.audio_tower
    with torch.no_grad():
        cnn, out = tower._get_feat_extract_output_lengths(torch.tensor(lens))
        want = tower(torch.tensor(feats), feature_lens=torch.tensor(lens), aftercnn_lens=cnn).last_hidden_state.numpy()
    assert got.shape == want.shape == (int(output_lengths(lens)[1].sum()), 64)
    assert np.abs(want).mean() > 0.1
    assert max_abs_diff(got, want) <= 1e-4


@pytest.mark.parametrize("lens", [[20], [21], [39, 3], [80], [41, 19, 20], [99], [100, 4], [160], [160, 5]],
                         ids=lambda lens: "+".join(map(str, lens)))
@pytest.mark.parametrize("path", ["native", "ops"])
def test_audio_encoder_window_counts_around_the_compiled_graphs(our_model, reference_model, lens, path):
    """The compiled layers (one graph per power of two of windows, windows padded to a whole one)
    against the reference and against the layers run op by op (training mode), 1..9 windows; their
    attention through the native kernel and through the ops."""
    lens = np.array(lens)
    feats = np.random.default_rng(int(lens.sum())).standard_normal((128, lens.sum())).astype(np.float32)
    with attention_through(our_model.thinker.audio_tower, path) as tower:
        got = tower(feats, lens).asnumpy()
        windows_run = set(tower._windows)
    op_by_op = run_op_by_op(tower, feats, lens)
    reference = reference_model.thinker.audio_tower
    with torch.no_grad():
        cnn, _ = reference._get_feat_extract_output_lengths(torch.tensor(lens))
        want = reference(torch.tensor(feats), feature_lens=torch.tensor(lens), aftercnn_lens=cnn).last_hidden_state
    assert got.shape == want.shape
    assert max_abs_diff(got, want.numpy()) <= 1e-4 and max_abs_diff(got, op_by_op) <= 1e-5
    windows = int(np.ceil(lens / 20).sum())  # the tiny encoder's windows are 20 frames
    assert 1 << (windows - 1).bit_length() in windows_run <= {1, 2, 4, 8, 16}  # its compiled graph ran


def test_audio_clips_encoded_together_equal_each_alone(our_model, monkeypatch):
    """encode_clips (the voice server's turns that arrive together): each clip's embeddings as it
    gives alone, clips of 1-5 windows with lengths around the window edges, in one graph run."""
    tower = our_model.thinker.audio_tower
    rng = np.random.default_rng(11)
    lens = [3, 19, 20, 21, 39, 41, 100]  # the tiny encoder's windows are 20 frames: 15 windows in all
    clips = [rng.standard_normal((128, n)).astype(np.float32) for n in lens]
    runs, run_graphs = [], tower._run_graphs
    monkeypatch.setattr(tower, "_run_graphs", lambda *a: runs.append(len(a[1])) or run_graphs(*a))
    together = tower.encode_clips(clips)
    assert runs == [15]
    for clip, got, tokens in zip(clips, together, output_lengths(lens)[1]):
        alone = tower(clip, [clip.shape[1]]).asnumpy()
        assert got.shape == alone.shape == (tokens, 64)
        assert max_abs_diff(got.asnumpy(), alone) <= 1e-5
    assert max_abs_diff(tower.encode_clips(clips[6:])[0].asnumpy(), tower(clips[6], [100]).asnumpy()) == 0


@pytest.mark.parametrize("grid", [[[1, 4, 4]], [[1, 2, 10]], [[1, 4, 8]], [[1, 6, 6]], [[1, 2, 24]], [[1, 10, 10]],
                                  [[2, 6, 10]], [[1, 4, 4], [1, 2, 2]]], ids=lambda g: "+".join("x".join(map(str, i)) for i in g))
def test_vision_encoder_patch_counts_around_the_compiled_graphs(visual, reference_model, grid):
    """The compiled blocks (patches padded to one of 8 sizes per power of two) against the
    reference and against the blocks run op by op (training mode), 16..128 patches."""
    grid = np.asarray(grid)
    pixels = np.random.default_rng(int(grid.prod(1).sum())).standard_normal((int(grid.prod(1).sum()), 1176))
    pixels = pixels.astype(np.float32)
    got = visual(pixels, grid).asnumpy()
    op_by_op = run_op_by_op(visual, pixels, grid)
    with torch.no_grad():
        want = reference_model.thinker.visual(torch.tensor(pixels), grid_thw=torch.tensor(grid)).numpy()
    assert got.shape == want.shape
    assert max_abs_diff(got, want) <= 1e-4 and max_abs_diff(got, op_by_op) <= 1e-5
    assert -(-int(grid.prod(1).sum()) // 16) * 16 in visual._widths <= {16, 32, 48, 64, 80, 96, 112, 128}  # it ran
    # the attention's segments padded too: a power of two of them (the kernel's lengths), each a
    # bucketed length (the ops' layouts)
    segments = {layout for shapes in visual._shapes for layout in shapes[1:]}
    assert all(layout[0] & (layout[0] - 1) == 0 for layout in segments), segments
    assert visual.kernels.rotary_attention is not None or all(layout[2] % 16 == 0 for layout in segments)


@pytest.mark.parametrize("grid", [[[1, 6, 10]], [[4, 8, 6]], [[1, 4, 4], [2, 6, 8]]], ids=["image", "video", "both"])
def test_vision_encoder_window_and_full_attention(visual, reference_model, grid):
    config = reference_model.config.thinker_config.vision_config
    assert set(config.fullatt_block_indexes) and len(config.fullatt_block_indexes) < config.depth
    grid = np.asarray(grid)
    pixels = np.random.default_rng(4).standard_normal((int(grid.prod(1).sum()), 1176)).astype(np.float32)
    got = visual(pixels, grid).asnumpy()
    with torch.no_grad():
        want = reference_model.thinker.visual(torch.tensor(pixels), grid_thw=torch.tensor(grid)).numpy()
    assert np.abs(want).mean() > 0.1
    assert max_abs_diff(got, want) <= 1e-4


@pytest.mark.parametrize("grid, step", [([[1, 10, 12]], 35), ([[1, 10, 12]], 59), ([[1, 10, 12]], 60),
                                        ([[1, 10, 12]], 61), ([[1, 10, 12]], 119), ([[4, 8, 6]], 23),
                                        ([[1, 4, 4], [2, 6, 8]], 29)],
                         ids=lambda v: "+".join("x".join(map(str, i)) for i in v) if isinstance(v, list) else f"{v} rows")
def test_vision_encoder_large_frames_attend_op_by_op_in_row_chunks(our_model, reference_model, monkeypatch, grid, step):
    """Frames past the scores budget: their full-attention blocks run op by op, `step` query rows
    at a time (the budget lowered so small frames take that path, their windows of 16 patches not:
    16 windows x 2 heads x 16 x 16 scores = 8192 within it; chunk sizes around half and all of a
    frame's length; smaller chunks: tests/nn), equal to the reference. The ops' path: the native
    kernel holds a chunk of queries' scores at a time, and takes every frame in the graph."""
    import sys

    from mindone_ext.models.qwen2_5_omni import vision_encoder

    attention = sys.modules["mindone_ext.nn.attention"]  # the package's `attention` is the function
    grid = np.asarray(grid)
    longest, frames = int((grid[:, 1] * grid[:, 2]).max()), int(grid[:, 0].sum())
    monkeypatch.setattr(attention, "SCORES_AT_ONCE", step * frames * 2 * longest)  # 2 heads: `step` rows a chunk
    monkeypatch.setattr(vision_encoder, "SCORES_AT_ONCE", step * frames * 2 * longest)
    pixels = np.random.default_rng(step).standard_normal((int(grid.prod(1).sum()), 1176)).astype(np.float32)
    with attention_through(our_model.thinker.visual, "ops") as visual:
        got = visual(pixels, grid).asnumpy()
        shapes = visual._shapes
    with torch.no_grad():
        want = reference_model.thinker.visual(torch.tensor(pixels), grid_thw=torch.tensor(grid)).numpy()
    assert max_abs_diff(got, want) <= 1e-4
    width = -(-int(grid.prod(1).sum()) // 16) * 16
    # the graph ran at this width with the windows' layout alone (16 patches each): the frames went op by op
    assert any(s[0] == width and all(layout[-1] == 16 for layout in s[1:]) for s in shapes), shapes


def test_a_full_hd_picture_is_encoded_in_bounded_memory(tmp_path):
    """A 1920 x 1080 picture (ffmpeg's test card) through process_mm_info, the processor and
    generate on the tiny checkpoint, in a process of its own: its vision encoder's full-attention
    blocks attend over 10764 patches. Peak memory 20.4 GB before they attended in row chunks, ~2 GB after."""
    import subprocess
    import sys

    from tests.conftest import SHIPPED_CHECKPOINT

    picture = tmp_path / "card.png"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc2=size=1920x1080", "-frames:v", "1",
                    str(picture)], check=True)
    # VmHWM: this process's own peak (ru_maxrss keeps the forking pytest's, which can be larger)
    script = f"""
from mindone_ext import Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniProcessor, process_mm_info
conversation = [{{"role": "user", "content": [{{"type": "image", "image": {str(picture)!r}}}, {{"type": "text", "text": "?"}}]}}]
processor = Qwen2_5OmniProcessor.from_pretrained({SHIPPED_CHECKPOINT!r})
_, images, _ = process_mm_info(conversation)
inputs = processor(processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False), images=images)
model = Qwen2_5OmniForConditionalGeneration.from_pretrained({SHIPPED_CHECKPOINT!r}, enable_audio_output=False)
model.generate(**inputs, max_new_tokens=2, return_audio=False)
peak_kb = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
print(inputs["image_grid_thw"].tolist(), int(peak_kb) // 1024)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    grid, peak_mb = done.stdout.strip().splitlines()[-1].rsplit(" ", 1)
    assert grid == "[[1, 78, 138]]" and int(peak_mb) < 4096, done.stdout


@pytest.mark.parametrize("name", sorted(CASES))
def test_rope_index_equals_reference(our_model, reference_model, tiny_checkpoint, name):
    from mindone_ext.models.qwen2_5_omni.rope_index import get_rope_index

    inputs, in_video = case(tiny_checkpoint, name)
    mask = inputs["attention_mask"]
    audio_lengths = inputs["feature_attention_mask"].sum(1) if "feature_attention_mask" in inputs else None
    got_ids, got_deltas = get_rope_index(our_model.thinker.rope_tokens, inputs["input_ids"], inputs.get("image_grid_thw"),
                                         inputs.get("video_grid_thw"), mask, in_video, audio_lengths,
                                         inputs.get("video_second_per_grid"))
    t = to_torch(inputs)
    want_ids, want_deltas = reference_model.thinker.get_rope_index(
        t["input_ids"], t.get("image_grid_thw"), t.get("video_grid_thw"), t["attention_mask"], in_video,
        None if audio_lengths is None else torch.tensor(audio_lengths), t.get("video_second_per_grid"))
    np.testing.assert_array_equal(got_ids, want_ids.numpy())
    np.testing.assert_array_equal(got_deltas, want_deltas.numpy())


@pytest.mark.parametrize("name", ["audio_image_video", "audio_in_video", "mixed_batch_padded"])
def test_thinker_logits_with_media(our_model, reference_model, tiny_checkpoint, name):
    inputs, in_video = case(tiny_checkpoint, name)
    with torch.no_grad():
        ref = reference_model.thinker(**to_torch(inputs), use_audio_in_video=in_video)
    out = our_model.thinker(**inputs, use_audio_in_video=in_video)
    valid = inputs["attention_mask"].astype(bool)
    want = ref.logits.numpy()
    assert np.abs(want[valid]).mean() > 0.1
    assert max_abs_diff(out.logits.asnumpy()[valid], want[valid]) <= 1e-4
    np.testing.assert_array_equal(out.rope_deltas, ref.rope_deltas.numpy())


@pytest.mark.parametrize("name", ["audio_image_video", "audio_in_video", "mixed_batch_padded"])
def test_greedy_generation_after_multimodal_prompt(our_model, reference_model, tiny_checkpoint, name):
    inputs, in_video = case(tiny_checkpoint, name)
    with torch.no_grad():
        want = reference_model.generate(**to_torch(inputs), use_audio_in_video=in_video, return_audio=False,
                                        thinker_max_new_tokens=16, thinker_do_sample=False,
                                        thinker_eos_token_id=None).numpy()
    got = our_model.generate(return_audio=False, **inputs, use_audio_in_video=in_video, max_new_tokens=16, eos_token_id=[])
    np.testing.assert_array_equal(got, want)


def test_placeholder_count_mismatch_is_explained(our_model, tiny_checkpoint):
    inputs, _ = case(tiny_checkpoint, "image")
    inputs["image_grid_thw"] = np.array([[1, 6, 12]])  # 18 feature rows for a prompt made for 15
    inputs["pixel_values"] = np.zeros((72, 1176), np.float32)
    with pytest.raises(ValueError, match="image features and image tokens do not match: 15 placeholder tokens"):
        our_model.thinker(**inputs)
