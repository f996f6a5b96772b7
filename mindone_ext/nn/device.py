"""The one place in the tree that asks which device MindSpore runs on.

`on_ascend()` is a compile-time constant inside `mindspore.jit` graphs (via `constexpr`), so
portable ops can branch on it at no run-time cost, in graph and PyNative mode alike.
"""
import mindspore as ms
from mindspore.ops import constexpr


@constexpr
def on_ascend() -> bool:
    return ms.get_context("device_target") == "Ascend"


def storage_dtype(requested):
    """The dtype parameters are kept in for a requested dtype.

    bfloat16 matmul has no CPU kernel, so on CPU bf16 weights are rounded to bf16 and then
    kept (and computed) in float32; everything else is kept as requested.
    """
    if requested == ms.bfloat16 and not on_ascend():
        return ms.float32
    return requested

