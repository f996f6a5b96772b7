"""Each portable op: the CPU path against torch, and the Ascend path called with real shapes,
accepting only MindSpore's "no kernel on this device" failure (so argument mistakes surface)."""
import re

import numpy as np
import pytest
import torch
import mindspore as ms
from mindspore import Tensor

from mindone_ext.nn import ops as P
from mindone_ext.nn.device import on_ascend

rng = np.random.default_rng(0)
X = rng.standard_normal((2, 7, 64)).astype(np.float32)
W = (1 + 0.1 * rng.standard_normal(64)).astype(np.float32)
B = (0.1 * rng.standard_normal(64)).astype(np.float32)
IDS = np.array([[3, 0, 9], [1, 1, 4]], np.int32)
TABLE = rng.standard_normal((10, 8)).astype(np.float32)
CONV_W = rng.standard_normal((8, 32, 3)).astype(np.float32)  # groups=2 over 64 input channels


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
    "conv1d": (lambda f: f(Tensor(X.swapaxes(1, 2)), Tensor(CONV_W), Tensor(B[:8]), 2, 1, 2, 2),
               lambda: torch.nn.functional.conv1d(torch.tensor(X.swapaxes(1, 2)), torch.tensor(CONV_W),
                                                  torch.tensor(B[:8]), stride=2, padding=1, dilation=2, groups=2)),
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
    """On Ascend the Ascend path must run and give finite values. Elsewhere it must get as far
    as kernel selection: a wrong argument would raise a TypeError/ValueError first."""
    if on_ascend():
        out = call()
        for value in out if isinstance(out, tuple) else (out,):
            assert np.isfinite(value.asnumpy().astype(np.float32)).all()
        return
    no_kernel = r"unregistered|Create kernelmod for op \w+ failed|only supports? Ascend"
    with pytest.raises(RuntimeError, match=no_kernel):
        out = call()
        (out[0] if isinstance(out, tuple) else out).asnumpy()
    try:  # the asynchronous queue may report the same failure again; only that one is accepted
        ms.runtime.synchronize()
    except RuntimeError as e:
        assert re.search(no_kernel, str(e)), str(e)


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


@pytest.mark.parametrize("c_in, c_out, k, stride, padding, groups", [(8, 4, 11, 5, 3, 1), (6, 6, 12, 2, 0, 6),
                                                                     (4, 4, 7, 3, 2, 2)])
def test_conv_transpose1d_matches_torch(c_in, c_out, k, stride, padding, groups):
    x = rng.standard_normal((2, c_in, 9)).astype(np.float32)
    w = rng.standard_normal((c_in, c_out // groups, k)).astype(np.float32)
    b = rng.standard_normal(c_out).astype(np.float32)
    got = P.conv_transpose1d(Tensor(x), Tensor(w), Tensor(b), stride, padding, groups).asnumpy()
    want = torch.nn.functional.conv_transpose1d(torch.tensor(x), torch.tensor(w), torch.tensor(b), stride=stride,
                                                padding=padding, groups=groups).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("mode", ["constant", "reflect", "replicate"])
def test_pad1d_matches_torch(mode):
    got = P.pad1d(Tensor(X), 2, 3, mode).asnumpy()
    np.testing.assert_array_equal(got, torch.nn.functional.pad(torch.tensor(X), (2, 3), mode=mode).numpy())


@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_pytorch_tanh", "quick_gelu", "relu"])
def test_activations_by_config_name_match_transformers(name):
    from transformers.activations import ACT2FN

    want = ACT2FN[name](torch.tensor(X)).numpy()
    np.testing.assert_allclose(P.activation(name)(Tensor(X)).asnumpy(), want, atol=1e-5)
