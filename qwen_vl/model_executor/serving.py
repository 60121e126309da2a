"""What the plugin sets in vLLM's config so that `vllm serve` answers as the
original does, with no extra flags. The checkpoint's files stay as downloaded.

Stops.
vLLM stops a request at the eos ids of the checkpoint's generation_config.json.
Qwen-VL-Chat's names only `<|endoftext|>`; the original chat() (with
`chat_format: "chatml"` in that file) also stops at `<|im_end|>` and
`<|im_start|>` (`get_stop_words_ids`). Without them `vllm serve` runs on past
the answer into a new turn.

So the engine reads a copy of the checkpoint's generation config that names
all three ids, kept in our cache (a `--generation-config` the user gives is
left alone). With a chatml checkpoint every request (chat or raw completion,
`vllm serve` or ours) then ends at those ids unless `ignore_eos`.

Images. vLLM's media loader composites images with alpha onto white; the
original's `convert("RGB")` drops the alpha channel. The loader is told to
keep each image's mode (`media_io_kwargs` image_mode None, unless the user set
one), and the plugin's processor converts as the original does. The loader
also turns photos upright by their EXIF orientation, which the original does
not; the plugin's data parser decodes those from their bytes again, as stored
(`processor.as_stored`).

The renderer. Qwen-VL's tokenizer mode becomes "qwen_vl" in place of "auto"
or "hf" (the same tokenizer): vLLM then renders its prompts with
renderer.QwenVLRenderer, the original's prompt and the dynamic-NTK cache salt.

Dtypes. A dtype the platform does not compute in is refused (check_dtype).

Parallel sizes. A size tensor parallelism cannot split is refused with its
name (config.check_tensor_parallel), not deep inside model construction; so is
pipeline parallelism in eager mode on the CPU (check_pipeline_parallel), which
would otherwise kill the second stage's worker.

All of these are done from vLLM's per-architecture config hook (MODELS_CONFIG_MAP, the
place vLLM's own models adjust their settings).
"""

import hashlib
import json
import os
import tempfile

from vllm.model_executor.models.config import VerifyAndUpdateConfig

from qwen_vl.cache import cache_dir

from .checkpoint_facts import CheckpointFacts
from .config import check_tensor_parallel
from .quantization import check_quantization, keep_16_bit_activations
from .renderer import RENDERER_MODE

GENERATION_CONFIG = "generation_config.json"


def chat_generation_config(model_config) -> None:
    if model_config.generation_config != "auto":
        return
    checkpoint = CheckpointFacts(model_config)
    if not checkpoint.chatml:
        return
    eos = checkpoint.generation_config.get("eos_token_id")
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    wanted = ids + [i for i in checkpoint.stop_token_ids if i not in ids]
    if wanted == ids:
        return
    # As transformers writes a generation config (GenerationConfig.to_json_string).
    text = json.dumps({**checkpoint.generation_config, "eos_token_id": wanted}, indent=2, sort_keys=True) + "\n"
    directory = cache_dir() / "generation-configs" / hashlib.sha256(text.encode()).hexdigest()[:32]
    if not (directory / GENERATION_CONFIG).exists():
        directory.mkdir(parents=True, exist_ok=True)
        # Written whole, then renamed: vLLM's processes may read it at once.
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(tmp, directory / GENERATION_CONFIG)
    model_config.generation_config = str(directory)


def use_qwen_vl_renderer(model_config) -> None:
    if model_config.tokenizer_mode in ("auto", "hf"):
        model_config.tokenizer_mode = RENDERER_MODE


def keep_image_mode(model_config) -> None:
    if model_config.multimodal_config is not None:
        model_config.multimodal_config.media_io_kwargs.setdefault("image", {}).setdefault("image_mode", None)


def check_pipeline_parallel(vllm_config) -> None:
    """vLLM 0.32's CPU worker allocates the buffers a later pipeline stage receives into only in
    its warm-up run, which it skips in eager mode: the second stage's worker would die on the
    first step. Refused here, since this hook runs on every way in (our server and its
    --headless nodes, vllm serve, the offline LLM)."""
    from vllm.platforms import current_platform

    if (current_platform.is_cpu() and vllm_config.parallel_config.pipeline_parallel_size > 1
            and vllm_config.model_config.enforce_eager):
        raise ValueError(
            "pipeline parallelism on vLLM's CPU platform needs its warm-up run, which --enforce-eager skips: "
            "drop --enforce-eager (offline: enforce_eager=True), or trace once without compiling: "
            "--compilation-config '{\"mode\": 2, \"backend\": \"eager\"}'"
        )


def check_dtype(model_config) -> None:
    """vLLM checks a dtype it picks itself ("auto") against the platform's list, but runs one
    the user names: on AMD CPUs without AVX512-FP16, zentorch's matmul then fails in the worker
    on the first float16 product. Refused here instead."""
    from vllm.platforms import current_platform

    supported = current_platform.supported_dtypes
    if current_platform.is_cpu() and model_config.dtype not in supported:
        names = ", ".join(str(dtype).removeprefix("torch.") for dtype in supported)
        raise ValueError(
            f"dtype {str(model_config.dtype).removeprefix('torch.')} does not run on {type(current_platform).__name__} "
            f"(this CPU's kernels): use --dtype auto or one of {names}"
        )


class QWenServingDefaults(VerifyAndUpdateConfig):
    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        check_dtype(model_config)
        chat_generation_config(model_config)
        use_qwen_vl_renderer(model_config)
        keep_image_mode(model_config)

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        # Once, in the process that builds the engine's config, before any worker starts.
        check_tensor_parallel(vllm_config.model_config.hf_config, vllm_config.parallel_config.tensor_parallel_size)
        check_pipeline_parallel(vllm_config)
        check_quantization(vllm_config)
        keep_16_bit_activations(vllm_config)


def register_serving_defaults(architecture: str) -> None:
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    MODELS_CONFIG_MAP.setdefault(architecture, QWenServingDefaults)
