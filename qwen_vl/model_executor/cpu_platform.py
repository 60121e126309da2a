"""Which of vLLM's CPU platforms runs the model.

On an AMD CPU with AVX-512, vLLM 0.32 picks its `ZenCpuPlatform` whenever
`zentorch` (AMD's ZenDNN kernels for PyTorch, a `cpu` dependency of ours)
imports: every linear layer, the ViT's and the LM head's included, then runs
through zentorch's GEMM on weights packed once at load. Elsewhere, and with
`QWEN_VL_ZENTORCH=0`, it is vLLM's plain `CpuPlatform` (oneDNN).

The opt-out is a vLLM platform plugin (entry point group
`vllm.platform_plugins`): vLLM asks it in every process it starts, before its
own detection, and an out-of-tree answer wins. It answers only where the
built-in detection would pick Zen, so it never moves a GPU host to the CPU.
`VLLM_TARGET_DEVICE=cpu` makes vLLM skip the plugins: the opt-out does not
apply then.
"""

import logging
import os

ZENTORCH_ENV = "QWEN_VL_ZENTORCH"  # "0": vLLM's CpuPlatform even where zentorch would be used
CPU_PLATFORM = "vllm.platforms.cpu.CpuPlatform"


def zentorch_wanted() -> bool:
    """False when QWEN_VL_ZENTORCH says "0"; a value other than "0" or "1" is an error."""
    value = os.environ.get(ZENTORCH_ENV, "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{ZENTORCH_ENV} must be 0 or 1, not {value!r}")
    return value == "1"


def select() -> str | None:
    """vLLM's platform-plugin hook: CpuPlatform where vLLM would pick ZenCpuPlatform and the
    user opted out; None (vLLM decides) otherwise."""
    try:
        if zentorch_wanted():
            return None
    except ValueError as error:  # vLLM swallows a plugin's exceptions: say it, and keep vLLM's choice
        logging.getLogger(__name__).warning("%s; ignored", error)
        return None
    from vllm import platforms

    if platforms.vllm_version_matches_substr("cpu") and platforms._is_amd_zen_cpu():
        return CPU_PLATFORM
    return None
