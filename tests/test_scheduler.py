"""Bounded pauses (qwen_vl.engine.scheduler): the step costs fitted from timed steps, the limits
they give a step beside decoding requests, the engine configuration that selects the scheduler,
and a server whose budget binds: a long prompt beside decoding streams is prefilled in small
steps, and every answer stays the offline engine's."""

import asyncio
import re

import httpx
import numpy as np
import pytest
from vllm.engine.arg_utils import AsyncEngineArgs

from qwen_vl.engine.engine import engine_config
from qwen_vl.engine.scheduler import (
    BUDGET_KEY,
    MIN_PREFILL_SAMPLES,
    MIN_PREFILL_TOKENS,
    NEVER_SPLIT,
    BoundedPauseScheduler,
    Costs,
    StepCosts,
    chunk_limit,
    nonnegative_least_squares,
)
from qwen_vl.server.settings import parse
from tests.helpers import AUTH, MAX_TOKENS, SERVED_MODEL, data_url, image_part, offline_answer, pattern_image, start_server

TRUE_COSTS = Costs(step=0.004, decode=0.002, token=0.0008, image=0.2)


def timed_steps(count: int, seed: int = 0, images: bool = True, noise: float = 0.002):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        decodes = int(rng.integers(0, 8))
        tokens = int(rng.choice([0, 0, rng.integers(1, 2048)]))
        started = int(rng.integers(0, 4)) if images and tokens else 0
        seconds = (TRUE_COSTS.step + TRUE_COSTS.decode * decodes + TRUE_COSTS.token * tokens
                   + TRUE_COSTS.image * started + rng.normal(0, noise))
        yield decodes, tokens, started, seconds


def test_the_fit_recovers_the_costs_of_timed_steps():
    costs = StepCosts()
    for step in timed_steps(200):
        costs.add(*step)
    fitted = costs.fit()
    assert fitted.decode == pytest.approx(TRUE_COSTS.decode, abs=3e-4)
    assert fitted.token == pytest.approx(TRUE_COSTS.token, rel=0.05)
    assert fitted.image == pytest.approx(TRUE_COSTS.image, rel=0.05)
    assert costs.costs is not None  # refitted as steps arrive


def test_work_not_seen_yet_has_no_cost_and_is_not_limited():
    costs = StepCosts()
    for step in timed_steps(7):
        costs.add(*step)
    assert costs.fit() is None  # too few steps
    costs = StepCosts()
    for step in timed_steps(100, images=False):
        costs.add(*step)
    fitted = costs.fit()
    assert fitted.image is None and fitted.token == pytest.approx(TRUE_COSTS.token, rel=0.05)
    assert chunk_limit(Costs(0.004, 0.002, None, None), budget=0.25, decodes=3) is None


def test_prefill_is_trusted_after_a_few_steps_of_it():
    # Where an image costs seconds, steps that prefill are few among the decoding ones.
    steps = list(timed_steps(400))
    decoding = [step for step in steps if not step[1]][:40]
    prefill = [step for step in steps if step[1] and step[2]]
    costs = StepCosts()
    for step in decoding + prefill[:MIN_PREFILL_SAMPLES - 1]:
        costs.add(*step)
    assert costs.fit().token is None
    costs.add(*prefill[MIN_PREFILL_SAMPLES - 1])
    assert costs.costs.token is not None  # refitted at once, not at the next 16th step


def test_until_text_prefill_is_seen_the_images_cost_is_folded_into_the_tokens():
    costs = StepCosts()
    for decodes, tokens, images, seconds in timed_steps(200):
        if tokens and not images:
            continue  # every prompt step starts an image (one-image chats)
        costs.add(decodes, tokens, images, seconds)
    fitted = costs.fit()
    assert fitted.image is None and fitted.token > TRUE_COSTS.token


def test_decoding_does_not_push_the_prefill_steps_out_of_the_window():
    costs = StepCosts(window=16)
    for step in timed_steps(100):
        costs.add(*step)
    for _ in range(1000):
        costs.add(3, 0, 0, 0.01)
    assert costs.fit().token is not None and costs.fit().image is not None


def test_nonnegative_least_squares_drops_what_would_fit_negative():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]])
    assert nonnegative_least_squares(a, np.array([1.0, 3.0, 5.0])) == pytest.approx([1.0, 2.0])
    # The unconstrained slope is -1: held at 0, the intercept takes the mean.
    assert nonnegative_least_squares(a, np.array([3.0, 2.0, 1.0])) == pytest.approx([2.0, 0.0])


def test_a_long_prompt_takes_what_fits_in_the_budget_beside_the_decodes():
    # 0.25 s - 4 ms - 3 x 2 ms = 240 ms to spare; a position costs 0.8 ms + 200 ms / 258.
    per_position = 0.0008 + 0.2 / 258
    affordable = int(0.24 / per_position)
    assert chunk_limit(TRUE_COSTS, budget=0.25, decodes=3, prefills=[4000]) == affordable == 152
    assert chunk_limit(TRUE_COSTS, budget=1.0, decodes=3, prefills=[4000]) == int(0.99 / per_position)
    # Text-only costs so far: a position is a token.
    assert chunk_limit(Costs(0.004, 0.002, 0.0008, None), budget=0.25, decodes=3, prefills=[4000]) == 300
    # Two long prompts share it; always some progress.
    assert chunk_limit(TRUE_COSTS, budget=1.0, decodes=3, prefills=[4000, 5000]) == int(0.99 / per_position) // 2
    assert chunk_limit(TRUE_COSTS, budget=0.01, decodes=50, prefills=[4000]) == MIN_PREFILL_TOKENS


def test_prompts_that_fit_whole_are_not_split():
    per_position = 0.0008 + 0.2 / 258
    affordable = int(0.99 / per_position)  # 628 at a 1 s budget
    # Short prompts alone: no threshold, as vLLM.
    assert chunk_limit(TRUE_COSTS, budget=1.0, decodes=3, prefills=[290, 290]) is None
    # A short prompt beside a long one: the long one takes what the short leaves, but the
    # threshold never splits the short one.
    assert chunk_limit(TRUE_COSTS, budget=1.0, decodes=3, prefills=[290, 4000]) == affordable - 290
    assert chunk_limit(TRUE_COSTS, budget=1.0, decodes=3, prefills=[600, 4000]) == 600
    # Nor is a one-image question when little is to spare.
    assert chunk_limit(TRUE_COSTS, budget=0.01, decodes=3, prefills=[NEVER_SPLIT]) is None
    assert chunk_limit(TRUE_COSTS, budget=0.01, decodes=3, prefills=[NEVER_SPLIT, 4000]) == NEVER_SPLIT


@pytest.mark.parametrize(("costs", "budget", "decodes"), [
    (TRUE_COSTS, 0.25, 0),  # nothing decodes: nobody waits
    (TRUE_COSTS, 0.0, 3),  # the budget is off
    (None, 0.25, 3),  # nothing measured yet
    (Costs(0.004, 0.002, 0.0, 0.0), 0.25, 3),  # measured as free, with time to spare
])
def test_a_prompt_is_not_limited(costs, budget, decodes):
    assert chunk_limit(costs, budget, decodes, prefills=[4000]) is None


def test_the_engine_configuration_selects_the_scheduler_and_carries_the_budget(tiny_checkpoint):
    args = AsyncEngineArgs(model=str(tiny_checkpoint), max_model_len=2048, enforce_eager=True)
    config = engine_config(args, None, pause_budget=0.25)
    assert config.scheduler_config.scheduler_cls == "qwen_vl.engine.scheduler.BoundedPauseScheduler"
    assert config.scheduler_config.get_scheduler_cls() is BoundedPauseScheduler
    assert config.additional_config[BUDGET_KEY] == 0.25
    # The sizes every node warms up with stay vLLM's.
    plain = engine_config(args, None)
    assert plain.scheduler_config.scheduler_cls is None and BUDGET_KEY not in plain.additional_config
    assert config.scheduler_config.max_num_batched_tokens == plain.scheduler_config.max_num_batched_tokens
    assert (config.scheduler_config.max_num_encoder_input_tokens
            == plain.scheduler_config.max_num_encoder_input_tokens)
    # A scheduler of the user's own wins.
    theirs = AsyncEngineArgs(model=str(tiny_checkpoint), max_model_len=2048, enforce_eager=True,
                             scheduler_cls="vllm.v1.core.sched.scheduler.Scheduler")
    assert engine_config(theirs, None, 0.25).scheduler_config.scheduler_cls == "vllm.v1.core.sched.scheduler.Scheduler"


def test_the_budget_defaults_to_a_quarter_second_and_refuses_negative_values(capsys):
    assert parse(["--model", "m"]).server.decode_pause_budget == 0.25
    with pytest.raises(SystemExit):
        parse(["--model", "m", "--decode-pause-budget", "-1"])
    assert "--decode-pause-budget" in capsys.readouterr().err


# ---- a server whose budget always binds ----------------------------------------------------


@pytest.fixture(scope="module")
def tight_server(tiny_checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("tight") / "server.log"
    server = start_server(tiny_checkpoint, log, "--decode-pause-budget", "0.000001", "--enable-logging-iteration-details")
    yield server.url, log
    server.stop()


def test_the_server_says_its_scheduling(tight_server):
    assert "scheduling: beside decoding requests, a prompt's prefill takes about 1e-06 s" in tight_server[1].read_text()


# vLLM's log line for each engine step (--enable-logging-iteration-details).
ITERATION = re.compile(r"Iteration\(\d+\): (\d+) context requests, (\d+) context tokens, (\d+) generation requests"
                       r"(?:.*?encoder inputs: (\d+))?")


def steps_beside_decodes(log) -> list[tuple[int, int]]:
    """(prefill tokens, images started) of every logged step that also decoded."""
    return [(int(tokens), int(images or 0)) for _, tokens, decoding, images in ITERATION.findall(log.read_text())
            if int(decoding)]


def chat(content, max_tokens: int, **fields) -> dict:
    return {"model": SERVED_MODEL, "temperature": 0, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": content}], **fields}


def test_a_long_prompt_beside_decoding_streams_is_prefilled_in_small_steps(tight_server, engine, ref_tokenizer):
    url = tight_server[0]
    images = [pattern_image(800 + i, (300, 200)) for i in range(6)]
    long_text = " ".join(f"word{i % 50}" for i in range(900))
    long_content = [*(image_part(data_url(image)) for image in images), {"type": "text", "text": long_text}]

    async def run():
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=600) as client:
            async def stream(text: str) -> None:
                async with client.stream("POST", "/v1/chat/completions",
                                         json=chat(text, 4000, ignore_eos=True, stream=True)) as response:
                    async for _ in response.aiter_lines():
                        pass

            # The scheduler learns what prefill and images cost from the steps it sees.
            for i in range(12):
                image = image_part(data_url(pattern_image(820 + i, (64, 64))))
                await client.post("/v1/chat/completions", json=chat([image, {"type": "text", "text": f"{i}?"}], 2))
            # Two streams decoding (started one after the other: their own prefills are small) ...
            streams = [asyncio.create_task(stream(f"Count to a hundred, {name}.")) for name in ("Ann", "Bob")]
            await asyncio.sleep(1.0)
            # ... then the long prompt arrives beside them; they decode until its answer is back
            # (long enough on any machine: the client hangs up on them then).
            long_answer = (await client.post("/v1/chat/completions", json=chat(long_content, MAX_TOKENS))).json()
            assert not any(task.done() for task in streams)
            for task in streams:
                task.cancel()
            await asyncio.gather(*streams, return_exceptions=True)
            return long_answer

    answer = asyncio.run(run())
    query = ref_tokenizer.from_list_format([*({"image": str(i)} for i in range(6)), {"text": long_text}])
    prompt_ids = ref_tokenizer.make_context(query)
    assert answer["usage"]["prompt_tokens"] == len(prompt_ids) > 2048
    # Every step that decoded held at most the least chunk (128 positions) of the long prompt, or
    # a remainder short enough never to be split, and the long prompt went through such steps: at
    # vLLM's 2048 positions a step, it takes two.
    beside = steps_beside_decodes(tight_server[1])
    assert all(tokens <= NEVER_SPLIT and images <= 1 for tokens, images in beside), beside
    assert sum(images for _, images in beside) >= len(images)  # the log's image counts are read
    assert sum(tokens == MIN_PREFILL_TOKENS for tokens, _ in beside) >= 10
    assert sum(tokens for tokens, _ in beside) >= 2048
    assert answer["choices"][0]["message"]["content"] == offline_answer(engine, prompt_ids, images)
