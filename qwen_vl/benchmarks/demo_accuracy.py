"""How well the demo model answers about fresh scenes, asked through the HTTP API as a user asks.

    python -m qwen_vl.benchmarks.demo_accuracy --base-url http://127.0.0.1:8000 [--scenes 200]
        [--first-seed 0] [--sampling greedy|default] [--model qwen-vl-demo] [--api-key KEY] [--json FILE]

Scenes come from qwen_vl.demo.scenes.evaluation_scene (a generator written apart from the one
training draws from, seeded so no training scene repeats). For each scene: "What is in this
picture?", "How many shapes are there?", "What colour is the <shape>?" (a shape that is there
once), "Where is the <colour> <shape>?", "What does the text say?" (when there is a word), the
three Chinese questions, and "Which picture shows a <colour> <shape>?" ("an orange ...") over the scene and another.
`greedy` asks at temperature 0; `default` leaves sampling to the checkpoint's
generation_config.json (top_p 0.3), each request with its own seed.
"""

import argparse
import asyncio
import json
import random
import sys
from dataclasses import asdict, dataclass

import httpx

from qwen_vl.benchmarks.workloads import data_url
from qwen_vl.demo.scenes import evaluation_scene
from qwen_vl.demo.tasks import Question, correct, questions, which_question

# The targets a user is promised, per kind (fraction correct); Chinese within 5 points of English.
TARGETS = {"name": 0.90, "count": 0.95, "colour": 0.95, "where": 0.90, "text": 0.80, "which": 0.90}
CHINESE_GAP = 0.05
PAIRED_SEED = 1_000_000  # the second picture of scene n is scene n + PAIRED_SEED


@dataclass
class Asked:
    seed: int
    kind: str
    question: str
    expected: str
    answer: str
    correct: bool


def scene_questions(seed: int) -> list[tuple[Question, list]]:
    """The questions asked about scene `seed`, each with its images."""
    scene = evaluation_scene(seed)
    rng = random.Random(f"questions-{seed}")
    available = questions(scene)
    chosen: list[Question] = []
    for kind in ("name", "count", "name_zh", "count_zh", "colour", "text"):
        options = [q for q in available if q.kind == kind]
        if options:
            chosen.append(rng.choice(options))
    shape = rng.choice(scene.shapes)
    chosen += [q for q in available if q.kind in ("where", "where_zh") and q.subject is shape]
    asked = [(q, [scene.image]) for q in chosen]
    other = evaluation_scene(seed + PAIRED_SEED)
    which = which_question(scene, other, rng)
    if which is not None:
        asked.append((which, [scene.image, other.image]))
    return asked


async def ask(client: httpx.AsyncClient, base_url: str, model: str, question: Question, images: list,
              sampling: str, seed: int) -> str:
    content = [{"type": "image_url", "image_url": {"url": data_url(image, "png")}} for image in images]
    body = {"model": model, "max_tokens": 64,
            "messages": [{"role": "user", "content": [*content, {"type": "text", "text": question.text}]}]}
    body |= {"temperature": 0} if sampling == "greedy" else {"seed": seed}
    response = await client.post(f"{base_url}/v1/chat/completions", json=body)
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"]


async def evaluate(base_url: str, seeds: range, model: str = "qwen-vl-demo", sampling: str = "greedy",
                   api_key: str | None = None, concurrency: int = 8) -> list[Asked]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    slots = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(headers=headers, timeout=300) as client:
        async def one(seed: int, n: int, question: Question, images: list) -> Asked:
            async with slots:
                answer = await ask(client, base_url, model, question, images, sampling, seed * 100 + n)
            return Asked(seed, question.kind, question.text, question.answer, answer, correct(question, answer))

        jobs = [one(seed, n, q, images) for seed in seeds for n, (q, images) in enumerate(scene_questions(seed))]
        return list(await asyncio.gather(*jobs))


def accuracy(results: list[Asked]) -> dict[str, tuple[int, int]]:
    """kind -> (correct, asked)."""
    table: dict[str, tuple[int, int]] = {}
    for r in results:
        right, total = table.get(r.kind, (0, 0))
        table[r.kind] = (right + r.correct, total + 1)
    return dict(sorted(table.items()))


def report(results: list[Asked]) -> str:
    table = accuracy(results)
    lines = [f"{'question':<10} {'correct':>9} {'share':>7} {'target':>7}"]
    for kind, (right, total) in table.items():
        base = kind.removesuffix("_zh")
        # A Chinese question's target is its English twin's share, less the gap.
        target = table[base][0] / table[base][1] - CHINESE_GAP if kind != base and base in table else TARGETS[base]
        target_text = f">={target:.0%}"
        lines.append(f"{kind:<10} {right:>4}/{total:<4} {right / total:>7.1%} {target_text:>7}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qwen_vl.benchmarks.demo_accuracy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="qwen-vl-demo")
    parser.add_argument("--api-key")
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--sampling", choices=("greedy", "default"), default="greedy")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--json", help="write every question, answer and verdict to this file")
    args = parser.parse_args(argv)
    seeds = range(args.first_seed, args.first_seed + args.scenes)
    results = asyncio.run(evaluate(args.base_url, seeds, args.model, args.sampling, args.api_key, args.concurrency))
    print(f"{len(seeds)} scenes (seeds {seeds.start}-{seeds.stop - 1}), sampling {args.sampling}")
    print(report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1, ensure_ascii=False)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
