"""Request fields -> vLLM SamplingParams, with the checkpoint's
generation_config.json filling what the request leaves unset."""

from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind

from .errors import APIError
from .protocol import SamplingFields


def sampling_params(
    request: SamplingFields,
    defaults: dict,
    *,
    prompt_tokens: int,
    max_model_len: int,
    completion_limit: int | None,
    logprobs: int | None,
    stop_token_ids: list[int],
    stream: bool,
) -> SamplingParams:
    room = max_model_len - prompt_tokens
    if room <= 0:
        raise APIError(
            400,
            f"the prompt is {prompt_tokens} tokens (258 per image) but the model's context is "
            f"{max_model_len} tokens",
            param="messages" if hasattr(request, "messages") else "prompt",
            code="context_length_exceeded",
        )
    if completion_limit is not None and completion_limit > room:
        raise APIError(
            400,
            f"max_tokens={completion_limit} does not fit: the prompt is {prompt_tokens} tokens and the "
            f"context {max_model_len}, which leaves {room}",
            param="max_tokens",
            code="context_length_exceeded",
        )
    fields = {
        "temperature": request.temperature,
        "top_p": request.top_p,
        "top_k": request.top_k,
        "seed": request.seed,
        "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty,
        "repetition_penalty": request.repetition_penalty,
    }
    chosen = {**defaults, **{k: v for k, v in fields.items() if v is not None}}
    chosen["max_tokens"] = min(completion_limit or chosen.get("max_tokens") or room, room)
    try:
        return SamplingParams.from_optional(
            **chosen,
            n=request.n,
            stop=request.stop_sequences or None,
            stop_token_ids=stop_token_ids,
            ignore_eos=request.ignore_eos,
            logprobs=logprobs,
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
        )
    except ValueError as e:
        raise APIError(400, str(e), code="invalid_value") from e
