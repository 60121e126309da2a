"""The HTTP API: OpenAI's chat and completions endpoints for Qwen-VL, models,
health, version and metrics. Handlers read like the API reference; the work
is in prompt.py (messages -> ids), images.py, generation.py and grounding.py."""

import asyncio
import hmac
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Receive, Scope, Send

from qwen_vl.model_executor.tokenizer import IM_END_ID, IM_START_ID
from qwen_vl.server import metrics
from qwen_vl.server.engine import Engine
from qwen_vl.server.settings import Settings

from . import generation
from .errors import APIError, error_body, install_error_handlers
from .images import ImageLimits, new_client
from .prompt import PromptBuilder, PromptError
from .sampling import sampling_params
from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Delta,
    ErrorResponse,
    ModelCard,
    ModelList,
)

logger = logging.getLogger("qwen_vl.api")
VERSION = "0.1.0"
# The original chat() stops at <|im_end|> or <|im_start|>; <|endoftext|> is
# the checkpoint's eos, which vLLM adds itself.
CHAT_STOP_TOKEN_IDS = [IM_END_ID, IM_START_ID]
ENGINE_WATCH_INTERVAL = 0.5  # seconds
ENGINE_DEAD_LINGER = 3.0  # seconds
# The playground page and its assets; everything it loads or calls is this server.
PLAYGROUND = Path(__file__).with_name("static")
PLAYGROUND_CSP = "default-src 'self'; img-src 'self' data: blob:"


class BodySizeLimit:
    """413 for bodies beyond the limit, by header or by counting what arrives."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = APIError(413, f"request body larger than {self.limit} bytes", code="request_too_large")
        headers = dict(scope.get("headers", []))
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            response = JSONResponse(error_body(413, too_large.message, code=too_large.code), status_code=413)
            return await response(scope, receive, send)
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # Raised inside FastAPI's body read; the APIError handler answers it.
                    raise too_large
            return message

        await self.app(scope, counting_receive, send)


class CountRequests:
    """qwen_vl_requests_total by route and status. Plain ASGI: Starlette's
    BaseHTTPMiddleware would relay every streamed chunk through a queue."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def record_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = scope.get("route")
            endpoint = route.path if route is not None else "other"
            metrics.REQUESTS.labels(endpoint=endpoint, status=str(status)).inc()


def create_app(settings: Settings, engine: Engine, on_engine_dead: Callable[[], None] | None = None) -> FastAPI:
    """`on_engine_dead` is called once if the engine dies: the process should
    then exit non-zero so that an orchestrator restarts it."""
    state: dict = {}
    admission = generation.Admission(settings.max_pending_requests)

    async def watch_engine():
        while engine.serving:
            await asyncio.sleep(ENGINE_WATCH_INTERVAL)
        logger.error("the engine died: answering 503 for %.0f s, then exiting", ENGINE_DEAD_LINGER)
        # Linger briefly so that load balancers and clients see 503s (and
        # /health fail) rather than refused connections, then exit.
        await asyncio.sleep(ENGINE_DEAD_LINGER)
        if on_engine_dead is not None:
            on_engine_dead()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        started = time.perf_counter()
        engine.start()
        tokenizer = engine.tokenizer
        state["builder"] = PromptBuilder(tokenizer.backend_tokenizer, engine.max_window_size())
        state["defaults"] = engine.sampling_defaults()
        logger.info(
            "serving %s as %r on http://%s:%d (engine ready in %.1f s, context %d tokens)",
            settings.model, settings.served_model_name, settings.host, settings.port,
            time.perf_counter() - started, engine.max_model_len,
        )
        watcher = asyncio.create_task(watch_engine())
        async with new_client(image_limits) as state["http"]:
            yield
        watcher.cancel()
        engine.stop()

    app = FastAPI(title="qwen-vl-serve", version=VERSION, lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, limit=settings.max_request_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    image_limits = ImageLimits(
        max_bytes=settings.max_image_bytes,
        max_pixels=settings.max_image_pixels,
        fetch_timeout=settings.image_fetch_timeout,
        max_redirects=settings.image_max_redirects,
        allow_private_networks=settings.allow_private_image_urls,
        local_root=settings.image_local_root,
    )

    app.add_middleware(CountRequests)

    async def authorized(request: Request) -> None:
        if not settings.api_keys:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        # Compare against every key, always, in constant time.
        matches = [hmac.compare_digest(token.encode(), key.encode()) for key in settings.api_keys]
        if not any(matches):
            raise APIError(401, "missing or invalid API key", code="invalid_api_key")

    def check_model(name: str) -> None:
        if name not in (settings.served_model_name, settings.model):
            raise APIError(404, f"model {name!r} does not exist; this server serves {settings.served_model_name!r}",
                           param="model", code="model_not_found")
        if not engine.serving:
            raise APIError(503, "the engine is not serving", code="engine_unavailable")

    @app.get("/health", response_class=Response,
             responses={200: {"description": "the engine serves"}, 503: {"model": ErrorResponse}})
    async def health():
        if engine.serving:
            return Response(status_code=200)
        return JSONResponse(error_body(503, "the engine is not serving"), status_code=503)

    @app.get("/version")
    async def version():
        import vllm

        return {"version": VERSION, "vllm": vllm.__version__}

    @app.get("/metrics", dependencies=[Depends(authorized)] if settings.protect_metrics else [],
             response_class=PlainTextResponse)
    async def prometheus():
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorized)], responses={401: {"model": ErrorResponse}})
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=settings.served_model_name, max_model_len=engine.max_model_len)])

    async def prepare(body, build_prompt, *, endpoint: str, prefix: str, stop_token_ids: list[int],
                      logprobs: int | None, grounding_image: int | None = None) -> generation.Job:
        """Validate (cheap checks first), admit, then fetch the images."""
        check_model(body.model)
        try:
            # Tokenizing a long conversation takes real time: not on the event loop.
            prompt = await asyncio.to_thread(build_prompt)
        except PromptError as e:
            raise APIError(400, str(e), param=e.param) from e
        if grounding_image is not None and grounding_image >= len(prompt.image_urls):
            raise APIError(400, f"grounding_image={grounding_image} but the conversation has "
                           f"{len(prompt.image_urls)} image(s)", param="grounding_image")
        params = sampling_params(
            body, state["defaults"],
            prompt_tokens=len(prompt.token_ids), max_model_len=engine.max_model_len,
            completion_limit=body.completion_limit, logprobs=logprobs,
            stop_token_ids=stop_token_ids, stream=body.stream,
        )
        ticket = admission.admit()
        try:
            images = await generation.fetch_images(
                prompt, image_limits, settings.max_images_per_request, state["http"]
            )
        except BaseException:
            ticket.release()
            raise
        timeout = settings.request_timeout or None
        return generation.Job(endpoint, generation.new_request_id(prefix), prompt, images, params, ticket, timeout)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)],
              responses={200: {"model": ChatCompletion}, **ERROR_RESPONSES})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        top = body.top_logprobs or 0
        job = await prepare(
            body, lambda: state["builder"].chat(body.messages), endpoint="chat", prefix="chatcmpl",
            # ignore_eos asks for exactly max_tokens tokens: the chat's end
            # tokens are its end-of-sequence too.
            stop_token_ids=[] if body.ignore_eos else CHAT_STOP_TOKEN_IDS, logprobs=top if body.logprobs else None,
            grounding_image=body.grounding_image,
        )
        images = job.images
        if body.stream:
            return StreamingResponse(chat_stream(body, job), media_type="text/event-stream")
        choices = await generation.run_to_end(request, engine, job)
        return ChatCompletion(
            id=job.request_id,
            model=body.model,
            choices=[
                ChatChoice(
                    index=c.index,
                    message=AssistantMessage(
                        # The original chat() strips the response.
                        content=c.text.strip(),
                        boxes=generation.boxes(c.text, images, body.grounding_image),
                    ),
                    finish_reason=c.finish_reason,
                    logprobs=generation.chat_logprobs(c.logprobs, c.token_ids, top) if body.logprobs else None,
                )
                for c in choices
            ],
            usage=generation.usage(job, choices),
        )

    def chat_stream(body: ChatCompletionRequest, job: generation.Job):
        top = body.top_logprobs or 0
        started: set[int] = set()

        def chunk(choices: list[ChatChunkChoice], usage=None) -> dict:
            return ChatCompletionChunk(id=job.request_id, model=body.model, choices=choices, usage=usage).model_dump(
                exclude_none=True
            )

        def on_delta(choice: generation.Choice, out) -> dict | None:
            first = choice.index not in started
            started.add(choice.index)
            if not out.text and not first:
                return None
            logprobs = None
            if body.logprobs and out.logprobs:
                logprobs = generation.chat_logprobs(list(out.logprobs), list(out.token_ids), top)
            delta = Delta(role="assistant" if first else None, content=out.text)
            return chunk([ChatChunkChoice(index=choice.index, delta=delta, logprobs=logprobs)])

        def on_finish(choices: list[generation.Choice]) -> list[dict]:
            closing = [
                chunk([ChatChunkChoice(
                    index=c.index,
                    delta=Delta(boxes=generation.boxes(c.text, job.images, body.grounding_image)),
                    finish_reason=c.finish_reason,
                )])
                for c in choices
            ]
            if body.stream_options and body.stream_options.include_usage:
                closing.append(chunk([], usage=generation.usage(job, choices)))
            return closing

        return generation.stream_events(engine, job, on_delta, on_finish)

    @app.post("/v1/completions", dependencies=[Depends(authorized)],
              responses={200: {"model": Completion}, **ERROR_RESPONSES})
    async def completions(body: CompletionRequest, request: Request):
        job = await prepare(
            body, lambda: state["builder"].completion(body.prompt_text), endpoint="completion", prefix="cmpl",
            stop_token_ids=[], logprobs=body.logprobs,
        )

        def completion(choices: list[CompletionChoice], usage=None) -> Completion:
            return Completion(id=job.request_id, model=body.model, choices=choices, usage=usage)

        if body.stream:
            def on_delta(choice, out):
                if not out.text:
                    return None
                return completion([CompletionChoice(index=choice.index, text=out.text)]).model_dump(exclude_none=True)

            def on_finish(choices):
                closing = [
                    completion([CompletionChoice(index=c.index, text="", finish_reason=c.finish_reason)]).model_dump(
                        exclude_none=True
                    )
                    for c in choices
                ]
                if body.stream_options and body.stream_options.include_usage:
                    closing.append(completion([], usage=generation.usage(job, choices)).model_dump(exclude_none=True))
                return closing

            return StreamingResponse(generation.stream_events(engine, job, on_delta, on_finish),
                                     media_type="text/event-stream")
        choices = await generation.run_to_end(request, engine, job)
        return completion(
            [
                CompletionChoice(
                    index=c.index,
                    text=c.text,
                    finish_reason=c.finish_reason,
                    logprobs=completion_logprobs(c, body.logprobs) if body.logprobs is not None else None,
                )
                for c in choices
            ],
            usage=generation.usage(job, choices),
        )

    if settings.playground:
        # No key to load it: the page holds no secret, and asks for a key when the API answers 401.
        app.mount("/static", StaticFiles(directory=PLAYGROUND), name="static")

        @app.get("/", include_in_schema=False)
        async def playground():
            return FileResponse(PLAYGROUND / "index.html", headers={"Content-Security-Policy": PLAYGROUND_CSP})

    app.openapi = lambda: openapi_without_422(app)
    return app


# What the generation endpoints answer besides 200, all as OpenAI's error object.
ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 503, 504)}


def openapi_without_422(app: FastAPI) -> dict:
    """FastAPI documents its own 422 for invalid bodies; this server answers
    those with 400 and OpenAI's error object (documented per route)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for path in schema["paths"].values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        app.openapi_schema = schema
    return app.openapi_schema


def completion_logprobs(choice: generation.Choice, top: int) -> CompletionLogprobs:
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    offset = 0
    for token_id, candidates in zip(choice.token_ids, choice.logprobs):
        chosen = candidates[token_id]
        text = chosen.decoded_token or ""
        tokens.append(text)
        token_logprobs.append(chosen.logprob)
        ranked = sorted(candidates.values(), key=lambda lp: lp.rank)[:top]
        top_logprobs.append({lp.decoded_token or "": lp.logprob for lp in ranked})
        offsets.append(offset)
        offset += len(text)
    return CompletionLogprobs(tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top_logprobs, text_offset=offsets)
