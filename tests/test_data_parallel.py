"""Data parallelism: `--data-parallel-size 2` runs two engine replicas behind
one API (one core each, chosen by the server's CPU defaults), and both answer
as the reference does."""

import asyncio

import httpx
import pytest

from tests.helpers import AUTH, SERVED_MODEL, assert_server_matches_reference, chat_case, start_server


@pytest.fixture(scope="module")
def dp_server(tiny_checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("dp") / "server.log"
    server = start_server(tiny_checkpoint, log, "--data-parallel-size", "2", "--max-model-len", "2048")
    yield server.url, log
    server.stop()


def test_two_replicas_start_each_on_its_own_core(dp_server):
    _, log = dp_server
    text = log.read_text()
    assert "VLLM_CPU_OMP_THREADS_BIND='0|1'" in text
    assert "core ids=[0]" in text and "core ids=[1]" in text


def test_data_parallel_answer_matches_reference(dp_server, ref_tokenizer, reference):
    url, _ = dp_server
    assert_server_matches_reference(url, ref_tokenizer, reference)


def test_concurrent_requests_across_replicas_all_give_the_same_answer(dp_server, ref_tokenizer):
    url, _ = dp_server
    body, _, _ = chat_case(ref_tokenizer)
    body = {"model": SERVED_MODEL, **body, "logprobs": False, "top_logprobs": None}

    async def ask_all(n: int) -> list[str]:
        async with httpx.AsyncClient(timeout=600, headers=AUTH) as client:
            responses = await asyncio.gather(*(client.post(f"{url}/v1/chat/completions", json=body) for _ in range(n)))
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        return [r.json()["choices"][0]["message"]["content"] for r in responses]

    answers = asyncio.run(ask_all(8))
    assert len(set(answers)) == 1
