"""The baseline: Qwen-VL served the way the official repo's demos do it, behind our API shape.

One request at a time (an asyncio lock), each a plain PyTorch forward with a growing KV cache:
the independent reference model the parity tests use (`qwen_vl.testing.reference.ReferenceQwenVL`,
imported, not copied), driven token by token as its `generate` does, so that tokens can be streamed.
Prompts come from our `PromptBuilder`, so every system under test sees the same token ids. It streams `/v1/chat/completions` (SSE, with `usage`) and answers
`/health` and `/v1/models`; only data: URLs are accepted, and sampling is greedy.

    python -m qwen_vl.benchmarks.baseline_server --model DIR --served-model-name NAME --port 8001
"""

import argparse
import asyncio
import base64
import binascii
import io
import json
import time
import uuid

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image

from qwen_vl.api.prompt import PromptBuilder
from qwen_vl.api.protocol import ChatCompletionRequest
from qwen_vl.model_executor.chat_prompt import CHAT_STOP_TOKEN_IDS
from qwen_vl.model_executor.tokenizer import QWenTokenizer
from qwen_vl.testing.reference import ReferenceQwenVL, pick_token


def decode_data_url(url: str) -> Image.Image:
    if not url.startswith("data:") or "," not in url:
        raise ValueError("the baseline server takes data: URLs only")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


def generate(model: ReferenceQwenVL, token_ids: list[int], images: list, max_new_tokens: int, stop_ids,
             on_token) -> None:
    """Greedy decoding with the reference's KV cache (its `generate` loop), one callback per token."""
    cache = model.new_cache()
    logits = model(token_ids, images, cache)[-1]
    for step in range(max_new_tokens):
        token = pick_token(logits, 0.0, 1.0, 0, None)
        on_token(token)
        if token in stop_ids or step + 1 == max_new_tokens:
            return
        logits = model([token], (), cache)[-1]


def create_app(model_dir: str, served_model_name: str, dtype: torch.dtype) -> FastAPI:
    model = ReferenceQwenVL.from_pretrained(model_dir, dtype=dtype)
    tokenizer = QWenTokenizer(vocab_file=f"{model_dir}/qwen.tiktoken")
    builder = PromptBuilder(tokenizer.backend_tokenizer)
    lock = asyncio.Lock()
    app = FastAPI(title="qwen-vl baseline")

    @app.get("/health")
    async def health():
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_model_name, "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest):
        try:
            prompt = builder.chat(body.messages)
            images = [decode_data_url(url) for url in prompt.image_urls]
        except (ValueError, binascii.Error, OSError) as e:
            return JSONResponse({"error": {"message": str(e), "type": "invalid_request_error"}}, status_code=400)
        max_tokens = body.completion_limit or 16
        stop_ids = () if body.ignore_eos else CHAT_STOP_TOKEN_IDS
        request_id = f"chatcmpl-{uuid.uuid4().hex}"

        def event(delta: dict, finish_reason=None, usage=None) -> str:
            chunk = {
                "id": request_id, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": body.model,
                "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            }
            if usage:
                chunk["usage"] = usage
            return f"data: {json.dumps(chunk)}\n\n"

        async def stream():
            # Strictly one request at a time, as the original's web demo serves.
            async with lock:
                queue: asyncio.Queue = asyncio.Queue()
                loop = asyncio.get_running_loop()

                def run() -> None:
                    try:
                        generate(model, prompt.token_ids, images, max_tokens, stop_ids,
                                 lambda t: loop.call_soon_threadsafe(queue.put_nowait, t))
                    finally:
                        loop.call_soon_threadsafe(queue.put_nowait, None)

                worker = loop.run_in_executor(None, run)
                generated: list[int] = []
                text = ""
                first = True
                while (token := await queue.get()) is not None:
                    generated.append(token)
                    full = tokenizer.decode(generated, skip_special_tokens=True)
                    delta, text = full[len(text):], full
                    if first or delta:
                        yield event({"role": "assistant", "content": delta} if first else {"content": delta})
                        first = False
                await worker
            finish = "stop" if generated and generated[-1] in stop_ids else "length"
            yield event({}, finish_reason=finish)
            if body.stream_options and body.stream_options.include_usage:
                usage = {"prompt_tokens": len(prompt.token_ids), "completion_tokens": len(generated),
                         "total_tokens": len(prompt.token_ids) + len(generated)}
                yield event({}, usage=usage)
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qwen_vl.benchmarks.baseline_server", description=__doc__)
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--threads", type=int, default=None, help="torch compute threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    app = create_app(args.model, args.served_model_name or args.model, getattr(torch, args.dtype))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
