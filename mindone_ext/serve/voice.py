"""One WebSocket conversation: the user's audio in, the answer's text and speech out.

The protocol is in docs/voice_service.md. The conversation (its KV cache included) lives in a
ConversationSession on the model thread; audio is prefilled window by window while the user
speaks, so the answer starts soon after they stop. Whatever goes wrong with one message is
answered with an error frame naming it, and the conversation goes on.
"""
import asyncio
import copy
import json
import logging

import numpy as np
from aiohttp import WSMsgType

from ..models.qwen2_5_omni.session import ConversationFull, ConversationSession, system_turn, typed_turn
from ..models.qwen2_5_omni.streaming import SAMPLE_RATE, AudioChunk, TextDelta
from ..utils.audio import Pieces
from .engine import Busy, Failed, Finished, Started, Stopped, error_id
from .options import AUDIO_IN_RATE, AnswerSettings, BadSetting, wants_audio
from .vad import SpeechStarted, SpeechStopped, TurnDetector

AUDIO_FORMAT = "pcm_s16le"
# audio goes to the model thread in pieces of at least 0.1 s (what the voice page sends): a client
# may send any frame size, and each piece is a call on the model thread, which every conversation shares
FEED_SAMPLES = AUDIO_IN_RATE // 10
log = logging.getLogger(__name__)


class ClientError(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


class VoiceConversation:
    """`preprocess`: (executor, tokenizer) that tokenize the conversation's texts off the model's thread."""

    def __init__(self, ws, engine, model, processor, options, preprocess):
        self.ws, self.engine, self.model, self.processor, self.options = ws, engine, model, processor, options
        self.preprocess = preprocess
        self.settings = AnswerSettings.defaults(options)
        if not model.has_talker:
            self.settings.audio = False
        self.system_prompt = None  # default: the one the released model needs to speak
        self.vad = True
        self.detector = TurnDetector()
        self.session = None
        self.turn_open = False  # the user's audio turn is in the session
        self.turn_mark = 0  # cache length before the open turn: where a dropped turn rewinds to
        self.discarding = False  # the turn grew too long: its audio is dropped until it ends
        self.turn_samples = 0
        self.unfed = Pieces()  # the open turn's audio not yet given to the session
        self.turns = 0
        self.answer = None  # (generation, forwarding task) while an answer streams
        self.send_lock = asyncio.Lock()

    async def send(self, message):
        async with self.send_lock:
            if isinstance(message, bytes):
                await self.ws.send_bytes(message)
            else:
                await self.ws.send_str(json.dumps(message))

    async def error(self, code, message):
        await self.send({"type": "error", "code": code, "message": message})

    # ------------------------------------------------------------------ the connection

    async def run(self):
        await self.send({"type": "ready", "input_sample_rate": AUDIO_IN_RATE, "input_format": AUDIO_FORMAT,
                         "output_sample_rate": SAMPLE_RATE, "output_format": "pcm_f32le",
                         "speakers": sorted(self.model.speakers), "audio_output": self.model.has_talker,
                         "limits": {"max_audio_seconds": self.options.max_audio_seconds,
                                    "max_message_bytes": self.options.max_message_bytes,
                                    "idle_timeout": self.options.idle_timeout,
                                    "max_new_tokens": self.options.max_new_tokens}})
        try:
            while True:
                try:
                    message = await self.ws.receive(timeout=self.options.idle_timeout)
                except asyncio.TimeoutError:
                    if self.answer is not None:
                        continue  # the user is listening
                    await self.error("idle_timeout", f"no message for {self.options.idle_timeout:g} s: closing")
                    break
                if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                    break
                try:
                    if message.type == WSMsgType.BINARY:
                        await self.on_audio(message.data)
                    else:
                        await self.on_message(message.data)
                except ClientError as e:
                    await self.error(e.code, str(e))
                except BadSetting as e:
                    await self.error("bad_config", str(e))
                except Stopped:
                    break  # the server is shutting down: the connection closes with 1001
                except ConversationFull as e:
                    await self.error("conversation_full", f"{e}; the turn was dropped")
                except ValueError as e:  # refused by the session: the turn was dropped
                    await self.error("bad_request", f"{e}; the turn was dropped")
                except Exception:  # noqa: BLE001  (a bug of ours: the trace to the log, a short note to the client)
                    await self.error("internal", f"internal error {error_id(log, 'voice conversation')}: the turn "
                                                 "was dropped, the conversation goes on")
                finally:
                    self.after_message()
        finally:
            try:
                await self.stop_answer(None)
                if self.session is not None:
                    await self.engine.call(self.session.close)
            except Stopped:
                pass  # the model thread is gone, and its caches with it

    def after_message(self):
        """A failed session call has rewound the conversation to before the open turn: the rest
        of that turn's audio is dropped until it ends."""
        if self.turn_open and self.session is not None and self.session.audio is None:
            self.discarding = True

    async def tokens(self, text):
        """`text`'s tokens, made on the preprocessing thread: the model's thread is every conversation's."""
        executor, tokenizer = self.preprocess
        return await asyncio.get_running_loop().run_in_executor(executor, lambda: tokenizer(text)["input_ids"])

    async def conversation(self):
        if self.session is None:
            kwargs = {} if self.system_prompt is None else {
                "system_prompt": self.system_prompt, "system_ids": await self.tokens(system_turn(self.system_prompt))}
            # the Talker's caches are a row per answer in progress (serve/memory.py), not per conversation
            self.session = await self.engine.call(lambda: ConversationSession(
                self.model, self.processor, max_tokens=self.options.max_context_tokens,
                answer_room=self.settings.max_new_tokens, keep_talker_cache=False, **kwargs))
        return self.session

    # ------------------------------------------------------------------ messages

    async def on_message(self, data):
        try:
            message = json.loads(data)
        except json.JSONDecodeError as e:
            raise ClientError("bad_json", f"not JSON: {e}") from None
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            raise ClientError("bad_message", 'a message is a JSON object with a "type"')
        kind = message.pop("type")
        if kind == "config":
            await self.configure(message)
        elif kind == "text":
            text = message.get("text")
            if not isinstance(text, str) or not text.strip():
                raise ClientError("bad_message", '"text" needs a non-empty string "text"')
            if self.turn_open:
                raise ClientError("bad_message", "an audio turn is open: send \"end\" first")
            await self.stop_answer("barge_in")
            session = await self.conversation()
            mark = session.cache.length
            await self.engine.call_steps(session.ask_steps, text, await self.tokens(typed_turn(text)))
            await self.answer_turn(mark)
        elif kind == "end":
            await self.end_turn()
        elif kind == "cancel":
            await self.stop_answer("client")
        else:
            raise ClientError("bad_message", f"unknown message type {kind!r}; known: config, text, end, cancel")

    async def configure(self, values):
        """Checks every value before applying any: a refused config changes nothing."""
        vad = values.pop("vad", self.vad)
        if not isinstance(vad, bool):
            raise BadSetting(f"vad must be true or false, got {vad!r}")
        rate = values.pop("sample_rate", AUDIO_IN_RATE)
        if rate != AUDIO_IN_RATE:
            raise BadSetting(f"sample_rate {rate!r} is not supported: send 16-bit mono PCM at {AUDIO_IN_RATE} Hz "
                             "(resample on the client)")
        audio_format = values.pop("format", AUDIO_FORMAT)
        if audio_format != AUDIO_FORMAT:
            raise BadSetting(f"format {audio_format!r} is not supported: send {AUDIO_FORMAT}")
        system_prompt = values.pop("system_prompt", self.system_prompt)
        if system_prompt != self.system_prompt:
            if self.session is not None:
                raise BadSetting("system_prompt can only be set before the first turn")
            if not isinstance(system_prompt, str):
                raise BadSetting("system_prompt must be a string")
        if "modalities" in values and wants_audio(values["modalities"]) and not self.model.has_talker:
            raise BadSetting('this server was started without audio output: ask for modalities ["text"]')
        settings = copy.copy(self.settings)
        settings.update(values, self.options, self.model.speakers)
        self.vad, self.system_prompt, self.settings = vad, system_prompt, settings
        if self.session is not None:
            self.session.answer_room = settings.max_new_tokens  # later turns keep room for such answers
        await self.send({"type": "config.done"})

    # ------------------------------------------------------------------ audio

    async def on_audio(self, data):
        if len(data) % 2:
            raise ClientError("bad_audio", f"binary frames carry 16-bit samples: {len(data)} bytes is an odd count")
        if not self.vad:
            if not self.turn_open:
                await self.open_turn()
            await self.feed(np.frombuffer(data, "<i2").astype(np.float32) / 32768)
            return
        for event in self.detector.push(data):
            if isinstance(event, SpeechStarted):
                await self.stop_answer("barge_in")  # first: no more of the answer once the user speaks
                await self.send({"type": "speech_started"})
                await self.open_turn()
            await self.feed(event.audio)
            if isinstance(event, SpeechStopped):
                await self.send({"type": "speech_stopped"})
                await self.end_turn()

    async def open_turn(self):
        await self.stop_answer("barge_in")
        session = await self.conversation()
        self.turn_mark = session.cache.length
        await self.engine.call_steps(session.begin_audio_steps)
        self.turn_open, self.discarding, self.turn_samples, self.unfed = True, False, 0, Pieces()

    async def feed(self, samples):
        if self.discarding or not self.turn_open:
            return
        self.turn_samples += len(samples)
        if self.turn_samples > self.options.max_audio_seconds * AUDIO_IN_RATE:
            self.discarding, self.unfed = True, Pieces()
            await self.engine.call(self.session.rewind, self.turn_mark)
            raise ClientError("audio_too_long", f"a turn holds at most {self.options.max_audio_seconds:g} s of audio: "
                                                "this one was dropped (its audio is ignored until it ends)")
        self.unfed.add(samples)
        if self.unfed.count >= FEED_SAMPLES:
            await self.feed_unfed()

    async def feed_unfed(self):
        samples, self.unfed = self.unfed.joined(), Pieces()
        await self.engine.call_steps(self.session.feed_audio_steps, samples)

    async def end_turn(self):
        if not self.turn_open:
            raise ClientError("bad_message", '"end" with no audio: send audio frames first')
        self.turn_open = False
        self.detector = TurnDetector()  # an explicit end also ends what the detector heard
        if self.discarding:
            self.discarding, self.unfed = False, Pieces()
            return
        if self.unfed.count:
            await self.feed_unfed()
        await self.engine.call_steps(self.session.end_audio_steps)
        await self.answer_turn(self.turn_mark)

    # ------------------------------------------------------------------ answers

    async def answer_turn(self, mark):
        """Start answering the turn that began at cache slot `mark` (forgotten if the server is busy)."""
        session, kwargs = self.session, self.settings.generate_kwargs()
        tokenizer = self.processor.tokenizer
        try:
            generation = self.engine.submit(lambda: session.answer(tokenizer=tokenizer, **kwargs))
        except Busy as e:
            await self.engine.call(session.rewind, mark)
            raise ClientError("busy", f"the server is busy ({e}); the turn was not kept, try again") from None
        self.turns += 1
        if generation.position:
            await self.send({"type": "queued", "turn": self.turns, "position": generation.position})
        self.answer = (generation, asyncio.create_task(self.forward(generation, self.turns)))

    async def forward(self, generation, turn):
        try:
            await self._forward(generation, turn)
        except ConnectionError:
            pass  # the client is gone: run() stops the answer on its way out
        finally:
            if self.answer is not None and self.answer[0] is generation:
                self.answer = None

    async def _forward(self, generation, turn):
        text, samples = [], 0
        while True:
            event = await generation.events.get()
            if isinstance(event, Started):
                await self.send({"type": "response.start", "turn": turn})
            elif isinstance(event, TextDelta):
                if event.text:
                    text.append(event.text)
                    await self.send({"type": "text", "turn": turn, "delta": event.text})
            elif isinstance(event, AudioChunk):
                samples += len(event.audio)
                await self.send(np.ascontiguousarray(event.audio, "<f4").tobytes())
            elif isinstance(event, Finished):
                await self.send({"type": "response.done", "turn": turn, "text": "".join(text),
                                 "audio_samples": samples})
                break
            elif isinstance(event, Failed):
                error = event.error
                if isinstance(error, Stopped):
                    code, message = "shutting_down", error
                elif isinstance(error, ValueError):  # refused before it began (e.g. no room for the answer)
                    code, message = "conversation_full" if isinstance(error, ConversationFull) else "bad_request", error
                else:
                    code, message = "generation_failed", f"internal error {error_id(log, 'answer', error)}"
                await self.error(code, f"turn {turn}: {message}; the turn was dropped, the conversation goes on")
                break

    async def stop_answer(self, reason):
        """Cancel the answer being streamed, if any (`reason` None: the client is gone, tell no one)."""
        if self.answer is None:
            return
        generation, task = self.answer
        self.answer = None
        task.cancel()
        await self.engine.cancel(generation)
        if reason is not None:
            await self.send({"type": "response.cancelled", "turn": self.turns, "reason": reason})
