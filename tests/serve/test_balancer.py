"""Two voice servers behind HAProxy with deploy/haproxy.cfg, all on loopback: each conversation
stays on the process that holds it, a process that dies ends only its own conversations, and the
health checks send new ones to the live process. .ci/run installs HAProxy from the OS packages."""
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
from types import SimpleNamespace

import aiohttp
import pytest

from tests.conftest import ROOT
from tests.serve.conftest import API_KEY
from tests.serve.wsclient import VoiceClient

CONFIG = os.path.join(ROOT, "deploy", "haproxy.cfg")
TURN = {"type": "config", "vad": False, "modalities": ["text"], "temperature": 0, "max_new_tokens": 5}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def servers(tiny_checkpoint):
    from mindone_ext.serve.process import ServerProcess

    with ServerProcess(tiny_checkpoint, "--api_key", API_KEY, "--no_audio_output") as card0, \
            ServerProcess(tiny_checkpoint, "--api_key", API_KEY, "--no_audio_output") as card1:
        yield card0, card1


@pytest.fixture(scope="module")
def balancer(servers, tmp_path_factory):
    haproxy = shutil.which("haproxy")
    assert haproxy, "HAProxy is not installed (.ci/run installs it: apt-get install haproxy)"
    port = free_port()
    config = open(CONFIG).read().replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    for default, server in zip(("127.0.0.1:8001", "127.0.0.1:8002"), servers):
        assert default in config
        config = config.replace(default, server.url.removeprefix("http://"))
    path = tmp_path_factory.mktemp("haproxy") / "haproxy.cfg"
    path.write_text(config)
    process = subprocess.Popen([haproxy, "-db", "-f", str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert process.poll() is None and time.time() < deadline, process.stdout.read().decode()
                time.sleep(0.2)
        yield SimpleNamespace(url=url, ws_url=url.replace("http://", "ws://") + "/v1/voice", process=process)
    finally:
        process.terminate()
        process.wait(10)


async def sessions(server):
    async with aiohttp.ClientSession() as http, http.get(server.url + "/health") as response:
        return (await response.json())["sessions"]


async def turn(client, text):
    await client.send({"type": "text", "text": text})
    events = await client.until("response.done")
    return events[-1]["text"]


async def conversation(balancer_or_server):
    client = await VoiceClient.connect(balancer_or_server)
    await client.send(TURN)
    await client.until("config.done")
    return client


async def scenario(servers, balancer):
    card0 = servers[0]
    async with aiohttp.ClientSession() as http:
        for card in servers:  # what HAProxy checks (with its own Host header)
            async with http.get(card.url + "/health/live", headers={"Host": "127.0.0.1"}) as response:
                assert response.status == 200 and await response.json() == {"status": "ok"}
    # what each turn answers when the conversation is alone on one server
    alone = await conversation(card0)
    want = [await turn(alone, text) for text in ("hello there", "and then?", "one more")]
    await alone.close()
    without_history = await conversation(card0)
    assert await turn(without_history, "and then?") != want[1]  # so an answer equal to want[1] had the history
    await without_history.close()
    while await sessions(card0):
        await asyncio.sleep(0.1)

    first = await conversation(balancer)
    home = [await sessions(card) for card in servers]
    assert sorted(home) == [0, 1]
    second = await conversation(balancer)
    assert [await sessions(card) for card in servers] == [1, 1]  # leastconn: the other process
    # the turns of each conversation reach the process that holds it: the second turn continues the first
    for client in (first, second):
        assert [await turn(client, "hello there"), await turn(client, "and then?")] == want[:2]
    survivor, victim = servers if home == [1, 0] else servers[::-1]
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait(30)
    # the conversation on the dead process ends; the other goes on where it was
    await second.send({"type": "text", "text": "one more"})
    assert (await second.event())["type"] == "closed"
    assert await turn(first, "one more") == want[2]
    # health checks (every second, two failures) take the dead process out: new conversations all
    # reach the live one
    await asyncio.sleep(3)
    fresh = [await conversation(balancer) for _ in range(3)]
    for client in fresh:
        assert await turn(client, "hello there") == want[0]
    assert await sessions(survivor) == 4
    for client in [first, second] + fresh:
        await client.close()


def test_conversations_stay_on_their_process_and_a_dead_one_is_taken_out(servers, balancer):
    asyncio.run(scenario(servers, balancer))
