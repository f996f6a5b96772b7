"""The server against clients that mean harm or make mistakes: other web pages, malformed and
oversized requests, media bombs, turns that fail, clients that vanish. Each gets a clear error
and the server goes on, answering the next request as if nothing happened."""
import asyncio
import base64
import io
import json
import socket

import aiohttp
import numpy as np
import pytest

from mindone_ext.utils.audio import speech_like
from tests.hostile_media import flac_silence, png_declaring, wav_declaring
from tests.serve.conftest import API_KEY, LIMITS
from tests.serve.test_voice_service import chat
from tests.serve.wsclient import VoiceClient, pcm16

AUTH = {"Authorization": f"Bearer {API_KEY}"}
HELLO = {"role": "user", "content": "hi"}


async def _status(http, method, url, **kwargs):
    async with http.request(method, url, **kwargs) as response:
        return response.status, await response.json(content_type=None)


async def _origins_hosts_and_content_types(server):
    async with aiohttp.ClientSession() as http:
        # another site's page driving the server from a visitor's browser
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(server.ws_url, headers={**AUTH, "Origin": "http://evil.example"})
        assert refused.value.status == 403
        status, body = await _status(http, "POST", server.url + "/v1/chat/completions", json={"messages": [HELLO]},
                                     headers={**AUTH, "Origin": "http://evil.example"})
        assert status == 403 and body["error"]["code"] == "origin_not_allowed"
        # a form or text/plain POST needs no preflight in a browser: refused
        status, body = await _status(http, "POST", server.url + "/v1/chat/completions",
                                     data=json.dumps({"messages": [HELLO]}), headers={**AUTH, "Content-Type": "text/plain"})
        assert status == 415 and "application/json" in body["error"]["message"]
        # a DNS-rebound name for the loopback server
        status, body = await _status(http, "GET", server.url + "/v1/models", headers={**AUTH, "Host": "evil.example"})
        assert status == 403 and body["error"]["code"] == "host_not_allowed"
    # the server's own page (same origin) is welcome
    client = await VoiceClient.connect(server, headers={"Origin": server.url})
    await client.close()


def test_other_web_pages_cannot_drive_the_server(server):
    asyncio.run(_origins_hosts_and_content_types(server))


def _raw_request(server, head):
    """Bytes sent as they are (a client library would refuse to send them); the status line back."""
    host, port = server.url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head)
        return s.recv(65536).split(b"\r\n")[0]


def test_a_body_declared_over_the_limit_is_refused_before_it_is_sent(server):
    # headers only: a server that read the body first would wait for a terabyte (socket timeout)
    line = _raw_request(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                                + API_KEY.encode() + b"\r\nContent-Type: application/json\r\n"
                                b"Content-Length: 1000000000000\r\nConnection: close\r\n\r\n")
    assert line.startswith(b"HTTP/1.1 413"), line


def test_malformed_requests_get_4xx_never_500(server):
    deep = "[" * 100000 + "]" * 100000
    for body, words in [(deep, "nested too deeply"), ("1e999999", None), ('{"messages": [' + "{}," * 3 + "{}]}", None)]:
        raw = body.encode()
        line = _raw_request(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                    b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Type: application/json"
                                    b"\r\nContent-Length: " + str(len(raw)).encode() + b"\r\nConnection: close\r\n\r\n"
                            + raw)
        assert line.startswith(b"HTTP/1.1 400"), (body[:40], line)
    # an Authorization header that is not text
    line = _raw_request(server, b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \xff\xfe\x80"
                                b"\r\nConnection: close\r\n\r\n")
    assert line.startswith(b"HTTP/1.1 401"), line
    wrong_types = [
        {"messages": [HELLO], "modalities": ["text", "audio"], "audio": {"voice": 123}},
        {"messages": [HELLO], "modalities": "audio"},
        {"messages": [HELLO], "modalities": [["text"]]},
        {"messages": [HELLO], "audio": "Ethan"},
        {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": "abc"}]}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": 5}]}]},
        {"messages": [{"role": "user", "content": [5]}]},
        {"messages": [{"role": "user", "content": ["hello"]}]},
        {"messages": [HELLO], "max_tokens": "ten"},
        {"messages": [HELLO], "model": ["m"]},
        {"messages": [{"role": "assistant", "audio": {"id": "audio_unknown"}}, HELLO]},
    ]
    for body in wrong_types:
        got, answer = chat(server, body)
        assert got == 400 and answer["error"]["message"], (body, answer)


@pytest.mark.parametrize("field, value", [
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("stop", ["\n"]),
    ("response_format", {"type": "json_object"}), ("logprobs", True), ("frequency_penalty", 0.5),
    ("logit_bias", {"1": 5}), ("functions", [{"name": "f"}]), ("not_a_field", 1)])
def test_what_is_not_implemented_is_refused_not_ignored(server, field, value):
    got, answer = chat(server, {"messages": [HELLO], "max_tokens": 2, field: value})
    assert got == 400 and answer["error"]["param"] == field and field in answer["error"]["message"], answer


def test_fields_that_change_nothing_are_accepted(server):
    got, answer = chat(server, {"messages": [HELLO], "max_tokens": 2, "user": "u1", "metadata": {"k": "v"},
                                "stop": None, "logprobs": False, "response_format": {"type": "text"}})
    assert got == 200, answer


def test_models_endpoints_and_unknown_paths_answer_like_openai(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY)
    models = client.models.list().data
    assert len(models) == 1 and models[0].created > 0
    assert client.models.retrieve(models[0].id).id == models[0].id
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-nothing")
    assert missing.value.body["code"] == "model_not_found"

    async def unknown_path():
        async with aiohttp.ClientSession() as http:
            return await _status(http, "GET", server.url + "/v1/nothing", headers=AUTH)

    status, body = asyncio.run(unknown_path())
    assert status == 404 and body["error"]["type"] == "invalid_request_error"


def test_a_spoken_answer_is_referred_to_by_its_audio_id(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY)
    question = [{"role": "user", "content": "Say hello."}]
    first = client.chat.completions.create(model="m", messages=question, modalities=["text", "audio"],
                                           audio={"voice": "Ethan", "format": "wav"}, max_completion_tokens=4,
                                           seed=0, extra_body={"talker_max_new_tokens": 10})
    audio = first.choices[0].message.audio
    follow = [{"role": "user", "content": "And then?"}]
    by_id = client.chat.completions.create(model="m", max_tokens=2, messages=question + [
        {"role": "assistant", "audio": {"id": audio.id}}] + follow)
    by_text = client.chat.completions.create(model="m", max_tokens=2, messages=question + [
        {"role": "assistant", "content": audio.transcript}] + follow)
    assert audio.transcript and by_id.usage.prompt_tokens == by_text.usage.prompt_tokens
    assert by_id.choices[0].message.content == by_text.choices[0].message.content


def test_media_bombs_are_refused_before_they_are_decoded(server):
    before = server.rss_mb()
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    cases = [
        (audio_message(b64(wav_declaring(1, 8000))), "sample rate of 1 Hz"),
        (audio_message(b64(flac_silence(1))), "longer than"),
        (image_message(b64(png_declaring(20000, 20000))), "pixels allowed"),
    ]
    for message, words in cases:
        got, answer = chat(server, {"messages": [message], "max_tokens": 2})
        assert got == 400 and words in answer["error"]["message"], answer
    assert server.rss_mb("VmHWM") - before < 300, "a bomb was decoded"


def audio_message(data):
    return {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}]}


def image_message(data):
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}]}


async def _turns_that_fail(server, processor):
    client = await VoiceClient.connect(server)
    await client.send({"type": "config", "vad": False, "modalities": ["text"], "max_new_tokens": 4})
    await client.until("config.done")
    # a spoken turn ending one feature frame past an encoder window (it once crashed and broke the
    # conversation for good): answered
    window = 2 * 10 * processor.feature_extractor.hop_length  # the tiny checkpoint's n_window is 10
    await client.send(pcm16(0.1 * np.sin(np.arange(3 * window + 160) / 7.0)))
    await client.send({"type": "end"})
    await client.until("response.done")
    # a typed turn far longer than the conversation may hold: refused at once, nothing prefilled
    await client.send({"type": "text", "text": "word " * 2000})
    event = await client.event(timeout=30)
    assert event["code"] == "conversation_full", event
    # and the conversation goes on, with what it held before
    await client.send({"type": "text", "text": "Still there?"})
    done = (await client.until("response.done"))[-1]
    assert done["text"] is not None
    await client.close()


def test_a_failed_turn_is_dropped_and_the_conversation_goes_on(server, processor):
    asyncio.run(_turns_that_fail(server, processor))


async def _turn_in_frames(server, samples, frame):
    """The greedy text answer to one spoken turn sent in binary frames of `frame` samples."""
    client = await VoiceClient.connect(server)
    await client.send({"type": "config", "vad": False, "modalities": ["text"], "temperature": 0, "max_new_tokens": 4})
    await client.until("config.done")
    data = pcm16(samples)
    for i in range(0, len(data), 2 * frame):
        await client.send(data[i:i + 2 * frame])
    await client.send({"type": "end"})
    done = (await client.until("response.done"))[-1]
    await client.close()
    return done["text"]


@pytest.mark.parametrize("frame", [1, 1601])
def test_a_turn_in_frames_of_any_size_is_answered_as_the_turn_sent_whole(server, frame):
    """A client may send 1-sample frames (19200 for this turn): they reach the model thread in
    pieces of at least 0.1 s, and the turn's answer is the one of the same audio in one frame."""
    samples = speech_like(1.2, 16000, seed=7)
    assert asyncio.run(_turn_in_frames(server, samples, frame)) == asyncio.run(_turn_in_frames(server, samples, len(samples)))


async def _abandoned(server):
    """A non-streaming client that hangs up: its answer is stopped (not finished for nobody)."""
    body = {"messages": [{"role": "user", "content": "Talk for a while."}], "modalities": ["text", "audio"],
            "talker_max_new_tokens": LIMITS["talker_max_new_tokens"]}
    async with aiohttp.ClientSession() as http:
        request = asyncio.create_task(http.post(server.url + "/v1/chat/completions", json=body, headers=AUTH))
        async with asyncio.timeout(120):
            while (await _status(http, "GET", server.url + "/health"))[1]["active"] == 0:
                await asyncio.sleep(0.1)
        request.cancel()  # the client goes away mid-answer
        # stopped at its next step: seconds (a minute on a loaded machine), where finishing the
        # answer for nobody takes over 220 s
        async with asyncio.timeout(60):
            while (await _status(http, "GET", server.url + "/health"))[1]["active"]:
                await asyncio.sleep(0.2)


def test_an_abandoned_answer_stops(server):
    asyncio.run(_abandoned(server))


async def _hostile_round(server, processor):
    """Every kind of bad request once; returns the statuses/codes got (none may be 5xx/internal)."""
    got = []
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    bodies = [{"messages": [HELLO], "modalities": "audio"}, {"messages": [{"role": "user", "content": [5]}]},
              {"messages": [HELLO], "tools": [{"type": "function"}]}, {"messages": [audio_message(b64(
                  wav_declaring(1, 8000)))]}, {"messages": [image_message(b64(png_declaring(20000, 20000)))]},
              {"messages": [{"role": "user", "content": "y" * 20000}]}]
    async with aiohttp.ClientSession() as http:
        url = server.url + "/v1/chat/completions"
        for body in bodies:
            got.append((await _status(http, "POST", url, json=body, headers=AUTH))[0])
        for data, headers in [("{oops", {"Content-Type": "application/json"}), ("[" * 50000, {"Content-Type":
                              "application/json"}), ("{}", {"Content-Type": "text/plain"}),
                              ("{}", {"Content-Type": "application/json", "Origin": "http://evil.example"})]:
            got.append((await _status(http, "POST", url, data=data, headers={**AUTH, **headers}))[0])
        got.append((await _status(http, "POST", url, data=bytes(LIMITS.get("max_request_bytes", 33 << 20) + 1),
                                  headers={**AUTH, "Content-Type": "application/json"}))[0])
    client = await VoiceClient.connect(server)
    for message in ["{not json", {"type": "config", "speaker": [1]}, {"type": "config", "modalities": 7},
                    {"type": "text", "text": "z" * 20000}, b"\x01"]:
        await client.send(message)
        got.append((await client.event())["code"])
    await client.close()
    return got


def test_a_hostile_run_leaves_the_server_as_it_was(server, processor):
    rounds, rss = [], [server.rss_mb()]
    for _ in range(3):
        rounds.append(asyncio.run(_hostile_round(server, processor)))
        rss.append(server.rss_mb())
    print(json.dumps({"hostile_requests_per_round": len(rounds[0]), "rss_mb": rss}))
    assert rounds[0] == rounds[1] == rounds[2]
    assert all(isinstance(code, str) or 400 <= code < 500 for code in rounds[0]), rounds[0]
    assert "internal" not in rounds[0] and "generation_failed" not in rounds[0]
    assert rss[-1] - rss[1] < 32, rss  # after the first round (which may compile), nothing accumulates
    assert chat(server, {"messages": [HELLO], "max_tokens": 2})[0] == 200  # and it still answers


def test_an_image_over_the_servers_pixel_limit_is_refused_from_its_header(server):
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (4200, 4100)).save(out, "PNG")  # a real, complete image: 17 million pixels, ~50 KB
    got, answer = chat(server, {"messages": [image_message(base64.b64encode(out.getvalue()).decode())],
                                "max_tokens": 2})
    assert got == 400 and "4200 x 4100 is more than the 16777216 pixels allowed" in answer["error"]["message"]
