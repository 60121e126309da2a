"""`python -m qwen_vl.server` (or `qwen-vl-serve`): the OpenAI-compatible
server, uvicorn + FastAPI over vLLM's async engine in one process.

Exit status: 0 after a clean shutdown (SIGTERM/SIGINT: stop accepting, let
requests in flight finish within the grace period), 1 if the engine died,
so that an orchestrator restarts the process; 2 for settings that cannot run
(a bad flag, or a configuration vLLM or the plugin refuses), said in one line."""

import logging
import os
import signal
import sys

# vLLM 0.32 saves its compiled model in torch's AOT format by default and, with the torch it pins
# (2.13), never loads it back ("Compiling model again due to a load failure ...: 'function' object
# has no attribute 'finalize_loading'"): every start compiled afresh. vLLM's previous compile cache,
# chosen by this variable, is loaded back: a restart of the tiny checkpoint's server took 46 s
# against 60-73 s on a 2-core CPU (docs/reference.md, "The compile cache"). A value the user set wins.
AOT_COMPILE_ENV = "VLLM_USE_AOT_COMPILE"


def main(argv: list[str] | None = None) -> None:
    from qwen_vl.server.settings import parse

    settings = parse(argv)
    process, engine_args = settings.server, settings.engine_args
    from qwen_vl.server.cpu import apply_cpu_defaults

    # Before the engine starts: its processes read these variables.
    os.environ.setdefault(AOT_COMPILE_ENV, "0")
    apply_cpu_defaults(engine_args, process.cpu_threads_bind, process.cpu_preload)
    from qwen_vl.engine.engine import Engine, configuration_error, run_headless

    if process.headless:
        try:
            run_headless(engine_args, process.images_per_step, process.decode_pause_budget)
        except ValueError as error:
            refuse(configuration_error(error))
        return
    # force: zentorch's import (ZenCpuPlatform) configures the root logger first, at WARNING.
    logging.basicConfig(
        level=process.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr,
        force=True,
    )
    from vllm.platforms import current_platform

    # ZenCpuPlatform on AMD CPUs with zentorch (QWEN_VL_ZENTORCH=0: CpuPlatform): qwen_vl/model_executor/cpu_platform.py
    logging.getLogger("qwen_vl.server").info("vLLM platform: %s", type(current_platform).__name__)

    import uvicorn

    from qwen_vl.api.app import create_app

    try:
        engine = Engine(engine_args, process.images_per_step, process.decode_pause_budget)
    except ValueError as error:
        refuse(configuration_error(error))
    engine_died = False

    def on_engine_dead() -> None:
        nonlocal engine_died
        engine_died = True
        server.should_exit = True

    app = create_app(settings.api, engine, on_engine_dead)
    config = uvicorn.Config(
        app, host=process.host, port=process.port, log_level=process.log_level,
        timeout_graceful_shutdown=process.shutdown_grace_period,
    )
    server = uvicorn.Server(config)
    # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal to the
    # handler that was installed before it: make that one a no-op, so that a
    # clean drain ends with exit status 0 rather than "killed by SIGTERM".
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    server.run()
    # Everything is stopped (the engine's processes too). The interpreter's own
    # teardown of the libraries the engine loaded takes ~10 s here with nothing
    # left to do: skip it, logs flushed.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if engine_died or not server.started else 0)


def refuse(message: str) -> None:
    print(f"qwen-vl-serve: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
    main()
