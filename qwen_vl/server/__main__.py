"""`python -m qwen_vl.server` (or `qwen-vl-serve`): the OpenAI-compatible
server, uvicorn + FastAPI over vLLM's async engine in one process."""

import logging
import os
import sys


def main(argv: list[str] | None = None) -> None:
    # On CPU, vLLM otherwise sizes its KV cache as a fraction of all RAM and
    # refuses to start when the page cache makes "available" look small.
    # Ignored on GPUs.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from qwen_vl.server.settings import parse

    settings, engine_args = parse(argv)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )

    import uvicorn

    from qwen_vl.api.app import create_app
    from qwen_vl.server.engine import Engine

    app = create_app(settings, Engine(engine_args))
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, timeout_graceful_shutdown=30)


if __name__ == "__main__":
    main()
