"""The chat-traffic benchmark's request stream: deterministic from its seed (conversations,
turns, images, arrival times), drawn from its mix, and sent as a chat client sends it (each
turn resends the history with the server's answers); goodput counts what met its target."""

import asyncio
import json

import httpx
import numpy as np

from qwen_vl.benchmarks import chat_traffic
from qwen_vl.benchmarks.chat_traffic import CHAT_TURNS, LONG_IMAGES, MIX, THINK_SECONDS, Targets, TurnResult
from qwen_vl.benchmarks.load import RequestResult


def test_the_same_seed_builds_the_same_traffic_and_another_seed_other_traffic():
    first, again = (chat_traffic.build_traffic(0.5, 60, seed=3) for _ in range(2))
    assert first == again
    assert first != chat_traffic.build_traffic(0.5, 60, seed=4)


def test_arrivals_are_poisson_at_the_rate_within_the_duration():
    traffic = chat_traffic.build_traffic(2.0, 300, seed=0)
    arrivals = np.array([c.arrival for c in traffic])
    assert np.all(np.diff(arrivals) > 0) and 0 < arrivals[0] and arrivals[-1] < 300
    # 600 expected; a Poisson count's standard deviation is its square root (24.5).
    assert abs(len(traffic) - 600) < 4 * 24.5
    gaps = np.diff(arrivals)
    assert abs(gaps.mean() - 0.5) < 0.05 and abs(gaps.std() - 0.5) < 0.06  # exponential: std == mean


def test_the_conversations_follow_the_mix_and_their_shapes():
    traffic = chat_traffic.build_traffic(2.0, 300, seed=1)
    for kind, share in MIX.items():
        count = sum(c.kind == kind for c in traffic)
        assert abs(count / len(traffic) - share) < 0.06, kind
    for c in traffic:
        if c.kind == "question":
            assert [len(t.image_urls) for t in c.turns] == [1] and c.think == []
        elif c.kind == "chat":
            assert [len(t.image_urls) for t in c.turns] == [1] * CHAT_TURNS
            assert len(c.think) == CHAT_TURNS - 1 and all(THINK_SECONDS[0] <= t <= THINK_SECONDS[1] for t in c.think)
        else:
            assert [len(t.image_urls) for t in c.turns] == [LONG_IMAGES]
            words, _, question = c.turns[0].text.rpartition("\n")
            assert 1100 <= len(words.split()) <= 1300 and question
        assert all(url.startswith("data:image/") for t in c.turns for url in t.image_urls)
    # Every conversation has images of its own.
    urls = [url for c in traffic for t in c.turns for url in t.image_urls]
    assert len(set(urls)) == len(urls)


def fake_server(answers: list[str], seen: list[dict]) -> httpx.AsyncClient:
    """A chat endpoint that streams the next answer in two chunks and records each request."""

    def respond(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        answer = answers[len(seen) - 1]
        events = [{"choices": [{"index": 0, "delta": {"content": part}}]} for part in (answer[:3], answer[3:])]
        events.append({"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 2}})
        body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return httpx.Response(200, content=body.encode(), headers={"content-type": "text/event-stream"})

    return httpx.AsyncClient(transport=httpx.MockTransport(respond))


def test_each_turn_resends_the_history_with_the_servers_answers():
    conversation = next(c for c in chat_traffic.build_traffic(1.0, 60, seed=2) if c.kind == "chat")
    conversation.arrival, conversation.think = 0.0, [0.0] * (CHAT_TURNS - 1)
    seen, results = [], []

    async def go():
        async with fake_server(["first answer", "second answer", "third answer"], seen) as client:
            await chat_traffic.converse(client, "http://server/v1/chat/completions", {}, 0, conversation, 0.0, 8,
                                        results)

    asyncio.run(go())
    assert [r.turn for r in results] == [0, 1, 2] and all(r.result.success for r in results)
    assert [r.result.text for r in results] == ["first answer", "second answer", "third answer"]
    last = seen[-1]["messages"]
    assert [m["role"] for m in last] == ["user", "assistant", "user", "assistant", "user"]
    assert [m["content"] for m in last if m["role"] == "assistant"] == ["first answer", "second answer"]
    sent_images = [p["image_url"]["url"] for m in last if m["role"] == "user" for p in m["content"]
                   if p["type"] == "image_url"]
    assert sent_images == [t.image_urls[0] for t in conversation.turns]
    assert all(body["stream"] and body["ignore_eos"] and body["max_tokens"] == 8 for body in seen)


def test_a_failed_turn_loses_the_rest_of_its_conversation():
    conversation = next(c for c in chat_traffic.build_traffic(1.0, 60, seed=2) if c.kind == "chat")
    conversation.arrival = 0.0
    results = []

    async def go():
        refuse = httpx.MockTransport(lambda request: httpx.Response(400, json={"error": {"message": "no"}}))
        async with httpx.AsyncClient(transport=refuse) as client:
            await chat_traffic.converse(client, "http://server/v1/chat/completions", {}, 0, conversation, 0.0, 8,
                                        results)

    asyncio.run(go())
    assert [(r.turn, r.result.success, r.result.error) for r in results] == [
        (0, False, "http_400"), (1, False, "not sent"), (2, False, "not sent")]


def outcome(kind: str, ttft: float, gaps: list[float], success: bool = True) -> TurnResult:
    return TurnResult(0, 0, kind, RequestResult(success=success, ttft=ttft, itl=gaps))


def test_goodput_counts_the_requests_within_their_targets():
    targets = Targets(ttft=4.0, long_ttft=30.0, pause=1.5)
    results = [
        outcome("question", 1.0, [0.1, 0.2]),   # within
        outcome("question", 5.0, [0.1]),        # TTFT too long
        outcome("chat", 1.0, [0.1, 2.0]),       # a pause too long
        outcome("long", 20.0, [0.3]),           # within: the long prompts' own TTFT bound
        outcome("question", 0.5, [], success=False),
    ]
    summary = chat_traffic.summarise(results, elapsed=10.0, targets=targets)
    assert [targets.met(r) for r in results] == [True, False, False, True, False]
    assert summary["within_target"] == 2 and summary["goodput"] == 0.2
    assert summary["completed"] == 4 and summary["within_target_share_of_accepted"] == 0.5
    assert summary["longest_pause_max_s"] == 2.0
    assert summary["question"]["requests"] == 3 and summary["question"]["within_target"] == 1
