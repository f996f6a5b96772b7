"""Each portable op: the CPU path against torch, and the Ascend path against the CPU path, on
the real kernels on a card and on their documented contracts elsewhere (`ascend_kernels`)."""
import numpy as np
import pytest
import torch
import mindspore as ms
from mindspore import Tensor, mint

from mindone_ext.nn import ops as P
from mindone_ext.nn.device import on_ascend
from tests.conftest import KERNEL_TOLERANCE

rng = np.random.default_rng(0)
X = rng.standard_normal((2, 7, 64)).astype(np.float32)
W = (1 + 0.1 * rng.standard_normal(64)).astype(np.float32)
B = (0.1 * rng.standard_normal(64)).astype(np.float32)
IDS = np.array([[3, 0, 9], [1, 1, 4]], np.int32)
TABLE = rng.standard_normal((10, 8)).astype(np.float32)
CONV_W = rng.standard_normal((8, 32, 3)).astype(np.float32)  # groups=2 over 64 input channels
LINEAR_W = (0.1 * rng.standard_normal((48, 64))).astype(np.float32)


def torch_rms_norm(x, w, eps):
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return w * h


# name: (call of our op `f` on float inputs made by `t`, the torch reference)
CASES = {
    "rms_norm": (lambda f, t: f(t(X), t(W), 1e-6), lambda: torch_rms_norm(torch.tensor(X), torch.tensor(W), 1e-6)),
    "layer_norm": (lambda f, t: f(t(X), t(W), t(B), 1e-5),
                   lambda: torch.nn.functional.layer_norm(torch.tensor(X), (64,), torch.tensor(W), torch.tensor(B), 1e-5)),
    "gelu": (lambda f, t: f(t(X)), lambda: torch.nn.functional.gelu(torch.tensor(X))),
    "embedding": (lambda f, t: f(Tensor(IDS), t(TABLE)),
                  lambda: torch.nn.functional.embedding(torch.tensor(IDS).long(), torch.tensor(TABLE))),
    "arange": (lambda f, t: f(11), lambda: torch.arange(11)),
    "linear": (lambda f, t: f(t(X), t(LINEAR_W), t(B[:48])),
               lambda: torch.nn.functional.linear(torch.tensor(X), torch.tensor(LINEAR_W), torch.tensor(B[:48]))),
    "conv1d": (lambda f, t: f(t(X.swapaxes(1, 2)), t(CONV_W), t(B[:8]), 2, 1, 2, 2),
               lambda: torch.nn.functional.conv1d(torch.tensor(X.swapaxes(1, 2)), torch.tensor(CONV_W),
                                                  torch.tensor(B[:8]), stride=2, padding=1, dilation=2, groups=2)),
}


def float32(x):
    return Tensor(x)


@pytest.mark.parametrize("name", sorted(CASES))
def test_cpu_path_matches_torch(name):
    ours, ref = CASES[name]
    got = ours(getattr(P, f"exact_{name}"), float32).asnumpy()
    np.testing.assert_allclose(got, ref().numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_dispatcher_matches_torch(name):
    ours, ref = CASES[name]
    np.testing.assert_allclose(ours(getattr(P, name), float32).asnumpy(), ref().numpy(), **KERNEL_TOLERANCE["Float32"])


@pytest.mark.parametrize("dtype", [ms.float32, ms.float16, ms.bfloat16], ids=str)
@pytest.mark.parametrize("name", sorted(CASES))
def test_ascend_path_matches_the_exact_path(name, dtype, ascend_kernels):
    """The kernel in `dtype` against the exact path in float32 on the same rounded inputs."""
    ours, _ = CASES[name]
    got = ours(getattr(P, f"ascend_{name}"), lambda x: Tensor(x).astype(dtype))
    want = ours(getattr(P, f"exact_{name}"), lambda x: Tensor(x).astype(dtype).astype(ms.float32)).asnumpy()
    if name != "arange":
        assert got.dtype == dtype, f"{ascend_kernels}: {name} returned {got.dtype} for {dtype} inputs"
    np.testing.assert_allclose(got.astype(ms.float32).asnumpy(), want, **KERNEL_TOLERANCE[str(dtype)],
                               err_msg=f"{name} on {ascend_kernels}")


def test_gelu_tanh_matches_torch_over_a_wide_range():
    """The CPU path computes it as x * sigmoid(2u) (see exact_gelu): from deep negatives, where it
    underflows to -0, through 0 to large positives, where x**3 overflows and it must return x."""
    x = np.concatenate([np.linspace(-12, 12, 4801), [-1e13, -1e4, -50, 50, 1e4, 1e13]]).astype(np.float32)
    want = torch.nn.functional.gelu(torch.tensor(x), approximate="tanh").numpy()
    for got in (P.exact_gelu(Tensor(x), "tanh"), P.gelu_tanh(Tensor(x))):
        np.testing.assert_allclose(got.asnumpy(), want, atol=1e-6, rtol=1e-6)


def test_silu_matches_torch():
    np.testing.assert_allclose(P.silu(Tensor(X)).asnumpy(), torch.nn.functional.silu(torch.tensor(X)).numpy(), atol=1e-6)


def _mint_linear(x, *weights):
    return mint.nn.functional.linear(x, *weights)


def _exact_linear(x, *weights):
    return P.exact_linear(x, *weights)


@pytest.mark.skipif(on_ascend(), reason="the CPU's expansion of mint's linear (Ascend runs its Dense kernel)")
@pytest.mark.parametrize("biased", [False, True])
def test_linear_in_a_graph_equals_mints_bit_for_bit(biased):
    """Compiled, the CPU path runs the kernels mint's linear expands to there (MatMul with the
    weight transposed, then the bias), so moving graphs to it changes no result (exact_linear)."""
    mint_linear, exact_linear = ms.jit(_mint_linear), ms.jit(_exact_linear)
    weights = (Tensor(LINEAR_W), Tensor(B[:48])) if biased else (Tensor(LINEAR_W),)
    for shape in [(64,), (1, 64), (5, 64), (1, 1, 64), (2, 7, 64), (2, 3, 5, 64)]:
        x = Tensor(rng.standard_normal(shape).astype(np.float32))
        want, got = mint_linear(x, *weights).asnumpy(), exact_linear(x, *weights).asnumpy()
        assert got.shape == shape[:-1] + (48,)
        np.testing.assert_array_equal(got, want, err_msg=str(shape))


def test_rms_norm_half_precision_keeps_float32_statistics():
    x16 = Tensor(X * 100, ms.float16)
    got = P.exact_rms_norm(x16, Tensor(W, ms.float16), 1e-6)
    assert got.dtype == ms.float16
    ref = torch_rms_norm(torch.tensor(X * 100).half().float(), torch.tensor(W).half().float(), 1e-6)
    np.testing.assert_allclose(got.asnumpy().astype(np.float32), ref.numpy(), atol=2e-2, rtol=2e-3)


@pytest.mark.parametrize("c_in, c_out, k, stride, padding, groups", [(8, 4, 11, 5, 3, 1), (5, 3, 7, 3, 2, 1),
                                                                     (3, 5, 4, 2, 1, 1), (4, 4, 3, 1, 1, 1),
                                                                     (6, 6, 12, 2, 0, 6), (4, 4, 7, 3, 2, 2)])
def test_conv_transpose1d_matches_torch(c_in, c_out, k, stride, padding, groups):
    """The device's own path, the portable one everywhere, and the CPU's deconvolution where it runs
    (groups of 1 on the CPU), op by op and compiled."""
    x = rng.standard_normal((2, c_in, 9)).astype(np.float32)
    w = rng.standard_normal((c_in, c_out // groups, k)).astype(np.float32)
    b = rng.standard_normal(c_out).astype(np.float32)
    want = torch.nn.functional.conv_transpose1d(torch.tensor(x), torch.tensor(w), torch.tensor(b), stride=stride,
                                                padding=padding, groups=groups).numpy()

    def device(x, w, b):
        return P.conv_transpose1d(x, w, b, stride, padding, groups)

    def portable(x, w, b):
        return P.portable_conv_transpose1d(x, w, b, stride, padding, groups)

    def cpu(x, w, b):
        return P.cpu_conv_transpose1d(x, w, b, stride, padding)

    for path in [device, portable] + ([cpu] if groups == 1 and not on_ascend() else []):
        for run in (path, ms.jit(path)):
            np.testing.assert_allclose(run(Tensor(x), Tensor(w), Tensor(b)).asnumpy(), want, atol=1e-5)


@pytest.mark.skipif(on_ascend(), reason="the CPU's layout of BigVGAN's rows (Ascend runs conv1d)")
@pytest.mark.parametrize("c_in, c_out, k, padding, dilation", [(8, 4, 7, 3, 1), (4, 4, 3, 3, 3), (5, 3, 7, 15, 5),
                                                                (3, 1, 7, 3, 1), (2, 2, 1, 0, 1)])
def test_convolutions_on_rows_match_torch(c_in, c_out, k, padding, dilation):
    """conv1d and conv_transpose1d on rows laid out (B, C, 1, L), weights (A, B, K) or already
    (A, B, 1, K), op by op and compiled."""
    x = rng.standard_normal((2, c_in, 23)).astype(np.float32)
    w = rng.standard_normal((c_out, c_in, k)).astype(np.float32)
    want = torch.nn.functional.conv1d(torch.tensor(x), torch.tensor(w), padding=padding, dilation=dilation).numpy()
    stride = dilation + 1  # the transposed convolution's stride, padding below its kernel
    wt = rng.standard_normal((c_in, c_out, k + stride)).astype(np.float32)
    want_t = torch.nn.functional.conv_transpose1d(torch.tensor(x), torch.tensor(wt), stride=stride,
                                                  padding=padding // 2).numpy()

    def conv(x, w):
        return P.cpu_conv_rows(x, w, padding, dilation)

    def transposed(x, w):
        return P.cpu_conv_transpose_rows(x, w, stride, padding // 2)

    for weight, weight_t in ((w, wt), (w[:, :, None], wt[:, :, None])):
        for run, run_t in ((conv, transposed), (ms.jit(conv), ms.jit(transposed))):
            got = run(Tensor(x[:, :, None]), Tensor(weight)).asnumpy()
            np.testing.assert_allclose(got[:, :, 0], want, atol=1e-5)
            got_t = run_t(Tensor(x[:, :, None]), Tensor(weight_t)).asnumpy()
            np.testing.assert_allclose(got_t[:, :, 0], want_t, atol=1e-5)


@pytest.mark.parametrize("mode", ["constant", "reflect", "replicate"])
def test_pad1d_matches_torch(mode):
    got = P.pad1d(Tensor(X), 2, 3, mode).asnumpy()
    np.testing.assert_array_equal(got, torch.nn.functional.pad(torch.tensor(X), (2, 3), mode=mode).numpy())


@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_pytorch_tanh", "quick_gelu", "relu"])
def test_activations_by_config_name_match_transformers(name):
    from transformers.activations import ACT2FN

    want = ACT2FN[name](torch.tensor(X)).numpy()
    np.testing.assert_allclose(P.activation(name)(Tensor(X)).asnumpy(), want, atol=1e-5)


@pytest.mark.parametrize("dtype", [ms.float32, ms.float16], ids=str)
def test_an_embeddings_host_lookup_is_its_gather(dtype):
    """Embedding.lookup (host ids, outside a graph: a prompt's, the Talker's) gives what the cell
    gives, to the bit, for ids of any shape; an id outside the table is refused by name."""
    from mindone_ext.nn.layers import Embedding

    table = Embedding(50, 8, dtype)
    table.weight.set_data(Tensor(np.random.default_rng(0).standard_normal((50, 8)), dtype))
    for ids in (np.array([[3, 0, 49, 3]]), np.array([7]), np.arange(50).reshape(5, 10), np.zeros((1, 0), np.int64)):
        got, want = table.lookup(ids), table(Tensor(ids, ms.int32))
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got.asnumpy(), want.asnumpy())
    for bad in ([50], [-1]):
        with pytest.raises(ValueError, match="token ids must lie in 0..49"):
            table.lookup(np.array([bad]))
