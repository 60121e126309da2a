"""What the API's handlers share: one ApiState on `app.state.api`, given to each handler by the
`Api` dependency. It holds the settings and the engine, and what is known once the engine has
started (the prompt builder, the checkpoint's sampling defaults, the image limit); its methods
are the steps every generation request takes before the engine: the model check, and `prepare`
(validate, admit, fetch the images)."""

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

import httpx
from fastapi import Depends, Request

from qwen_vl.engine.engine import Engine
from qwen_vl.model_executor.tokenizer import IMAGE_SPAN

from . import generation
from .errors import APIError
from .images import ImageLimits
from .prompt import Prompt, PromptBuilder, PromptError, truncate
from .sampling import sampling_params
from .settings import ApiSettings


def max_images(max_model_len: int) -> int:
    """The images a prompt of this context can hold (258 positions each), the
    default limit per request: the original answers as many."""
    return max_model_len // len(IMAGE_SPAN)


@dataclass
class ApiState:
    settings: ApiSettings
    engine: Engine
    on_engine_dead: Callable[[], None] | None = None  # called once if the engine dies
    admission: generation.Admission = field(init=False)
    image_limits: ImageLimits = field(init=False)
    # Set by `started`, once the engine runs:
    builder: PromptBuilder | None = None
    sampling_defaults: dict = field(default_factory=dict)
    max_images: int = 0
    http: httpx.AsyncClient | None = None

    def __post_init__(self):
        settings = self.settings
        self.admission = generation.Admission(settings.max_pending_requests)
        self.image_limits = ImageLimits(
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
            fetch_timeout=settings.image_fetch_timeout,
            max_redirects=settings.image_max_redirects,
            allow_private_networks=settings.allow_private_image_urls,
            local_root=settings.image_local_root,
        )

    def started(self, http: httpx.AsyncClient) -> None:
        """What the running engine tells: its tokenizer, the checkpoint's facts, the context."""
        engine = self.engine
        checkpoint = engine.checkpoint
        self.builder = PromptBuilder(engine.tokenizer.backend_tokenizer, checkpoint.max_window_size)
        self.sampling_defaults = checkpoint.sampling_defaults
        self.max_images = self.settings.max_images_per_request or max_images(engine.max_model_len)
        self.http = http

    def check_model(self, name: str | None) -> None:
        settings = self.settings
        if name is not None and name not in (settings.served_model_name, settings.model):
            raise APIError(404, f"model {name!r} does not exist; this server serves {settings.served_model_name!r}",
                           param="model", code="model_not_found")
        if not self.engine.serving:
            raise APIError(503, "the engine is not serving", code="engine_unavailable")

    def truncated(self, prompt: Prompt, body) -> Prompt:
        if body.truncate_prompt_tokens is None:
            return prompt
        # -1: as long as the context allows, one token left for the answer (as vLLM).
        keep = self.engine.max_model_len - 1 if body.truncate_prompt_tokens == -1 else body.truncate_prompt_tokens
        return truncate(prompt, keep, body.truncation_side or "right")

    async def prepare(self, body, build_prompts: Callable[[], list[Prompt]], *, endpoint: str, prefix: str,
                      stop_token_ids: list[int], grounding_image: int | None = None) -> generation.Job:
        """Validate (cheap checks first), admit, then fetch the images."""
        engine = self.engine
        self.check_model(body.model)
        if body.priority and not engine.priority_scheduling:
            raise APIError(400, "priority: the engine schedules first come, first served; start the server with "
                           "--scheduling-policy priority to order requests by priority", param="priority",
                           code="invalid_value")
        try:
            # Tokenizing a long conversation takes real time: not on the event loop.
            prompts = [self.truncated(p, body) for p in await asyncio.to_thread(build_prompts)]
        except PromptError as e:
            raise APIError(400, str(e), param=e.param) from e
        if grounding_image is not None and grounding_image >= len(prompts[0].image_urls):
            raise APIError(400, f"grounding_image={grounding_image} but the conversation has "
                           f"{len(prompts[0].image_urls)} image(s)", param="grounding_image")
        params = sampling_params(
            body, self.sampling_defaults,
            prompt_tokens=max(len(p.token_ids) for p in prompts), max_model_len=engine.max_model_len,
            completion_limit=body.completion_limit, logprobs=body.top,
            stop_token_ids=stop_token_ids, stream=body.stream,
        )
        if getattr(body, "echo", False) and body.logprobs is not None and params.prompt_logprobs is None:
            # Echoed prompt tokens carry log-probabilities too, as in vLLM.
            params.prompt_logprobs = body.logprobs
        ticket = self.admission.admit()
        try:
            images = await generation.fetch_images(prompts, self.image_limits, self.max_images, self.http)
        except BaseException:
            ticket.release()
            raise
        request_id = f"{prefix}-{body.request_id or generation.new_request_id()}"
        return generation.Job(endpoint, request_id, prompts, images, params, ticket,
                              timeout=self.settings.request_timeout or None, priority=body.priority,
                              cache_salt=body.cache_salt)


async def api_state(request: Request) -> ApiState:
    # async: FastAPI would run a plain function in its thread pool, for every request.
    return request.app.state.api


# A handler's parameter `api: Api` is the app's ApiState.
Api = Annotated[ApiState, Depends(api_state)]
