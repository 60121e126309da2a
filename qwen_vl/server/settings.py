"""Every setting of the server in one place: our own (listen address, keys,
image limits) and vLLM's engine arguments, passed through unchanged. Each one
has a flag, an environment variable (`QWEN_VL_` + the flag's name in capitals,
dashes as underscores) and a line in `--help`; a flag beats its variable."""

import argparse
import os
from pathlib import Path

from qwen_vl.api.settings import Settings

ENV_PREFIX = "QWEN_VL_"
MIB = 1024 * 1024
DEMO_MODEL_NAME = "qwen-vl-demo"


def env_name(dest: str) -> str:
    return ENV_PREFIX + dest.upper()


def _truthy(value: str) -> bool:
    if value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if value.strip().lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def apply_environment(parser: argparse.ArgumentParser) -> None:
    """Let `QWEN_VL_<DEST>` set each option's default, and say so in --help."""
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", argparse.SUPPRESS):
            continue
        name = env_name(action.dest)
        action.help = f"{action.help or ''} [env {name}]".strip() if action.help != argparse.SUPPRESS else action.help
        raw = os.environ.get(name)
        if raw is None:
            continue
        if action.nargs == 0:  # store_true / store_false / BooleanOptionalAction
            value = _truthy(raw)
            if isinstance(action, argparse._StoreFalseAction):
                value = not value
        elif isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+"):
            value = [action.type(v) if action.type else v for v in raw.split()]
        else:
            value = action.type(raw) if callable(action.type) else raw
        parser.set_defaults(**{action.dest: value})


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    from qwen_vl.engine.scheduler import DEFAULT_BUDGET as DEFAULT_PAUSE_BUDGET

    group = parser.add_argument_group("qwen-vl server")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on")
    group.add_argument("--port", type=int, default=8000, help="port to listen on")
    group.add_argument(
        "--api-key", action="append", default=None, dest="api_key",
        help="accepted API key (repeat for several; env: space-separated); none = no auth",
    )
    group.add_argument(
        "--api-key-file", type=Path, default=None,
        help="file with accepted API keys, one per line (added to --api-key)",
    )
    group.add_argument("--protect-metrics", action="store_true", help="require an API key on /metrics too")
    group.add_argument(
        "--cors-origin", action="append", default=None, dest="cors_origin",
        help="allowed CORS origin (repeat for several, '*' for any); unset = CORS off",
    )
    group.add_argument(
        "--max-pending-requests", type=int, default=256,
        help="generation requests admitted at once (running, waiting or fetching images); "
        "beyond it new ones get 503 with Retry-After",
    )
    group.add_argument(
        "--request-timeout", type=float, default=600.0,
        help="deadline of one generation request in seconds (0 = none); past it the request is aborted",
    )
    group.add_argument(
        "--shutdown-grace-period", type=float, default=30.0,
        help="on SIGTERM, seconds that requests in flight get to finish",
    )
    group.add_argument(
        "--max-images-per-request", type=int, default=None, metavar="N",
        help="images in one request, at most (400 beyond). Unset: as many as the context holds, 258 positions "
        "each (31 at 8192), as the original answers them",
    )
    group.add_argument(
        "--images-per-step", type=int, default=None, metavar="N",
        help="images the vision encoder takes in one engine step, at most (vLLM's encoder compute budget); a "
        "prompt stops just before an image that does not fit and goes on in the next step (chunked prefill). "
        "1 bounds the stall a burst of new images puts into running streams and lowers TTFT under bursts, "
        "but splits requests that arrive together (BENCHMARKS.md, 'Images per step'). Unset: vLLM's budget, "
        "as many as --max-num-batched-tokens holds (8 at 2048)",
    )
    group.add_argument(
        "--decode-pause-budget", type=float, default=DEFAULT_PAUSE_BUDGET, metavar="SECONDS",
        help="while requests are decoding, a prompt's prefill takes about this much of an engine step (at least "
        "128 positions; its cost measured from the engine's own steps), so that a long prompt pauses the running "
        "streams only briefly; a prompt alone still gets vLLM's full step. 0 = vLLM's scheduling. Ignored with "
        "--scheduler-cls",
    )
    group.add_argument("--max-request-bytes", type=int, default=32 * MIB, help="request body size limit (413 beyond)")
    group.add_argument("--max-image-bytes", type=int, default=20 * MIB, help="size limit of one image, encoded")
    group.add_argument(
        "--max-image-pixels", type=int, default=40_000_000, help="width x height limit (decompression-bomb guard)"
    )
    group.add_argument("--image-fetch-timeout", type=float, default=10.0, help="connect/read timeout of image URLs, s")
    group.add_argument("--image-max-redirects", type=int, default=3, help="redirects followed for an image URL")
    group.add_argument(
        "--allow-private-image-urls", action="store_true",
        help="allow image URLs that resolve to loopback/private/link-local/reserved addresses",
    )
    group.add_argument(
        "--image-local-root", type=Path, default=None,
        help="directory under which local image paths (file://) may be read; unset = none",
    )
    group.add_argument(
        "--no-playground", action="store_true",
        help="do not serve the playground page at / (API-only deployments; / is then 404)",
    )
    group.add_argument(
        "--headless", action="store_true",
        help="multi-node: run this node's engine workers only, no HTTP server (with --nnodes N, --node-rank R "
        "> 0 and --master-addr of node 0, which serves the API); every node needs the same engine flags",
    )
    cpu = parser.add_argument_group("CPU platform")
    cpu.add_argument(
        "--cpu-threads-bind", default=None, metavar="BIND",
        help="cores the engine's ranks compute on, in vLLM's VLLM_CPU_OMP_THREADS_BIND syntax ('0-3'; one "
        "group per rank: '0-1|2-3'; 'auto' = vLLM's default, which keeps a core per rank free; 'nobind'). "
        "Unset: every allowed core, one thread per physical core, split evenly among the ranks on this node. "
        "VLLM_CPU_OMP_THREADS_BIND in the environment, if set, wins",
    )
    cpu.add_argument(
        "--cpu-preload", action=argparse.BooleanOptionalAction, default=True,
        help="preload tcmalloc and Intel's OpenMP (libiomp5) into the engine's processes when installed and "
        "LD_PRELOAD is unset (vLLM asks for both)",
    )


def build_parser() -> argparse.ArgumentParser:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    class ServerArgumentParser(FlexibleArgumentParser):
        """vLLM's parser (JSON-valued flags, --help=GROUP/KEYWORD), except that a
        plain --help lists every setting and its variable, not just the groups."""

        def format_help(self):
            if self._search_keyword is None:
                return argparse.ArgumentParser.format_help(self)
            return super().format_help()

    parser = ServerArgumentParser(
        prog="qwen-vl-serve",
        description="OpenAI-compatible server for Qwen-VL / Qwen-VL-Chat on vLLM. With no --model it serves "
        "the built-in demo checkpoint (random tiny weights). vLLM's engine arguments pass through. Every flag "
        f"also reads the environment variable {ENV_PREFIX}<FLAG> (capitals, dashes as underscores); a flag "
        "beats its variable. --help=GROUP or --help=WORD narrows this list.",
    )
    add_server_arguments(parser)
    AsyncEngineArgs.add_cli_args(parser)
    parser.set_defaults(model=None)
    apply_environment(parser)
    return parser


def parse(argv: list[str] | None = None):
    """-> (the API's Settings, vLLM AsyncEngineArgs, the parsed namespace: the process-level
    settings (CPU binding, preloads, --headless) and vLLM's headless runner read it)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    from qwen_vl.model_executor.cpu_platform import zentorch_wanted

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        zentorch_wanted()
    except ValueError as error:
        parser.error(str(error))
    if args.max_images_per_request is not None and args.max_images_per_request < 1:
        parser.error("--max-images-per-request: at least 1")
    if args.decode_pause_budget < 0:
        parser.error("--decode-pause-budget: 0 (vLLM's scheduling) or more seconds")
    if args.images_per_step is not None:
        if args.images_per_step < 1:
            parser.error("--images-per-step: at least 1")
        if args.enable_chunked_prefill is False:
            parser.error("--images-per-step needs chunked prefill (a prompt's images may not fit one step): "
                         "drop --no-enable-chunked-prefill or --images-per-step")
    if args.model is None:
        from qwen_vl.model_executor.checkpoint import demo_checkpoint

        args.model = str(demo_checkpoint())
        args.served_model_name = args.served_model_name or [DEMO_MODEL_NAME]
    # vLLM's per-interval stats feed our Prometheus gauges (running, waiting, KV cache).
    args.disable_log_stats = False
    engine_args = AsyncEngineArgs.from_cli_args(args)
    keys = list(args.api_key or [])
    if args.api_key_file is not None:
        keys += [line.strip() for line in args.api_key_file.read_text().splitlines() if line.strip()]
    settings = Settings(
        host=args.host,
        port=args.port,
        model=args.model,
        served_model_name=(args.served_model_name or [args.model])[0],
        api_keys=tuple(keys),
        protect_metrics=args.protect_metrics,
        cors_origins=tuple(args.cors_origin or ()),
        max_pending_requests=args.max_pending_requests,
        request_timeout=args.request_timeout,
        shutdown_grace_period=args.shutdown_grace_period,
        max_images_per_request=args.max_images_per_request,
        max_request_bytes=args.max_request_bytes,
        max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels,
        image_fetch_timeout=args.image_fetch_timeout,
        image_max_redirects=args.image_max_redirects,
        allow_private_image_urls=args.allow_private_image_urls,
        image_local_root=args.image_local_root,
        playground=not args.no_playground,
        # vLLM's own --log-level (None unless given) also sets ours.
        log_level=(getattr(args, "log_level", None) or "info").lower(),
    )
    return settings, engine_args, args
