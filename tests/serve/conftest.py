"""One voice server for the service's tests: the tiny checkpoint, an API key, small limits; and
`drain`, an engine generation's events to its end."""
import os
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "examples", "qwen2_5_omni"))  # demo_media, the example client

API_KEY = "test-key"
LIMITS = {"max_new_tokens": 8, "talker_max_new_tokens": 200, "max_audio_seconds": 5, "max_message_bytes": 262144,
          "idle_timeout": 8, "max_active": 1, "max_queue": 1, "max_context_tokens": 2048}


@pytest.fixture(scope="session")
def server(tiny_checkpoint):
    from mindone_ext.serve.process import ServerProcess

    args = [x for name, value in LIMITS.items() for x in (f"--{name}", value)]
    with ServerProcess(tiny_checkpoint, "--api_key", API_KEY, *args) as running:
        yield running


@pytest.fixture(scope="session")
def processor(tiny_checkpoint):
    from mindone_ext import Qwen2_5OmniProcessor

    return Qwen2_5OmniProcessor.from_pretrained(tiny_checkpoint)


async def drain(generation):
    """A serve.engine Generation's events, up to its Finished or Failed."""
    from mindone_ext.serve.engine import Failed, Finished

    events = []
    while not events or not isinstance(events[-1], (Finished, Failed)):
        events.append(await generation.events.get())
    return events
