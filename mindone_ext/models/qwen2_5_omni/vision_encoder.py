"""The vision encoder (Qwen2.5-VL ViT): 3D patch embedding, 2D rotary embedding, window attention
in most blocks and full (per-frame) attention in `fullatt_block_indexes`, and the patch merger.
Names mirror the reference (`thinker.visual.*`). Images and videos alike: a video is frames in
pairs (temporal_patch_size), an image one such pair.

Token order: patches arrive in the processor's order (2x2 merge groups contiguous). Window
attention wants each window contiguous, so the sequence is permuted by `window_index` (in units of
merge groups) before the blocks and put back after the merger, as in the reference.

For inference each block runs as one compiled graph shared by every block (the weights its
inputs, `vision_block`), over the patches padded to one of 8 sizes per power of two: a handful of
graphs serve every image size. Op by op, the projections ran ~1.5x and the segmented attention ~6x
slower on the CPU (window blocks 124 ms against 19 ms at 448x448). Training, and blocks wrapped by
LoRA adapters, run op by op through the cells.

The attention's segments (each image's windows, or frames): on the CPU in float32 the native
kernel (EncoderKernels.rotary_attention) rotates and attends within them where q, k, v lie, given
each segment's first row and length (segment_table, the count padded to a power of two), holding
one chunk of queries' scores at a time, so every image goes through the graph (the 7B's encoder on
448x448: 5.71 s with the ops, 4.81 s so). Otherwise (Ascend, the ops) they are gathered into a
power of two of segments of a bucketed length with a key mask, and a frame too large for a block's
scores to be held at once (nn/attention.py SCORES_AT_ONCE, over all its segments: an image of more
than ~4096 patches on the tiny checkpoint, ~1448 on the 7B, and as many video frames of half that
as make the same) attends op by op, without a (patches x patches) mask: exact attention takes its
query rows in chunks (a 1920 x 1080 picture's generate on the tiny checkpoint peaked at 20.4 GB in
the graph, 1.6 GB so), and the flash kernel, which holds no scores, gets no mask at all (a frame's
patches are one segment, without padding).
"""
import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ...generation.decode import bucket
from ...nn import ops as P
from ...nn.attention import SCORES_AT_ONCE, segment_layout, segmented_attention, use_flash
from ...nn.decoder_kernels import rms_norm
from ...nn.encoder_kernels import EncoderKernels, bias_residual, segment_table
from ...nn.layers import GELU, Linear, RMSNorm, empty_parameter
from ...nn.mlp import GatedMLP
from ...nn.rotary import rope_inv_freq, rotate_half
from ...utils.graph_cache import StoredGraph
from ...utils.notice import compiling


def rotary_positions(grid_thw, merge):
    """(h, w) patch coordinates in the processor's patch order (merge groups contiguous)."""
    out = []
    for t, h, w in grid_thw:
        hpos = np.broadcast_to(np.arange(h)[:, None], (h, w))
        wpos = np.broadcast_to(np.arange(w)[None, :], (h, w))
        order = lambda a: a.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).reshape(-1)  # noqa: E731
        out.append(np.tile(np.stack([order(hpos), order(wpos)], -1), (t, 1)))
    return np.concatenate(out)


def window_index(grid_thw, merge, patch, window_size):
    """Permutation of merge groups that makes each attention window contiguous, and the window
    lengths in patches (empty windows dropped)."""
    groups_per_window = window_size // merge // patch
    index, lengths, offset = [], [], 0
    for t, h, w in grid_thw:
        gh, gw = h // merge, w // merge
        ids = np.arange(t * gh * gw).reshape(t, gh, gw)
        ph, pw = groups_per_window - gh % groups_per_window, groups_per_window - gw % groups_per_window
        padded = np.pad(ids, ((0, 0), (0, ph), (0, pw)), constant_values=-1)
        nh, nw = padded.shape[1] // groups_per_window, padded.shape[2] // groups_per_window
        padded = padded.reshape(t, nh, groups_per_window, nw, groups_per_window).transpose(0, 1, 3, 2, 4)
        padded = padded.reshape(t * nh * nw, -1)
        counts = (padded >= 0).sum(1)
        index.append(padded[padded >= 0] + offset)
        lengths.extend((counts[counts > 0] * merge * merge).tolist())
        offset += t * gh * gw
    return np.concatenate(index), np.asarray(lengths)


def rotate(x, cos, sin):
    """2D rotary on (N, heads, head_dim), in float32 as the reference."""
    x32 = x.astype(ms.float32)
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


def block_to_attention(x, cos, sin, weights, heads, kernels=EncoderKernels()):
    """A block's norm and rotated q, k, v (N, heads, head_dim), as a pure function of its weights
    (`VisionBlock.weights()[0]`)."""
    norm, q_w, q_b, k_w, k_b, v_w, v_b = weights
    h = rms_norm(x, norm, 1e-6, kernels.rms_norm)
    n, d = x.shape
    q, k, v = (P.linear(h, w, b).reshape(n, heads, d // heads)
               for w, b in ((q_w, q_b), (k_w, k_b), (v_w, v_b)))
    return rotate(q, cos, sin), rotate(k, cos, sin), v


def block_after_attention(x, attended, weights, act, kernels=EncoderKernels()):
    """The rest of a block (`VisionBlock.weights()[1]`): projection and residual, norm, gated MLP.
    `kernels`: native ones for its norm and residuals."""
    proj_w, proj_b, norm, gate_w, gate_b, up_w, up_b, down_w, down_b = weights
    linear = P.linear
    x = bias_residual(x, linear(attended, proj_w), proj_b, kernels.bias_residual)
    h = rms_norm(x, norm, 1e-6, kernels.rms_norm)
    h = act(linear(h, gate_w, gate_b)) * linear(h, up_w, up_b)
    return bias_residual(x, linear(h, down_w), down_b, kernels.bias_residual)


def native_attention(x, cos, sin, segments, weights, heads, kernels):
    """`block_to_attention` and `segmented_attention` through the native kernel
    (kernels.rotary_attention): the projections, then their rotation and attention within
    `segments` (segment_table; rows in none give zeros) in one pass."""
    norm, q_w, q_b, k_w, k_b, v_w, v_b = weights
    h = rms_norm(x, norm, 1e-6, kernels.rms_norm)
    n, d = x.shape
    q, k, v = (P.linear(h, w, b).reshape(n, heads, d // heads) for w, b in ((q_w, q_b), (k_w, k_b), (v_w, v_b)))
    scale = Tensor(np.array([(d // heads) ** -0.5], np.float32))
    return kernels.rotary_attention(q, k, v, cos, sin, segments, scale).reshape(n, d)


def vision_block(x, cos, sin, layout, weights, heads, act, flash, kernels=EncoderKernels()):
    """A whole block as a pure function of its weights (`VisionBlock.weights()`, joined), attending
    within the segments of `layout`: segment_layout padded to x's rows, or with the native kernel
    segment_table's."""
    before, after = weights[:7], weights[7:]
    if kernels.rotary_attention is not None:
        attended = native_attention(x, cos, sin, layout, before, heads, kernels)
    else:
        q, k, v = block_to_attention(x, cos, sin, before, heads, kernels)
        attended = segmented_attention(q, k, v, layout, (x.shape[1] // heads) ** -0.5, flash)
    return block_after_attention(x, attended, after, act, kernels)


class VisionAttention(nn.Cell):
    def __init__(self, dim, heads, dtype, flash):
        super().__init__()
        self.heads, self.head_dim, self.flash = heads, dim // heads, flash
        self.q = Linear(dim, dim, True, dtype)
        self.k = Linear(dim, dim, True, dtype)
        self.v = Linear(dim, dim, True, dtype)
        self.proj = Linear(dim, dim, True, dtype)

    def construct(self, x, cos, sin, layout):
        n = x.shape[0]
        q, k, v = (p(x).reshape(n, self.heads, self.head_dim) for p in (self.q, self.k, self.v))
        return self.proj(segmented_attention(rotate(q, cos, sin), rotate(k, cos, sin), v, layout,
                                             self.head_dim**-0.5, self.flash))


class VisionBlock(nn.Cell):
    def __init__(self, config, dtype, flash):
        super().__init__()
        self.norm1 = RMSNorm(config.hidden_size, 1e-6, dtype)
        self.norm2 = RMSNorm(config.hidden_size, 1e-6, dtype)
        self.attn = VisionAttention(config.hidden_size, config.num_heads, dtype, flash)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, dtype, bias=True, act=config.hidden_act)

    def plain(self):
        """Whether every projection is a plain Linear (no adapter wraps it): `weights` is the block."""
        a, m = self.attn, self.mlp
        return all(type(p) is Linear for p in (a.q, a.k, a.v, a.proj, m.gate_proj, m.up_proj, m.down_proj))

    def weights(self):
        """(weights up to the attention, after it), as block_to_attention / block_after_attention take them."""
        a, m = self.attn, self.mlp
        return ((self.norm1.weight, a.q.weight, a.q.bias, a.k.weight, a.k.bias, a.v.weight, a.v.bias),
                (a.proj.weight, a.proj.bias, self.norm2.weight, m.gate_proj.weight, m.gate_proj.bias,
                 m.up_proj.weight, m.up_proj.bias, m.down_proj.weight, m.down_proj.bias))

    def construct(self, x, cos, sin, layout):
        x = x + self.attn(self.norm1(x), cos, sin, layout)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Cell):
    """Conv3d with kernel = stride = (temporal_patch, patch, patch) over pre-cut patches: a matmul."""

    def __init__(self, config, dtype):
        super().__init__()
        self.proj = nn.Cell()
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.proj.weight = empty_parameter((config.hidden_size, config.in_channels) + kernel, dtype, "weight")

    def construct(self, x):
        w = self.proj.weight
        return P.linear(x.astype(w.dtype), w.reshape(w.shape[0], -1))  # (no transposed copy of w)


class PatchMerger(nn.Cell):
    def __init__(self, dim, context_dim, merge, dtype):
        super().__init__()
        self.hidden = context_dim * merge * merge
        self.ln_q = RMSNorm(context_dim, 1e-6, dtype)
        self.mlp = nn.SequentialCell([Linear(self.hidden, self.hidden, True, dtype), GELU(),
                                      Linear(self.hidden, dim, True, dtype)])

    def construct(self, x):
        return self.mlp(self.ln_q(x).reshape(-1, self.hidden))


class Qwen2_5OmniVisionEncoder(nn.Cell):
    def __init__(self, config, dtype=ms.float32, attn_implementation="eager"):
        super().__init__()
        self.merge = config.spatial_merge_size
        self.patch = config.patch_size
        self.window_size = config.window_size
        self.fullatt_block_indexes = set(config.fullatt_block_indexes)
        self.patch_embed = PatchEmbed(config, dtype)
        self.inv_freq = rope_inv_freq(config.hidden_size // config.num_heads // 2, 10000.0)
        flash = use_flash(attn_implementation, dtype, config.hidden_size // config.num_heads)
        self.blocks = nn.CellList([VisionBlock(config, dtype, flash) for _ in range(config.depth)])
        self.merger = PatchMerger(config.out_hidden_size, config.hidden_size, self.merge, dtype)
        self.heads, self.act, self.flash = config.num_heads, P.activation(config.hidden_act), flash
        self.hidden_act = config.hidden_act
        self.use_kernels(EncoderKernels.build(dtype))

    def use_kernels(self, kernels):
        """Run the blocks with `kernels` (EncoderKernels; tests run the ops alone this way)."""
        heads, act, flash = self.heads, self.act, self.flash
        self.kernels = kernels

        def block(x, cos, sin, layout, weights):
            return vision_block(x, cos, sin, layout, weights, heads, act, flash, kernels)

        # the block graph shared by all blocks, stored once per machine
        self._block_graph = StoredGraph("vision_block", block, (heads, self.hidden_act, flash, kernels.libraries))
        self._shapes = set()  # (width, layout shapes) it has run

    @property
    def _widths(self):
        """The padded patch counts the block graph has run."""
        return {shapes[0] for shapes in self._shapes}

    def _blocks(self, x, cos, sin, segments):
        """The blocks on x (N, hidden), block i attending within segments of lengths segments[i]
        (see the module's docstring)."""
        if self.training or not all(block.plain() for block in self.blocks):
            layouts = {id(lengths): segment_layout(lengths) for lengths in segments}
            for block, lengths in zip(self.blocks, segments):
                x = block(x, cos, sin, layouts[id(lengths)])
            return x
        n = x.shape[0]
        width = bucket(n, 16)
        x, cos, sin = (ops.pad(a, (0, 0) * (a.ndim - 1) + (0, width - n)) for a in (x, cos, sin))
        if self.kernels.rotary_attention is not None:  # it holds a chunk of queries' scores at a time
            # the count padded to a power of two, so that one graph serves images of similar sizes
            layouts = {id(lengths): segment_table(lengths, count=1 << (len(lengths) - 1).bit_length())
                       for lengths in segments}
            apart = set()
        else:
            layouts, apart = self._padded_layouts(segments, width)
        shapes = (width,) + tuple(sorted(tuple(layout.shape if isinstance(layout, Tensor) else layout[2].shape)
                                         for key, layout in layouts.items() if key not in apart))
        with compiling(None if shapes in self._shapes else f"the vision encoder for {width} patches"):
            self._shapes.add(shapes)
            for block, lengths in zip(self.blocks, segments):
                # Tensor(p): the Parameter's storage, read by the graph (no copy)
                weights = tuple(Tensor(w) for part in block.weights() for w in part)
                if id(lengths) in apart:
                    x = vision_block(x, cos, sin, layouts[id(lengths)], weights, self.heads, self.act, self.flash,
                                     self.kernels)
                else:
                    x = self._block_graph(x, cos, sin, layouts[id(lengths)], ms.mutable(weights))
        return x[:n]

    def _padded_layouts(self, segments, width):
        """The ops' attention layouts (segment_layout) of each of `segments`, and which of them attend
        apart, op by op (their ids)."""
        layouts, apart = {}, set()
        for lengths in segments:
            count, longest = 1 << (len(lengths) - 1).bit_length(), bucket(max(lengths), 16)
            if count * self.heads * longest * longest > SCORES_AT_ONCE:
                # Segments this large attend op by op at their own lengths: in the graph their
                # scores (exact attention) or their (segments x patches x patches) mask (flash)
                # would all be held at once, and kept with the graph. Op by op, exact attention
                # takes the query rows in chunks, and flash gets no mask where no slot is padding
                # (memory bounded by construction, the graphs' too: only layouts within the budget go in)
                apart.add(id(lengths))
                layouts[id(lengths)] = segment_layout(lengths, rows=width, keys_only=True)
            else:  # mutable: graph inputs, not constants compiled in
                layouts[id(lengths)] = ms.mutable(segment_layout(lengths, count, longest, width))
        return layouts, apart

    def encode_clips(self, clips):
        """Each of `clips` ((pixel rows, (t, h, w)): an image, a video, or whole frames of one) ->
        its embeddings, all in one call (frames are encoded apart: a clip's embeddings are what it
        gives alone, to float32 rounding)."""
        grid = np.asarray([thw for _, thw in clips], np.int64)
        out = self(np.concatenate([rows for rows, _ in clips]) if len(clips) > 1 else clips[0][0], grid)
        bounds = np.cumsum([0] + (grid.prod(1) // (self.merge * self.merge)).tolist()).tolist()
        return [out[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])] if len(clips) > 1 else [out]

    def construct(self, pixel_values, grid_thw):
        """pixel_values (patches, C * T * P * P) from the processor, grid_thw (items, 3).
        Returns (patches / merge^2, out_hidden_size) in the processor's order."""
        grid_thw = np.asarray(grid_thw, np.int64).reshape(-1, 3)
        unit = self.merge * self.merge
        order, window_lengths = window_index(grid_thw, self.merge, self.patch, self.window_size)
        patch_order = (order[:, None] * unit + np.arange(unit)[None, :]).reshape(-1).astype(np.int32)

        x = self.patch_embed(pixel_values if isinstance(pixel_values, Tensor) else Tensor(pixel_values))
        x = ops.gather(x, Tensor(patch_order), 0)
        freqs = rotary_positions(grid_thw, self.merge)[patch_order].astype(np.float32)  # (N, 2)
        angles = (freqs[:, :, None] * self.inv_freq[None, None, :]).reshape(len(patch_order), -1)
        angles = np.concatenate([angles, angles], -1)[:, None, :]  # (N, 1, head_dim)
        cos, sin = Tensor(np.cos(angles)), Tensor(np.sin(angles))

        frames = np.repeat(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
        x = self._blocks(x, cos, sin, [frames if i in self.fullatt_block_indexes else window_lengths
                                       for i in range(len(self.blocks))])
        x = self.merger(x)
        return ops.gather(x, Tensor(np.argsort(order).astype(np.int32)), 0)
