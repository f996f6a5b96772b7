"""Speaking against the PyTorch reference: Talker, ECAPA, DiT, BigVGAN, the ODE, and the whole
generate(..., return_audio=True) chain with the same injected noise."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import mindspore as ms
from mindspore import Tensor

from tests.conftest import max_abs_diff

rng = np.random.default_rng(11)


@pytest.fixture(scope="module")
def parts(our_model, reference_model):
    return our_model.token2wav.code2wav_dit_model, reference_model.token2wav.code2wav_dit_model


def assert_close(got, want, tol=1e-4, scale=0.1):
    assert np.abs(want).mean() > scale, "reference output too small for the tolerance to mean anything"
    assert got.shape == want.shape
    assert max_abs_diff(got, want) <= tol


def test_talker_prefill_and_five_decode_steps(our_model, reference_model):
    from mindone_ext.models.qwen2_5_omni.speech import talker_runner

    talker = our_model.talker
    embeds = rng.standard_normal((1, 14, 64)).astype(np.float32)
    positions = np.broadcast_to(np.arange(14), (3, 1, 14)).copy()
    positions[1:, :, 3:7] += np.array([[0, 1, 0, 1], [0, 0, 1, 1]])[:, None, :]  # a 2x2 image grid inside
    with torch.no_grad():
        want = reference_model.talker(inputs_embeds=torch.tensor(embeds), position_ids=torch.tensor(positions),
                                      use_cache=False).logits.numpy()
    full = talker(Tensor(embeds), positions, np.ones((1, 14), np.int32)).asnumpy()
    assert_close(full, want)
    runner = talker_runner(talker)
    cache = runner.allocate(1, 14, ms.float32)
    logits, _ = runner.prefill(cache, Tensor(embeds[:, :9]), positions[:, :, :9], np.ones((1, 9), np.int32))
    steps = [logits]
    for i in range(9, 14):
        logits, _ = runner.decode(cache, Tensor(embeds[:, i:i + 1]), positions[:, :, i:i + 1])
        steps.append(logits)
    assert max_abs_diff(np.stack(steps, 1)[0], want[0, 8:14]) <= 1e-4


@pytest.mark.parametrize("rows, frames", [(1, 73), (2, 300)])  # a reference mel; a guided pair of the real length
def test_ecapa_speaker_embedding(parts, rows, frames):
    """Op by op and as its stored graph (what the answers run)."""
    ours, ref = parts
    mel = rng.standard_normal((rows, frames, 80)).astype(np.float32)
    with torch.no_grad():
        want = ref.input_embed.spk_encoder(torch.tensor(mel)).numpy()
    encoder = ours.input_embed.spk_encoder
    assert_close(encoder(Tensor(mel)).asnumpy(), want)
    assert_close(encoder.encode(Tensor(mel)).asnumpy(), want)


def test_dit_rotary_turns_the_first_head_as_the_reference_and_leaves_the_others_bit_for_bit(parts):
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import apply_rotary_pos_emb

    from mindone_ext.models.qwen2_5_omni.dit import rotate

    ours, ref = parts
    heads, frames = ours.transformer_blocks[0].heads, 50
    q, k = (rng.standard_normal((2, heads, frames, ours.head_dim)).astype(np.float32) * 3 for _ in range(2))
    cos, sin, _ = ours.frame_inputs(frames, ms.float32)
    assert cos.shape == sin.shape == (heads, frames, ours.head_dim)
    with torch.no_grad():
        ref_cos, ref_sin = ref.rotary_embed(torch.zeros(2, frames, 1))
        want_q, want_k = apply_rotary_pos_emb(torch.tensor(q[:, :1]), torch.tensor(k[:, :1]), ref_cos, ref_sin)
    for x, want in ((q, want_q), (k, want_k)):
        got = rotate(Tensor(x), cos, sin).asnumpy()
        assert max_abs_diff(got[:, :1], want.numpy()) <= 1e-5
        assert np.array_equal(got[:, 1:], x[:, 1:])


@pytest.mark.parametrize("apply_cfg, drop, native", [(True, False, True), (False, False, True), (False, True, True),
                                                     (True, False, False)])
def test_dit_forward_at_a_fixed_time_step(parts, monkeypatch, apply_cfg, drop, native):
    """`native`: the window attention, modulated norms and gated residuals as the CPU's native
    kernels (the default there), or as ops."""
    from mindone_ext.models.qwen2_5_omni.dit import DiTKernels
    from mindone_ext.nn.device import on_ascend

    ours, ref = parts
    assert (ours.kernels.attention is None) == (ours.kernels.modulated_norm is None) == on_ascend()
    if native and on_ascend():
        pytest.skip("the native kernels are the CPU target's")
    if not native:
        monkeypatch.setattr(ours, "kernels", DiTKernels())
    frames = 62  # not a multiple of the block size: a partial last block
    x = rng.standard_normal((1, frames, 80)).astype(np.float32)
    mel = rng.standard_normal((1, 40, 80)).astype(np.float32)
    spk = rng.standard_normal((1, frames, 16)).astype(np.float32)
    code = rng.integers(0, 8193, size=(1, frames // 2))
    args = dict(apply_cfg=apply_cfg, drop_audio_conditioning=drop, drop_code=drop)
    with torch.no_grad():
        want = ref(torch.tensor(x), torch.tensor(mel), torch.tensor(spk), torch.tensor(code), torch.tensor(0.37),
                   **args).numpy()
    got = ours(Tensor(x), Tensor(mel), Tensor(spk), Tensor(code, ms.int32), Tensor(np.float32(0.37)), **args)
    assert_close(got.asnumpy(), want)


@pytest.mark.parametrize("apply_cfg", [True, False])
def test_dit_forward_of_two_rows_at_their_own_time_steps(parts, apply_cfg):
    """Each row its own time step. With guidance the reference fails on this (its time embedding
    has B rows for 2B); its conditioned and unconditioned forwards, each without guidance, are
    the two halves ours must give."""
    ours, ref = parts
    frames = 48
    x = rng.standard_normal((2, frames, 80)).astype(np.float32)
    mel = rng.standard_normal((2, 40, 80)).astype(np.float32)
    spk = rng.standard_normal((2, frames, 16)).astype(np.float32)
    code = rng.integers(0, 8193, size=(2, frames // 2))
    t = np.array([0.2, 0.7], np.float32)
    with torch.no_grad():
        inputs = (torch.tensor(x), torch.tensor(mel), torch.tensor(spk), torch.tensor(code), torch.tensor(t))
        want = ref(*inputs, apply_cfg=False).numpy()
        if apply_cfg:
            null = ref(*inputs, drop_audio_conditioning=True, drop_code=True, apply_cfg=False).numpy()
            want = np.concatenate([want, null])
    got = ours(Tensor(x), Tensor(mel), Tensor(spk), Tensor(code, ms.int32), Tensor(t), apply_cfg=apply_cfg)
    assert_close(got.asnumpy(), want)


@pytest.mark.parametrize("native", [True, False])
def test_bigvgan_waveform_from_a_fixed_mel(our_model, reference_model, monkeypatch, native):
    """Its activations as native kernels (the CPU's default) and as MindSpore ops (Ascend's path)."""
    from mindone_ext.models.qwen2_5_omni.bigvgan import AntiAliasedActivation
    from mindone_ext.nn.device import on_ascend

    bigvgan = our_model.token2wav.code2wav_bigvgan_model
    activations = [cell for _, cell in bigvgan.cells_and_names() if isinstance(cell, AntiAliasedActivation)]
    if native and on_ascend():
        pytest.skip("the native kernels are the CPU target's")
    assert all((a.fused is None) == on_ascend() for a in activations)  # native on the CPU by default
    assert (bigvgan.kernels is None) == on_ascend()  # and the CPU's rows layout (B, C, 1, n) with them
    for activation in activations if not native else ():
        monkeypatch.setattr(activation, "fused", None)
    if not native:
        monkeypatch.setattr(bigvgan, "kernels", None)
    mel = rng.standard_normal((1, 80, 23)).astype(np.float32) - 2
    with torch.no_grad():
        want = reference_model.token2wav.code2wav_bigvgan_model(torch.tensor(mel)).numpy()
    got = bigvgan(Tensor(mel)).asnumpy()
    assert (np.abs(want) < 1).mean() > 0.9  # mostly inside the final clamp, so differences show
    assert_close(got, want)


def test_rk4_steps_round_as_the_reference_solver():
    """Our RK4 (its stage combinations compiled) against the reference's RungeKutta4ODESolver on a
    field made of the same float32 operations in both, over the sway-sampled grid."""
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import RungeKutta4ODESolver

    from mindone_ext.models.qwen2_5_omni.token2wav import rk4_integrate, sway_timesteps
    from mindone_ext.nn.device import on_ascend

    y0, a = rng.standard_normal((2, 48, 80)).astype(np.float32), rng.standard_normal((48, 80)).astype(np.float32)
    times = sway_timesteps(10, -1.0)
    want = RungeKutta4ODESolver(lambda t, y: y * torch.tensor(a) + t, torch.tensor(y0)).integrate(
        torch.tensor(times))[-1].numpy()
    got = rk4_integrate(lambda t, y: y * Tensor(a) + Tensor(t), Tensor(y0), times).asnumpy()
    if on_ascend():  # another device's float32 kernels: a rounding at most per operation
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    else:
        np.testing.assert_array_equal(got, want)


def test_ode_mel_with_the_same_noise(our_model, reference_model):
    speaker = our_model.speakers["Chelsie"]
    code = rng.integers(0, 8193, size=(1, 20))
    torch.manual_seed(5)
    with torch.no_grad():
        want = reference_model.token2wav.code2wav_dit_model.sample(
            torch.tensor(speaker.cond), torch.tensor(speaker.ref_mel), torch.tensor(code)).numpy()
    torch.manual_seed(5)
    noise = torch.randn(1, 30000, 80).numpy()
    got = our_model.token2wav.sample_mel(code, speaker.cond, speaker.ref_mel, noise=noise).asnumpy()
    assert_close(got, want)


def test_codes_beyond_the_dit_table_are_dropped_not_fatal(our_model, reference_model):
    speaker = our_model.speakers["Chelsie"]
    table = our_model.token2wav.code2wav_dit_model.num_embeds  # 8193 rows + 1; the Talker has 8448 codes
    code = rng.integers(0, table, size=(1, 12))
    mixed = np.insert(code, [3, 7], [8300, 8447], axis=1)
    torch.manual_seed(2)
    noise = torch.randn(1, 30000, 80).numpy()
    with pytest.raises(IndexError):  # the reference indexes out of range
        with torch.no_grad():
            reference_model.token2wav(torch.tensor(mixed), torch.tensor(speaker.cond), torch.tensor(speaker.ref_mel))
    torch.manual_seed(2)
    with torch.no_grad():
        want = reference_model.token2wav(torch.tensor(code), torch.tensor(speaker.cond),
                                          torch.tensor(speaker.ref_mel)).numpy()
    got = our_model.token2wav(mixed, speaker.cond, speaker.ref_mel, noise=noise).asnumpy()
    assert_close(got, want)


def test_generate_with_audio_matches_reference(our_model, reference_model):
    ids = np.array([[401, 5, 6, 7, 8, 9, 10, 402, 401, 20, 30, 40]])
    mask = np.ones_like(ids)
    torch.manual_seed(123)
    with torch.no_grad():
        seq, wav = reference_model.generate(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), speaker="Ethan", thinker_max_new_tokens=12,
            thinker_do_sample=False, thinker_eos_token_id=None, talker_do_sample=False, talker_max_new_tokens=30)
    torch.manual_seed(123)
    noise = torch.randn(1, 30000, 80).numpy()
    got_seq, got_wav = our_model.generate(input_ids=ids, attention_mask=mask, spk="Ethan", max_new_tokens=12,
                                          eos_token_id=[], talker_do_sample=False, talker_max_new_tokens=30,
                                          token2wav_noise=noise)
    np.testing.assert_array_equal(got_seq, seq.numpy())
    assert got_wav.dtype == ms.float32 and got_wav.shape == tuple(wav.shape) and len(got_wav) % 480 == 0
    assert_close(got_wav, wav.numpy())


def test_speech_argument_errors(our_model, tiny_checkpoint):
    from mindone_ext import Qwen2_5OmniForConditionalGeneration

    ids = np.array([[401, 5, 6]])
    with pytest.raises(ValueError, match="unknown speaker 'Nobody'; available: Chelsie, Ethan"):
        our_model.generate(input_ids=ids, speaker="Nobody")
    with pytest.raises(ValueError, match="batch size 1"):
        our_model.generate(input_ids=np.ones((2, 3), np.int64), return_audio=True)
    with pytest.raises(TypeError, match="unsupported arguments: num_beams, talker_typo"):
        our_model.generate(input_ids=ids, num_beams=4, talker_typo=1)
    text_only = Qwen2_5OmniForConditionalGeneration.from_pretrained(tiny_checkpoint, enable_audio_output=False)
    with pytest.raises(ValueError, match="enable_audio_output=True"):
        text_only.generate(input_ids=ids, return_audio=True)
    assert text_only.generate(input_ids=ids, max_new_tokens=2).shape == (1, 5)  # return_audio defaults to off


def test_the_dit_as_one_graph_or_block_by_block_gives_the_same_velocity(our_model, monkeypatch):
    from mindone_ext.models.qwen2_5_omni import token2wav as token2wav_module

    t2w = our_model.token2wav
    dit = t2w.code2wav_dit_model
    speaker = our_model.speakers["Chelsie"]
    frames = 50
    x = Tensor(rng.standard_normal((1, 72, 80)).astype(np.float32))
    cond = Tensor(np.tile(np.asarray(speaker.cond, np.float32).reshape(1, 1, -1), (1, 72, 1)))
    code = Tensor(rng.integers(0, 8193, size=(1, 36)), ms.int32)
    cos, sin, masks = dit.frame_inputs(frames, ms.float32, 72)
    args = (x, cond, code, Tensor(np.float32(0.4)), cos, sin, masks)
    assert t2w.one_graph(72)  # the tiny DiT: one graph
    for scale in (0.5, 0.0):  # with and without guidance
        voice = t2w.speaker_voice(speaker.ref_mel, scale)
        whole = t2w.velocity(*args, scale, voice).asnumpy()
        monkeypatch.setattr(token2wav_module, "ONE_GRAPH_BYTES", 0)
        layered = t2w.velocity(*args, scale, voice).asnumpy()
        monkeypatch.undo()
        assert max_abs_diff(whole[:, :frames], layered[:, :frames]) <= 1e-5
    # the released DiT (1024 wide, 22 blocks) at a streaming window's 264 frames runs block by block
    released = SimpleNamespace(code2wav_dit_model=SimpleNamespace(proj_out=SimpleNamespace(in_features=1024),
                                                                  transformer_blocks=[None] * 22))
    assert not type(t2w).one_graph(released, 264)
    # nor its RK4 step as one graph, even on one DiT block's frames
    assert not type(t2w).one_graph(released, token2wav_module.RK4_EVALUATIONS * dit.block_size,
                                   token2wav_module.STEP_GRAPH_BYTES)


@pytest.mark.parametrize("rows,length", [(1, 48), (2, 48)])
def test_an_ode_step_as_one_graph_equals_its_evaluations_one_by_one(our_model, monkeypatch, rows, length):
    """The tiny DiT's RK4 steps on small windows run as one graph each (four evaluations and the
    stage combinations); where four evaluations would keep too much they run one by one: both
    give the same mel, with guidance and without."""
    from mindone_ext.models.qwen2_5_omni import token2wav as token2wav_module
    from mindone_ext.models.qwen2_5_omni.token2wav import OdeRow
    from mindone_ext.nn.device import on_ascend

    t2w = our_model.token2wav
    speaker = our_model.speakers["Ethan"]
    assert t2w.one_graph(token2wav_module.RK4_EVALUATIONS * rows * length, token2wav_module.STEP_GRAPH_BYTES)
    for scale in (0.5, 0.0):
        voice = t2w.speaker_voice(speaker.ref_mel, scale)
        ode_rows = [OdeRow(rng.integers(0, 8193, length // 2 - 3 * i), rng.standard_normal((length - 6 * i, 80)).astype(
            np.float32), np.asarray(speaker.cond, np.float32), voice) for i in range(rows)]
        stepped = t2w.solve_rows(ode_rows, length, guidance_scale=scale).asnumpy()
        monkeypatch.setattr(token2wav_module, "RK4_EVALUATIONS", 1 << 40)  # four evaluations never fit
        evaluated = t2w.solve_rows(ode_rows, length, guidance_scale=scale).asnumpy()
        monkeypatch.undo()
        if on_ascend():  # a graph may fuse the stage combinations' operations: a rounding at most per operation
            np.testing.assert_allclose(stepped, evaluated, rtol=1e-5, atol=1e-5)
        else:
            np.testing.assert_array_equal(stepped, evaluated)


def test_the_graphs_use_weights_loaded_after_a_solve(our_model):
    """The DiT's graphs take its weights as inputs, made per solve (graph_weights): weights set
    afterwards (as a checkpoint is loaded) must reach the next evaluation. The graphs' guided
    velocity against the op-by-op DiT before and after the blocks' matrices change, twice (a freed
    buffer's address comes back on the second change)."""
    t2w = our_model.token2wav
    dit = t2w.code2wav_dit_model
    speaker = our_model.speakers["Chelsie"]
    frames, scale = 48, 0.5
    x = Tensor(rng.standard_normal((1, frames, 80)).astype(np.float32))
    cond = Tensor(np.tile(np.asarray(speaker.cond, np.float32).reshape(1, 1, -1), (1, frames, 1)))
    code = Tensor(rng.integers(0, 8193, size=(1, frames // 2)), ms.int32)
    t = Tensor(np.float32(0.3))
    cos, sin, masks = dit.frame_inputs(frames, ms.float32)
    voice = t2w.speaker_voice(speaker.ref_mel, scale)

    def graph_and_eager():
        graph = t2w.velocity(x, cond, code, t, cos, sin, masks, scale, voice).asnumpy()
        guided, null = np.split(dit(x, Tensor(speaker.ref_mel), cond, code, t, apply_cfg=True).asnumpy(), 2)
        return graph, guided + (guided - null) * scale

    matrices = [w for block in dit.transformer_blocks for w in block.weights() if w.ndim == 2]
    saved = [m.asnumpy() for m in matrices]
    outputs = []
    try:
        for factor in (1.0, 1.5, 0.5):
            for m, value in zip(matrices, saved):
                m.set_data(Tensor(value * np.float32(factor)))
            graph, eager = graph_and_eager()
            assert max_abs_diff(graph, eager) <= 1e-5, factor
            outputs.append(graph)
    finally:
        for m, value in zip(matrices, saved):
            m.set_data(Tensor(value))
    assert max_abs_diff(outputs[0], outputs[1]) > 1e-3 and max_abs_diff(outputs[1], outputs[2]) > 1e-3
