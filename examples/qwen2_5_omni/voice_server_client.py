"""Talk to a voice server: send a spoken question, save the spoken answer.

    python examples/qwen2_5_omni/voice_server_client.py     # a generated question; a server on the
                                                            # bundled checkpoint if none is running
    python -m mindone_ext.serve --model_path /models/Qwen2.5-Omni-7B &
    python examples/qwen2_5_omni/voice_server_client.py --audio question.wav --output answer.wav

The smallest use of the WebSocket protocol (docs/voice_service.md): the question is decoded
with FFmpeg (any format), sent as 16 kHz 16-bit mono PCM in 0.5 s frames, and the turn is ended
with an explicit "end" (the server's voice activity detection is switched off, so silences in
the file do not cut it). Text deltas are printed as they arrive; the answer's 24 kHz float32 audio
frames are joined and written as 16-bit wav. Needs only aiohttp, PyAV and numpy.
"""
import argparse
import asyncio
import json
import os
import signal
import sys
import wave

import av
import aiohttp
import numpy as np

IN_RATE, OUT_RATE = 16000, 24000
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_URL = "ws://127.0.0.1:8000/v1/voice"


def read_pcm16(path):
    """The file's audio as 16 kHz mono 16-bit little-endian PCM bytes."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=IN_RATE)
    chunks = []
    with av.open(path) as container:
        if not container.streams.audio:
            raise SystemExit(f"{path}: has no audio track")
        for frame in container.decode(audio=0):
            chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(chunks).astype("<i2").tobytes() if chunks else b""


def write_wav(path, samples):
    """16-bit mono, written whole or not at all (an interrupted write leaves no file)."""
    tmp = f"{path}.partial"
    try:
        with wave.open(tmp, "wb") as f:
            f.setnchannels(1)
            f.setsampwidth(2)
            f.setframerate(OUT_RATE)
            f.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class ServerError(RuntimeError):
    def __init__(self, code, message):
        super().__init__(f"server error {code}: {message}")
        self.code = code


async def receive(ws):
    """The next event as a dict; an audio frame as {"type": "audio", "audio": float32 samples}."""
    message = await ws.receive()
    if message.type == aiohttp.WSMsgType.BINARY:
        return {"type": "audio", "audio": np.frombuffer(message.data, "<f4")}
    if message.type != aiohttp.WSMsgType.TEXT:
        raise ConnectionError(f"the server closed the connection ({message.type.name} {message.data})")
    event = json.loads(message.data)
    if event["type"] == "error":
        raise ServerError(event["code"], event["message"])
    return event


async def start(ws, config):
    """After connecting: the server's hello, then our settings (voice activity detection off:
    the turn ends when we say so)."""
    await receive(ws)  # ready
    await ws.send_str(json.dumps({"type": "config", "vad": False, **config}))
    await receive(ws)  # config.done


async def speak_turn(ws, pcm, frame_seconds=0.5, on_text=None, on_audio=None, on_end=None, realtime=False):
    """One spoken turn: returns (the answer's text, its float32 24 kHz audio). The callbacks see
    each text delta, each audio chunk, and the moment the turn's "end" was sent. `realtime`: each
    frame is sent once it would have been spoken (after its duration), as a microphone's are;
    else all at once, as from a file."""
    step = int(frame_seconds * IN_RATE) * 2
    for offset in range(0, len(pcm), step):
        frame = pcm[offset:offset + step]
        if realtime:
            await asyncio.sleep(len(frame) / 2 / IN_RATE)
        await ws.send_bytes(frame)
    await ws.send_str(json.dumps({"type": "end"}))
    if on_end:
        on_end()
    text, audio = [], []
    while True:
        event = await receive(ws)
        if event["type"] == "audio":
            audio.append(event["audio"])
            if on_audio:
                on_audio(event["audio"])
        elif event["type"] == "text":
            text.append(event["delta"])
            if on_text:
                on_text(event["delta"])
        elif event["type"] == "response.done":
            return "".join(text), np.concatenate(audio) if audio else np.zeros(0, np.float32)


async def converse(url, pcm, config, api_key=None, on_text=None):
    """Connect, speak one turn, return (text, audio)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with aiohttp.ClientSession() as http, http.ws_connect(url, headers=headers) as ws:
        await start(ws, config)
        return await speak_turn(ws, pcm, on_text=on_text)


def printable(text):
    """Control characters (random weights produce them) as escapes; this client needs only
    aiohttp, av and numpy, so it keeps its own copy of common.printable."""
    return "".join(c if c.isprintable() or c in "\n\t" else c.encode("unicode_escape").decode() for c in text)


def demo_question():
    """A generated speech-like clip (demo_media.py beside), for a run with no --audio."""
    import tempfile

    sys.path.insert(0, HERE)
    from demo_media import speech_like, write_wav as write_demo_wav

    path = os.path.join(tempfile.gettempdir(), "mindone_ext_voice_client_question.wav")
    write_demo_wav(path, speech_like(2.0, IN_RATE), IN_RATE)
    return path


def bundled_server():
    """A server on the bundled tiny checkpoint, for a run with no --url and nothing listening
    on the default one (needs mindone_ext installed; short answers: its weights are random)."""
    try:
        from mindone_ext.serve.process import ServerProcess
    except ImportError:
        sys.exit(f"error: no server at {DEFAULT_URL}; start one first: python -m mindone_ext.serve --model_path "
                 "examples/qwen2_5_omni/tiny-qwen2.5-omni")
    print(f"no server at {DEFAULT_URL}: starting one on the bundled checkpoint ...", flush=True)
    # one question: a warm-up would only add its own answers before it
    return ServerProcess(os.path.join(HERE, "tiny-qwen2.5-omni"), "--max_new_tokens", 16,
                         "--talker_max_new_tokens", 50, "--no_warmup")


async def listening(url):
    try:
        async with aiohttp.ClientSession() as http, http.ws_connect(url):
            return True
    except (aiohttp.ClientError, OSError):
        return False


INTERRUPTED = []  # a Ctrl-C came (see interrupt)


def interrupt(signum, frame):
    """Ctrl-C: noted, then raised as Python does. asyncio.run's own handler would cancel the turn
    instead, and a connection that ended first (a server this client started, in the same
    terminal group, got the Ctrl-C too) would be reported as an error."""
    INTERRUPTED.append(signum)
    raise KeyboardInterrupt


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help=f"the server's voice endpoint (default: {DEFAULT_URL}, or a "
                    "server started on the bundled checkpoint when nothing listens there)")
    ap.add_argument("--audio", default=None, help="the spoken question (any format FFmpeg reads); default: a "
                    "generated clip")
    ap.add_argument("--output", default="answer.wav")
    ap.add_argument("--api_key", default=os.environ.get("MINDONE_API_KEY"))
    ap.add_argument("--speaker", default=None)
    ap.add_argument("--seed", type=int, default=None, help="fixes the answer's sampling and voice noise")
    ap.add_argument("--max_new_tokens", type=int, default=None)
    ap.add_argument("--talker_max_new_tokens", type=int, default=None)
    args = ap.parse_args()
    if args.audio is not None and not os.path.isfile(args.audio):
        sys.exit(f"error: --audio {args.audio}: file not found")
    audio_path = args.audio or demo_question()
    server = None
    if args.url is None and not asyncio.run(listening(DEFAULT_URL)):
        server = bundled_server()
    url = args.url or (server.url.replace("http", "ws", 1) + "/v1/voice" if server else DEFAULT_URL)
    config = {k: v for k in ("speaker", "seed", "max_new_tokens", "talker_max_new_tokens")
              if (v := getattr(args, k)) is not None}
    print("assistant: ", end="", flush=True)
    try:
        _, audio = asyncio.run(converse(url, read_pcm16(audio_path), config, args.api_key,
                                        on_text=lambda delta: print(printable(delta), end="", flush=True)))
    except (ServerError, ConnectionError, aiohttp.ClientError, av.error.FFmpegError) as e:
        if INTERRUPTED:  # Ctrl-C reached the server it started too: its connection ended first
            raise KeyboardInterrupt from None
        print()
        sys.exit(f"error: {e}")
    finally:
        if server is not None:
            server.stop()
    print()
    write_wav(args.output, audio)
    print(f"speech: {len(audio) / OUT_RATE:.2f} s at {OUT_RATE} Hz -> {args.output}")


def end_on_interrupt(main):
    """Run `main`; Ctrl-C ends it with one line, as a shell expects (a server it started is
    stopped by main's own cleanup), and exit status 130 at once: at the interpreter's teardown
    what the Ctrl-C cut short (an event loop caught half built, a turn's coroutine not yet
    started) would print its finalisers' complaints after that line."""
    signal.signal(signal.SIGINT, interrupt)
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)


if __name__ == "__main__":
    end_on_interrupt(main)
