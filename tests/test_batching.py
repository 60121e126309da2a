"""Continuous batching does not change results: requests scheduled together
(images of several requests encoded in one call, chunked prefill and prefix
caching at vLLM's defaults) give exactly what each gives alone."""

from vllm import SamplingParams

from tests.helpers import pattern_image

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


def mixed_requests(tok):
    requests = []
    for i in range(16):
        kind = i % 4
        if kind == 0:
            requests.append({"prompt_token_ids": tok.make_context(f"Question {i}: count to {i * 7}.")})
            continue
        images = [pattern_image(100 + i + j, (320 + 40 * i, 480 - 10 * i)) for j in range(kind)]
        query = tok.from_list_format(
            [{"image": f"img{i}_{j}.png"} for j in range(kind)] + [{"text": f"What is in picture {kind}?"}]
        )
        requests.append({"prompt_token_ids": tok.make_context(query), "multi_modal_data": {"image": images}})
    return requests


def test_sixteen_mixed_requests_together_equal_each_alone(engine, ref_tokenizer):
    requests = mixed_requests(ref_tokenizer)
    together = engine.generate(requests, GREEDY, use_tqdm=False)
    alone = [engine.generate([request], GREEDY, use_tqdm=False)[0] for request in requests]
    for i, (batched, single) in enumerate(zip(together, alone)):
        assert list(batched.outputs[0].token_ids) == list(single.outputs[0].token_ids), f"request {i}"
