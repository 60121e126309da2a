"""POST /tokenize and /detokenize, at the root as vLLM's server has them and under /v1/ beside
the other endpoints: a prompt's token ids as the generation endpoints build them, and back."""

import asyncio

from fastapi import APIRouter

from ..errors import APIError
from ..prompt import PromptError
from ..protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)
from ..state import Api
from . import ERROR_RESPONSES

router = APIRouter()


async def tokenize(body: TokenizeChatRequest | TokenizeCompletionRequest, api: Api) -> TokenizeResponse:
    api.check_model(body.model)
    try:
        if isinstance(body, TokenizeChatRequest):
            prompt = await asyncio.to_thread(api.builder.chat, body.messages)
        else:
            prompt = await asyncio.to_thread(api.builder.completion, body.prompt)
    except PromptError as e:
        raise APIError(400, str(e), param=e.param) from e
    ids = prompt.token_ids
    strs = api.engine.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=api.engine.max_model_len, tokens=ids, token_strs=strs)


async def detokenize(body: DetokenizeRequest, api: Api) -> DetokenizeResponse:
    api.check_model(body.model)
    return DetokenizeResponse(prompt=api.engine.tokenizer.decode(body.tokens))


for prefix in ("", "/v1"):
    router.post(f"{prefix}/tokenize", responses=ERROR_RESPONSES)(tokenize)
    router.post(f"{prefix}/detokenize", responses=ERROR_RESPONSES)(detokenize)
