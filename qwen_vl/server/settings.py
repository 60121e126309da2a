"""Every setting of the server: the process's (ServerSettings, below), the API's
(qwen_vl.api.settings.ApiSettings), each declared once as a field (qwen_vl.options), and vLLM's
engine arguments, passed through unchanged. Each one has a flag, an environment variable
(`QWEN_VL_` + the flag's name in capitals, dashes as underscores) and a line in `--help`; a flag
beats its variable."""

import argparse
from dataclasses import dataclass

from vllm.engine.arg_utils import AsyncEngineArgs

from qwen_vl.api.settings import ApiSettings
from qwen_vl.engine.scheduler import DEFAULT_BUDGET
from qwen_vl.options import ENV_PREFIX, add_options, apply_environment, check_minimums, from_namespace, option

DEMO_MODEL_NAME = "qwen-vl-demo"
CPU = "CPU platform"


@dataclass(frozen=True)
class ServerSettings:
    """The process: where it listens, how it stops, the engine's scheduling and its CPU set-up."""

    log_level: str  # vLLM's own --log-level (None unless given) also sets ours
    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(8000, "port to listen on")
    shutdown_grace_period: float = option(30.0, "on SIGTERM, seconds that requests in flight get to finish")
    images_per_step: int | None = option(
        None, "images the vision encoder takes in one engine step, at most (vLLM's encoder compute budget); a "
        "prompt stops just before an image that does not fit and goes on in the next step (chunked prefill). "
        "1 bounds the stall a burst of new images puts into running streams and lowers TTFT under bursts, "
        "but splits requests that arrive together (BENCHMARKS.md, 'Images per step'). Unset: vLLM's budget, "
        "as many as --max-num-batched-tokens holds (8 at 2048)", metavar="N", minimum=1,
    )
    decode_pause_budget: float = option(
        DEFAULT_BUDGET, "while requests are decoding, a prompt's prefill takes about this much of an engine step "
        "(at least 128 positions; its cost measured from the engine's own steps), so that a long prompt pauses "
        "the running streams only briefly; a prompt alone still gets vLLM's full step. 0 = vLLM's scheduling. "
        "Ignored with --scheduler-cls", metavar="SECONDS", minimum=0,
        below_minimum="0 (vLLM's scheduling) or more seconds",
    )
    headless: bool = option(
        False, "multi-node: run this node's engine workers only, no HTTP server (with --nnodes N, --node-rank R "
        "> 0 and --master-addr of node 0, which serves the API); every node needs the same engine flags",
    )
    cpu_threads_bind: str | None = option(
        None, "cores the engine's ranks compute on, in vLLM's VLLM_CPU_OMP_THREADS_BIND syntax ('0-3'; one "
        "group per rank: '0-1|2-3'; 'auto' = vLLM's default, which keeps a core per rank free; 'nobind'). "
        "Unset: every allowed core, one thread per physical core, split evenly among the ranks on this node. "
        "VLLM_CPU_OMP_THREADS_BIND in the environment, if set, wins", group=CPU, metavar="BIND",
    )
    cpu_preload: bool = option(
        True, "preload tcmalloc and Intel's OpenMP (libiomp5) into the engine's processes when installed and "
        "LD_PRELOAD is unset (vLLM asks for both)", group=CPU,
    )


@dataclass(frozen=True)
class Settings:
    """What `parse` returns: the process's settings, the API's, and vLLM's engine arguments."""

    server: ServerSettings
    api: ApiSettings
    engine_args: AsyncEngineArgs


def build_parser() -> argparse.ArgumentParser:
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
        "the built-in demo model (qwen-vl-demo: a small Qwen-VL-Chat trained on drawn shapes and words). vLLM's engine arguments pass through. Every flag "
        f"also reads the environment variable {ENV_PREFIX}<FLAG> (capitals, dashes as underscores); a flag "
        "beats its variable. --help=GROUP or --help=WORD narrows this list.",
    )
    add_options(parser, ServerSettings)
    add_options(parser, ApiSettings)
    AsyncEngineArgs.add_cli_args(parser)
    parser.set_defaults(model=None)
    apply_environment(parser)
    return parser


def parse(argv: list[str] | None = None) -> Settings:
    """The settings from flags and environment variables; a setting that cannot run ends the
    process here with parser.error (exit status 2, one line naming the flag)."""
    from qwen_vl.model_executor.cpu_platform import zentorch_wanted

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        zentorch_wanted()
    except ValueError as error:
        parser.error(str(error))
    check_minimums(parser, args, ServerSettings)
    check_minimums(parser, args, ApiSettings)
    if args.images_per_step is not None and args.enable_chunked_prefill is False:
        parser.error("--images-per-step needs chunked prefill (a prompt's images may not fit one step): "
                     "drop --no-enable-chunked-prefill or --images-per-step")
    if args.model is None:
        from qwen_vl.testing.demo_checkpoint import demo_checkpoint

        args.model = str(demo_checkpoint())
        args.served_model_name = args.served_model_name or [DEMO_MODEL_NAME]
    # vLLM's per-interval stats feed our Prometheus gauges (running, waiting, KV cache).
    args.disable_log_stats = False
    try:
        api = from_namespace(ApiSettings, args, model=args.model,
                             served_model_name=(args.served_model_name or [args.model])[0])
    except OSError as error:
        parser.error(f"--api-key-file: {error}")
    server = from_namespace(ServerSettings, args, log_level=(getattr(args, "log_level", None) or "info").lower())
    return Settings(server, api, AsyncEngineArgs.from_cli_args(args))
