"""Offline demo: one chat turn about one image, through vLLM's offline engine
and our plugin, on the built-in demo checkpoint unless --model says otherwise.

    python -m qwen_vl.server.demo [--model DIR_OR_HUB_ID] [--image FILE] [--question TEXT]

The built-in demo model knows drawn scenes (circles, squares and triangles in
eight colours, and short words): the default picture, a red circle and a blue
square on white, is one of them. Give --model to run a real checkpoint the same way; the
timings it prints are the path's (image -> encoder -> decoder -> text).
"""

import argparse
import os
import time

from PIL import Image, ImageDraw

SYSTEM = "You are a helpful assistant."


def chat_prompt(question: str) -> str:
    """One user turn with one image, in Qwen-VL-Chat's ChatML format."""
    return (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
        f"<|im_start|>user\nPicture 1: <img></img>\n{question}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def sample_image() -> Image.Image:
    """A red circle and a blue square on white: a scene of the kind the demo model was trained on."""
    image = Image.new("RGB", (640, 480), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((80, 160, 240, 320), fill="red")
    draw.rectangle((400, 170, 540, 310), fill="blue")
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("QWEN_VL_MODEL"),
                        help="checkpoint directory or hub id (env QWEN_VL_MODEL; default: built-in demo checkpoint)")
    parser.add_argument("--image", help="image file (default: a drawn red circle and blue square on white)")
    parser.add_argument("--question", default="What is in this picture?")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="auto", help="model dtype (auto, float32, bfloat16)")
    parser.add_argument("--compile", action="store_true",
                        help="use vLLM's compiled mode (slower start on CPU, faster decode)")
    args = parser.parse_args()

    # On CPU, vLLM otherwise sizes its KV cache as a fraction of all RAM and
    # refuses to start when the page cache makes "available" look small.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams

    from qwen_vl.model_executor.checkpoint_facts import CheckpointFacts
    from qwen_vl.testing.demo_checkpoint import demo_checkpoint

    model = args.model or str(demo_checkpoint())
    image = Image.open(args.image) if args.image else sample_image()

    started = time.perf_counter()
    llm = LLM(model=model, dtype=args.dtype, enforce_eager=not args.compile, seed=0)
    ready = time.perf_counter()

    # The checkpoint's generation_config.json (Qwen-VL-Chat: top_p 0.3) sets
    # the sampling defaults, as in the original `chat()`; so do its stops.
    checkpoint = CheckpointFacts(llm.model_config)
    params = SamplingParams.from_optional(**{
        **checkpoint.sampling_defaults, "max_tokens": args.max_tokens,
        "stop_token_ids": list(checkpoint.stop_token_ids), "seed": 0,
    })
    request = {"prompt": chat_prompt(args.question), "multi_modal_data": {"image": image}}
    output = llm.generate([request], params, use_tqdm=False)[0].outputs[0]
    done = time.perf_counter()

    print(f"model: {model}")
    print(f"question: {args.question}")
    print(f"answer: {output.text.strip()}")
    print(
        f"engine start {ready - started:.1f} s; generation {done - ready:.2f} s for "
        f"{len(output.token_ids)} tokens ({len(output.token_ids) / (done - ready):.1f} tokens/s, "
        "image encoding included)"
    )


if __name__ == "__main__":
    main()
