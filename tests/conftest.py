"""Shared fixtures: tiny checkpoints built once per session with the PyTorch reference."""
import os
import shutil
import sys
import tempfile

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `tools.` is importable from the tests

SHIPPED_CHECKPOINT = os.path.join(ROOT, "examples", "qwen2_5_omni", "tiny-qwen2.5-omni")
GRAPH_CACHE_ENV = "MINDONE_EXT_GRAPH_CACHE"  # mindone_ext.utils.graph_cache.ENV (not imported: it imports MindSpore)


def pytest_configure(config):
    """Compiled graphs go to a folder of this run's own (not the user's cache), shared by the
    xdist workers and the processes tests start, which inherit the variable; removed at the end."""
    if hasattr(config, "workerinput") or os.environ.get(GRAPH_CACHE_ENV):
        return
    config.graph_cache = tempfile.mkdtemp(prefix="mindone_ext-test-graphs-")
    os.environ[GRAPH_CACHE_ENV] = config.graph_cache


def pytest_unconfigure(config):
    folder = getattr(config, "graph_cache", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
        os.environ.pop(GRAPH_CACHE_ENV, None)


@pytest.fixture(scope="session", autouse=True)
def ops_keep_their_dtype():
    """On a card, float32 computes in float32 for every test, as from_pretrained makes it for a
    user (the tests build most modules themselves); nothing to do on a CPU."""
    from mindone_ext.nn.device import keep_dtypes_exact

    keep_dtypes_exact()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A float32 tiny checkpoint, sharded into many files (the index path)."""
    from tools.tiny_checkpoint import build

    return build(str(tmp_path_factory.mktemp("ckpt") / "tiny"), seed=0, shard_size="200KB")


@pytest.fixture(scope="session")
def tiny_tied_checkpoint(tmp_path_factory):
    """Tied thinker embeddings, saved as one safetensors file."""
    from tools.tiny_checkpoint import build

    return build(str(tmp_path_factory.mktemp("ckpt") / "tied"), seed=1, shard_size="1GB", tie_word_embeddings=True)


@pytest.fixture
def ascend_kernels(monkeypatch):
    """The kernels only Ascend registers, for the tests of how we call them: on an Ascend device the
    real ones, elsewhere CPU stand-ins written from their documented contracts
    (tests/ascend_standins.py). The one place the suite chooses by device; returns its name."""
    from mindone_ext.nn.device import on_ascend

    if on_ascend():
        return "Ascend"
    from tests import ascend_standins

    ascend_standins.install(monkeypatch)
    return "CPU stand-ins"


# Tolerances of a kernel against the exact float32 path on the same (rounded) inputs: a few units
# in the last place of the result's dtype (fp16: 2^-10, bf16: 2^-7), sums accumulated in float32.
KERNEL_TOLERANCE = {"Float32": dict(rtol=1e-4, atol=1e-4), "Float16": dict(rtol=4e-3, atol=4e-3),
                    "BFloat16": dict(rtol=3e-2, atol=3e-2)}


@pytest.fixture(scope="session")
def reference_model(tiny_checkpoint):
    import torch
    from transformers import Qwen2_5OmniForConditionalGeneration

    return Qwen2_5OmniForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def our_model(tiny_checkpoint):
    from mindone_ext import Qwen2_5OmniForConditionalGeneration

    return Qwen2_5OmniForConditionalGeneration.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="session")
def padded_batch():
    """Two prompts of different lengths, left padded, as the processor pads them."""
    rng = np.random.default_rng(7)
    ids = rng.integers(0, 400, size=(2, 13))
    mask = np.ones_like(ids)
    ids[1, :4], mask[1, :4] = 400, 0  # <|endoftext|> is the pad token
    return ids, mask


# A script's `knob.scale`, read by MindSpore's parser while it compiles a function that uses it:
# its first read sends the process `signals` SIGINTs (a Ctrl-C landing inside the compile, every
# time). The script defines `signals` before it and runs from a file (MindSpore reads the source).
INTERRUPTING_KNOB = """
class Interrupting:
    sent = False

    @property
    def scale(self):
        if not Interrupting.sent:
            Interrupting.sent = True
            for _ in range(signals):
                os.kill(os.getpid(), signal.SIGINT)
        return 2.0

knob = Interrupting()
"""


def max_abs_diff(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def snr_db(got, want):
    """Signal-to-noise ratio of `got` against `want`, in dB."""
    want = np.asarray(want, np.float64)
    return float(10 * np.log10(np.sum(want ** 2) / max(np.sum((np.asarray(got, np.float64) - want) ** 2), 1e-30)))


@pytest.fixture(scope="session")
def reference_env():
    """The python of the reference media stack's own environment (made once, then reused), with
    the tools real media is made with checked: their absence fails, it does not skip."""
    from tests.reference_media.environment import reference_python
    from tests.reference_media.real_media import missing_tools

    missing = missing_tools()
    if missing:  # .ci/run installs them
        pytest.fail(f"the real-media tests need {', '.join(missing)} (apt-get install espeak-ng sox "
                    "libsox-fmt-mp3 ffmpeg)")
    try:
        return reference_python()
    except RuntimeError as e:
        pytest.fail(str(e))
