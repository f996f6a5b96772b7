"""The voice service end to end, on a real server process: the example client's answer equals
generate_stream's, OpenAI's own client streams text and speech, barge-in and the stop button
cancel an answer within a chunk, and bad input gets a clear error while the server goes on."""
import asyncio
import base64
import io
import json
import os
import re
import subprocess
import sys
import time
import wave

import aiohttp
import numpy as np
import pytest

from mindone_ext.models.qwen2_5_omni.session import SYSTEM_PROMPT
from mindone_ext.models.qwen2_5_omni.streaming import AudioChunk, TextDelta
from tests.conftest import ROOT
from tests.serve.conftest import API_KEY, LIMITS
from tests.serve.wsclient import VoiceClient, as_pcm16, pcm16

CLIENT = f"{ROOT}/examples/qwen2_5_omni/voice_server_client.py"


def expected_stream(model, processor, conversation, **kwargs):
    """(text, float32 waveform) of generate_stream on the conversation, as the processor prepares it."""
    from mindone_ext import process_mm_info

    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    audios, _, _ = process_mm_info(conversation)
    events = list(model.generate_stream(tokenizer=processor.tokenizer, **processor(text, audio=audios), **kwargs))
    chunks = [e.audio for e in events if isinstance(e, AudioChunk)]
    return "".join(e.text for e in events if isinstance(e, TextDelta)), np.concatenate(chunks)


def test_cli_client_answer_equals_generate_stream(server, our_model, processor, tmp_path, monkeypatch):
    from common import printable
    from demo_media import speech_like, write_wav
    from transformers.models.whisper import feature_extraction_whisper

    # the server runs transformers without torch, as users install it: the question's Whisper
    # features come from the extractor's numpy code (utils/without_torch.py); here too
    monkeypatch.setattr(feature_extraction_whisper, "is_torch_available", lambda: False)

    question, answer = tmp_path / "question.wav", tmp_path / "answer.wav"
    write_wav(str(question), speech_like(1.3, 16000, seed=3), rate=16000)
    done = subprocess.run([sys.executable, CLIENT, "--url", server.ws_url, "--api_key", API_KEY, "--audio",
                           str(question), "--output", str(answer), "--seed", "0", "--max_new_tokens", "8",
                           "--talker_max_new_tokens", "30"], capture_output=True, timeout=600,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    printed = re.search(r"assistant: (.*)\nspeech: ", done.stdout.decode(), re.S).group(1)
    conversation = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
                    {"role": "user", "content": [{"type": "audio", "audio": str(question)}]}]
    text, waveform = expected_stream(our_model, processor, conversation, spk="Chelsie", seed=0, max_new_tokens=8,
                                     talker_max_new_tokens=30)
    assert printed == printable(text)
    with wave.open(str(answer)) as f:
        assert (f.getframerate(), f.getnchannels()) == (24000, 1)
        got = np.frombuffer(f.readframes(f.getnframes()), "<i2")
    assert got.shape == waveform.shape and len(got) > 0
    # the client writes 16-bit samples: equal to the reference waveform's, to the rounding of the last bit
    assert np.abs(got.astype(np.int32) - as_pcm16(waveform)).max() <= 1


def test_cli_client_runs_as_is(tmp_path):
    """No arguments: a generated question, and a server started on the bundled checkpoint when
    nothing listens on the default address."""
    import socket

    with socket.socket() as probe:
        default_taken = probe.connect_ex(("127.0.0.1", 8000)) == 0  # a developer's own server, say
    done = subprocess.run([sys.executable, CLIENT], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "speech:" in done.stdout
    assert default_taken or "starting one on the bundled checkpoint" in done.stdout
    with wave.open(str(tmp_path / "answer.wav")) as f:
        assert (f.getframerate(), f.getnchannels()) == (24000, 1) and f.getnframes() > 0


class RecordingSocket:
    """A WebSocket that records when each frame was sent and answers every turn at once."""

    def __init__(self):
        self.sent = []

    async def send_bytes(self, data):
        self.sent.append((time.monotonic(), len(data)))

    async def send_str(self, data):
        self.sent.append((time.monotonic(), json.loads(data)["type"]))

    async def receive(self):
        return aiohttp.WSMessage(aiohttp.WSMsgType.TEXT, json.dumps({"type": "response.done"}), None)


@pytest.mark.parametrize("realtime", [False, True])
def test_a_client_speaking_in_real_time_sends_each_frame_once_it_is_spoken(realtime):
    """bench/serve_load.py's --pace realtime: the example client's frames leave as a microphone
    gives them (frame n once n + 1 frames' duration has passed; the last, short one after its own
    length), then "end"; else all at once."""
    from voice_server_client import speak_turn

    socket, pcm = RecordingSocket(), bytes(2 * 16000 * 45 // 100)  # 0.45 s: 4 frames of 0.1 s and one of 0.05
    began = time.monotonic()
    assert asyncio.run(speak_turn(socket, pcm, frame_seconds=0.1, realtime=realtime))[0] == ""
    assert [what for _, what in socket.sent] == [3200] * 4 + [1600, "end"]
    sent = [when - began for when, _ in socket.sent]
    if realtime:
        assert all(at >= spoken - 0.005 for at, spoken in zip(sent, (0.1, 0.2, 0.3, 0.4, 0.45, 0.45))), sent
    else:
        assert sent[-1] < 0.1, sent


def test_openai_client_streams_text_and_speech(server, our_model, processor):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY)
    stream = client.chat.completions.create(
        model="qwen2.5-omni", messages=[{"role": "user", "content": "Say hello."}], modalities=["text", "audio"],
        audio={"voice": "Ethan", "format": "pcm16"}, stream=True, seed=1, max_completion_tokens=6,
        stream_options={"include_usage": True}, extra_body={"talker_max_new_tokens": 20})
    transcript, pcm, finish, usage = [], [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            audio = getattr(choice.delta, "audio", None)
            if audio is not None:  # a typed object in newer SDKs, a dict in older ones
                audio = audio if isinstance(audio, dict) else audio.model_dump()
                transcript.append(audio.get("transcript") or "")
                if audio.get("data"):
                    pcm.append(np.frombuffer(base64.b64decode(audio["data"]), "<i2"))
            finish = choice.finish_reason or finish
    conversation = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
                    {"role": "user", "content": [{"type": "text", "text": "Say hello."}]}]
    text, waveform = expected_stream(our_model, processor, conversation, spk="Ethan", seed=1, max_new_tokens=6,
                                     talker_max_new_tokens=20)
    assert "".join(transcript) == text
    got = np.concatenate(pcm)
    assert got.shape == waveform.shape and np.abs(got.astype(np.int32) - as_pcm16(waveform)).max() <= 1
    assert usage.completion_tokens == 6 and finish in ("stop", "length")
    # whole, text only: the same text as generate()
    reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Say hello."}],
                                           max_tokens=5)
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Say hello."}]}],
                                           add_generation_prompt=True, tokenize=False)
    inputs = processor(prompt)
    ids = our_model.generate(**inputs, max_new_tokens=5, return_audio=False)[0, inputs["input_ids"].shape[1]:]
    assert reply.choices[0].message.content == processor.tokenizer.decode(ids, skip_special_tokens=True)


def test_openai_client_sends_real_speech_and_a_picture(server, our_model, processor, tmp_path):
    """A spoken question (espeak-ng, 22.05 kHz WAV) and a picture (ffmpeg's test card, PNG) through
    OpenAI's client: the answer is generate's on the same files as process_mm_info reads them (the
    server encodes the audio in parts, ~3 s of it in 5 parts on the tiny model; generate, whole)."""
    import openai

    from tests.reference_media import real_media

    assert not real_media.missing_tools(), "apt-get install espeak-ng sox ffmpeg"
    question = real_media.speech(str(tmp_path), "What is in this picture? Tell me quickly, please.")
    picture = real_media.image(str(tmp_path / "card.png"), 160, 120, "rgb24")
    with wave.open(question) as f:
        assert 3.0 < f.getnframes() / f.getframerate() < LIMITS["max_audio_seconds"]
    data = {name: base64.b64encode(open(path, "rb").read()).decode() for name, path in (("wav", question),
                                                                                        ("png", picture))}
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY)
    reply = client.chat.completions.create(model="m", max_tokens=8, seed=0, messages=[{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": data["wav"], "format": "wav"}},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data['png']}"}}]}])
    from mindone_ext import process_mm_info

    conversation = [{"role": "user", "content": [{"type": "audio", "audio": question},
                                                 {"type": "image", "image": picture}]}]
    audios, images, _ = process_mm_info(conversation)
    inputs = processor(processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False),
                       audio=audios, images=images)
    assert inputs["feature_attention_mask"].sum() > 4 * 80  # five parts of at most 80 frames
    ids = our_model.generate(**inputs, max_new_tokens=8, seed=0, return_audio=False)[0, inputs["input_ids"].shape[1]:]
    assert reply.choices[0].message.content == processor.tokenizer.decode(ids, skip_special_tokens=True)
    assert reply.usage.prompt_tokens == inputs["input_ids"].shape[1]


def test_the_docs_openai_example_runs_as_written(server, our_model, processor, tmp_path):
    """docs/voice_service.md's OpenAI example, as a user copies it (the server's address and key
    filled in), on a spoken question made by espeak-ng: it prints the answer's text, generate's
    on the same conversation, and writes its speech as a 24 kHz WAV."""
    from mindone_ext import process_mm_info
    from tests.reference_media import real_media

    assert not real_media.missing_tools(), "apt-get install espeak-ng sox ffmpeg"
    with open(os.path.join(ROOT, "docs", "voice_service.md")) as f:
        (code,) = re.findall(r"^```python\n(.*?)^```", f.read(), re.S | re.M)
    for placeholder, value in (('"http://127.0.0.1:8000/v1"', repr(server.url + "/v1")), ('"KEY"', repr(API_KEY))):
        assert placeholder in code, f"the example no longer holds {placeholder}"
        code = code.replace(placeholder, value)
    question = real_media.speech(str(tmp_path), "What is the capital of France?", name="question.wav")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        g = {"__name__": "__main__"}
        exec(compile(code, "docs/voice_service.md", "exec"), g)
    finally:
        os.chdir(cwd)
    conversation = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
                    {"role": "user", "content": [{"type": "audio", "audio": question},
                                                 {"type": "text", "text": "Answer the question in the recording."}]}]
    audios, _, _ = process_mm_info(conversation)
    inputs = processor(processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False),
                       audio=audios)
    ids = our_model.generate(**inputs, max_new_tokens=LIMITS["max_new_tokens"], return_audio=False)
    assert "".join(g["transcript"]) == processor.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:],
                                                                   skip_special_tokens=True)
    with wave.open(str(tmp_path / "answer.wav")) as f:
        assert (f.getframerate(), f.getnchannels(), f.getsampwidth()) == (24000, 1, 2)
        assert 0 < f.getnframes() and f.getnframes() % our_model.samples_per_codec_token == 0


async def spoken_turn(server, text, talker_max_new_tokens):
    """A new conversation whose first turn, `text`, has just been sent for a spoken answer (seeded)."""
    client = await VoiceClient.connect(server)
    await client.send({"type": "config", "talker_max_new_tokens": talker_max_new_tokens, "seed": 0})
    await client.until("config.done")
    await client.send({"type": "text", "text": text})
    return client


async def _barge_in(server):
    from demo_media import speech_like

    client = await spoken_turn(server, "Tell me a long story.", 200)
    await client.until("response.start")
    await client.until("audio")  # the answer is being spoken
    chunk = len(client.take_audio())
    await client.send(pcm16(speech_like(0.6, 16000, seed=5)))  # the user talks over it
    cancelled = await client.until("response.cancelled")
    assert cancelled[-1]["reason"] == "barge_in"
    late = len(client.take_audio())
    assert [e["type"] for e in await client.until("speech_started")] == ["speech_started"]
    await client.send(pcm16(np.zeros(16000, np.float32)))  # a second of silence ends the turn
    await client.until("speech_stopped")
    await client.until("response.start")  # the spoken turn is answered...
    await client.send({"type": "cancel"})  # ...until the stop button
    assert (await client.until("response.cancelled"))[-1]["reason"] == "client"
    await client.close()
    return chunk, late


def test_barge_in_and_stop_cancel_the_answer(server):
    chunk, late = asyncio.run(_barge_in(server))
    assert late <= chunk  # what was already in flight when the user spoke: at most one chunk


async def _bad_input(server):
    client = await VoiceClient.connect(server)
    errors = []

    async def refused(message, code):
        await client.send(message)
        event = await client.event()
        assert event["type"] == "error" and event["code"] == code, event
        errors.append(event["message"])

    await refused("{not json", "bad_json")
    await refused("[1, 2]", "bad_message")
    await refused({"type": "shout"}, "bad_message")
    await refused(b"\x01\x02\x03", "bad_audio")
    await refused({"type": "config", "sample_rate": 44100}, "bad_config")
    await refused({"type": "config", "speaker": "Nobody"}, "bad_config")
    await refused({"type": "config", "max_new_tokens": 10 ** 6}, "bad_config")
    await refused({"type": "end"}, "bad_message")
    # a 10-minute upload in frames of the largest allowed size: refused once, the rest dropped
    await client.send({"type": "config", "vad": False, "modalities": ["text"]})
    await client.until("config.done")
    frame = bytes(LIMITS["max_message_bytes"])
    for _ in range(10 * 60 * 16000 * 2 // len(frame)):
        await client.send(frame)
    await client.send({"type": "end"})
    event = await client.event()
    assert event["code"] == "audio_too_long", event
    errors.append(event["message"])
    # and the conversation goes on
    await client.send({"type": "text", "text": "Still there?"})
    done = (await client.until("response.done"))[-1]
    assert done["audio_samples"] == 0
    await client.close()
    return errors


def test_bad_websocket_input_gets_error_frames_and_the_conversation_goes_on(server):
    errors = asyncio.run(_bad_input(server))
    assert "not JSON" in errors[0] and "odd count" in errors[3] and "16000 Hz" in errors[4]
    assert "Nobody" in errors[5] and "at most 5 s" in errors[-1]


async def _limits_and_keys(server):
    # a frame over the size limit closes that connection with 1009 (message too big)
    client = await VoiceClient.connect(server)
    await client.send(bytes(LIMITS["max_message_bytes"] + 2))
    assert (await client.event())["type"] == "closed" and client.ws.close_code == 1009
    await client.close()
    # a wrong key: the WebSocket handshake and HTTP both get 401
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await VoiceClient.connect(server, key="wrong")
    assert refused.value.status == 401
    async with aiohttp.ClientSession() as http:
        async with http.post(server.url + "/v1/chat/completions", json={}) as response:
            assert response.status == 401 and (await response.json())["error"]["code"] == "invalid_api_key"
        for garbage in ("{oops", b"\xff\xfe{}"):  # not JSON; not UTF-8
            async with http.post(server.url + "/v1/chat/completions", data=garbage,
                                 headers={"Authorization": f"Bearer {API_KEY}",
                                          "Content-Type": "application/json"}) as response:
                assert response.status == 400 and "not JSON" in (await response.json())["error"]["message"]
        # a client that goes away mid-answer: its answer stops and its cache is freed
        client = await VoiceClient.connect(server)
        await client.send({"type": "text", "text": "Talk for a while."})
        await client.until("response.start")
        await client.close()
        async with asyncio.timeout(60):
            while True:
                async with http.get(server.url + "/health") as response:
                    health = await response.json()
                if (health["sessions"], health["active"], health["caches"]) == (0, 0, 0):
                    break
                await asyncio.sleep(0.2)
        # a silent client is closed after the idle timeout, with a message
        client = await VoiceClient.connect(server)
        start = time.time()
        event = await client.event(timeout=30)
        assert event["code"] == "idle_timeout" and 7 < time.time() - start < 20
        await client.close()


async def _between_answers(server):
    client = await spoken_turn(server, "Say something.", 20)
    await client.until("response.done")
    async with aiohttp.ClientSession() as http:
        async with http.get(server.url + "/health") as response:
            health = await response.json()
    await client.close()
    return health


def test_a_conversation_between_spoken_answers_holds_its_thinker_row_only(server):
    """The server's memory bound counts a Talker cache per answer in progress, so its
    conversations do not keep theirs between answers (ConversationSession(keep_talker_cache=False))."""
    health = asyncio.run(_between_answers(server))
    assert (health["sessions"], health["active"], health["caches"]) == (1, 0, 1), health


def test_limits_keys_disconnects_and_idle_timeout(server):
    asyncio.run(_limits_and_keys(server))


async def _busy(server):
    """max_active 1, max_queue 1: a third answer at once is refused as busy, the first two go on."""
    clients = [await VoiceClient.connect(server) for _ in range(3)]
    for client in clients:
        await client.send({"type": "text", "text": "Talk for a while."})
    first = await clients[0].event()
    events = [await client.event() for client in clients[1:]]
    assert first["type"] == "response.start"
    assert events[0] == {"type": "queued", "turn": 1, "position": 1}
    assert events[1]["type"] == "error" and events[1]["code"] == "busy" and "busy" in events[1]["message"]
    for client in clients:
        await client.close()


def test_a_full_queue_answers_busy(server):
    asyncio.run(_busy(server))


def chat(server, body, key=API_KEY):
    import urllib.error
    import urllib.request

    request = urllib.request.Request(server.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def audio_part(data):
    return {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}]}


def wav_base64(seconds):
    out = io.BytesIO()
    with wave.open(out, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(16000)
        f.writeframes(bytes(int(seconds * 16000) * 2))
    return base64.b64encode(out.getvalue()).decode()


@pytest.mark.parametrize("body, status, words", [
    ({"messages": "hi"}, 400, "messages must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "hi"}], "modalities": ["text", "audio"], "audio": {"voice": "alloy"}},
     400, "unknown speaker 'alloy'"),
    ({"messages": [audio_part("@@not base64@@")]}, 400, "invalid base64"),
    ({"messages": [audio_part(base64.b64encode(b"RIFF garbage" * 50).decode())]}, 400, "audio"),
    ({"messages": [audio_part(wav_base64(600))]}, 400, "longer than 5 s"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]},
     400, "base64 data URL"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": True, "modalities": ["text", "audio"],
      "audio": {"format": "mp3"}}, 400, "audio.format 'mp3'"),
])
def test_bad_http_requests_get_openai_shaped_errors(server, body, status, words):
    got, answer = chat(server, body)
    assert got == status and words in answer["error"]["message"], answer
