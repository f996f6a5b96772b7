"""The Qwen2 decoder layer as a function of its weights, for compiled graphs that take the
weights as inputs: one graph serves every layer of the same make-up (training/layer_grad.py), and
a graph without parameters can be stored on disk and loaded by a later process
(generation/decode.py, utils/graph_cache.py). The arithmetic is the cells' (nn/decoder.py,
nn/lora.py), op for op."""
from typing import NamedTuple, Optional, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor

from .decoder import Qwen2DecoderLayer, attend
from .decoder_kernels import DecoderKernels, cached_attention, cached_attention_kernel, gated_unit, rms_norm
from .layers import Linear
from .ops import linear
from .lora import LoraLinear

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class Projection(NamedTuple):
    bias: bool
    scaling: Optional[float]  # the LoRA adapter's, None for a plain Linear


class LayerKind(NamedTuple):
    """What a layer's graphs are compiled for besides the tensors' shapes."""
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    act: str
    flash: bool
    projections: Tuple[Projection, ...]  # in PROJECTIONS order


# functions, not properties: compiled graphs read a NamedTuple's fields but not its properties
def projection_width(p):
    """How many weights a projection takes: W, [bias], [A, B]."""
    return 1 + p.bias + 2 * (p.scaling is not None)


def layer_width(kind):
    """How many weights a layer takes: its two norms' and its projections' (host side)."""
    return 2 + sum(projection_width(p) for p in kind.projections)


def projection_parts(cell, training=True):
    """(Projection, its weights: W, [bias], [A, B]) of a Linear or a LoRA-wrapped one. Dropout
    is drawn only in training, which the graphs do not do."""
    base = cell.base_layer if isinstance(cell, LoraLinear) else cell
    if type(base) is not Linear:
        raise TypeError(f"a {type(base).__name__}, not a Linear (or a LoRA-wrapped one)")
    weights = [base.weight] + ([base.bias] if base.bias is not None else [])
    if not isinstance(cell, LoraLinear):
        return Projection(base.bias is not None, None), weights
    if training and cell.lora_dropout > 0:
        raise ValueError("the compiled step draws no dropout: use lora_dropout=0 or the op-by-op step")
    return Projection(base.bias is not None, float(cell.scaling)), weights + [cell.lora_A.weight, cell.lora_B.weight]


def layer_parts(layer, act, training=True):
    """(LayerKind, the layer's weights in the order the graphs take them (Parameters), its adapter
    Parameters in the order of the training graphs' gradients: A then B of each adapted projection,
    in PROJECTIONS order)."""
    if not isinstance(layer, Qwen2DecoderLayer):
        raise TypeError(f"expected a Qwen2DecoderLayer, got {type(layer).__name__}")
    attn = layer.self_attn
    weights, adapters, kinds = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight], [], []
    for name in PROJECTIONS:
        first, second = name.split(".")
        try:
            kind, parts = projection_parts(getattr(getattr(layer, first), second), training)
        except TypeError as error:
            raise TypeError(f"{name} is {error}") from None
        weights += parts
        adapters += parts[-2:] if kind.scaling is not None else []
        kinds.append(kind)
    kind = LayerKind(attn.num_heads, attn.num_kv_heads, attn.head_dim, float(layer.input_layernorm.eps), act,
                     bool(attn.flash), tuple(kinds))
    return kind, weights, adapters


def split_layer(weights, kind):
    """A layer's flat weights -> (norm1, norm2, per projection (W, [bias], [A, B]))."""
    out, i = [], 2
    for p in kind.projections:
        out.append(weights[i:i + projection_width(p)])
        i += projection_width(p)
    return weights[0], weights[1], out


def project(x, w, p, biased=True):
    """A Linear, or a LoraLinear without dropout, as a function of its weights (same arithmetic);
    without its bias when not `biased` (see `bias_of`)."""
    out = linear(x, w[0], w[1] if p.bias and biased else None)
    if p.scaling is None:
        return out
    return out + (linear(linear(x.astype(ms.float32), w[-2]), w[-1]) * p.scaling).astype(out.dtype)


def bias_of(w, p):
    """A projection's bias (zeros, a constant of the graph, for one without)."""
    return w[1] if p.bias else Tensor(np.zeros(w[0].shape[0], np.float32), w[0].dtype)


def decoder_layer(x, cos, sin, mask, weights, kind, past=None, step=None, kernels=DecoderKernels()):
    """Qwen2DecoderLayer.construct as a function of its weights (`layer_parts`). `kernels`: the
    native CPU kernels to use (DecoderKernels; default none: MindSpore ops, as training needs)."""
    norm1, norm2, w = split_layer(weights, kind)
    proj = kind.projections
    heads = (kind.heads, kind.kv_heads, kind.head_dim, kind.flash)
    a = rms_norm(x, norm1, kind.eps, kernels.rms_norm)
    # x (B, T, E), or its rows with the native attention (cos (B, T, D) tells T)
    native = None if past is None else cached_attention_kernel(kernels, cos.shape[1], mask.shape[-1], heads)
    if native is not None:  # the kernel adds the projections' biases itself
        q, k, v = (project(a, w[0], proj[0], False), project(a, w[1], proj[1], False),
                   project(a, w[2], proj[2], False))
        o = cached_attention(q, k, v, (bias_of(w[0], proj[0]), bias_of(w[1], proj[1]), bias_of(w[2], proj[2])),
                             cos, sin, mask, heads, past, step, native)
    else:
        q, k, v = project(a, w[0], proj[0]), project(a, w[1], proj[1]), project(a, w[2], proj[2])
        o = attend(q, k, v, cos, sin, mask, heads, past, step)
    x = x + project(o, w[3], proj[3])
    m = rms_norm(x, norm2, kind.eps, kernels.rms_norm)
    return x + project(gated_unit(project(m, w[4], proj[4]), project(m, w[5], proj[5]), kind.act, kernels.silu_gate),
                       w[6], proj[6])
