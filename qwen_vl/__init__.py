"""qwen-vl-serve: exact, high-throughput serving of Qwen-VL / Qwen-VL-Chat.

Why one top-level package: vLLM 0.32 puts its own module into `sys.modules`
under the bare name `model_executor` (a LazyLoader in `vllm/config/model.py`),
so a top-level package of that name is shadowed once vLLM has loaded a model
config. Under `qwen_vl.` our names cannot collide.

    model_executor/  the vLLM plugin: network, processor, tokenizer, weights
    api/             wire protocol, chat-to-prompt, images, grounding
    server/          process, settings, engine lifecycle, metrics
    benchmarks/      load generator and side-by-side peers
"""

import sys

from ._torchvision import hide_broken_torchvision

if (_torchvision_error := hide_broken_torchvision()) is not None:
    import multiprocessing as _multiprocessing

    if _multiprocessing.parent_process() is None:  # once, not in every engine process
        print(f"qwen_vl: torchvision is installed but cannot be imported ({_torchvision_error}); treating it as "
              "not installed (`pip uninstall torchvision` silences this)", file=sys.stderr)
