"""HTTP layer of ``adapterkit serve`` (FastAPI): OpenAI-compatible completions and chat completions, model
listing, vLLM-style runtime adapter load/unload, health and Prometheus metrics.

The HTTP side only validates, tokenizes, queues (:class:`~adapterkit.serve.engine.Engine`) and streams; the
engine thread runs the model. Fields outside the supported set are refused with 400 (never ignored);
errors follow OpenAI's schema ``{"error": {"message", "type", "param", "code"}}``.

Chat prompts use the chat template the adapter was trained with (``chat_template`` in its ``run.json``, written by
``adapterkit train --chat-template``), else the tokenizer's, else the plain fallback ``"{role}: {content}\\n"`` per
message followed by ``"assistant:"``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, EngineError
from .engine import Request as GenRequest
from .pool import AdapterPool, PoolError

__all__ = ["ApiError", "ServerState", "create_app"]

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    409: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "n", "user"}
# fields accepted only at the value that changes nothing
_NEUTRAL = {
    "n": 1,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "best_of": 1,
    "echo": False,
    "logprobs": None,
    "top_logprobs": None,
    "logit_bias": None,
    "suffix": None,
    "tools": None,
    "tool_choice": None,
    "response_format": None,
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {
        "error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param, "code": code}
    }


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    headers = {"Retry-After": "1"} if status == 429 else None
    return JSONResponse(_error_body(status, message, param, code), status_code=status, headers=headers)


@dataclass
class ServerState:
    engine: Engine
    pool: AdapterPool
    tokenizer: Any
    base_name: str
    base_path: str
    context_len: int
    metrics: Any
    api_key: str | None = None
    allow_runtime_updates: bool = False
    draining: bool = False
    created: int = field(default_factory=lambda: int(time.time()))


# --- request parsing -------------------------------------------------------------------------------------
def _check_fields(body: dict[str, Any], allowed: set[str]) -> None:
    for key, value in body.items():
        if key in allowed and key not in _NEUTRAL:
            continue
        if key in _NEUTRAL and (value is None or value == _NEUTRAL[key]):
            continue
        if key in _NEUTRAL:
            raise ApiError(400, f"{key}={value!r} is not supported by this server", key, "unsupported_parameter")
        raise ApiError(400, f"unsupported field {key!r}", key, "unsupported_parameter")


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"{key} must be a number", key)
    if value < lo or value > hi or (lo_open and value == lo):
        raise ApiError(400, f"{key} must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}", key)
    return float(value)


@dataclass
class _Params:
    name: str | None
    model: str
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool


def _common(state: ServerState, body: dict[str, Any], prompt: list[int], default_max: int | None) -> _Params:
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "model is required (the base model's name or an adapter's)", "model")
    if model == state.base_name:
        name = None
    elif state.pool.get(model) is not None:
        name = model
    else:
        raise ApiError(404, f"the model {model!r} does not exist", "model", "model_not_found")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is None:
        max_tokens = default_max if default_max is not None else state.context_len - len(prompt)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ApiError(400, f"max_tokens must be a positive integer, got {max_tokens!r}", "max_tokens")
    if not prompt:
        raise ApiError(400, "the prompt is empty", "prompt")
    if len(prompt) + max_tokens > state.context_len:
        raise ApiError(
            400,
            f"this model's maximum context length is {state.context_len} tokens; the prompt has {len(prompt)} "
            f"and max_tokens asks for {max_tokens}",
            "max_tokens",
            "context_length_exceeded",
        )
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, "seed must be an integer", "seed")
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise ApiError(400, "stop must be a non-empty string or a list of up to 4 of them", "stop")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be a boolean", "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise ApiError(400, "stream_options is only allowed with stream=true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise ApiError(400, "stream_options supports include_usage only", "stream_options")
        include_usage = bool(options.get("include_usage"))
    return _Params(
        name=name,
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        seed=seed,
        stop=stops,
        stream=stream,
        include_usage=include_usage,
    )


def _completion_prompt(state: ServerState, body: dict[str, Any]) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return list(state.tokenizer(prompt)["input_ids"])
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        vocab = len(state.tokenizer)
        if any(t < 0 or t >= vocab for t in prompt):
            raise ApiError(400, "prompt token ids must lie in the vocabulary", "prompt")
        return list(prompt)
    raise ApiError(400, "prompt must be a string or a list of token ids (one prompt per request)", "prompt")


def _adapter_chat_template(state: ServerState, model: Any) -> str | None:
    """The chat template adapter ``model`` was trained with (its directory's ``run.json``), None for the base
    model, unknown names and adapters trained without one."""
    entry = state.pool.get(model) if isinstance(model, str) else None
    if entry is None:
        return None
    run = entry.path / "run.json"
    try:
        template = json.loads(run.read_text()).get("chat_template") if run.is_file() else None
    except (OSError, ValueError):
        return None
    return template if isinstance(template, str) and template else None


def _chat_prompt(state: ServerState, body: dict[str, Any]) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    clean = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, "each message needs a role and a content", "messages")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise ApiError(400, "only text content parts are supported", "messages")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise ApiError(400, "message content must be a string", "messages")
        clean.append({"role": m["role"], "content": content})
    tok = state.tokenizer
    template = _adapter_chat_template(state, body.get("model"))
    if template is not None or getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(clean, chat_template=template, add_generation_prompt=True, tokenize=False)
        return list(tok(text, add_special_tokens=False)["input_ids"])
    text = "".join(f"{m['role']}: {m['content']}\n" for m in clean) + "assistant:"
    return list(tok(text)["input_ids"])


# --- generation ------------------------------------------------------------------------------------------
class _Run:
    """One submitted request seen from the HTTP side: text deltas as tokens arrive, stop strings applied."""

    def __init__(self, state: ServerState, p: _Params) -> None:
        self.state, self.p = state, p
        self.queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self.req = GenRequest(
            model=p.name, prompt=p.prompt, max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p,
            seed=p.seed, emit=self._emitter(),
        )  # fmt: skip
        self.tokens: list[int] = []
        self.sent = ""
        # incremental detokenization (as TGI/vLLM): decode a short window, not the whole output, per token
        self._decoded, self._prefix, self._read = "", 0, 0
        self.finish: str | None = None
        self.hold = max((len(s) for s in p.stop), default=1) - 1

    def _emitter(self) -> Any:
        loop = asyncio.get_running_loop()

        def emit(ev: tuple[Any, ...]) -> None:  # engine thread -> this request's queue on the event loop
            with contextlib.suppress(RuntimeError):  # a closed event loop (server stopped): nobody listens
                loop.call_soon_threadsafe(self.queue.put_nowait, ev)

        return emit

    def submit(self) -> None:
        try:
            self.state.engine.submit(self.req)
        except EngineError as e:
            raise ApiError(e.status, str(e)) from None

    def _text(self, final: bool = False) -> str:
        """The text of the tokens so far. Each call decodes the window from the last emitted boundary: the text
        the new tokens add is the window's decoding minus its old part's (an incomplete UTF-8 sequence, shown as
        U+FFFD, waits for the next token unless ``final``)."""
        decode = self.state.tokenizer.decode
        old = decode(self.tokens[self._prefix : self._read], skip_special_tokens=True)
        new = decode(self.tokens[self._prefix :], skip_special_tokens=True)
        if len(new) > len(old) and (final or not new.endswith("\ufffd")):
            self._decoded += new[len(old) :]
            self._prefix, self._read = self._read, len(self.tokens)
        return self._decoded

    async def deltas(self) -> AsyncIterator[str]:
        """Text pieces until the request finishes (then ``self.finish`` is set); ApiError on engine errors."""
        try:
            while True:
                ev = await self.queue.get()
                if ev[0] == "error":
                    raise ApiError(ev[2], ev[1])
                if ev[0] == "token":
                    self.tokens.append(ev[1])
                    text, done = self._text(), False
                else:
                    text, done = self._text(final=True), True
                    self.finish = "stop" if ev[1] == "stop" else "length" if ev[1] == "length" else ev[1]
                for s in self.p.stop:
                    i = text.find(s, max(0, len(self.sent) - len(s)))
                    if i >= 0:
                        text, done, self.finish = text[:i], True, "stop"
                        self.state.engine.cancel(self.req)
                upto = len(text) if done else max(len(self.sent), len(text) - self.hold)
                if upto > len(self.sent):
                    piece, self.sent = text[len(self.sent) : upto], text[:upto]
                    yield piece
                if done:
                    return
        finally:
            if self.finish is None:
                self.state.engine.cancel(self.req)  # client gone or error: free the row

    def usage(self) -> dict[str, int]:
        n = len(self.tokens)
        return {
            "prompt_tokens": len(self.p.prompt),
            "completion_tokens": n,
            "total_tokens": len(self.p.prompt) + n,
        }


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _respond(run: _Run, chat: bool) -> Response:
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    obj = "chat.completion" if chat else "text_completion"
    head = {"id": rid, "created": created, "model": run.p.model}
    run.submit()
    if not run.p.stream:
        text = "".join([piece async for piece in run.deltas()])
        choice: dict[str, Any] = {"index": 0, "finish_reason": run.finish, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return JSONResponse({**head, "object": obj, "choices": [choice], "usage": run.usage()})

    chunk_obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        c: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            d: dict[str, Any] = {"role": "assistant"} if first else {}
            if delta is not None:
                d["content"] = delta
            c["delta"] = d
        else:
            c["text"] = delta or ""
        out = {**head, "object": chunk_obj, "choices": [c]}
        if run.p.include_usage:
            out["usage"] = None
        return out

    async def events() -> AsyncIterator[str]:
        try:
            if chat:
                yield _sse(chunk("", None, first=True))
            async for piece in run.deltas():
                yield _sse(chunk(piece, None))
            yield _sse(chunk(None if chat else "", run.finish))
            if run.p.include_usage:
                yield _sse({**head, "object": chunk_obj, "choices": [], "usage": run.usage()})
        except ApiError as e:
            yield _sse(_error_body(e.status, e.message, e.param, e.code))
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


# --- app -------------------------------------------------------------------------------------------------
def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="adapterkit serve")
    app.state.serve = state

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error(e.status, e.message, e.param, e.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail))

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Response:
        if state.api_key is not None and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {state.api_key}".encode()):
                return _error(401, "invalid API key", None, "invalid_api_key")
        return await call_next(request)

    async def _body(request: Request) -> dict[str, Any]:
        if state.draining:
            raise ApiError(503, "the server is shutting down")
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await _body(request)
        _check_fields(body, _COMMON | {"prompt"})
        params = _common(state, body, _completion_prompt(state, body), 16)
        return await _respond(_Run(state, params), chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await _body(request)
        _check_fields(body, _COMMON | {"messages", "max_completion_tokens"})
        params = _common(state, body, _chat_prompt(state, body), None)
        return await _respond(_Run(state, params), chat=True)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = [
            {"id": state.base_name, "object": "model", "created": state.created, "owned_by": "adapterkit",
             "root": state.base_path, "parent": None, "max_model_len": state.context_len, "method": None,
             "state": "attached"}
        ]  # fmt: skip
        for e in state.pool.listing():
            data.append(
                {"id": e.name, "object": "model", "created": e.created, "owned_by": "adapterkit",
                 "root": str(e.path), "parent": state.base_name, "max_model_len": state.context_len,
                 "method": e.method, "state": e.state, "content_hash": e.digest}
            )  # fmt: skip
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health() -> Response:
        if state.engine.dead is not None:
            return _error(503, f"the engine stopped: {state.engine.dead}")
        if state.draining:
            return _error(503, "the server is shutting down")
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    if state.allow_runtime_updates:

        @app.post("/v1/load_lora_adapter")
        async def load_adapter(request: Request) -> Response:
            body = await _body(request)
            name, path = body.get("lora_name"), body.get("lora_path")
            if not isinstance(name, str) or not name or not isinstance(path, str):
                raise ApiError(400, "lora_name and lora_path are required", "lora_name")
            if name == state.base_name:
                raise ApiError(400, f"{name!r} is the base model's name", "lora_name")
            try:
                state.pool.register(name, state.pool.confined(path))
            except PoolError as e:
                raise ApiError(e.status, str(e), "lora_path") from None
            return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

        @app.post("/v1/unload_lora_adapter")
        async def unload_adapter(request: Request) -> Response:
            body = await _body(request)
            name = body.get("lora_name")
            if not isinstance(name, str):
                raise ApiError(400, "lora_name is required", "lora_name")
            try:
                state.pool.unregister(name)
            except PoolError as e:
                raise ApiError(e.status, str(e), "lora_name") from None
            with state.engine.cond:
                state.engine.cond.notify_all()  # the engine thread deletes it from the model once unused
            return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    return app
