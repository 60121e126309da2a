"""Token parity of this server and vLLM 0.23 on the benchmark's requests.

    python -m qwen_vl.benchmarks.vllm023 --vllm023-venv DIR --num-requests 4 --max-tokens 16

Starts this server, then vLLM 0.23 (as `compare` does: same checkpoint and engine arguments,
float32 by default), sends each the same greedy requests one at a time (the `--workload`'s, and
one text-only request, which leaves the image path out) with `return_token_ids`, and compares,
per request, the prompt ids (and usage's prompt token count) and the generated ids. Prints a
table; the answers go to --out-dir/parity.json. Exits 1 if any request differs.
"""

import json
import os
import shlex
import sys
from pathlib import Path

import httpx

from qwen_vl.benchmarks import compare
from qwen_vl.benchmarks.harness import SERVED_MODEL, Server, checkpoint_for, server_command, server_env
from qwen_vl.benchmarks.workloads import build_workload


def ask(url: str, body: dict, timeout: float) -> dict:
    body = {**body, "stream": False, "return_token_ids": True}
    body.pop("stream_options", None)
    answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=timeout).json()
    if "choices" not in answer:
        return {"error": answer}
    return {"prompt_tokens": answer["usage"]["prompt_tokens"], "prompt_token_ids": answer.get("prompt_token_ids"),
            "token_ids": answer["choices"][0].get("token_ids"), "text": answer["choices"][0]["message"]["content"]}


def answers(system: str, model: Path, requests: list, args, env: dict) -> list[dict]:
    server = Server(system, lambda port: server_command(system, model, port, args), args.out_dir / f"parity-{system}.log",
                    server_env(system, env, args))
    print(f"[{system}] starting: {shlex.join(server.command)}", file=sys.stderr)
    try:
        print(f"[{system}] ready in {server.start(args.start_timeout):.1f} s", file=sys.stderr)
        return [ask(server.url, request.body(SERVED_MODEL), args.request_timeout) for request in requests]
    finally:
        server.stop()


def first_difference(a: list[int] | None, b: list[int] | None) -> str:
    if a is None or b is None:
        return "not returned"
    if a == b:
        return "same"
    index = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"differ from token {index} of {max(len(a), len(b))}"


def main(argv: list[str] | None = None) -> bool:
    parser = compare.build_parser()
    parser.prog = "python -m qwen_vl.benchmarks.vllm023"
    parser.description = "Token parity of this server and vLLM 0.23 (see the module docstring)."
    parser.set_defaults(dtype="float32", num_requests=4, max_tokens=16, out_dir=Path("bench-results/vllm023"))
    args = parser.parse_args(argv)
    model = args.model or checkpoint_for(args.preset)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    requests = build_workload(args.workload, args.num_requests, args.seed, args.max_tokens)
    requests += build_workload("text", 1, args.seed, args.max_tokens)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib)}
    try:
        results = {system: answers(system, model, requests, args, env) for system in ("ours", "vllm023")}
    except RuntimeError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return False
    (args.out_dir / "parity.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"| request | kind | prompt tokens ours / vllm023 | prompt ids | {args.max_tokens} greedy tokens ({args.dtype}) |")
    print("|---|---|---|---|---|")
    same = True
    for i, (request, ours, theirs) in enumerate(zip(requests, results["ours"], results["vllm023"])):
        if "error" in ours or "error" in theirs:
            print(f"| {i} | {request.kind} | error: {ours.get('error') or theirs.get('error')} | | |")
            same = False
            continue
        prompt = first_difference(ours["prompt_token_ids"], theirs["prompt_token_ids"])
        output = first_difference(ours["token_ids"], theirs["token_ids"])
        same &= prompt == output == "same" and ours["prompt_tokens"] == theirs["prompt_tokens"]
        print(f"| {i} | {request.kind} | {ours['prompt_tokens']} / {theirs['prompt_tokens']} | {prompt} | {output} |")
    return same


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
