"""Where this project keeps files it generates for itself (built tokenizers, the demo checkpoint)."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$QWEN_VL_CACHE`, else `$XDG_CACHE_HOME/qwen-vl-serve`, else `~/.cache/qwen-vl-serve`.

    Never the model directory: it may be read-only or shared.
    """
    if override := os.environ.get("QWEN_VL_CACHE"):
        return Path(override)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "qwen-vl-serve"
