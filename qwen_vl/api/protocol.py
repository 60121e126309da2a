"""The wire protocol: OpenAI's chat and completions schemas (the parts Qwen-VL
serves), vLLM's extensions to them, and our `boxes` field.

Every field of vLLM 0.32's ChatCompletionRequest / CompletionRequest is named
here: it either works as in vLLM's server or accepts only its no-op default
(any other value is a 400 naming the field and saying why, REFUSED below).
A field this server does not know is a 400 too: nothing a client sends is
silently dropped."""

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from qwen_vl.model_executor.tokenizer import VOCAB_SIZE

MAX_N = 16
MAX_STOP_SEQUENCES = 8
MAX_TOP_LOGPROBS = 20
# vLLM takes int64 here; this server the integers JSON carries exactly everywhere
# (JavaScript, and JSON Schema tools, which compare big integers as floats).
JSON_INT_MIN, JSON_INT_MAX = -(2**53 - 1), 2**53 - 1
# vLLM only asks repetition_penalty > 0, but applies it in float32: a value
# such as 5e-324 is 0 there, and masked logits (-inf) times 0 are NaN, so a
# structured-output request then samples a token its grammar forbids (vLLM
# ends it with finish_reason "error"); tiny non-zero values overflow the
# logits they divide. 0.01 already repeats 100-fold.
MIN_REPETITION_PENALTY = 0.01


def _integer(value):
    """JSON's integers only: no numeric strings or booleans (pydantic's lax mode takes both)."""
    if isinstance(value, (str, bool)):
        raise ValueError("Input should be a valid integer")
    return value


# An id of the Qwen tokenizer (the same 151860 tokens in every Qwen-VL checkpoint).
TokenId = Annotated[int, Field(ge=0, lt=VOCAB_SIZE), BeforeValidator(_integer)]
# logit_bias keys: token ids written as decimal strings, 0..151859.
TOKEN_ID_KEY = r"^(0|[1-9][0-9]{0,4}|1[0-4][0-9]{4}|150[0-9]{3}|151[0-7][0-9]{2}|1518[0-5][0-9])$"

# Fields of vLLM's requests that only take their default here, and why.
REFUSED = {
    "tools": "Qwen-VL-Chat has no tool-calling format",
    "tool_choice": "Qwen-VL-Chat has no tool-calling format",
    "parallel_tool_calls": "Qwen-VL-Chat has no tool-calling format",
    "reasoning_effort": "Qwen-VL-Chat does not reason in a separate channel",
    "thinking_token_budget": "Qwen-VL-Chat does not reason in a separate channel",
    "include_reasoning": "Qwen-VL-Chat does not reason in a separate channel",
    "use_beam_search": "beam search is not served here",
    "length_penalty": "it applies to beam search only, which is not served here",
    "watermarking": "watermarking is not served here",
    "logprob_token_ids": "not served here; use logprobs/top_logprobs",
    "echo": "chat: the last message is the user's, so there is nothing to continue",
    "add_generation_prompt": "the prompt is always the original chat()'s, which ends with the assistant's turn",
    "continue_final_message": "the prompt is always the original chat()'s, which ends with the assistant's turn",
    "add_special_tokens": "the prompt is built exactly as the original; the Qwen tokenizer adds no special tokens",
    "documents": "the prompt is the original chat()'s; there is no chat template to give documents to",
    "chat_template": "the prompt is the original chat()'s; it is not built from a template",
    "chat_template_kwargs": "the prompt is the original chat()'s; it is not built from a template",
    "media_io_kwargs": "images are decoded as the original does (convert('RGB'))",
    "mm_processor_kwargs": "images are processed as the original does (448x448, 256 features)",
    "session_id": "not served here",
    "routed_experts_prompt_start": "Qwen-VL has no experts",
    "return_token_offsets": "only vLLM's render endpoints return offsets; this server has none",
    "return_prompt_text": "only vLLM's render endpoints return the prompt text; this server has none",
    "mm_payload": "only vLLM's render endpoints use it; this server has none",
    "return_mm_kwargs": "only vLLM's render endpoints use it; this server has none",
    "kv_transfer_params": "disaggregated serving is not set up here",
    "ec_transfer_params": "disaggregated serving is not set up here",
    "vllm_xargs": "this server runs no custom extensions",
    "repetition_detection": "not served here",
    "suffix": "Qwen-VL has no fill-in-the-middle format",
    "prompt_embeds": "prompts are text (and images) only",
    "stream_options.continuous_usage_stats": "usage comes in the closing chunk only",
    "structured_outputs.structural_tag": "structural tags are not served here",
    "structured_outputs.disable_any_whitespace": "vLLM takes it from the engine's --structured-outputs-config",
    "structured_outputs.disable_additional_properties": "vLLM takes it from the engine's --structured-outputs-config",
    "structured_outputs.whitespace_pattern": "vLLM's structured-output backends here do not read it",
}


class Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(Request):
    url: str = Field(min_length=1)
    # Accepted for OpenAI compatibility; every image is resized to 448x448 as the original does.
    detail: str | None = None


class TextPart(Request):
    type: Literal["text"]
    text: str


class ImagePart(Request):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(Request):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(Request):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: Literal[False] = False


class JsonSchema(Request):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema")
    # The output always follows the schema (constrained decoding), strict or not.
    strict: bool | None = None


class ResponseFormat(Request):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_with_json_schema(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema', and only with it")
        return self


class StructuredOutputs(Request):
    """vLLM's `structured_outputs`: exactly one constraint, enforced by
    vLLM's structured-output backend (xgrammar by default)."""

    model_config = ConfigDict(extra="forbid")
    json_: str | dict[str, Any] | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(default=None, min_length=1)
    grammar: str | None = None
    json_object: bool | None = None
    # vLLM reads these from its engine settings, never from the request
    # (`--structured-outputs-config '{"backend": "xgrammar", "disable_any_whitespace": true}'`).
    disable_any_whitespace: Literal[False] = False
    disable_additional_properties: Literal[False] = False
    whitespace_pattern: None = None
    structural_tag: None = None

    @model_validator(mode="after")
    def _one_constraint(self):
        given = [self.json_, self.regex, self.choice, self.grammar, self.json_object]
        if sum(v is not None for v in given) != 1:
            raise ValueError("exactly one of json, regex, choice, grammar, json_object")
        return self


class OriginalChatPrompt(Request):
    """vLLM's chat-rendering fields: here the prompt is always the original
    chat()'s, so they are refused unless at their default (see REFUSED)."""

    model_config = ConfigDict(extra="forbid")
    messages: list[Message] = Field(min_length=1)
    tools: None = None
    add_generation_prompt: Literal[True] = True
    continue_final_message: Literal[False] = False
    chat_template: None = None
    chat_template_kwargs: None = None
    media_io_kwargs: None = None
    mm_processor_kwargs: None = None


class SamplingFields(Request):
    """Fields shared by chat and completions. Unset sampling fields take the
    checkpoint's generation_config.json defaults (Qwen-VL-Chat: top_p 0.3)."""

    model_config = ConfigDict(extra="forbid")
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=JSON_INT_MIN, le=JSON_INT_MAX)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, ge=MIN_REPETITION_PENALTY, le=2.0)
    logit_bias: dict[Annotated[str, Field(pattern=TOKEN_ID_KEY)], Annotated[float, Field(ge=-100, le=100)]] | None = None
    # vLLM's extensions.
    ignore_eos: bool = False  # generate exactly max_tokens (chat: <|im_end|> does not stop it either)
    min_tokens: int = Field(default=0, ge=0)
    stop_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    bad_words: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    allowed_token_ids: list[TokenId] | None = Field(default=None, min_length=1)
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1, le=JSON_INT_MAX)
    truncation_side: Literal["left", "right"] | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    priority: int = Field(default=0, ge=JSON_INT_MIN, le=JSON_INT_MAX)
    request_id: str | None = Field(default=None, min_length=1, max_length=256)
    cache_salt: str | None = Field(default=None, min_length=1, max_length=1024)
    return_token_ids: bool | None = None
    return_tokens_as_token_ids: bool | None = None
    stream_interval: int | None = Field(default=None, ge=1)
    # OpenAI's end-user id; like vLLM's server, this one does nothing with it.
    user: str | None = None
    # Refused unless at their default (see REFUSED).
    use_beam_search: Literal[False] = False
    length_penalty: Literal[1.0] = 1.0
    watermarking: Literal[False] | None = None
    logprob_token_ids: None = None
    add_special_tokens: Literal[False] = False
    session_id: None = None
    routed_experts_prompt_start: Literal[0] = 0
    return_token_offsets: Literal[False] | None = None
    kv_transfer_params: None = None
    ec_transfer_params: None = None
    vllm_xargs: None = None
    repetition_detection: None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} sequences")
        return stop

    @model_validator(mode="after")
    def _check_vllm_rules(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only with stream=true")
        if self.prompt_logprobs and self.stream:
            raise ValueError("prompt_logprobs: not available with stream=true")
        if self.structured_outputs is not None and self.response_format not in (None,) and \
                self.response_format.type != "text":
            raise ValueError("structured_outputs: give either it or response_format, not both")
        return self

    @property
    def stop_sequences(self) -> list[str]:
        # An empty string can never be found in the text: OpenAI accepts it and stops on nothing.
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class ChatCompletionRequest(SamplingFields, OriginalChatPrompt):
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # Ours: which image of the conversation (0-based, in order of appearance)
    # the answer's boxes refer to; default the last one, as the original draws.
    grounding_image: int | None = Field(default=None, ge=0)
    # Refused unless at their default (see REFUSED).
    tool_choice: Literal["none"] | None = None
    parallel_tool_calls: Literal[True] | None = None
    reasoning_effort: None = None
    thinking_token_budget: None = None
    include_reasoning: Literal[True] = True
    echo: Literal[False] = False
    documents: None = None
    return_prompt_text: Literal[False] | None = None
    mm_payload: Literal["tensors"] = "tensors"
    return_mm_kwargs: None = None

    @model_validator(mode="after")
    def _top_logprobs_with_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: only with logprobs=true")
        return self

    @property
    def completion_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def top(self) -> int | None:
        """Top log-probabilities per token, or None for no log-probabilities."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingFields):
    # The engine refuses an empty prompt.
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    # Refused unless at their default (see REFUSED).
    suffix: None = None
    prompt_embeds: None = None

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def completion_limit(self) -> int | None:
        return self.max_tokens

    @property
    def top(self) -> int | None:
        return self.logprobs


class TokenizeCompletionRequest(Request):
    """vLLM's /tokenize with a prompt: counted as /v1/completions builds it
    (each `<img>URL</img>` is 258 positions)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str
    # The Qwen tokenizer adds no special tokens either way.
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(OriginalChatPrompt):
    """vLLM's /tokenize with messages: the ids /v1/chat/completions would run."""

    model: str | None = None
    return_token_strs: bool | None = False
    add_special_tokens: Literal[False] = False


class DetokenizeRequest(Request):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[TokenId]


# ---- responses ---------------------------------------------------------------


class Box(BaseModel):
    """One reference and its box (or quadrilateral) in the answer."""

    ref: str | None
    kind: Literal["box", "quad"]
    box: tuple[int, int, int, int] = Field(description="x1, y1, x2, y2 on the model's 0..1000 grid (1000 is the far edge)")
    points: list[tuple[int, int]] = Field(description="the corners as written, on the 0..1000 grid")
    image_index: int | None = Field(description="the image (0-based, in order of appearance) the box refers to")
    box_pixels: tuple[int, int, int, int] | None = Field(description="the box in that image's pixels")


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class PromptTokensDetails(BaseModel):
    # Prompt tokens whose keys and values came from the prefix cache (computed
    # for an earlier request with the same prefix, images and cache salt).
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    boxes: list[Box] = Field(default_factory=list)


# vLLM's prompt log-probabilities: per prompt token (None for the first),
# {token id: {"logprob", "rank", "decoded_token"}}.
PromptLogprobs = list[dict[str, dict[str, Any]] | None]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    # vLLM's: the stop string or token id that ended the choice, if any.
    stop_reason: int | str | None = None
    logprobs: ChoiceLogprobs | None = None
    token_ids: list[int] | None = None  # with return_token_ids


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | None = None  # with return_token_ids


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    boxes: list[Box] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: ChoiceLogprobs | None = None
    token_ids: list[int] | None = None  # this chunk's, with return_token_ids


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    prompt_token_ids: list[int] | None = None  # first chunk, with return_token_ids


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: CompletionLogprobs | None = None
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | None = None  # with return_token_ids (first chunk when streaming)
    token_ids: list[int] | None = None  # with return_token_ids


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "qwen-vl-serve"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
