"""POST /v1/completions: raw prompts in the pretrained Qwen-VL's format (`<img>URL</img>`)."""

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from .. import generation
from ..errors import APIError
from ..protocol import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest
from ..state import Api
from . import ERROR_RESPONSES, streamed

router = APIRouter()


@router.post("/v1/completions", responses={200: streamed(Completion), **ERROR_RESPONSES})
async def completions(body: CompletionRequest, request: Request, api: Api):
    if body.echo and body.logprobs is not None and body.stream:
        raise APIError(400, "echo: echoing the prompt's log-probabilities is not available with stream=true",
                       param="echo", code="invalid_value")
    job = await api.prepare(
        body, lambda: [api.builder.completion(text) for text in body.prompts], endpoint="completion",
        prefix="cmpl", stop_token_ids=[],
    )
    as_ids = bool(body.return_tokens_as_token_ids)

    def completion(choices: list[CompletionChoice], usage=None) -> Completion:
        return Completion(id=job.request_id, model=body.model, choices=choices, usage=usage)

    def prompt_ids(choice: generation.Choice) -> list[int] | None:
        return job.prompts[choice.prompt_index].token_ids if body.return_token_ids else None

    if body.stream:
        def delta(choice: generation.Choice, out, first: bool, opening: bool) -> Completion:
            return completion([CompletionChoice(
                index=choice.index,
                text=(body.prompts[choice.prompt_index] if first and body.echo else "") + out.text,
                logprobs=generation.completion_logprobs(list(out.token_ids), list(out.logprobs), body.logprobs,
                                                        as_ids) if body.logprobs is not None and out.logprobs
                else None,
                prompt_token_ids=prompt_ids(choice) if first else None,
                token_ids=list(out.token_ids) if body.return_token_ids else None,
            )])

        def closing(choice: generation.Choice) -> Completion:
            return completion([CompletionChoice(index=choice.index, text="", finish_reason=choice.finish_reason,
                                                stop_reason=choice.stop_reason)])

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = generation.stream_events(
            api.engine, job, delta=delta, closing=closing,
            usage_chunk=(lambda usage: completion([], usage=usage)) if include_usage else None,
            token_ids_wanted=bool(body.return_token_ids),
        )
        return StreamingResponse(events, media_type="text/event-stream")
    choices, prompts = await generation.run_to_end(request, api.engine, job)

    def logprobs(c: generation.Choice) -> CompletionLogprobs | None:
        if body.logprobs is None:
            return None
        token_ids, entries = c.token_ids, c.logprobs
        if body.echo:
            token_ids = job.prompts[c.prompt_index].token_ids + token_ids
            entries = prompts.logprobs[c.prompt_index] + entries
        return generation.completion_logprobs(token_ids, entries, body.logprobs, as_ids,
                                              decode=lambda t: api.engine.tokenizer.decode([t]))

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
