"""The OpenAI-compatible HTTP API over a `ServingEngine`.

`POST /v1/completions` and `POST /v1/chat/completions` (the tokenizer's chat template),
streamed as server-sent events in OpenAI's chunk format with `stream: true`;
`GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text).

Lengths are checked before a request queues: a prompt longer than the compiled prefill
(`max_context_length`) is a 400 naming both lengths, and so is a `max_tokens` beyond the
room the compiled `sequence_length` leaves after the prompt (the OpenAI and vLLM answer;
nothing is clamped behind the client's back). Without `max_tokens`, a completion gets
OpenAI's 16 tokens and a chat completion the whole room, each capped by the room.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from .engine import QueueFull, RequestStream, ServingEngine, ShuttingDown
from .protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    new_id,
    now,
    usage,
)
from .text import CompletionText

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
# Generation options a model's generation_config.json may set as the server's defaults.
SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k", "repetition_penalty")
DISCONNECT_POLL_SECONDS = 0.1


class OpenAIServer:
    """What the endpoints share: the engine, the tokenizer and the served model's limits."""

    def __init__(self, engine: ServingEngine, tokenizer, model_name: str):
        self.engine = engine
        self.model = engine.model
        self.tokenizer = tokenizer
        self.model_name = model_name
        runtime = self.model.runtime
        self.sequence_length = runtime.sequence_length
        self.prompt_limit = runtime.buckets[-1]
        self.vocab_size = self.model.config.get_text_config().vocab_size
        diff = self.model.generation_config.to_diff_dict()
        self.defaults = {key: diff[key] for key in SAMPLING_DEFAULTS if key in diff}

    # -- request preparation ------------------------------------------------------------

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(
                404,
                f"The model `{name}` does not exist: this server serves `{self.model_name}`.",
                param="model",
                code="model_not_found",
            )

    def completion_prompt(self, body: CompletionRequest) -> list[int]:
        if isinstance(body.prompt, str):
            return self.tokenizer(body.prompt)["input_ids"]
        bad = [t for t in body.prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(
                400,
                f"Prompt token ids {bad[:5]} are outside the vocabulary "
                f"(0..{self.vocab_size - 1}).",
                param="prompt",
            )
        return list(body.prompt)

    def chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        if self.tokenizer.chat_template is None:
            raise APIError(
                400,
                "This model's tokenizer has no chat template: use /v1/completions.",
                param="messages",
            )
        messages = [message.as_template_input() for message in body.messages]
        try:
            return list(
                self.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=True
                )
            )
        except Exception as error:  # the template's own checks (roles must alternate, ...)
            raise APIError(
                400, f"The chat template refused the messages: {error}", param="messages"
            ) from error

    def token_budget(self, prompt_tokens: int, asked: int | None, default: int | None) -> int:
        if prompt_tokens > self.prompt_limit or prompt_tokens >= self.sequence_length:
            raise APIError(
                400,
                f"The prompt has {prompt_tokens} tokens, more than this model's compiled "
                f"context takes: prompts of at most {self.prompt_limit} tokens "
                f"(max_context_length), leaving room to generate in sequence_length="
                f"{self.sequence_length}. Shorten the prompt.",
                param="messages" if default is None else "prompt",
                code="context_length_exceeded",
            )
        room = self.sequence_length - prompt_tokens
        if asked is None:
            return room if default is None else min(default, room)
        if asked > room:
            raise APIError(
                400,
                f"max_tokens={asked} is more than the {room} tokens left after the "
                f"{prompt_tokens}-token prompt in this model's compiled sequence_length="
                f"{self.sequence_length}: ask for at most {room}, or omit max_tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return asked

    def generation_kwargs(self, body: SamplingFields, budget: int) -> dict:
        """The request's options as `generate()` keyword arguments (GenerationConfig fields)."""
        kwargs = {"max_new_tokens": budget}
        if body.min_tokens:
            kwargs["min_new_tokens"] = body.min_tokens
        if body.ignore_eos:
            kwargs["eos_token_id"] = None
        if body.stop_strings:
            kwargs["stop_strings"] = body.stop_strings
        repetition_penalty = body.repetition_penalty or self.defaults.get("repetition_penalty")
        if repetition_penalty is not None:
            kwargs["repetition_penalty"] = repetition_penalty
        temperature = body.temperature
        if temperature is None:
            temperature = self.defaults.get("temperature", 1.0)
        if temperature == 0:
            kwargs["do_sample"] = False
            return kwargs
        top_k = body.top_k if body.top_k is not None else self.defaults.get("top_k", 0)
        kwargs.update(
            do_sample=True,
            temperature=temperature,
            top_p=body.top_p if body.top_p is not None else self.defaults.get("top_p", 1.0),
            top_k=max(top_k, 0),  # -1 (vLLM) and 0 both mean no top-k
        )
        return kwargs

    def start(
        self, body: SamplingFields, prompt_ids: list[int], budget: int | None, default: int | None
    ) -> tuple[RequestStream, CompletionText]:
        """Check the lengths, queue the request; its stream and the text it will build."""
        budget = self.token_budget(len(prompt_ids), budget, default)
        stream = self.submit(body, prompt_ids, budget)
        return stream, CompletionText(self.tokenizer, body.stop_strings)

    def submit(self, body: SamplingFields, prompt_ids: list[int], budget: int) -> RequestStream:
        try:
            sampling = self.model.request_sampling(
                prompt_ids,
                tokenizer=self.tokenizer,
                seed=body.seed,
                **self.generation_kwargs(body, budget),
            )
        except ValueError as error:
            raise APIError(400, str(error)) from error
        try:
            stream = self.engine.submit(prompt_ids, sampling)
        except QueueFull as error:
            raise APIError(
                429,
                f"The server is at capacity ({self.engine.max_queue_size} requests waiting): "
                f"retry after {error.retry_after} s.",
                type="rate_limit_exceeded",
                code="queue_full",
                headers={"Retry-After": str(error.retry_after)},
            ) from error
        except ShuttingDown as error:
            raise APIError(503, "The server is shutting down.", type="server_error") from error
        return stream

    # -- answering ----------------------------------------------------------------------

    async def answer(self, request: Request, stream: RequestStream, text: CompletionText) -> str:
        """Wait for the whole completion (its text in `text`); a client that leaves
        cancels it. Returns the finish reason."""
        watcher = asyncio.create_task(_cancel_on_disconnect(request, stream))
        try:
            async for _, finish_reason in text_deltas(stream, text):
                if finish_reason is not None:
                    return finish_reason
        finally:
            watcher.cancel()
        raise AssertionError("a request stream ends with a finish reason")


async def _cancel_on_disconnect(request: Request, stream: RequestStream) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_SECONDS)
    stream.cancel()


async def text_deltas(
    stream: RequestStream, text: CompletionText
) -> AsyncIterator[tuple[str, str | None]]:
    """`(new text, None)` as tokens arrive, then `(last text, finish reason)`. A stop string
    found in the text ends the request (its generation is cancelled); a request the server
    ended (shutdown, a failed step) raises `APIError`."""
    while True:
        event = await stream.events.get()
        delta = text.add(event.token) if event.token is not None else ""
        if text.stopped:
            if event.finish_reason is None:
                stream.cancel()
            yield delta, "stop"
            return
        if event.finish_reason is None:
            if delta:
                yield delta, None
            continue
        if event.finish_reason in ("cancelled", "error"):
            raise APIError(
                503 if event.finish_reason == "cancelled" else 500,
                f"The request was ended by the server before it finished ({event.finish_reason}).",
                type="server_error",
            )
        yield delta + text.finish(), event.finish_reason
        return


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def event_stream(
    stream: RequestStream,
    text: CompletionText,
    chunk,
    usage_chunk: dict | None,
    first: dict | None = None,
) -> AsyncIterator[str]:
    """The SSE body: `first` if given, `chunk(delta, finish_reason)` per piece of text,
    `usage_chunk` (with its usage filled in) if given, then `[DONE]`. A client that
    disconnects closes this generator: its request is cancelled, freeing its slot at the
    next step."""
    finished = False
    try:
        if first is not None:
            yield sse(first)
        try:
            async for delta, finish_reason in text_deltas(stream, text):
                yield sse(chunk(delta, finish_reason))
        except APIError as error:
            yield sse(error.body)
        finished = True
        if usage_chunk is not None:
            usage_chunk["usage"] = usage(len(stream.request.prompt_ids), len(stream.request.tokens))
            yield sse(usage_chunk)
        yield sse("[DONE]")
    finally:
        if not finished:
            stream.cancel()


class CountRequests:
    """ASGI middleware counting answered requests by path and status. (Plain ASGI, not
    Starlette's `BaseHTTPMiddleware`: that one wraps `receive`, and handlers then miss a
    client's disconnect.)"""

    def __init__(self, app, counter):
        self.app = app
        self.counter = counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.counter.labels(scope["path"], str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


def build_app(
    engine: ServingEngine, tokenizer, model_name: str, shutdown_timeout: float = 30.0
) -> FastAPI:
    """The FastAPI app; closing it (lifespan end: SIGTERM under uvicorn) closes the engine,
    letting requests in flight finish for up to `shutdown_timeout` seconds."""
    server = OpenAIServer(engine, tokenizer, model_name)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(engine.close, shutdown_timeout)

    app = FastAPI(title="optimum-gemma3", lifespan=lifespan)
    app.state.server = server
    metrics = engine.metrics

    app.add_middleware(CountRequests, counter=metrics.requests)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return JSONResponse(error.body, status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        problems = []
        for problem in error.errors():
            where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body")
            problems.append(f"{where}: {problem.get('msg')}" if where else problem.get("msg"))
        body = APIError(400, "Invalid request: " + "; ".join(problems)).body
        return JSONResponse(body, status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        body = APIError(error.status_code, str(error.detail)).body
        return JSONResponse(body, status_code=error.status_code)

    @app.get("/health")
    async def health():
        if not engine.accepting:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        card = {
            "id": model_name,
            "object": "model",
            "created": now(),
            "owned_by": "optimum-gemma3",
            "max_model_len": server.sequence_length,
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        server.check_model(body.model)
        prompt_ids = server.completion_prompt(body)
        stream, text = server.start(body, prompt_ids, body.max_tokens, DEFAULT_COMPLETION_TOKENS)
        head = {
            "id": new_id("cmpl"),
            "object": "text_completion",
            "created": now(),
            "model": model_name,
        }

        def choice(delta: str, finish_reason: str | None) -> dict:
            return {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish_reason}

        if body.stream:
            usage_chunk = None
            if body.stream_options and body.stream_options.include_usage:
                usage_chunk = {**head, "choices": []}
            chunks = event_stream(
                stream, text, lambda d, f: {**head, "choices": [choice(d, f)]}, usage_chunk
            )
            return StreamingResponse(chunks, media_type="text/event-stream")
        finish_reason = await server.answer(request, stream, text)
        return {
            **head,
            "choices": [choice(text.text, finish_reason)],
            "usage": usage(len(prompt_ids), len(stream.request.tokens)),
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        server.check_model(body.model)
        prompt_ids = server.chat_prompt(body)
        stream, text = server.start(body, prompt_ids, body.token_budget, None)
        head = {"id": new_id("chatcmpl"), "created": now(), "model": model_name}
        if body.stream:
            chunk_head = {**head, "object": "chat.completion.chunk"}

            def chunk(delta: str, finish_reason: str | None) -> dict:
                content = {"content": delta} if delta or finish_reason is None else {}
                choice = {
                    "index": 0,
                    "delta": content,
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
                return {**chunk_head, "choices": [choice]}

            first = {
                **chunk_head,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
            }
            usage_chunk = None
            if body.stream_options and body.stream_options.include_usage:
                usage_chunk = {**chunk_head, "choices": []}
            chunks = event_stream(stream, text, chunk, usage_chunk, first)
            return StreamingResponse(chunks, media_type="text/event-stream")
        finish_reason = await server.answer(request, stream, text)
        message = {"role": "assistant", "content": text.text}
        return {
            **head,
            "object": "chat.completion",
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
            ],
            "usage": usage(len(prompt_ids), len(stream.request.tokens)),
        }

    return app
