"""The API's endpoints, one router per module, each handler thin: it reads like the API
reference, and the work is in ..prompt, ..images, ..generation and ..grounding.

    chat.py         POST /v1/chat/completions
    completions.py  POST /v1/completions
    tokenize.py     POST /tokenize, /detokenize (and under /v1/)
    service.py      GET /health, /version, /metrics, /v1/models
    playground.py   GET / (the playground page; its assets under /static)"""

from ..protocol import ErrorResponse

# What the generation endpoints answer besides 200, all as OpenAI's error object.
ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 404, 413, 503, 504)}


def streamed(model: type) -> dict:
    """A generation endpoint's 200: JSON, or server-sent events with `stream`."""
    event = {"type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}
    return {"model": model, "content": {"text/event-stream": {"schema": event}},
            "description": "the completion, or with stream=true its chunks as server-sent events"}
