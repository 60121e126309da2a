"""From a validated request to the engine and back: images fetched, the prompt
checked against the context, results gathered (or streamed as SSE), the
client's disconnect turned into an abort, and the metrics recorded."""

import asyncio
import json
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httpx
from fastapi import Request
from PIL import Image
from vllm import SamplingParams
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.exceptions import VLLMValidationError
from vllm.v1.engine.exceptions import EngineDeadError

from qwen_vl.engine import metrics
from qwen_vl.engine.engine import Engine

from .errors import APIError, error_body
from .grounding import parse_grounding
from .images import ImageError, ImageLimits, load_images
from .prompt import Prompt
from .protocol import Box, ChoiceLogprobs, TokenLogprob, TopLogprob, Usage


class Admission:
    """A bound on generation requests in flight, counted from admission
    (before images are fetched) to the end of generation."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight = 0

    def admit(self) -> "Ticket":
        if self.in_flight >= self.limit:
            raise APIError(503, f"the server is at capacity ({self.in_flight} requests in flight); retry shortly",
                           code="overloaded", headers={"Retry-After": "1"})
        self.in_flight += 1
        return Ticket(self)

    def _release(self) -> None:
        self.in_flight -= 1


class Ticket:
    """A place in the bound. `release()` gives it back once; so does garbage
    collection, so that a stream a client abandons before it starts (its
    generator then never runs) cannot hold its place forever."""

    def __init__(self, admission: Admission):
        self.release = weakref.finalize(self, admission._release)


@dataclass
class Job:
    """One generation request on its way through the engine."""

    endpoint: str
    request_id: str
    prompt: Prompt
    images: list[Image.Image]
    params: SamplingParams
    ticket: Ticket
    timeout: float | None = None  # seconds; None = no deadline
    arrival: float = field(default_factory=time.perf_counter)


@dataclass
class Choice:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def fetch_images(
    prompt: Prompt, limits: ImageLimits, max_images: int, client: httpx.AsyncClient
) -> list[Image.Image]:
    if len(prompt.image_urls) > max_images:
        raise APIError(
            400, f"{len(prompt.image_urls)} images in one request; the limit is {max_images}", code="too_many_images"
        )
    metrics.IMAGES_PER_REQUEST.observe(len(prompt.image_urls))
    if not prompt.image_urls:
        return []
    started = time.perf_counter()
    try:
        images = await load_images(prompt.image_urls, limits, client)
    except ImageError as e:
        raise APIError(400, str(e), code=e.code) from e
    metrics.IMAGE_LOAD.observe(time.perf_counter() - started)
    return images


def _engine_unavailable(error: Exception) -> APIError:
    return APIError(503, f"the engine is not serving: {type(error).__name__}", code="engine_unavailable")


def _deadline_exceeded(job: Job) -> APIError:
    return APIError(504, f"the request ran past its {job.timeout:g} s deadline and was aborted",
                    code="deadline_exceeded")


async def _outputs(engine: Engine, job: Job) -> AsyncIterator[RequestOutput]:
    try:
        async for output in engine.generate(job.prompt.token_ids, job.images, job.params, job.request_id):
            yield output
    except EngineDeadError as e:
        raise _engine_unavailable(e) from e
    except VLLMValidationError as e:
        # Whatever vLLM's own input checks refuse is the client's to fix.
        raise APIError(400, str(e), code="invalid_value") from e


async def _cancel_on_disconnect(request: Request, work: asyncio.Task) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            work.cancel()
            return


async def run_to_end(request: Request, engine: Engine, job: Job) -> list[Choice]:
    """Generate to the end; a client that hangs up cancels (and so aborts) it."""

    async def collect() -> list[Choice]:
        choices = {i: Choice(i) for i in range(job.params.n)}
        first = True
        async for output in _outputs(engine, job):
            if first:
                metrics.TIME_TO_FIRST_TOKEN.observe(time.perf_counter() - job.arrival)
                first = False
            for out in output.outputs:
                merge(choices[out.index], out)
        return [choices[i] for i in range(job.params.n)]

    work = asyncio.ensure_future(asyncio.wait_for(collect(), job.timeout))
    watcher = asyncio.ensure_future(_cancel_on_disconnect(request, work))
    try:
        choices = await work
    except TimeoutError as e:
        raise _deadline_exceeded(job) from e
    finally:
        watcher.cancel()
        job.ticket.release()
    record_finished(job, choices)
    return choices


def merge(choice: Choice, out: CompletionOutput) -> None:
    choice.text += out.text
    choice.token_ids += list(out.token_ids)
    choice.logprobs += list(out.logprobs or [])
    choice.finish_reason = out.finish_reason or choice.finish_reason


def record_finished(job: Job, choices: list[Choice]) -> None:
    metrics.END_TO_END_LATENCY.observe(time.perf_counter() - job.arrival)
    metrics.PROMPT_TOKENS.inc(len(job.prompt.token_ids))
    metrics.COMPLETION_TOKENS.inc(sum(len(c.token_ids) for c in choices))


def usage(job: Job, choices: list[Choice]) -> Usage:
    completion = sum(len(c.token_ids) for c in choices)
    prompt = len(job.prompt.token_ids)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def sse(payload) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


async def stream_events(
    engine: Engine,
    job: Job,
    on_delta: Callable[[Choice, CompletionOutput], dict | None],
    on_finish: Callable[[list[Choice]], list[dict]],
) -> AsyncIterator[str]:
    """SSE events: `on_delta` turns each choice's new piece into a chunk,
    `on_finish` adds the closing chunks; then `data: [DONE]`. Starlette
    cancels this generator when the client goes, which aborts the request."""
    choices = {i: Choice(i) for i in range(job.params.n)}
    last = None
    try:
        async with asyncio.timeout(job.timeout):
            async for output in _outputs(engine, job):
                now = time.perf_counter()
                if last is None:
                    metrics.TIME_TO_FIRST_TOKEN.observe(now - job.arrival)
                else:
                    metrics.INTER_TOKEN_LATENCY.observe(now - last)
                last = now
                for out in output.outputs:
                    choice = choices[out.index]
                    merge(choice, out)
                    chunk = on_delta(choice, out)
                    if chunk is not None:
                        yield sse(chunk)
        ordered = [choices[i] for i in range(job.params.n)]
        record_finished(job, ordered)
        for chunk in on_finish(ordered):
            yield sse(chunk)
    except TimeoutError:
        e = _deadline_exceeded(job)
        yield sse({"error": error_body(e.status, e.message, e.param, e.code)["error"]})
    except APIError as e:
        yield sse({"error": error_body(e.status, e.message, e.param, e.code)["error"]})
    finally:
        job.ticket.release()
    yield sse("[DONE]")


def chat_logprobs(logprobs: list, token_ids: list[int], top: int) -> ChoiceLogprobs:
    """vLLM's per-token {id: Logprob} -> OpenAI's `logprobs.content`."""
    content = []
    for token_id, candidates in zip(token_ids, logprobs):
        chosen = candidates[token_id]
        ranked = sorted(candidates.values(), key=lambda lp: lp.rank)[:top]
        content.append(
            TokenLogprob(
                token=chosen.decoded_token or "",
                logprob=chosen.logprob,
                bytes=list((chosen.decoded_token or "").encode()),
                top_logprobs=[
                    TopLogprob(token=lp.decoded_token or "", logprob=lp.logprob, bytes=list((lp.decoded_token or "").encode()))
                    for lp in ranked
                ],
            )
        )
    return ChoiceLogprobs(content=content)


def boxes(text: str, images: list[Image.Image], image_index: int | None) -> list[Box]:
    """The answer's references and boxes; pixels are those of the image they
    refer to: the conversation's last image unless the request named one."""
    found = parse_grounding(text)
    if not found:
        return []
    if image_index is None and images:
        image_index = len(images) - 1
    image = images[image_index] if image_index is not None and image_index < len(images) else None
    result = []
    for box in found:
        pixels = box.to_pixels(*image.size) if image is not None else None
        result.append(
            Box(
                ref=box.ref,
                kind=box.kind,
                box=box.box,
                points=box.points,
                image_index=image_index if image is not None else None,
                box_pixels=pixels,
            )
        )
    return result
