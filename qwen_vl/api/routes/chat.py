"""POST /v1/chat/completions: the original chat() over OpenAI's chat API, with grounding boxes."""

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from .. import generation
from ..protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Delta,
)
from ..state import Api
from . import ERROR_RESPONSES, streamed

router = APIRouter()


@router.post("/v1/chat/completions", responses={200: streamed(ChatCompletion), **ERROR_RESPONSES})
async def chat_completions(body: ChatCompletionRequest, request: Request, api: Api):
    job = await api.prepare(
        body, lambda: [api.builder.chat(body.messages)], endpoint="chat", prefix="chatcmpl",
        # ignore_eos asks for exactly max_tokens tokens: the chat's end
        # tokens are its end-of-sequence too.
        stop_token_ids=[] if body.ignore_eos else list(api.engine.checkpoint.stop_token_ids),
        grounding_image=body.grounding_image,
    )
    if body.stream:
        return StreamingResponse(chat_stream(api, body, job), media_type="text/event-stream")
    choices, prompts = await generation.run_to_end(request, api.engine, job)
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


def chat_stream(api, body: ChatCompletionRequest, job: generation.Job):
    as_ids = bool(body.return_tokens_as_token_ids)

    def chunk(choices: list[ChatChunkChoice], usage=None, opening: bool = False) -> ChatCompletionChunk:
        # vLLM sends the prompt's ids (return_token_ids) in the first chunk only.
        prompt_ids = job.prompts[0].token_ids if body.return_token_ids and opening else None
        return ChatCompletionChunk(id=job.request_id, model=body.model, choices=choices, usage=usage,
                                   prompt_token_ids=prompt_ids)

    def delta(choice: generation.Choice, out, first: bool, opening: bool) -> ChatCompletionChunk:
        logprobs = None
        if body.logprobs and out.logprobs:
            logprobs = generation.chat_logprobs(list(out.logprobs), list(out.token_ids), body.top, as_ids)
        return chunk([ChatChunkChoice(
            index=choice.index, delta=Delta(role="assistant" if first else None, content=out.text),
            logprobs=logprobs, token_ids=list(out.token_ids) if body.return_token_ids else None,
        )], opening=opening)

    def closing(choice: generation.Choice) -> ChatCompletionChunk:
        return chunk([ChatChunkChoice(
            index=choice.index,
            delta=Delta(boxes=generation.boxes(choice.text, job.images[0], body.grounding_image)),
            finish_reason=choice.finish_reason,
            stop_reason=choice.stop_reason,
        )])

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return generation.stream_events(
        api.engine, job, delta=delta, closing=closing,
        usage_chunk=(lambda usage: chunk([], usage=usage)) if include_usage else None,
        token_ids_wanted=bool(body.return_token_ids),
    )
