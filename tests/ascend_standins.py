"""CPU stand-ins for the kernels only Ascend registers, each written in numpy from the kernel's
documented contract (MindSpore's API pages for `ops.flash_attention_score`, `ops.rms_norm` and the
`mint` functions; CANN's FlashAttentionScore page for the sparse modes).

A stand-in checks what the documentation requires of its arguments (dtypes, layouts, shapes,
ranges) and raises where the card would refuse, computes the documented result in float64, and
returns it in the dtype the kernel returns. Where the documentation leaves a result undefined
(a query row whose keys are all discarded), it returns NaN, so code that relies on it fails here
as it could on the card. `install` puts them in MindSpore's namespaces for one test (the
`ascend_kernels` fixture); on an Ascend device nothing is replaced.
"""
import numpy as np
import mindspore as ms
from mindspore import Tensor, mint, ops

HALF = (ms.float16, ms.bfloat16)
FLOATS = (ms.float16, ms.bfloat16, ms.float32)
NO_LIMIT = 2147483647


def _array(x):
    return x.astype(ms.float32).asnumpy().astype(np.float64) if x.dtype in FLOATS else x.asnumpy()


def _tensor(x, dtype):
    return Tensor(np.asarray(x, np.float32)).astype(dtype) if dtype in FLOATS else Tensor(np.asarray(x), dtype)


def _require(condition, message):
    if not condition:
        raise ValueError(f"Ascend kernel contract: {message}")


# ---------------------------------------------------------------- flash attention

def _to_bnsd(x, layout, heads):
    """(B, N, S, D) view of a query/key/value in `layout`; `heads` is N when the layout merges it."""
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.transpose(0, 2, 1, 3)
    if layout in ("BSH", "SBH"):
        if layout == "SBH":
            x = x.transpose(1, 0, 2)
        b, s, h = x.shape
        _require(h % heads == 0, f"hidden size {h} is not a multiple of the head count {heads}")
        return x.reshape(b, s, heads, h // heads).transpose(0, 2, 1, 3)
    raise ValueError(f"Ascend kernel contract: unknown input_layout {layout!r}")


def _from_bnsd(x, layout):
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.transpose(0, 2, 1, 3)
    b, n, s, d = x.shape
    merged = x.transpose(0, 2, 1, 3).reshape(b, s, n * d)
    return merged.transpose(1, 0, 2) if layout == "SBH" else merged


def _kept_by_sparse_mode(mode, s1, s2, pre_tokens, next_tokens):
    """(S1, S2) boolean: which (query, key) pairs the sparse mode itself keeps, before attn_mask."""
    i, j = np.arange(s1)[:, None], np.arange(s2)[None, :]
    if mode == 0:  # defaultMask: a band around the top-left diagonal (no limit by default)
        return (j - i <= next_tokens) & (i - j <= pre_tokens)
    if mode == 1:  # allMask: attn_mask alone
        return np.ones((s1, s2), bool)
    if mode == 2:  # leftUpCausal
        return j <= i
    if mode == 3:  # rightDownCausal
        return j <= i + (s2 - s1)
    if mode == 4:  # band, aligned on the bottom-right diagonal
        shifted = j - i - (s2 - s1)
        return (shifted <= next_tokens) & (-shifted <= pre_tokens)
    raise NotImplementedError(f"the CPU stand-in models sparse modes 0-4, not {mode} (mindone_ext uses 0)")


def flash_attention_score(query, key, value, head_num, real_shift=None, drop_mask=None, padding_mask=None,
                          attn_mask=None, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, keep_prob=1.0,
                          scalar_value=1.0, pre_tokens=NO_LIMIT, next_tokens=NO_LIMIT, inner_precise=0,
                          input_layout="BSH", sparse_mode=0):
    """attention_out = Softmax(Mask(scalar_value * query @ key^T, attn_mask)) @ value, in query's
    layout and dtype; attn_mask 1/True marks a pair to DISCARD."""
    _require(query.dtype in HALF, f"query must be float16 or bfloat16, got {query.dtype}")
    _require(key.dtype == query.dtype == value.dtype, "query, key and value must share one dtype")
    _require(key.shape == value.shape, f"key {key.shape} and value {value.shape} must have one shape")
    _require(isinstance(head_num, int) and 1 <= head_num <= 256, f"head_num must be an int in 1..256, got {head_num}")
    _require(isinstance(scalar_value, float), f"scalar_value must be a float, got {type(scalar_value).__name__}")
    if input_layout == "TND":
        raise NotImplementedError("the CPU stand-in models the BSH, SBH, BSND and BNSD layouts (no varlen)")
    for name, given in (("real_shift", real_shift), ("drop_mask", drop_mask), ("padding_mask", padding_mask),
                        ("prefix", prefix), ("actual_seq_qlen", actual_seq_qlen),
                        ("actual_seq_kvlen", actual_seq_kvlen)):
        if given is not None:
            raise NotImplementedError(f"the CPU stand-in does not model {name} (mindone_ext never passes it)")
    if keep_prob != 1.0:
        raise NotImplementedError("dropout inside the kernel (keep_prob < 1) is random on the card; not modelled")
    _require(inner_precise in (0, 1, 2), f"inner_precise must be 0, 1 or 2, got {inner_precise}")
    _require(query.ndim == (4 if input_layout in ("BNSD", "BSND") else 3),
             f"query has {query.ndim} axes, layout {input_layout} needs {4 if len(input_layout) == 4 else 3}")

    q = _to_bnsd(_array(query), input_layout, head_num)
    d = q.shape[-1]
    _require(q.shape[1] == head_num, f"query has {q.shape[1]} heads, head_num says {head_num}")
    _require(d % 16 == 0 and d <= 512, f"head size must be a multiple of 16 up to 512, got {d}")
    key_heads = (key.shape[-1] // d) if input_layout in ("BSH", "SBH") else key.shape[1 if input_layout == "BNSD" else 2]
    k, v = (_to_bnsd(_array(x), input_layout, key_heads) for x in (key, value))
    _require(k.shape[-1] == d and k.shape[0] == q.shape[0], f"key {key.shape} does not fit query {query.shape}")
    _require(head_num % key_heads == 0, f"key heads ({key_heads}) must divide query heads ({head_num})")
    b, n1, s1, _ = q.shape
    s2 = k.shape[2]

    kept = np.broadcast_to(_kept_by_sparse_mode(sparse_mode, s1, s2, pre_tokens, next_tokens), (b, n1, s1, s2))
    if sparse_mode in (2, 3, 4):
        _require(attn_mask is not None and tuple(attn_mask.shape) == (2048, 2048),
                 f"sparse mode {sparse_mode} takes the compressed 2048x2048 causal attn_mask")
    elif attn_mask is not None:
        _require(attn_mask.dtype in (ms.bool_, ms.uint8), f"attn_mask must be bool or uint8, got {attn_mask.dtype}")
        allowed = [(b, n1, s1, s2), (b, 1, s1, s2), (s1, s2)]
        _require(tuple(attn_mask.shape) in allowed, f"attn_mask shape {attn_mask.shape} is none of {allowed}")
        discard = attn_mask.asnumpy().astype(bool)
        kept = kept & ~np.broadcast_to(discard if discard.ndim == 4 else discard[None, None], kept.shape)

    g = head_num // key_heads
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)  # query head h uses key head h // g
    scores = np.where(kept, scalar_value * q @ k.swapaxes(-1, -2), -np.inf)
    with np.errstate(invalid="ignore"):  # all-discarded rows: exp(-inf - -inf), left as NaN on purpose
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        out = (probs / probs.sum(-1, keepdims=True)) @ v
    out[~kept.any(-1)] = np.nan  # undefined by the contract
    return _tensor(_from_bnsd(out, input_layout), query.dtype)


# ---------------------------------------------------------------- normalisation, activations, lookups

def rms_norm(x, gamma, epsilon=1e-6):
    """(y, rstd): y = x / sqrt(mean(x^2) + eps) * gamma over gamma's trailing axes, in x's dtype;
    rstd float32, shape x.shape[:-gamma.ndim] + (1,) * gamma.ndim."""
    _require(x.dtype in FLOATS and gamma.dtype in FLOATS, f"rms_norm takes float16/bfloat16/float32, got {x.dtype}")
    _require(tuple(x.shape[x.ndim - gamma.ndim:]) == tuple(gamma.shape), f"gamma {gamma.shape} must end x {x.shape}")
    _require(isinstance(epsilon, float) and epsilon > 0, f"epsilon must be a positive float, got {epsilon}")
    h = _array(x)
    axes = tuple(range(x.ndim - gamma.ndim, x.ndim))
    rstd = 1 / np.sqrt((h * h).mean(axes, keepdims=True) + epsilon)
    return _tensor(h * rstd * _array(gamma), x.dtype), _tensor(rstd, ms.float32)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):  # noqa: A002 (the documented name)
    shape = tuple(normalized_shape)
    _require(tuple(input.shape[input.ndim - len(shape):]) == shape, f"normalized_shape {shape} must end {input.shape}")
    for name, given in (("weight", weight), ("bias", bias)):
        _require(given is None or tuple(given.shape) == shape, f"{name} must have shape {shape}")
    h = _array(input)
    axes = tuple(range(input.ndim - len(shape), input.ndim))
    h = (h - h.mean(axes, keepdims=True)) / np.sqrt(h.var(axes, keepdims=True) + eps)
    h = h * (1 if weight is None else _array(weight)) + (0 if bias is None else _array(bias))
    return _tensor(h, input.dtype)


def gelu(input, approximate="none"):  # noqa: A002
    _require(approximate in ("none", "tanh"), f"approximate must be 'none' or 'tanh', got {approximate!r}")
    x = _array(input)
    if approximate == "tanh":
        y = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    else:
        from math import erf

        y = 0.5 * x * (1 + np.vectorize(erf)(x / np.sqrt(2)))
    return _tensor(y, input.dtype)


def embedding(input, weight, padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False):  # noqa: A002
    _require(input.dtype in (ms.int32, ms.int64), f"embedding ids must be int32 or int64, got {input.dtype}")
    _require(max_norm is None, "max_norm renormalises the table in place; not modelled")
    ids = input.asnumpy()
    _require(((ids >= 0) & (ids < weight.shape[0])).all(), f"ids must lie in 0..{weight.shape[0] - 1}")
    return _tensor(_array(weight)[ids], weight.dtype)


def arange(start=0, end=None, step=1, *, dtype=None):
    if end is None:
        start, end = 0, start
    _require(step != 0, "step must not be 0")
    values = np.arange(start, end, step)
    if dtype is None:
        dtype = ms.int64 if all(isinstance(a, int) for a in (start, end, step)) else ms.float32
    return _tensor(values, dtype)


def conv1d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):  # noqa: A002
    """torch.nn.functional.conv1d: input (N, C_in, L), weight (C_out, C_in / groups, K)."""
    _require(input.ndim == 3 and weight.ndim == 3, "conv1d takes (N, C, L) and (C_out, C_in/groups, K) tensors")
    n, c_in, length = input.shape
    c_out, per_group, k = weight.shape
    _require(c_in == per_group * groups and c_out % groups == 0,
             f"weight {weight.shape} does not fit {c_in} input channels in {groups} groups")
    _require(isinstance(padding, int), f"padding must be an int here, got {padding!r}")
    x = np.pad(_array(input), ((0, 0), (0, 0), (padding, padding)))
    w = _array(weight)
    span = dilation * (k - 1) + 1
    out_length = (x.shape[-1] - span) // stride + 1
    taps = np.arange(k) * dilation
    starts = np.arange(out_length) * stride
    windows = x[:, :, starts[:, None] + taps[None, :]]  # (N, C_in, L_out, K)
    windows = windows.reshape(n, groups, per_group, out_length, k)
    w = w.reshape(groups, c_out // groups, per_group, k)
    out = np.einsum("ngclk,gock->ngol", windows, w).reshape(n, c_out, out_length)
    if bias is not None:
        out = out + _array(bias)[None, :, None]
    return _tensor(out, input.dtype)


def linear(input, weight, bias=None):  # noqa: A002
    """torch.nn.functional.linear: input (*, in), weight (out, in), bias (out,) -> (*, out)."""
    _require(weight.ndim == 2 and input.shape[-1] == weight.shape[1],
             f"weight {weight.shape} does not take inputs of {input.shape[-1]} features")
    _require(bias is None or tuple(bias.shape) == (weight.shape[0],), f"bias must have shape ({weight.shape[0]},)")
    out = _array(input) @ _array(weight).T + (0 if bias is None else _array(bias))
    return _tensor(out, input.dtype)


STANDINS = (
    (ops, "flash_attention_score", flash_attention_score),
    (ops, "rms_norm", rms_norm),
    (mint.nn.functional, "layer_norm", layer_norm),
    (mint.nn.functional, "gelu", gelu),
    (mint.nn.functional, "embedding", embedding),
    (mint.nn.functional, "conv1d", conv1d),
    (mint.nn.functional, "linear", linear),
    (mint, "arange", arange),
)


def install(monkeypatch):
    """Replace each kernel with its stand-in for the current test."""
    for namespace, name, standin in STANDINS:
        monkeypatch.setattr(namespace, name, standin)
