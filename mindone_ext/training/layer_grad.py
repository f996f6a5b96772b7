"""The Qwen2 decoder's training pass one layer at a time, as compiled graphs shared by every layer
of the same make-up (the weights are their inputs): a layer's forward, which also returns the few
tensors its backward needs, and its backward, run from the last layer to the first.

Why not one graph for the whole step: MindSpore's CPU backend keeps every intermediate of a
compiled graph allocated for the life of the process, and a whole step's graph held 11.3 GB for a
0.5B-shaped model at 384 tokens (PyTorch + PEFT: 6.44 GB). Here what stays is one layer's graphs
and, per layer, its input and its projections' outputs; with `recompute`, its input only (the
forward runs again inside the backward graph).

The backward is written out where autodiff costs more than the math: a (LoRA-)linear layer's is
one matmul for the input and two rank-r ones for the adapter, and attention's recomputes the
probabilities instead of keeping them (nn.attention.exact_attention_backward), which on the CPU
takes half the time of autodiff's. The norms and the gated activation go through `mindspore.grad`.
"""
import functools

import mindspore as ms
from mindspore import Tensor, ops

from ..nn import ops as P
from ..nn.attention import ascend_attention, attention, exact_attention_backward
from ..nn.decoder_weights import layer_parts as weights_of_layer
from ..nn.decoder_weights import project, split_layer
from ..nn.ops import activation
from ..nn.rotary import apply_rotary, rotary_backward

_linear = P.linear
_transposed_times = ops.MatMul(transpose_a=True)


def layer_parts(layer, act):
    """nn.decoder_weights.layer_parts, the weights as graph inputs (no copies: the Parameters' storage)."""
    kind, weights, adapters = weights_of_layer(layer, act)
    return kind, ms.mutable(tuple(Tensor(w) for w in weights)), adapters


def project_backward(x, grad, w, p):
    """(gradient of the input, (dA, dB) of the adapter or ()) for the output's gradient `grad`."""
    x2, g2 = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
    dx = ops.matmul(g2, w[0])
    if p.scaling is None:
        return dx.reshape(x.shape), ()
    a, b = w[-2], w[-1]
    g32, x32 = g2.astype(ms.float32) * p.scaling, x2.astype(ms.float32)
    low = ops.matmul(g32, b)  # the gradient at lora_A's output (N, r)
    dx = dx + ops.matmul(low, a).astype(dx.dtype)
    return dx.reshape(x.shape), (_transposed_times(low, x32), _transposed_times(g32, _linear(x32, a)))


@functools.lru_cache(maxsize=None)
def layer_graphs(kind):
    """(forward, backward, recomputing backward) compiled for layers of this kind:
    forward(x, cos, sin, mask, weights) -> (output, saved: 7 tensors);
    backward(x, *saved, grad, cos, sin, mask, weights) -> (input's gradient, adapter gradients);
    recomputing_backward(x, grad, cos, sin, mask, weights) -> the same from the input alone."""
    act, heads, kv, d = activation(kind.act), kind.heads, kind.kv_heads, kind.head_dim
    scale, eps, proj = d ** -0.5, kind.eps, kind.projections

    def norm_dot(x, weight, grad):
        return (P.rms_norm(x, weight, eps) * grad).sum()

    def gate_dot(gate, up, grad):
        return (act(gate) * up * grad).sum()

    def flash_dot(q, k, v, mask, grad):
        return (ascend_attention(q, k, v, mask, scale) * grad).sum()

    norm_grad = ms.grad(norm_dot, grad_position=0)
    gate_grad = ms.grad(gate_dot, grad_position=(0, 1))
    flash_grad = ms.grad(flash_dot, grad_position=(0, 1, 2))

    def heads_of(q, k, v, cos, sin):  # (B, T, n * D) -> rotated (B, n, T, D)
        b, t, _ = q.shape
        q = apply_rotary(q.reshape(b, t, heads, d).swapaxes(1, 2), cos, sin)
        k = apply_rotary(k.reshape(b, t, kv, d).swapaxes(1, 2), cos, sin)
        return q, k, v.reshape(b, t, kv, d).swapaxes(1, 2)

    def forward(x, cos, sin, mask, weights):  # Qwen2DecoderLayer.construct without a cache
        norm1, norm2, w = split_layer(weights, kind)
        a = P.rms_norm(x, norm1, eps)
        q, k, v = project(a, w[0], proj[0]), project(a, w[1], proj[1]), project(a, w[2], proj[2])
        q_, k_, v_ = heads_of(q, k, v, cos, sin)
        o = attention(q_, k_, v_, mask, scale, kind.flash)
        h = x + project(o, w[3], proj[3])
        m = P.rms_norm(h, norm2, eps)
        gate, up = project(m, w[4], proj[4]), project(m, w[5], proj[5])
        return h + project(act(gate) * up, w[6], proj[6]), (q, k, v, o, h, gate, up)

    def backward(x, q, k, v, o, h, gate, up, grad, cos, sin, mask, weights):
        norm1, norm2, w = split_layer(weights, kind)
        d_act, g_down = project_backward(act(gate) * up, grad, w[6], proj[6])
        d_gate, d_up = gate_grad(gate, up, d_act)
        m = P.rms_norm(h, norm2, eps)
        dm_gate, g_gate = project_backward(m, d_gate, w[4], proj[4])
        dm_up, g_up = project_backward(m, d_up, w[5], proj[5])
        dh = grad + norm_grad(h, norm2, dm_gate + dm_up)
        do, g_o = project_backward(o, dh, w[3], proj[3])
        q_, k_, v_ = heads_of(q, k, v, cos, sin)
        if kind.flash:
            dq, dk, dv = flash_grad(q_, k_, v_, mask, do)
        else:
            dq, dk, dv = exact_attention_backward(q_, k_, v_, o, mask, scale, do)
        dq = rotary_backward(dq, cos, sin).swapaxes(1, 2).reshape(q.shape)
        dk = rotary_backward(dk, cos, sin).swapaxes(1, 2).reshape(k.shape)
        dv = dv.swapaxes(1, 2).reshape(v.shape)
        a = P.rms_norm(x, norm1, eps)
        da_q, g_q = project_backward(a, dq, w[0], proj[0])
        da_k, g_k = project_backward(a, dk, w[1], proj[1])
        da_v, g_v = project_backward(a, dv, w[2], proj[2])
        dx = dh + norm_grad(x, norm1, da_q + da_k + da_v)
        return dx, g_q + g_k + g_v + g_o + g_gate + g_up + g_down

    def recomputing_backward(x, grad, cos, sin, mask, weights):
        _, saved = forward(x, cos, sin, mask, weights)
        return backward(x, *saved, grad, cos, sin, mask, weights)

    return ms.jit(forward), ms.jit(backward), ms.jit(recomputing_backward)
