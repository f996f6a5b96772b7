"""Token2Wav: codec tokens -> mel by the DiT under a Runge-Kutta flow-matching ODE with
classifier-free guidance, then mel -> 24 kHz waveform by BigVGAN. Names mirror the reference
(`token2wav.code2wav_dit_model`, `token2wav.code2wav_bigvgan_model`)."""
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ...generation.decode import bucket
from ...utils.graph_cache import StoredGraph
from ...utils.notice import compiling
from ...utils.stored_values import stored_value
from .bigvgan import Qwen2_5OmniToken2WavBigVGANModel
from .dit import EMBED_WEIGHTS, Qwen2_5OmniToken2WavDiTModel, dit_layer, split_weights
from .vocoder import Vocoder

ONE_GRAPH_BYTES = 256 << 20  # see Qwen2_5OmniToken2WavModel.one_graph
# What an RK4 step's graph may keep of activations, as one_graph estimates them (see solve_rows;
# a server that compiled them from source grew 6-52 MB per step graph, compiling included). It
# saves ~30 ms of graph calls per solve, but its first call in a process costs ~100 ms more than
# the graphs it replaces, once per window length: so only the short windows (the tiny checkpoint's
# streamed first chunks, up to 128 frames of one row: the first audio) take it; a longer one, where
# 30 ms is a smaller share, and a 16-row batch (its step graphs kept ~180 MB more in a voice
# server) do not, nor does the released DiT. Measured in alternating processes against 32 MB: a
# whole answer's cold call 1.02-1.07 s against 1.08-1.13, a process's first streamed answer
# 1.79-1.84 s against 1.97-2.08, later streams alike
STEP_GRAPH_BYTES = 8 << 20
RK4_EVALUATIONS = 4  # the DiT's evaluations in one RK4 step (its graph keeps the activations of each)


class DiTGraphs(NamedTuple):
    """The compiled pieces of the ODE's velocity (Qwen2_5OmniToken2WavModel._graphs)."""
    whole: StoredGraph  # the whole DiT, guidance included
    embed: StoredGraph  # its input embedding and time embedding
    block: StoredGraph  # one DiT block, shared by all blocks
    output: StoredGraph  # its output, guidance included
    rk4_step: StoredGraph  # a whole RK4 step: four evaluations of the whole DiT
    conditions: StoredGraph  # the frame conditions, made once per solve
ACTIVATIONS_PER_LAYER = 16  # (frames x hidden)-sized tensors a DiT block's graph keeps, roughly
NOISE_FRAMES = 30000  # the reference draws this much noise once and uses its first frames
VOICES_KEPT = 8  # speakers whose ECAPA embedding is kept (see speaker_voice)


def sway_timesteps(num_steps, sway_coefficient):
    """Flow times 0..1, bent towards 0 (where the ODE needs more resolution) by sway sampling."""
    t = np.linspace(0, 1, num_steps, dtype=np.float32)
    if sway_coefficient is not None:
        t = t + np.float32(sway_coefficient) * (np.cos(np.float32(math.pi) / 2 * t) - 1 + t)
    return t.astype(np.float32)


def _second_point(y, k1, h, third):
    return y + h * k1 * third


def _third_point(y, k1, k2, h, third):
    return y + h * (k2 - k1 * third)


def _fourth_point(y, k1, k2, k3, h):
    return y + h * (k1 - k2 + k3)


def _next_value(y, k1, k2, k3, k4, h):
    return y + (k1 + 3 * (k2 + k3) + k4) * h / 8


# Compiled, not op by op: after a graph call, each of MindSpore's element-wise ops could take
# 1.5-4 ms on the 2-core CPU, and these 18 ops per step were half the tiny checkpoint's ODE
# (200 frames: 620 ms -> 300 ms as graphs, the same values bit for bit).
RK4_GRAPHS = tuple(StoredGraph(f"rk4{fn.__name__}", fn, ()) for fn in
                   (_second_point, _third_point, _fourth_point, _next_value))


def rk4_step(f, y, times, h, third, points=(_second_point, _third_point, _fourth_point, _next_value)):
    """One step of the reference's RK4 (3/8-rule variant) from y: `times` its four evaluation
    times, `points` the stage combinations (outside a graph: RK4_GRAPHS)."""
    second_point, third_point, fourth_point, next_value = points
    k1 = f(times[0], y)
    k2 = f(times[1], second_point(y, k1, h, third))
    k3 = f(times[2], third_point(y, k1, k2, h, third))
    k4 = f(times[3], fourth_point(y, k1, k2, k3, h))
    return next_value(y, k1, k2, k3, k4, h)


def rk4_integrate(f, y0, times, step=None):
    """The reference's fixed-grid RK4: y at the last time. Scalars are float32 and applied in the
    reference's order, so both round alike. `step(y, times, h, third)`: a whole step as one
    compiled graph (rk4_step inside it), instead of f's evaluations and the compiled stage
    combinations called one by one (8 calls a step)."""
    one_third, two_thirds = np.float32(1 / 3), np.float32(2 / 3)
    third = Tensor(one_third)
    step = step or (lambda y, times, h, third: rk4_step(f, y, times, h, third, RK4_GRAPHS))
    y = y0
    for t0, t1 in zip(times[:-1], times[1:]):
        h = np.float32(t1 - t0)
        y = step(y, (t0, t0 + h * one_third, t0 + h * two_thirds, t1), Tensor(h), third)
    return y


@dataclass
class OdeRow:
    """One window of the ODE: codes (frames / repeats,) int64, starting noise (frames, mel_dim),
    the speaker's conditioning (enc_emb_dim,) and voice (`speaker_voice`)."""
    code: np.ndarray
    noise: np.ndarray
    conditioning: np.ndarray
    voice: Tensor


class Qwen2_5OmniToken2WavModel(nn.Cell):
    def __init__(self, config, dtype=ms.float32):
        super().__init__()
        # float32 throughout, as the reference keeps token2wav in float32 whatever the model dtype
        self.code2wav_dit_model = Qwen2_5OmniToken2WavDiTModel(config.dit_config, ms.float32)
        self.code2wav_bigvgan_model = Qwen2_5OmniToken2WavBigVGANModel(config.bigvgan_config, ms.float32)
        self._compiled, self._shapes = {}, set()  # (graphs) per guidance on/off; x shapes run
        self._voices = []  # (reference mel, with guidance, its speaker_voice), newest first
        self.vocoder = Vocoder(self.code2wav_bigvgan_model)

    def one_graph(self, frames, budget=None):
        """Whether one velocity evaluation over `frames` (all rows') runs as a single graph of the whole DiT:
        yes while the activations it keeps allocated (see `dit_layer`) stay within `budget` (default
        ONE_GRAPH_BYTES); the released DiT at a streaming window's size would keep ~0.8 GB, the tiny
        checkpoint's 4 MB."""
        dit = self.code2wav_dit_model
        hidden, layers = dit.proj_out.in_features, len(dit.transformer_blocks)
        return 2 * frames * hidden * layers * ACTIVATIONS_PER_LAYER * 4 <= (budget or ONE_GRAPH_BYTES)

    def _graphs(self, apply_cfg):
        """The compiled pieces of one velocity evaluation, with or without guidance (DiTGraphs): the
        whole DiT as one graph, or its input embedding, one DiT block shared by all blocks and its
        output, each with the guidance; a whole RK4 step (four evaluations of the whole DiT); and the
        frame conditions a solve makes once. All take the weights as inputs, so each is stored once
        per machine (utils/graph_cache.py) and compiles once per frame count."""
        if apply_cfg not in self._compiled:
            dit = self.code2wav_dit_model
            heads, head_dim = dit.transformer_blocks[0].heads, dit.head_dim
            constants = (heads, head_dim, dit.repeats, dit.time_embed.freq_dim, apply_cfg, dit.kernels.libraries)

            def guide(out, guidance_scale):
                if not apply_cfg:
                    return out
                guided, null = ops.chunk(out, 2, 0)
                return guided + (guided - null) * guidance_scale

            def conditions(cond, code, voice, weights):
                return dit.conditions(None, cond, code, apply_cfg=apply_cfg, voice=voice, weights=weights)

            def whole(x, conditions, t, cos, sin, masks, guidance_scale, weights):
                return guide(dit.run(x, conditions, t, cos, sin, masks, apply_cfg, weights), guidance_scale)

            def embed(x, conditions, t, weights):
                return dit.embed(x, conditions, t, apply_cfg, weights)

            def block(x, t_emb, cos, sin, window, weights):
                return dit_layer(x, t_emb, cos, sin, window, weights, heads, head_dim, dit.kernels)

            def output(x, t_emb, guidance_scale, weights):
                return guide(dit.output(x, t_emb, weights), guidance_scale)

            def step(y, t0, t_a, t_b, t1, h, third, conditions, cos, sin, masks, guidance_scale, weights):
                def f(t, x):
                    return whole(x, conditions, t, cos, sin, masks, guidance_scale, weights)
                return rk4_step(f, y, (t0, t_a, t_b, t1), h, third)

            self._compiled[apply_cfg] = DiTGraphs(*(StoredGraph(f"dit_{name}", function, constants)
                                                    for name, function in (("whole", whole), ("embed", embed),
                                                                           ("block", block), ("output", output),
                                                                           ("rk4_step", step),
                                                                           ("conditions", conditions))))
        return self._compiled[apply_cfg]

    def velocity(self, x, cond, code, t, cos, sin, masks, guidance_scale, voice, weights=None):
        """The ODE's right-hand side: the DiT, with classifier-free guidance when the scale is
        non-zero (guided + (guided - unconditioned) * scale). `voice`: the speaker's embedding
        for that scale (`speaker_voice`; rows of several speakers stacked as solve_rows does).
        `weights`: `graph_weights()`, made once for the many evaluations of one solve."""
        weights = weights or self.graph_weights()
        conditions = self.frame_conditions(cond, code, voice, guidance_scale, weights)
        return self._velocity(x, conditions, t, cos, sin, masks, guidance_scale, weights)

    def frame_conditions(self, cond, code, voice, guidance_scale, weights):
        """What the DiT reads of each frame besides the noisy mel (the DiT's `conditions`): the same
        for every evaluation of a solve, so made once for it."""
        graph = self._graphs(guidance_scale >= 1e-5).conditions
        return graph(cond, code, voice, ms.mutable(weights[:EMBED_WEIGHTS]))

    def _velocity(self, x, conditions, t, cos, sin, masks, guidance_scale, weights):
        dit = self.code2wav_dit_model
        graphs = self._graphs(guidance_scale >= 1e-5)
        scale = Tensor(np.float32(guidance_scale))
        new = None if x.shape in self._shapes else f"the DiT for {x.shape[1]} mel frames"
        self._shapes.add(x.shape)
        # mutable: the tensors are graph inputs, not constants baked into a new graph per call
        with compiling(new):
            if self.one_graph(x.shape[0] * x.shape[1]):
                return graphs.whole(x, conditions, t, cos, sin, ms.mutable(masks), scale, ms.mutable(weights))
            first, blocks, last = split_weights(weights, len(dit.transformer_blocks))
            h, t_emb = graphs.embed(x, conditions, t, ms.mutable(first))
            for window, block_weights in zip(masks, blocks):
                h = graphs.block(h, t_emb, cos, sin, ms.mutable(window), ms.mutable(block_weights))
            return graphs.output(h, t_emb, scale, ms.mutable(last))

    def clip_codes(self, code):
        """The Talker's vocabulary is larger than the DiT's codec table: a code past the table
        (a control token the Talker should not emit, but random or unlucky sampling can) would
        index out of range, so it is dropped; the reference would crash on it."""
        code = np.asarray(code, np.int64).reshape(1, -1)
        limit = self.code2wav_dit_model.num_embeds
        return code[:, (code[0] >= 0) & (code[0] < limit)]

    def noise(self, frames, noise=None, seed=None):
        """The ODE's start (1, frames, mel_dim): `noise` checked and cut, or standard normal from `seed`
        (drawn frame after frame, so a longer draw starts with the same frames)."""
        mel_dim = self.code2wav_dit_model.mel_dim
        if noise is None:
            return np.random.default_rng(seed).standard_normal((1, frames, mel_dim)).astype(np.float32)
        noise = np.asarray(noise, np.float32)
        if noise.ndim != 3 or noise.shape[1] < frames or noise.shape[2] != mel_dim:
            raise ValueError(f"noise must be (1, >= {frames}, {mel_dim}); got {noise.shape}")
        return noise[:, :frames]

    def speaker_voice(self, reference_mel, guidance_scale=0.5):
        """The ECAPA embedding of a speaker's reference mel, as the ODE's rows take it (see OdeRow).
        It depends on nothing else, so it is computed once per speaker: the last few reference
        mels seen (the model's speakers) are kept with their embeddings (a voice server's answers
        spent 7.6% of the model thread on it, measured), and once per machine, stored beside the
        graphs under a key of the encoder's weights and the mel (utils/stored_values.py)."""
        apply_cfg = guidance_scale >= 1e-5
        for mel, cfg, voice in self._voices:
            if mel is reference_mel and cfg == apply_cfg:
                return voice
        mel = np.asarray(reference_mel, np.float32)
        embed = self.code2wav_dit_model.input_embed
        weights = [w.asnumpy() for w in embed.spk_encoder.weights()]
        voice = Tensor(stored_value("ecapa_voice", [mel] + weights, apply_cfg,
                                    lambda: embed.reference_voice(Tensor(mel), apply_cfg=apply_cfg).asnumpy()))
        self._voices = [(reference_mel, apply_cfg, voice)] + self._voices[:VOICES_KEPT - 1]
        return voice

    def solve(self, code, conditioning, reference_mel, noise, num_steps=10, guidance_scale=0.5, sway_coefficient=-1.0,
              length=None):
        """The ODE from `noise` (1, T, mel_dim) under codes (1, T / repeats) -> mel (1, T, mel_dim).
        `length` (a multiple of the DiT block) pads the frames so one compiled graph serves
        several frame counts; the padding never reaches the real frames."""
        frames = noise.shape[1]
        row = OdeRow(np.asarray(code, np.int64).reshape(-1), np.asarray(noise, np.float32)[0], conditioning,
                     self.speaker_voice(reference_mel, guidance_scale))
        return self.solve_rows([row], max(length or frames, frames), num_steps, guidance_scale,
                               sway_coefficient)[:, :frames]

    def solve_rows(self, rows, length, num_steps=10, guidance_scale=0.5, sway_coefficient=-1.0):
        """The ODE of several windows at once, each padded to `length` frames (a multiple of the
        DiT block): one batch through the DiT per evaluation, each row masked to its own frames,
        so a row's mel is what it gets alone. -> mel (rows, length, mel_dim)."""
        dit = self.code2wav_dit_model
        count = len(rows)
        # rows padded to a power of two (copies of the last): a few compiled graphs per length,
        # whatever the number of answers (the CPU backend keeps each graph's memory)
        rows = rows + rows[-1:] * ((1 << (count - 1).bit_length()) - count)
        frames = [len(row.noise) for row in rows]
        code = np.stack([np.pad(row.code, (0, length // dit.repeats - len(row.code))) for row in rows])
        noise = np.stack([np.pad(row.noise, ((0, length - len(row.noise)), (0, 0))) for row in rows])
        cond = np.stack([np.asarray(row.conditioning, np.float32).reshape(-1) for row in rows])
        cond = Tensor(np.repeat(cond[:, None], length, 1))
        apply_cfg = guidance_scale >= 1e-5
        halves = [row.voice for row in rows] if not apply_cfg else \
            [row.voice[:1] for row in rows] + [row.voice[1:] for row in rows]  # conditioned rows, then unconditioned
        voice = halves[0] if len(halves) == 1 else ops.cat(halves, 0)
        # one row keeps the unbatched mask (and its graphs); several have a mask per row (x2 with guidance)
        cos, sin, masks = dit.frame_inputs(frames[0] if len(rows) == 1 else frames * (1 + apply_cfg), ms.float32,
                                           length)
        weights = self.graph_weights()
        conditions = self.frame_conditions(cond, Tensor(code, ms.int32), voice, guidance_scale, weights)

        def velocity(t, x):
            return self._velocity(x, conditions, Tensor(t, ms.float32), cos, sin, masks, guidance_scale, weights)

        step = None
        if self.one_graph(RK4_EVALUATIONS * len(rows) * length, STEP_GRAPH_BYTES):
            # one call a step, not 8: on the CPU each graph call costs ~0.5 ms beyond its work, a
            # third of a streamed window's solve on the tiny checkpoint (1 x 48 frames: 102 -> 71 ms)
            step_graph, scale = self._graphs(apply_cfg).rk4_step, Tensor(np.float32(guidance_scale))
            shape = (len(rows), length, "step")

            def whole_step(y, times, h, third):
                new = None if shape in self._shapes else f"the DiT for {length} mel frames"  # (its first step only)
                self._shapes.add(shape)
                with compiling(new):
                    return step_graph(y, *(Tensor(t, ms.float32) for t in times), h, third, conditions, cos, sin,
                                      ms.mutable(masks), scale, ms.mutable(weights))
            step = whole_step

        return rk4_integrate(velocity, Tensor(noise), sway_timesteps(num_steps, sway_coefficient), step)[:count]

    def graph_weights(self):
        """The DiT's weights as its graphs take them. Tensor(p): the Parameter's storage, read by
        the graph (no copy), so weights loaded after a solve (set_data) reach the next one; made
        per solve, not per evaluation (~70 tensors: ~2 ms a call)."""
        return tuple(Tensor(w) for w in self.code2wav_dit_model.weights())

    def sample_mel(self, code, conditioning, reference_mel, num_steps=10, guidance_scale=0.5, sway_coefficient=-1.0,
                   noise=None, seed=None):
        """codes (1, N) -> mel (1, mel_dim, N * repeats). `noise` (1, >= N * repeats, mel_dim) is the
        ODE's start; without it, standard normal noise from `seed`."""
        frames = code.shape[1] * self.code2wav_dit_model.repeats
        mel = self.solve(code, conditioning, reference_mel, self.noise(frames, noise, seed), num_steps, guidance_scale,
                         sway_coefficient, self.solved_length(frames))
        return mel.swapaxes(1, 2)

    def solved_length(self, frames):
        """The frames a whole answer of `frames` is solved in: rounded up to a few sizes per power
        of two, so a handful of compiled graphs serve every answer."""
        return bucket(frames, 2 * self.code2wav_dit_model.block_size)

    def construct(self, code, conditioning, reference_mel, num_steps=10, guidance_scale=0.5, sway_coefficient=-1.0,
                  noise=None, seed=None):
        code = self.clip_codes(code)
        if code.shape[1] == 0:
            return Tensor(np.zeros(0, np.float32))
        mel = self.sample_mel(code, conditioning, reference_mel, num_steps, guidance_scale, sway_coefficient, noise, seed)
        return Tensor(self.vocoder(mel.asnumpy()[0].T))
