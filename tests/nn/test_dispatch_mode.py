"""Models make MindSpore's op-by-op dispatch synchronous on CPU (faster there, see
nn/device.py), leave it alone on Ascend, and keep it asynchronous when asked to."""
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

PROBE = """
import mindspore as ms
from mindone_ext.bundled import CHECKPOINT
from mindone_ext import Qwen2_5OmniForConditionalGeneration
from mindone_ext.nn.device import dispatch_is_synchronous
before = dispatch_is_synchronous()
Qwen2_5OmniForConditionalGeneration.from_pretrained(CHECKPOINT, enable_audio_output=False)
print(ms.get_context("device_target"), before, dispatch_is_synchronous())
"""


def probe(**env):
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT, **env})
    assert done.returncode == 0, done.stderr[-2000:]
    device, before, after = done.stdout.split()[-3:]
    return device, before == "True", after == "True"


@pytest.mark.parametrize("async_env, synchronous_on_cpu", [("", True), ("1", False)])
def test_loading_a_model_sets_the_dispatch_mode(async_env, synchronous_on_cpu):
    device, before, after = probe(MINDONE_EXT_CPU_ASYNC=async_env)
    assert before is False  # MindSpore's default: asynchronous
    assert after is (synchronous_on_cpu and device == "CPU")
