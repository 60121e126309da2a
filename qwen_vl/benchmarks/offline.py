"""The ceiling for any API layer: vLLM's offline engine (`LLM.generate`) on the same requests.

The prompts are built by our `PromptBuilder` (the same token ids every server sees) and the
images decoded from the same data URLs before timing; sampling is the same (greedy, or with
`--sampling checkpoint` the checkpoint's generation_config.json, as a server applies it to a
request without sampling fields; exactly `max_tokens` tokens, `ignore_eos`). Each batch runs as a closed loop at its `--concurrency`
(a new request enters the engine as soon as one finishes, as the servers are driven), so the
throughputs compare at the same load; no TTFT is measured.

    python -m qwen_vl.benchmarks.offline --model DIR --workload single-image --num-requests 32 8 \\
        --seed 0 --max-tokens 64 --result-json out.json -- --dtype bfloat16 --max-model-len 2048

Each `--num-requests` value is one batch of requests, built with seed `--seed` + its position
(as `compare` builds the requests of each concurrency level); arguments after `--` are vLLM's
engine arguments.
"""

import argparse
import base64
import io
import json
import time
from pathlib import Path

from PIL import Image

from .workloads import SAMPLING, WORKLOADS, Request, build_workload


def decode_data_url(url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def engine_inputs(requests: list[Request], tokenizer) -> list[dict]:
    """vLLM prompts: our ChatML token ids and the decoded images."""
    from qwen_vl.api.prompt import PromptBuilder
    from qwen_vl.api.protocol import ChatCompletionRequest

    builder = PromptBuilder(tokenizer.backend_tokenizer)
    inputs = []
    for request in requests:
        prompt = builder.chat(ChatCompletionRequest(model="offline", messages=request.messages).messages)
        entry = {"prompt_token_ids": prompt.token_ids}
        if prompt.image_urls:
            entry["multi_modal_data"] = {"image": [decode_data_url(u) for u in prompt.image_urls]}
        inputs.append(entry)
    return inputs


def closed_loop(engine, inputs: list[dict], params, concurrency: int) -> list:
    """Run `inputs` through vLLM's LLMEngine with at most `concurrency` in flight."""
    waiting = list(enumerate(inputs))
    finished, in_flight = [], 0
    while waiting or in_flight:
        while waiting and in_flight < concurrency:
            index, prompt = waiting.pop(0)
            engine.add_request(f"offline-{index}", prompt, params)
            in_flight += 1
        for output in engine.step():
            if output.finished:
                finished.append(output)
                in_flight -= 1
    return finished


def run(model: str, engine_args: list[str], workload: str, batches: list[int], concurrency: list[int], seed: int,
        max_tokens: int, warmup: int, sampling: str = "greedy") -> list[dict]:
    from vllm import LLM, SamplingParams
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--model", model, *engine_args])
    llm = LLM(**vars(EngineArgs.from_cli_args(args)))
    tokenizer = llm.get_tokenizer()
    if sampling == "greedy":
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    else:  # what the servers apply to a request that sets no sampling field
        params = llm.get_default_sampling_params()
        params.max_tokens, params.ignore_eos = max_tokens, True
    if warmup:
        llm.generate(engine_inputs(build_workload(workload, warmup, seed + 10_000, max_tokens), tokenizer),
                     params, use_tqdm=False)
    results = []
    for index, (count, limit) in enumerate(zip(batches, concurrency)):
        inputs = engine_inputs(build_workload(workload, count, seed + index, max_tokens), tokenizer)
        started = time.perf_counter()
        outputs = closed_loop(llm.llm_engine, inputs, params, limit)
        duration = time.perf_counter() - started
        total_input = sum(len(o.prompt_token_ids) for o in outputs)
        total_output = sum(len(o.outputs[0].token_ids) for o in outputs)
        results.append({
            "backend": "vllm-offline",
            "num_prompts": count,
            "max_concurrency": limit,
            "duration": duration,
            "completed": len(outputs),
            "failed": count - len(outputs),
            "total_input_tokens": total_input,
            "total_output_tokens": total_output,
            "request_throughput": len(outputs) / duration,
            "output_throughput": total_output / duration,
            "total_token_throughput": (total_input + total_output) / duration,
        })
    llm.llm_engine.engine_core.shutdown()
    return results


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m qwen_vl.benchmarks.offline",
                                     description="Offline-engine throughput on a benchmark workload.")
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--workload", choices=WORKLOADS, default="single-image")
    parser.add_argument("--num-requests", type=int, nargs="+", default=[32], help="one batch per value")
    parser.add_argument("--concurrency", type=int, nargs="+", default=None,
                        help="requests in flight for each batch (default: all of it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--sampling", choices=SAMPLING, default="greedy")
    parser.add_argument("--warmup", type=int, default=2, help="untimed requests first")
    parser.add_argument("--result-json", type=Path, default=None)
    parser.add_argument("engine_args", nargs=argparse.REMAINDER, help="after --: vLLM engine arguments")
    args = parser.parse_args(argv)
    engine_args = args.engine_args[1:] if args.engine_args[:1] == ["--"] else args.engine_args
    concurrency = args.concurrency or args.num_requests
    if len(concurrency) != len(args.num_requests):
        parser.error("--concurrency needs one value per --num-requests value")
    results = run(args.model, engine_args, args.workload, args.num_requests, concurrency, args.seed, args.max_tokens,
                  args.warmup, args.sampling)
    text = json.dumps(results, indent=2)
    if args.result_json:
        args.result_json.write_text(text + "\n")
    print(text)
    return results


if __name__ == "__main__":
    main()
