"""Each portable op: the CPU path against torch, and the Ascend path called with real shapes,
accepting only MindSpore's "no kernel on this device" failure (so argument mistakes surface)."""
import numpy as np
import pytest
import torch
import mindspore as ms
from mindspore import Tensor

from mindone_ext.nn import ops as P

rng = np.random.default_rng(0)
X = rng.standard_normal((2, 7, 64)).astype(np.float32)
W = (1 + 0.1 * rng.standard_normal(64)).astype(np.float32)
B = (0.1 * rng.standard_normal(64)).astype(np.float32)
IDS = np.array([[3, 0, 9], [1, 1, 4]], np.int32)
TABLE = rng.standard_normal((10, 8)).astype(np.float32)


def torch_rms_norm(x, w, eps):
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return w * h


CASES = {
    "rms_norm": (lambda f: f(Tensor(X), Tensor(W), 1e-6), lambda: torch_rms_norm(torch.tensor(X), torch.tensor(W), 1e-6)),
    "layer_norm": (lambda f: f(Tensor(X), Tensor(W), Tensor(B), 1e-5),
                   lambda: torch.nn.functional.layer_norm(torch.tensor(X), (64,), torch.tensor(W), torch.tensor(B), 1e-5)),
    "gelu": (lambda f: f(Tensor(X)), lambda: torch.nn.functional.gelu(torch.tensor(X))),
    "embedding": (lambda f: f(Tensor(IDS), Tensor(TABLE)), lambda: torch.nn.functional.embedding(torch.tensor(IDS).long(), torch.tensor(TABLE))),
    "arange": (lambda f: f(11), lambda: torch.arange(11)),
    "cumsum": (lambda f: f(Tensor(X), 1), lambda: torch.cumsum(torch.tensor(X), 1)),
    "topk": (lambda f: f(Tensor(X), 5)[0], lambda: torch.topk(torch.tensor(X), 5).values),
    "argmax": (lambda f: f(Tensor(X)), lambda: torch.argmax(torch.tensor(X), -1)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_cpu_path_matches_torch(name):
    ours, ref = CASES[name]
    got = ours(getattr(P, f"exact_{name}")).asnumpy()
    np.testing.assert_allclose(got, ref().numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_dispatcher_takes_the_cpu_path_here(name):
    ours, ref = CASES[name]
    np.testing.assert_allclose(ours(getattr(P, name)).asnumpy(), ref().numpy(), atol=1e-5, rtol=1e-5)


def assert_no_kernel_here(call):
    """The Ascend path must get as far as kernel selection: a wrong argument would raise a
    TypeError/ValueError first."""
    with pytest.raises(RuntimeError, match="unregistered|Create kernelmod for op \w+ failed|only supports? Ascend"):
        out = call()
        (out[0] if isinstance(out, tuple) else out).asnumpy()


@pytest.mark.parametrize("name", sorted(CASES))
def test_ascend_path_is_called_correctly(name):
    ours, _ = CASES[name]
    if name in ("topk",):
        assert_no_kernel_here(lambda: P.ascend_topk(Tensor(X), 5))
    else:
        assert_no_kernel_here(lambda: ours(getattr(P, f"ascend_{name}")))


def test_silu_matches_torch():
    np.testing.assert_allclose(P.silu(Tensor(X)).asnumpy(), torch.nn.functional.silu(torch.tensor(X)).numpy(), atol=1e-6)


def test_rms_norm_half_precision_keeps_float32_statistics():
    x16 = Tensor(X * 100, ms.float16)
    got = P.exact_rms_norm(x16, Tensor(W, ms.float16), 1e-6)
    assert got.dtype == ms.float16
    ref = torch_rms_norm(torch.tensor(X * 100).half().float(), torch.tensor(W).half().float(), 1e-6)
    np.testing.assert_allclose(got.asnumpy().astype(np.float32), ref.numpy(), atol=2e-2, rtol=2e-3)
