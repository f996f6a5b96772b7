"""The server's warm-up (serve/warmup.py): spoken turns before the port opens, so a client's first
turn meets no graph for the first time (without it, it meets dozens); a server whose limits the
warm-up turn does not fit refuses to start with one line naming them."""
import asyncio
import json
import urllib.request

import pytest

from mindone_ext.serve.engine import BUSY_KINDS
from mindone_ext.serve.options import ServeOptions
from mindone_ext.serve.warmup import warmup_rounds
from tests.serve.conftest import API_KEY, LIMITS
from tests.serve.wsclient import VoiceClient, pcm16


@pytest.mark.parametrize("max_active, max_sessions, rounds", [
    (1, 16, [1]), (2, 16, [1, 2]), (3, 16, [1, 2, 3]), (4, 16, [1, 2, 4]), (5, 16, [1, 2, 4, 5]),
    (8, 16, [1, 2, 4, 8]), (9, 16, [1, 2, 4, 8, 9]), (16, 16, [1, 2, 4, 8, 16]), (8, 3, [1, 2, 3]), (4, 1, [1])])
def test_rounds_reach_every_power_of_two_up_to_max_active(max_active, max_sessions, rounds):
    assert warmup_rounds(ServeOptions(max_active=max_active, max_sessions=max_sessions)) == rounds


def health(server):
    with urllib.request.urlopen(server.url + "/health") as response:
        return json.loads(response.read())


async def spoken_turn(server, seconds):
    """A client's spoken turn (0.5 s frames, ended explicitly); the answer's audio samples."""
    from demo_media import speech_like

    client = await VoiceClient.connect(server)
    try:
        await client.send({"type": "config", "vad": False})
        await client.until("config.done")
        clip = speech_like(seconds, 16000, seed=5)
        for start in range(0, len(clip), 8000):
            await client.send(pcm16(clip[start:start + 8000]))
        await client.send({"type": "end"})
        return (await client.until("response.done"))[-1]["audio_samples"]
    finally:
        await client.close()


def graphs_met(server, seconds):
    """Graphs the server loaded or compiled for a spoken turn of `seconds`."""
    before = health(server)["graphs"]
    assert asyncio.run(spoken_turn(server, seconds)) > 0
    return health(server)["graphs"] - before


def test_a_warmed_up_server_meets_no_graph_at_its_first_clients_turns(tiny_checkpoint):
    from mindone_ext.serve.process import ServerProcess

    args = [x for name, value in LIMITS.items() for x in (f"--{name}", value)]
    with ServerProcess(tiny_checkpoint, "--api_key", API_KEY, *args) as server:
        log = "".join(server.log)
        assert "warmed up in " in log and ": 1 answers at once, " in log, log
        state = health(server)
        assert state["graphs"] > 0 and (state["sessions"], state["active"], state["caches"]) == (0, 0, 0), state
        # the warm-up's turns, counted by what the model thread did (the default engine is batched)
        busy = state["busy_seconds"]
        assert set(busy) == set(BUSY_KINDS) and min(busy["prefills"], busy["decode"], busy["token2wav"]) > 0, busy
        # questions of one, two and three audio encoder windows, the first client's first
        assert [graphs_met(server, seconds) for seconds in (1.3, 3.0, 5.0)] == [0, 0, 0]
    with ServerProcess(tiny_checkpoint, "--api_key", API_KEY, "--no_warmup", *args) as server:
        assert "warm" not in "".join(server.log) and health(server)["graphs"] == 0
        assert graphs_met(server, 1.3) > 10  # the control: without the warm-up, the first turn builds them


def test_limits_the_warmup_turn_does_not_fit_refuse_the_start_in_one_line(tiny_checkpoint):
    from mindone_ext.serve.process import ServerProcess

    with pytest.raises(RuntimeError, match="exited before serving") as refused:
        ServerProcess(tiny_checkpoint, "--no_audio_output", "--max_context_tokens", 200)
    output = str(refused.value)
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in output, output
    assert errors == ["error: the warm-up's spoken turn (5 s of audio and an answer of up to 16 tokens) does not fit "
                      "in --max_context_tokens 200: raise it, or serve without the warm-up (--no_warmup); not serving"]


# At once, Python's handler takes Ctrl-C; two seconds in, graphs have run, and MindSpore's handler
# turns it into SIGTERM (its graph runs install one; that case killed the process, exit -15)
@pytest.mark.parametrize("delay", [0.0, 2.0], ids=["at_once", "after_graphs_ran"])
def test_ctrl_c_during_the_warmup_ends_the_start_in_one_line(tiny_checkpoint, delay):
    import signal
    import subprocess
    import sys
    import time

    server = subprocess.Popen([sys.executable, "-m", "mindone_ext.serve", "--model_path", str(tiny_checkpoint),
                               "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in server.stdout:
            lines.append(line)
            if line.startswith("warming up"):
                time.sleep(delay)
                server.send_signal(signal.SIGINT)
                break
        output = "".join(lines) + server.stdout.read()
        assert server.wait(60) == 1, output
    finally:
        server.kill()
    assert output.rstrip().endswith("interrupted before serving") and "Traceback" not in output, output
    assert "serving on" not in output


def test_a_warmup_cancelled_during_its_answer_stops_the_answer_before_its_conversation_closes(tiny_checkpoint,
                                                                                              processor):
    """Ctrl-C during the warm-up cancels it: its answer stops before its conversation's cache rows are
    freed (they were freed under the running answer, and the engine's stop then failed closing it:
    a traceback in a loaded CI run), and nothing is left running or held."""
    from mindone_ext import Qwen2_5OmniForConditionalGeneration
    from mindone_ext.serve.engine import Engine
    from mindone_ext.serve.warmup import warm_up

    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(tiny_checkpoint)
    runners = (model.thinker_runner(), model.talker_runner())

    async def scenario():
        engine = Engine(max_active=1, max_queue=0, batched=True)
        try:
            warming = asyncio.ensure_future(warm_up(engine, model, processor, ServeOptions(max_active=1)))
            while not engine.load()["active"]:  # the warm-up's answer is being made
                await asyncio.sleep(0.005)
            warming.cancel()
            with pytest.raises(asyncio.CancelledError):
                await warming
            return engine.load(), await engine.call(lambda: [runner.caches_in_use() for runner in runners])
        finally:
            engine.stop()
            assert not engine.thread.is_alive()

    load, caches = asyncio.run(scenario())
    assert load == {"active": 0, "queued": 0} and caches == [0, 0]
