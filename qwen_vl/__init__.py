"""qwen-vl-serve: exact, high-throughput serving of Qwen-VL / Qwen-VL-Chat.

Why one top-level package: vLLM 0.32 puts its own module into `sys.modules`
under the bare name `model_executor` (a LazyLoader in `vllm/config/model.py`),
so a top-level package of that name is shadowed once vLLM has loaded a model
config. Under `qwen_vl.` our names cannot collide.

    model_executor/  the vLLM plugin: network, processor, tokenizer, weights
    api/             wire protocol, chat-to-prompt, images, grounding
    server/          process, settings, engine lifecycle, metrics
    benchmarks/      load generator and side-by-side peers
    demo/            the demo model's scenes, training and weights (uses model_executor)
"""

import os
import sys

from ._torch_extras import hide_broken_extras

if (_hidden := hide_broken_extras()) and not os.environ.get("QWEN_VL_EXTRAS_REPORTED"):
    os.environ["QWEN_VL_EXTRAS_REPORTED"] = "1"  # once: the processes it starts inherit this
    for _name, _error in _hidden.items():
        print(f"qwen_vl: {_name} is installed but cannot be imported ({_error}); treating it as not installed "
              f"(`pip uninstall {_name}` silences this)", file=sys.stderr)
