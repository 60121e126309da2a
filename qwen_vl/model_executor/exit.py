"""vLLM's engine processes end without the interpreter's teardown.

A process that has imported torch and vLLM spends about 2 s here tearing its interpreter down
(modules, objects) after its work is done. vLLM's engine core and its worker each paid it, one
after the other, on every stop: an idle server took ~5 s to stop on SIGTERM, and vLLM, which
gives its engine core 5 s, force-killed it with a warning.

In the processes vLLM starts for the engine (EngineCore*, VllmWorker-*), once multiprocessing
has finished with the process (its target returned or raised, its non-daemon threads joined,
its finalizers run) it logs the exit code. At that message this runs the atexit callbacks, as
the interpreter would, flushes the standard streams and ends the process with that exit code:
only the teardown is skipped, as the server's own main process does. Other processes (the
user's program, its own multiprocessing children) are left alone.
"""

import atexit
import logging
import multiprocessing
import os
import re
import sys

ENGINE_PROCESSES = ("EngineCore", "VllmWorker")
# multiprocessing.process.BaseProcess._bootstrap, last thing before returning the exit code.
EXITING = re.compile(r"process exiting with exitcode (-?\d+)")


class ExitOnReport(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        match = EXITING.fullmatch(record.getMessage())
        if match is None:
            return
        atexit._run_exitfuncs()  # logging's own flush among them
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (AttributeError, OSError, ValueError):
                pass
        os._exit(int(match.group(1)))


def is_engine_process() -> bool:
    return (multiprocessing.parent_process() is not None
            and multiprocessing.current_process().name.startswith(ENGINE_PROCESSES))


def install_fast_exit() -> bool:
    """In an engine process, end it at multiprocessing's exit report; elsewhere do nothing."""
    if not is_engine_process():
        return False
    logger = multiprocessing.get_logger()  # multiprocessing's own; it does not propagate
    if not any(isinstance(handler, ExitOnReport) for handler in logger.handlers):
        logger.addHandler(ExitOnReport(logging.INFO))
    if not logger.isEnabledFor(logging.INFO):
        logger.setLevel(logging.INFO)
    return True
