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

Parallel sizes. A size tensor parallelism cannot split is refused with its
name (config.check_tensor_parallel), not deep inside model construction.

All three are done from vLLM's per-architecture config hook (MODELS_CONFIG_MAP, the
place vLLM's own models adjust their settings).
"""

import hashlib
import os
import tempfile

from vllm.model_executor.models.config import VerifyAndUpdateConfig

from .cache import cache_dir
from .config import check_tensor_parallel
from .tokenizer import IM_END_ID, IM_START_ID

GENERATION_CONFIG = "generation_config.json"


def chat_generation_config(model_config) -> None:
    from vllm.transformers_utils.config import try_get_generation_config

    if model_config.generation_config != "auto":
        return
    config = try_get_generation_config(model_config.model, trust_remote_code=model_config.trust_remote_code,
                                       revision=model_config.revision)
    if config is None or getattr(config, "chat_format", None) != "chatml":
        return
    eos = config.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    wanted = ids + [i for i in (IM_END_ID, IM_START_ID) if i not in ids]
    if wanted == ids:
        return
    config.eos_token_id = wanted
    text = config.to_json_string(use_diff=True)
    directory = cache_dir() / "generation-configs" / hashlib.sha256(text.encode()).hexdigest()[:32]
    if not (directory / GENERATION_CONFIG).exists():
        directory.mkdir(parents=True, exist_ok=True)
        # Written whole, then renamed: vLLM's processes may read it at once.
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(tmp, directory / GENERATION_CONFIG)
    model_config.generation_config = str(directory)


def keep_image_mode(model_config) -> None:
    if model_config.multimodal_config is not None:
        model_config.multimodal_config.media_io_kwargs.setdefault("image", {}).setdefault("image_mode", None)


class QWenServingDefaults(VerifyAndUpdateConfig):
    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        chat_generation_config(model_config)
        keep_image_mode(model_config)

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        # Once, in the process that builds the engine's config, before any worker starts.
        check_tensor_parallel(vllm_config.model_config.hf_config, vllm_config.parallel_config.tensor_parallel_size)


def register_serving_defaults(architecture: str) -> None:
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    MODELS_CONFIG_MAP.setdefault(architecture, QWenServingDefaults)
