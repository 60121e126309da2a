"""qwen-vl-serve: exact, high-throughput serving of Qwen-VL / Qwen-VL-Chat.

Why one top-level package: vLLM 0.32 puts its own module into `sys.modules`
under the bare name `model_executor` (a LazyLoader in `vllm/config/model.py`),
so a top-level package of that name is shadowed once vLLM has loaded a model
config. Under `qwen_vl.` our names cannot collide.

Its parts, each importing only those listed below it (nothing imports upward; `benchmarks`
and `demo` are users of the rest, and nothing in the serving path imports them):

    benchmarks/      load tests and peers side by side, on a shared harness (harness.py)
    demo/            the demo model: scenes, questions, training, its weights file
    server/          the process: settings (flags, variables), CPU set-up, `python -m qwen_vl.server`
    api/             the HTTP API: wire protocol, routers, chat-to-prompt, images, grounding
    engine/          vLLM's async engine for the server: lifecycle, scheduling, metrics
    testing/         the plain-PyTorch reference and the checkpoint writer (tests, benchmarks), and
                     the built-in demo model's shipped weights
    model_executor/  the vLLM plugin: network, processor, tokenizer, weights, the checkpoint's
                     facts, and the hooks into vLLM (listed in its docstring)
    options.py       how a setting is declared once (flag, variable, typed field)
    cache.py         where generated files are kept
"""

import os
import sys

from ._torch_extras import hide_broken_extras

if (_hidden := hide_broken_extras()) and not os.environ.get("QWEN_VL_EXTRAS_REPORTED"):
    os.environ["QWEN_VL_EXTRAS_REPORTED"] = "1"  # once: the processes it starts inherit this
    for _name, _error in _hidden.items():
        print(f"qwen_vl: {_name} is installed but cannot be imported ({_error}); treating it as not installed "
              f"(`pip uninstall {_name}` silences this)", file=sys.stderr)
