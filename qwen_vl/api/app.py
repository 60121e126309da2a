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

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Receive, Scope, Send

from qwen_vl.engine import metrics
from qwen_vl.engine.engine import Engine
from qwen_vl.model_executor.chat_prompt import IMAGE_SPAN
from qwen_vl.model_executor.tokenizer import IM_END_ID, IM_START_ID

from . import generation
from .errors import APIError, error_body, install_error_handlers
from .images import ImageLimits, new_client
from .prompt import Prompt, PromptBuilder, PromptError, truncate
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
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)
from .sampling import sampling_params
from .settings import Settings

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


def needs_key(path: str, protect_metrics: bool) -> bool:
    """The API's own paths; not /health, /version, the docs, nor /metrics unless protected."""
    return path.startswith("/v1/") or path in ("/tokenize", "/detokenize") or (protect_metrics and path == "/metrics")


class RequireKey:
    """401 for requests to protected paths without a valid key, before
    anything reads or parses the body. Plain ASGI, outside the body limit."""

    def __init__(self, app: ASGIApp, keys: tuple[str, ...], protect_metrics: bool):
        self.app = app
        self.keys = [key.encode() for key in keys]
        self.protect_metrics = protect_metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send):
        # CORS preflights never get here: the CORS middleware, outside this one, answers them.
        if scope["type"] != "http" or not self.keys or not needs_key(scope["path"], self.protect_metrics):
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers", [])).get(b"authorization", b"")
        token = header[7:].strip() if header[:7].lower() == b"bearer " else b""
        # Compare against every key, always, in constant time.
        if not any([hmac.compare_digest(token, key) for key in self.keys]):
            response = JSONResponse(error_body(401, "missing or invalid API key", code="invalid_api_key"),
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        await self.app(scope, receive, send)


class CountRequests:
    """qwen_vl_requests_total by route and status. Plain ASGI: Starlette's
    BaseHTTPMiddleware would relay every streamed chunk through a queue."""

    def __init__(self, app: ASGIApp, routes: list):
        self.app = app
        self.routes = routes  # the app's, filled in once the routes are defined

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
            # Requests RequireKey refused never reached the router: named by their path if it is a route's.
            paths = {getattr(r, "path", None) for r in self.routes}
            endpoint = route.path if route is not None else scope["path"] if scope["path"] in paths else "other"
            metrics.REQUESTS.labels(endpoint=endpoint, status=str(status)).inc()


def max_images(max_model_len: int) -> int:
    """The images a prompt of this context can hold (258 positions each), the
    default limit per request: the original answers as many."""
    return max_model_len // len(IMAGE_SPAN)


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
        state["max_images"] = settings.max_images_per_request or max_images(engine.max_model_len)
        logger.info(
            "serving %s as %r on http://%s:%d (engine ready in %.1f s, context %d tokens, at most %d images "
            "per request)", settings.model, settings.served_model_name, settings.host, settings.port,
            time.perf_counter() - started, engine.max_model_len, state["max_images"],
        )
        watcher = asyncio.create_task(watch_engine())
        async with new_client(image_limits) as state["http"]:
            yield
        watcher.cancel()
        engine.stop()

    app = FastAPI(title="qwen-vl-serve", version=VERSION, lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, limit=settings.max_request_bytes)
    app.add_middleware(RequireKey, keys=settings.api_keys, protect_metrics=settings.protect_metrics)
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

    app.add_middleware(CountRequests, routes=app.router.routes)

    def check_model(name: str | None) -> None:
        if name is not None and name not in (settings.served_model_name, settings.model):
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

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=settings.served_model_name, max_model_len=engine.max_model_len)])

    def truncated(prompt: Prompt, body) -> Prompt:
        if body.truncate_prompt_tokens is None:
            return prompt
        # -1: as long as the context allows, one token left for the answer (as vLLM).
        keep = engine.max_model_len - 1 if body.truncate_prompt_tokens == -1 else body.truncate_prompt_tokens
        return truncate(prompt, keep, body.truncation_side or "right")

    async def prepare(body, build_prompts, *, endpoint: str, prefix: str, stop_token_ids: list[int],
                      grounding_image: int | None = None) -> generation.Job:
        """Validate (cheap checks first), admit, then fetch the images."""
        check_model(body.model)
        if body.priority and not engine.priority_scheduling:
            raise APIError(400, "priority: the engine schedules first come, first served; start the server with "
                           "--scheduling-policy priority to order requests by priority", param="priority",
                           code="invalid_value")
        try:
            # Tokenizing a long conversation takes real time: not on the event loop.
            prompts = [truncated(p, body) for p in await asyncio.to_thread(build_prompts)]
        except PromptError as e:
            raise APIError(400, str(e), param=e.param) from e
        if grounding_image is not None and grounding_image >= len(prompts[0].image_urls):
            raise APIError(400, f"grounding_image={grounding_image} but the conversation has "
                           f"{len(prompts[0].image_urls)} image(s)", param="grounding_image")
        params = sampling_params(
            body, state["defaults"],
            prompt_tokens=max(len(p.token_ids) for p in prompts), max_model_len=engine.max_model_len,
            completion_limit=body.completion_limit, logprobs=body.top,
            stop_token_ids=stop_token_ids, stream=body.stream,
        )
        if getattr(body, "echo", False) and body.logprobs is not None and params.prompt_logprobs is None:
            # Echoed prompt tokens carry log-probabilities too, as in vLLM.
            params.prompt_logprobs = body.logprobs
        ticket = admission.admit()
        try:
            images = await generation.fetch_images(prompts, image_limits, state["max_images"], state["http"])
        except BaseException:
            ticket.release()
            raise
        request_id = f"{prefix}-{body.request_id or generation.new_request_id()}"
        return generation.Job(endpoint, request_id, prompts, images, params, ticket,
                              timeout=settings.request_timeout or None, priority=body.priority,
                              cache_salt=body.cache_salt)

    @app.post("/v1/chat/completions", responses={200: streamed(ChatCompletion), **ERROR_RESPONSES})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        job = await prepare(
            body, lambda: [state["builder"].chat(body.messages)], endpoint="chat", prefix="chatcmpl",
            # ignore_eos asks for exactly max_tokens tokens: the chat's end
            # tokens are its end-of-sequence too.
            stop_token_ids=[] if body.ignore_eos else CHAT_STOP_TOKEN_IDS, grounding_image=body.grounding_image,
        )
        if body.stream:
            return StreamingResponse(chat_stream(body, job), media_type="text/event-stream")
        choices, prompts = await generation.run_to_end(request, engine, job)
        as_ids = bool(body.return_tokens_as_token_ids)
        return ChatCompletion(
            id=job.request_id,
            model=body.model,
            choices=[
                ChatChoice(
                    index=c.index,
                    message=AssistantMessage(
                        # The original chat() strips the response.
                        content=c.text.strip(),
                        boxes=generation.boxes(c.text, job.images[0], body.grounding_image),
                    ),
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                    logprobs=generation.chat_logprobs(c.logprobs, c.token_ids, body.top, as_ids)
                    if body.logprobs else None,
                    token_ids=c.token_ids if body.return_token_ids else None,
                )
                for c in choices
            ],
            usage=generation.usage(job, choices),
            prompt_logprobs=generation.prompt_logprobs(prompts.logprobs.get(0)),
            prompt_token_ids=job.prompts[0].token_ids if body.return_token_ids else None,
        )

    def chat_stream(body: ChatCompletionRequest, job: generation.Job):
        started: set[int] = set()
        as_ids = bool(body.return_tokens_as_token_ids)

        def chunk(choices: list[ChatChunkChoice], usage=None) -> dict:
            # vLLM sends the prompt's ids (return_token_ids) in the first chunk only.
            prompt_ids = job.prompts[0].token_ids if body.return_token_ids and not started else None
            return ChatCompletionChunk(id=job.request_id, model=body.model, choices=choices, usage=usage,
                                       prompt_token_ids=prompt_ids).model_dump(exclude_none=True)

        def on_delta(choice: generation.Choice, out) -> dict | None:
            first = choice.index not in started
            if not out.text and not first and not (body.return_token_ids and out.token_ids):
                return None
            logprobs = None
            if body.logprobs and out.logprobs:
                logprobs = generation.chat_logprobs(list(out.logprobs), list(out.token_ids), body.top, as_ids)
            delta = Delta(role="assistant" if first else None, content=out.text)
            token_ids = list(out.token_ids) if body.return_token_ids else None
            event = chunk([ChatChunkChoice(index=choice.index, delta=delta, logprobs=logprobs, token_ids=token_ids)])
            started.add(choice.index)
            return event

        def on_finish(choices: list[generation.Choice]) -> list[dict]:
            closing = [
                chunk([ChatChunkChoice(
                    index=c.index,
                    delta=Delta(boxes=generation.boxes(c.text, job.images[0], body.grounding_image)),
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                )])
                for c in choices
            ]
            if body.stream_options and body.stream_options.include_usage:
                closing.append(chunk([], usage=generation.usage(job, choices)))
            return closing

        return generation.stream_events(engine, job, on_delta, on_finish)

    @app.post("/v1/completions", responses={200: streamed(Completion), **ERROR_RESPONSES})
    async def completions(body: CompletionRequest, request: Request):
        if body.echo and body.logprobs is not None and body.stream:
            raise APIError(400, "echo: echoing the prompt's log-probabilities is not available with stream=true",
                           param="echo", code="invalid_value")
        job = await prepare(
            body, lambda: [state["builder"].completion(text) for text in body.prompts], endpoint="completion",
            prefix="cmpl", stop_token_ids=[],
        )
        as_ids = bool(body.return_tokens_as_token_ids)

        def completion(choices: list[CompletionChoice], usage=None) -> Completion:
            return Completion(id=job.request_id, model=body.model, choices=choices, usage=usage)

        def prompt_ids(choice: generation.Choice) -> list[int] | None:
            return job.prompts[choice.prompt_index].token_ids if body.return_token_ids else None

        if body.stream:
            started: set[int] = set()

            def on_delta(choice, out):
                first = choice.index not in started
                started.add(choice.index)
                text = (body.prompts[choice.prompt_index] if first and body.echo else "") + out.text
                if not text and not first and not (body.return_token_ids and out.token_ids):
                    return None
                return completion([CompletionChoice(
                    index=choice.index, text=text,
                    logprobs=generation.completion_logprobs(list(out.token_ids), list(out.logprobs), body.logprobs,
                                                            as_ids) if body.logprobs is not None and out.logprobs
                    else None,
                    prompt_token_ids=prompt_ids(choice) if first else None,
                    token_ids=list(out.token_ids) if body.return_token_ids else None,
                )]).model_dump(exclude_none=True)

            def on_finish(choices):
                closing = [
                    completion([CompletionChoice(index=c.index, text="", finish_reason=c.finish_reason,
                                                 stop_reason=c.stop_reason)]).model_dump(exclude_none=True)
                    for c in choices
                ]
                if body.stream_options and body.stream_options.include_usage:
                    closing.append(completion([], usage=generation.usage(job, choices)).model_dump(exclude_none=True))
                return closing

            return StreamingResponse(generation.stream_events(engine, job, on_delta, on_finish),
                                     media_type="text/event-stream")
        choices, prompts = await generation.run_to_end(request, engine, job)

        def logprobs(c: generation.Choice) -> CompletionLogprobs | None:
            if body.logprobs is None:
                return None
            token_ids, entries = c.token_ids, c.logprobs
            if body.echo:
                token_ids = job.prompts[c.prompt_index].token_ids + token_ids
                entries = prompts.logprobs[c.prompt_index] + entries
            return generation.completion_logprobs(token_ids, entries, body.logprobs, as_ids,
                                                  decode=lambda t: engine.tokenizer.decode([t]))

        return completion(
            [
                CompletionChoice(
                    index=c.index,
                    text=(body.prompts[c.prompt_index] if body.echo else "") + c.text,
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                    logprobs=logprobs(c),
                    prompt_logprobs=generation.prompt_logprobs(prompts.logprobs.get(c.prompt_index))
                    if body.prompt_logprobs is not None else None,
                    prompt_token_ids=prompt_ids(c),
                    token_ids=c.token_ids if body.return_token_ids else None,
                )
                for c in choices
            ],
            usage=generation.usage(job, choices),
        )

    async def tokenize(body: TokenizeChatRequest | TokenizeCompletionRequest) -> TokenizeResponse:
        check_model(body.model)
        try:
            if isinstance(body, TokenizeChatRequest):
                prompt = await asyncio.to_thread(state["builder"].chat, body.messages)
            else:
                prompt = await asyncio.to_thread(state["builder"].completion, body.prompt)
        except PromptError as e:
            raise APIError(400, str(e), param=e.param) from e
        ids = prompt.token_ids
        strs = engine.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids, token_strs=strs)

    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        check_model(body.model)
        return DetokenizeResponse(prompt=engine.tokenizer.decode(body.tokens))

    # vLLM's server has them at the root; /v1/ too, beside the other endpoints.
    for prefix in ("", "/v1"):
        app.post(f"{prefix}/tokenize", responses=ERROR_RESPONSES)(tokenize)
        app.post(f"{prefix}/detokenize", responses=ERROR_RESPONSES)(detokenize)


    if settings.playground:
        # No key to load it: the page holds no secret, and asks for a key when the API answers 401.
        app.mount("/static", StaticFiles(directory=PLAYGROUND), name="static")

        @app.get("/", include_in_schema=False)
        async def playground():
            return FileResponse(PLAYGROUND / "index.html", headers={"Content-Security-Policy": PLAYGROUND_CSP})


    app.openapi = lambda: openapi_document(app, settings)
    return app


def streamed(model: type) -> dict:
    """A generation endpoint's 200: JSON, or server-sent events with `stream`."""
    event = {"type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}
    return {"model": model, "content": {"text/event-stream": {"schema": event}},
            "description": "the completion, or with stream=true its chunks as server-sent events"}


# What the generation endpoints answer besides 200, all as OpenAI's error object.
ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 404, 413, 503, 504)}


def openapi_document(app: FastAPI, settings: Settings) -> dict:
    """FastAPI's document, told true: no 422 (this server answers invalid
    bodies with 400 and OpenAI's error object, documented per route), and
    with API keys the bearer scheme on the paths RequireKey guards."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for path, operations in schema["paths"].items():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
                if settings.api_keys and needs_key(path, settings.protect_metrics):
                    operation["security"] = [{"apiKey": []}]
                    operation["responses"].setdefault("401", {
                        "description": "missing or invalid API key",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
                    })
        if settings.api_keys:
            schema["components"]["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
        app.openapi_schema = schema
    return app.openapi_schema
