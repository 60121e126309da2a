"""Request fields -> vLLM SamplingParams, with the checkpoint's
generation_config.json filling what the request leaves unset."""

from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

from .errors import APIError
from .protocol import SamplingFields


def structured_outputs(request: SamplingFields) -> StructuredOutputsParams | None:
    """`structured_outputs` or `response_format` -> vLLM's constraint, as vLLM's server maps them."""
    if request.structured_outputs is not None:
        so = request.structured_outputs
        return StructuredOutputsParams(json=so.json_, regex=so.regex, choice=so.choice, grammar=so.grammar,
                                       json_object=so.json_object)
    rf = request.response_format
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    return StructuredOutputsParams(json=rf.json_schema.json_schema)


def _logit_bias(request: SamplingFields) -> dict[int, float] | None:
    if request.logit_bias is None:
        return None
    # The schema admits token ids only (decimal strings).
    return {int(token): bias for token, bias in request.logit_bias.items()}


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
        "min_p": request.min_p,
        "seed": request.seed,
        "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty,
        "repetition_penalty": request.repetition_penalty,
    }
    chosen = {**defaults, **{k: v for k, v in fields.items() if v is not None}}
    chosen["max_tokens"] = min(completion_limit or chosen.get("max_tokens") or room, room)
    if request.min_tokens > chosen["max_tokens"]:
        raise APIError(400, f"min_tokens={request.min_tokens} is more than max_tokens={chosen['max_tokens']}",
                       param="min_tokens", code="invalid_value")
    try:
        return SamplingParams.from_optional(
            **chosen,
            n=request.n,
            stop=request.stop_sequences or None,
            stop_token_ids=list(dict.fromkeys([*(request.stop_token_ids or []), *stop_token_ids])),
            include_stop_str_in_output=request.include_stop_str_in_output,
            ignore_eos=request.ignore_eos,
            min_tokens=request.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=request.prompt_logprobs,
            skip_special_tokens=request.skip_special_tokens,
            spaces_between_special_tokens=request.spaces_between_special_tokens,
            logit_bias=_logit_bias(request),
            bad_words=request.bad_words or None,
            allowed_token_ids=request.allowed_token_ids,
            structured_outputs=structured_outputs(request),
            stream_interval=request.stream_interval,
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
        )
    except (ValueError, VLLMValidationError) as e:  # vLLM's own checks, e.g. n > 1 when greedy
        raise APIError(400, str(e), param=getattr(e, "parameter", None), code="invalid_value") from e
