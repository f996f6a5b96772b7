"""The gated MLP (down(act(gate(x)) * up(x))) of the Qwen2 decoder and the vision blocks."""
from mindspore import nn

from .layers import Linear
from .ops import activation


class GatedMLP(nn.Cell):
    def __init__(self, hidden, intermediate, dtype, bias=False, act="silu"):
        super().__init__()
        self.act = activation(act)
        self.gate_proj = Linear(hidden, intermediate, bias, dtype)
        self.up_proj = Linear(hidden, intermediate, bias, dtype)
        self.down_proj = Linear(intermediate, hidden, bias, dtype)

    def construct(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
