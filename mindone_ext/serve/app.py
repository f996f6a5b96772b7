"""The aiohttp application: the browser page, the voice WebSocket, OpenAI-style chat completions.

    GET  /                     the voice-chat page (static/)
    GET  /health               {"status", "sessions", "active", "queued", "caches"}
    GET  /v1/models            the one model, OpenAI-style
    GET  /v1/voice             WebSocket: the voice conversation (docs/voice_service.md)
    POST /v1/chat/completions  OpenAI's chat completions, streamed as server-sent events or whole

With an API key, /v1/* needs `Authorization: Bearer KEY` (browsers, which cannot set headers on a
WebSocket, may pass `?api_key=KEY`); the page and /health stay open, they carry no conversation.
"""
import asyncio
import hmac
import json
import os

import numpy as np
from aiohttp import web

from ..models.qwen2_5_omni.streaming import AudioChunk, TextDelta
from .engine import Busy, Engine, Failed, Finished
from .openai_api import ApiError, ChatRequest, prepare_inputs
from .voice import VoiceConversation

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
ENGINE = web.AppKey("engine", Engine)
STATE = web.AppKey("state", dict)


def create_app(model, processor, options):
    app = web.Application(client_max_size=options.max_request_bytes, middlewares=[_errors, _auth(options.api_key)])
    app[STATE] = {"model": model, "processor": processor, "options": options, "sessions": 0}
    app.router.add_get("/", _page)
    app.router.add_static("/static/", STATIC)
    app.router.add_get("/health", _health)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/v1/voice", _voice)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.cleanup_ctx.append(_engine)
    return app


async def _engine(app):
    options = app[STATE]["options"]
    app[ENGINE] = Engine(options.max_active, options.max_queue)
    yield
    app[ENGINE].stop()


def _auth(api_key):
    @web.middleware
    async def check(request, handler):
        if api_key and request.path.startswith("/v1/"):
            header = request.headers.get("Authorization", "")
            given = header[len("Bearer "):] if header.startswith("Bearer ") else request.query.get("api_key", "")
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                raise ApiError(401, "invalid or missing API key: send Authorization: Bearer KEY",
                               code="invalid_api_key")
        return await handler(request)
    return check


@web.middleware
async def _errors(request, handler):
    try:
        return await handler(request)
    except ApiError as e:
        return web.json_response(e.body(), status=e.status)
    except web.HTTPRequestEntityTooLarge as e:
        return web.json_response(ApiError(413, f"request body too large: {e.text}", code="too_large").body(),
                                 status=413)


async def _page(request):
    return web.FileResponse(os.path.join(STATIC, "index.html"))


async def _health(request):
    state, engine = request.app[STATE], request.app[ENGINE]
    caches = await engine.call(_caches_in_use, state["model"])
    return web.json_response({"status": "ok", "sessions": state["sessions"], **engine.load(), "caches": caches})


def _caches_in_use(model):
    runners = [model.thinker_runner()] + ([model.talker_runner()] if model.has_talker else [])
    return sum(runner.caches_in_use() for runner in runners)


async def _models(request):
    name = os.path.basename(os.path.normpath(request.app[STATE]["model"].name_or_path or "qwen2.5-omni"))
    return web.json_response({"object": "list", "data": [{"id": name, "object": "model", "owned_by": "local"}]})


async def _voice(request):
    state = request.app[STATE]
    options = state["options"]
    # aiohttp refuses a frame of exactly max_msg_size bytes; ours is the largest one allowed
    ws = web.WebSocketResponse(max_msg_size=options.max_message_bytes + 1, heartbeat=30)
    await ws.prepare(request)
    if state["sessions"] >= options.max_sessions:
        await ws.send_str(json.dumps({"type": "error", "code": "too_many_sessions",
                                      "message": f"{options.max_sessions} conversations are open: try again later"}))
        await ws.close(code=1013, message=b"too many sessions")
        return ws
    state["sessions"] += 1
    try:
        await VoiceConversation(ws, request.app[ENGINE], state["model"], state["processor"], options).run()
    except ConnectionError:  # the client went away mid-send; its conversation was closed on the way out
        pass
    finally:
        state["sessions"] -= 1
        await ws.close()
    return ws


async def _chat_completions(request):
    state, engine = request.app[STATE], request.app[ENGINE]
    model, processor = state["model"], state["processor"]
    try:
        body = await request.json()
    except ValueError as e:  # not JSON, or not UTF-8
        raise ApiError(400, f"the request body is not JSON: {e}") from None
    loop = asyncio.get_running_loop()
    chat = await loop.run_in_executor(None, ChatRequest, body, state["options"], model)
    try:
        inputs = await loop.run_in_executor(None, prepare_inputs, processor, chat.conversation)
    except ValueError as e:  # MediaError among them
        raise ApiError(400, str(e), "messages") from None
    prompt_tokens = int(inputs["input_ids"].shape[1])
    context = model.config.thinker_config.text_config.max_position_embeddings
    if prompt_tokens + chat.settings.max_new_tokens > context:
        raise ApiError(400, f"the conversation is {prompt_tokens} tokens; with max_completion_tokens "
                            f"{chat.settings.max_new_tokens} it exceeds the context length {context}", "messages",
                       "context_length_exceeded")
    kwargs = chat.settings.generate_kwargs()
    try:
        generation = engine.submit(lambda: model.generate_stream(tokenizer=processor.tokenizer, **inputs, **kwargs))
    except Busy as e:
        raise ApiError(503, f"the server is busy ({e}): try again", code="busy") from None
    answer = _Answer(model, chat.settings.max_new_tokens, prompt_tokens)
    if not chat.stream:
        try:
            async for _ in answer.events(generation):
                pass
        finally:
            await engine.cancel(generation)
        return web.json_response(chat.completion(answer.text, answer.audio(), answer.finish_reason, answer.usage()))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)

    async def send(data):
        await response.write(f"data: {json.dumps(data)}\n\n".encode())

    try:
        await send(chat.chunk({"role": "assistant", "content": None if chat.settings.audio else ""}))
        async for event in answer.events(generation):
            if isinstance(event, TextDelta):
                await send(chat.chunk(chat.text_delta(event.text)))
            else:
                await send(chat.chunk(chat.audio_delta(event.audio)))
        await send(chat.chunk(finish_reason=answer.finish_reason))
        if chat.include_usage:
            await send(chat.chunk(usage=answer.usage()))
        await response.write(b"data: [DONE]\n\n")
    except ApiError as e:  # the stream has begun: the error is its last event
        await send(e.body())
    except ConnectionError:  # the client went away mid-answer
        pass
    finally:
        await engine.cancel(generation)  # a client gone mid-answer stops it (no-op when it finished)
    return response


class _Answer:
    """A generation's events, kept for the totals OpenAI's answer carries."""

    def __init__(self, model, max_new_tokens, prompt_tokens):
        self.stop_ids = set(model.stop_token_ids)
        self.max_new_tokens, self.prompt_tokens = max_new_tokens, prompt_tokens
        self.tokens, self.pieces, self.chunks = [], [], []

    async def events(self, generation):
        """TextDelta (with text) and AudioChunk events; raises ApiError if the generation fails."""
        while True:
            event = await generation.events.get()
            if isinstance(event, Finished):
                return
            if isinstance(event, Failed):
                raise ApiError(500, f"generation failed: {type(event.error).__name__}: {event.error}",
                               code="generation_failed")
            if isinstance(event, TextDelta):
                self.tokens.append(event.token_id)
                self.pieces.append(event.text)
                if event.text:
                    yield event
            elif isinstance(event, AudioChunk):
                self.chunks.append(event.audio)
                yield event

    @property
    def text(self):
        return "".join(self.pieces)

    def audio(self):
        return np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.float32)

    @property
    def finish_reason(self):
        stopped = self.tokens and self.tokens[-1] in self.stop_ids
        return "length" if len(self.tokens) >= self.max_new_tokens and not stopped else "stop"

    def usage(self):
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.tokens),
                "total_tokens": self.prompt_tokens + len(self.tokens)}
