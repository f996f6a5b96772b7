"""A small WebSocket client for the tests: JSON events and binary audio frames, in order."""
import asyncio
import json

import aiohttp
import numpy as np

from tests.serve.conftest import API_KEY


class VoiceClient:
    def __init__(self, http, ws):
        self.http, self.ws = http, ws
        self.audio = []  # binary frames since the last take_audio(), float32

    @classmethod
    async def connect(cls, server, key=API_KEY, headers=None, **kwargs):
        http = aiohttp.ClientSession()
        try:
            ws = await http.ws_connect(server.ws_url, headers={"Authorization": f"Bearer {key}", **(headers or {})},
                                       **kwargs)
        except BaseException:
            await http.close()
            raise
        client = cls(http, ws)
        assert (await client.event())["type"] == "ready"
        return client

    async def send(self, message):
        if isinstance(message, bytes):
            await self.ws.send_bytes(message)
        else:
            await self.ws.send_str(message if isinstance(message, str) else json.dumps(message))

    async def event(self, timeout=120, audio_too=False):
        """The next JSON event (binary frames on the way are kept in self.audio); with `audio_too`,
        a binary frame returns {"type": "audio"}."""
        while True:
            message = await self.ws.receive(timeout=timeout)
            if message.type == aiohttp.WSMsgType.BINARY:
                self.audio.append(np.frombuffer(message.data, "<f4"))
                if audio_too:
                    return {"type": "audio"}
                continue
            if message.type != aiohttp.WSMsgType.TEXT:  # the code the server sent, else the connection's
                code = message.data if message.type == aiohttp.WSMsgType.CLOSE else self.ws.close_code
                return {"type": "closed", "code": code, "message": message.extra}
            return json.loads(message.data)

    async def until(self, kind, timeout=300):
        """Events up to and including the first of type `kind` (an error on the way fails the test
        unless `kind` is "error")."""
        seen = []
        async with asyncio.timeout(timeout):
            while True:
                event = await self.event(audio_too=kind == "audio")
                seen.append(event)
                if event["type"] == kind:
                    return seen
                assert event["type"] not in ("error", "closed"), event

    def take_audio(self):
        audio, self.audio = self.audio, []
        return np.concatenate(audio) if audio else np.zeros(0, np.float32)

    async def close(self):
        await self.ws.close()
        await self.http.close()


def as_pcm16(samples):
    return (np.clip(samples, -1, 1) * 32767).astype("<i2")


def pcm16(samples):
    return as_pcm16(samples).tobytes()
