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
from pydantic import BaseModel
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.v1.engine.exceptions import EngineDeadError

from qwen_vl.engine import metrics
from qwen_vl.engine.engine import Engine

from .errors import APIError, error_body
from .grounding import parse_grounding
from .images import ImageError, ImageLimits, load_images
from .prompt import Prompt
from .protocol import Box, ChoiceLogprobs, CompletionLogprobs, PromptTokensDetails, TokenLogprob, TopLogprob, Usage


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
    """One generation request on its way through the engine: one engine
    request per prompt (a completions request may hold several)."""

    endpoint: str
    request_id: str
    prompts: list[Prompt]
    images: list[list[Image.Image]]  # per prompt
    params: SamplingParams
    ticket: Ticket
    timeout: float | None = None  # seconds; None = no deadline
    priority: int = 0
    cache_salt: str | None = None
    arrival: float = field(default_factory=time.perf_counter)
    cached_tokens: dict[int, int] = field(default_factory=dict)  # per prompt, as the engine reports them

    @property
    def choice_count(self) -> int:
        return len(self.prompts) * self.params.n


@dataclass
class Choice:
    index: int
    prompt_index: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class Prompts:
    """What the engine reports about each prompt (with prompt_logprobs)."""

    logprobs: dict[int, list] = field(default_factory=dict)


def new_request_id() -> str:
    return uuid.uuid4().hex


async def fetch_images(
    prompts: list[Prompt], limits: ImageLimits, max_images: int, client: httpx.AsyncClient
) -> list[list[Image.Image]]:
    """Each prompt's images; the limit counts them all."""
    count = sum(len(p.image_urls) for p in prompts)
    if count > max_images:
        raise APIError(400, f"{count} images in one request; the limit is {max_images}", code="too_many_images")
    metrics.IMAGES_PER_REQUEST.observe(count)
    if not count:
        return [[] for _ in prompts]
    started = time.perf_counter()
    try:
        images = [await load_images(p.image_urls, limits, client) if p.image_urls else [] for p in prompts]
    except ImageError as e:
        raise APIError(400, str(e), code=e.code) from e
    metrics.IMAGE_LOAD.observe(time.perf_counter() - started)
    return images


def _engine_unavailable(error: Exception) -> APIError:
    return APIError(503, f"the engine is not serving: {type(error).__name__}", code="engine_unavailable")


def _deadline_exceeded(job: Job) -> APIError:
    return APIError(504, f"the request ran past its {job.timeout:g} s deadline and was aborted",
                    code="deadline_exceeded")


async def _outputs(engine: Engine, job: Job) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) of every prompt's engine request, as they come."""
    streams = [
        engine.generate(prompt.token_ids, images, job.params, f"{job.request_id}-{i}",
                        priority=job.priority, cache_salt=job.cache_salt)
        for i, (prompt, images) in enumerate(zip(job.prompts, job.images))
    ]
    try:
        async for i, output in _merged(streams):
            if output.num_cached_tokens is not None:
                job.cached_tokens[i] = output.num_cached_tokens
            yield i, output
    except EngineDeadError as e:
        raise _engine_unavailable(e) from e
    except (VLLMValidationError, ValueError) as e:
        # Whatever vLLM's own input checks refuse is the client's to fix (so
        # vLLM's server answers them too); e.g. a regex its grammar backend cannot compile.
        raise APIError(400, str(e), param=getattr(e, "parameter", None), code="invalid_value") from e


async def _merged(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator) -> None:
        try:
            async for item in stream:
                await queue.put((i, item))
        except BaseException as e:  # handed to the consumer, which raises it
            await queue.put((i, e))
        finally:
            await queue.put((i, done))

    # Cancelling a pump cancels its engine stream, which aborts that request.
    tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            i, item = await queue.get()
            if item is done:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


async def _cancel_on_disconnect(request: Request, work: asyncio.Task) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            work.cancel()
            return


async def run_to_end(request: Request, engine: Engine, job: Job) -> tuple[list[Choice], Prompts]:
    """Generate to the end; a client that hangs up cancels (and so aborts) it."""

    async def collect() -> tuple[list[Choice], Prompts]:
        choices = new_choices(job)
        prompts = Prompts()
        first = True
        async for i, output in _outputs(engine, job):
            if first:
                metrics.TIME_TO_FIRST_TOKEN.observe(time.perf_counter() - job.arrival)
                first = False
            if output.prompt_logprobs is not None:
                prompts.logprobs[i] = list(output.prompt_logprobs)
            for out in output.outputs:
                merge(choices[i * job.params.n + out.index], out)
        return choices, prompts

    work = asyncio.ensure_future(asyncio.wait_for(collect(), job.timeout))
    watcher = asyncio.ensure_future(_cancel_on_disconnect(request, work))
    try:
        choices, prompts = await work
    except TimeoutError as e:
        raise _deadline_exceeded(job) from e
    finally:
        watcher.cancel()
        job.ticket.release()
    record_finished(job, choices)
    return choices, prompts


def new_choices(job: Job) -> list[Choice]:
    return [Choice(i, prompt_index=i // job.params.n) for i in range(job.choice_count)]


def merge(choice: Choice, out: CompletionOutput) -> None:
    choice.text += out.text
    choice.token_ids += list(out.token_ids)
    choice.logprobs += list(out.logprobs or [])
    choice.finish_reason = out.finish_reason or choice.finish_reason
    choice.stop_reason = out.stop_reason if out.stop_reason is not None else choice.stop_reason


def record_finished(job: Job, choices: list[Choice]) -> None:
    metrics.END_TO_END_LATENCY.observe(time.perf_counter() - job.arrival)
    metrics.PROMPT_TOKENS.inc(prompt_tokens(job))
    metrics.CACHED_PROMPT_TOKENS.inc(cached_tokens(job))
    metrics.COMPLETION_TOKENS.inc(sum(len(c.token_ids) for c in choices))


def prompt_tokens(job: Job) -> int:
    return sum(len(p.token_ids) for p in job.prompts)


def cached_tokens(job: Job) -> int:
    return sum(job.cached_tokens.values())


def usage(job: Job, choices: list[Choice]) -> Usage:
    completion = sum(len(c.token_ids) for c in choices)
    prompt = prompt_tokens(job)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens(job)))


def sse(payload) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


async def stream_events(
    engine: Engine,
    job: Job,
    *,
    delta: Callable[[Choice, CompletionOutput, bool, bool], BaseModel],
    closing: Callable[[Choice], BaseModel],
    usage_chunk: Callable[[Usage], BaseModel] | None,
    token_ids_wanted: bool,
) -> AsyncIterator[str]:
    """Both endpoints' SSE stream. `delta(choice, piece, first, opening)` makes the chunk of a
    choice's new piece (`first`: that choice's first chunk; `opening`: the stream's first); a
    piece with no text and no token ids to show is skipped, unless it is its choice's first (the
    one that says the choice began). Once the engine is done, `closing(choice)` per choice, then
    the `usage_chunk` if asked for; then `data: [DONE]`. An error after the stream began is an
    error event. Starlette cancels this generator when the client goes, which aborts the request."""
    choices = new_choices(job)
    started: set[int] = set()
    last = None
    try:
        async with asyncio.timeout(job.timeout):
            async for i, output in _outputs(engine, job):
                now = time.perf_counter()
                if last is None:
                    metrics.TIME_TO_FIRST_TOKEN.observe(now - job.arrival)
                else:
                    metrics.INTER_TOKEN_LATENCY.observe(now - last)
                last = now
                for out in output.outputs:
                    choice = choices[i * job.params.n + out.index]
                    merge(choice, out)
                    first = choice.index not in started
                    if not first and not out.text and not (token_ids_wanted and out.token_ids):
                        continue
                    chunk = delta(choice, out, first, not started)
                    started.add(choice.index)
                    yield sse(chunk.model_dump(exclude_none=True))
        record_finished(job, choices)
        for choice in choices:
            yield sse(closing(choice).model_dump(exclude_none=True))
        if usage_chunk is not None:
            yield sse(usage_chunk(usage(job, choices)).model_dump(exclude_none=True))
    except TimeoutError:
        e = _deadline_exceeded(job)
        yield sse({"error": error_body(e.status, e.message, e.param, e.code)["error"]})
    except APIError as e:
        yield sse({"error": error_body(e.status, e.message, e.param, e.code)["error"]})
    finally:
        job.ticket.release()
    yield sse("[DONE]")


# JSON has no -inf (a token masked out); vLLM's server writes this instead.
LOGPROB_FLOOR = -9999.0


def finite(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


def token_text(token_id: int, logprob, as_ids: bool) -> str:
    """A token as logprobs name it: its text, or `token_id:N` (vLLM's
    return_tokens_as_token_ids, for tokens that are no whole UTF-8 text)."""
    return f"token_id:{token_id}" if as_ids else logprob.decoded_token or ""


def chat_logprobs(logprobs: list, token_ids: list[int], top: int, as_ids: bool = False) -> ChoiceLogprobs:
    """vLLM's per-token {id: Logprob} -> OpenAI's `logprobs.content`."""

    def entry(token_id, lp) -> dict:
        text = token_text(token_id, lp, as_ids)
        return {"token": text, "logprob": finite(lp.logprob), "bytes": list(text.encode())}

    content = []
    for token_id, candidates in zip(token_ids, logprobs):
        ranked = sorted(candidates.items(), key=lambda item: item[1].rank)[:top]
        content.append(TokenLogprob(**entry(token_id, candidates[token_id]),
                                    top_logprobs=[TopLogprob(**entry(i, lp)) for i, lp in ranked]))
    return ChoiceLogprobs(content=content)


def completion_logprobs(token_ids: list[int], logprobs: list, top: int, as_ids: bool = False,
                        decode: Callable[[int], str] = str) -> CompletionLogprobs:
    """vLLM's per-token {id: Logprob} -> the completions API's logprobs;
    None entries (the first prompt token, with echo) have no log-probability."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    offset = 0
    for token_id, candidates in zip(token_ids, logprobs):
        if candidates is None:
            text, chosen, ranked = f"token_id:{token_id}" if as_ids else decode(token_id), None, None
        else:
            chosen = candidates[token_id]
            text = token_text(token_id, chosen, as_ids)
            ranked = sorted(candidates.items(), key=lambda item: item[1].rank)[:top]
        tokens.append(text)
        token_logprobs.append(finite(chosen.logprob) if chosen is not None else None)
        top_logprobs.append({token_text(i, lp, as_ids): finite(lp.logprob) for i, lp in ranked}
                            if ranked is not None else None)
        offsets.append(offset)
        offset += len(text)
    return CompletionLogprobs(tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top_logprobs,
                              text_offset=offsets)


def prompt_logprobs(logprobs: list | None) -> list | None:
    """vLLM's prompt_logprobs as its server writes them: None for the first
    token, then {token id: {"logprob", "rank", "decoded_token"}}."""
    if logprobs is None:
        return None
    return [
        None if position is None else {
            str(token_id): {"logprob": finite(lp.logprob), "rank": lp.rank, "decoded_token": lp.decoded_token}
            for token_id, lp in position.items()
        }
        for position in logprobs
    ]


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
