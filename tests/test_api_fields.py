"""vLLM's request fields on our server: structured output through vLLM's own
backend, the sampling and output extensions, /tokenize and /detokenize, and
what is refused (with a 400 naming the field). One shared server, tiny
checkpoint, float32, greedy where the answer is compared."""

import json
import socket
from urllib.parse import urlsplit

import jsonschema
import pytest

from qwen_vl.api.grounding import parse_grounding
from qwen_vl.model_executor.tokenizer import ENDOFTEXT_ID, IM_END_ID, IMG_PAD_ID
from tests.helpers import AUTH, SERVED_MODEL, assert_error, chat_body, data_url, http, image_part, pattern_image, post, sse_chunks

# Qwen-VL's grounding markup, as the playground's "ground" toggle asks for it.
BOX_REGEX = r"<ref>[a-z ]{1,16}</ref><box>\(\d{1,3},\d{1,3}\),\(\d{1,3},\d{1,3}\)</box>"
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def ok(server: str, path: str, body: dict) -> dict:
    response = post(server, path, body)
    assert response.status_code == 200, response.text
    return response.json()


IMAGE = pattern_image(3, (640, 480))
IMAGE_QUESTION = [image_part(data_url(IMAGE)), {"type": "text", "text": "Where is the wave? Answer with a box."}]


# ---- structured output ---------------------------------------------------------


def test_a_json_schema_answer_validates_against_the_schema(server):
    body = chat_body("Describe a person as JSON.", max_tokens=60, temperature=0, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": PERSON}})
    answer = ok(server, "/v1/chat/completions", body)["choices"][0]
    assert answer["finish_reason"] == "stop"
    jsonschema.validate(json.loads(answer["message"]["content"]), PERSON)


def test_a_json_object_answer_is_a_json_object(server, client):
    # Only braces may come, "}" favoured above all: the grammar still makes the answer open with "{".
    braces = [ok(server, "/tokenize", {"prompt": brace})["tokens"][0] for brace in "{}"]
    answer = client.chat.completions.create(
        model=SERVED_MODEL, messages=[{"role": "user", "content": "JSON please."}], max_tokens=20, temperature=0,
        response_format={"type": "json_object"}, logit_bias={str(braces[1]): 100},
        extra_body={"allowed_token_ids": [*braces, ENDOFTEXT_ID]})
    assert answer.choices[0].message.content == "{}"
    assert answer.choices[0].finish_reason == "stop"


def test_a_box_regex_yields_parsed_boxes_in_the_images_pixels(server):
    body = chat_body(IMAGE_QUESTION, max_tokens=60, temperature=0, structured_outputs={"regex": BOX_REGEX})
    message = ok(server, "/v1/chat/completions", body)["choices"][0]["message"]
    [box] = message["boxes"]
    [parsed] = parse_grounding(message["content"])
    assert box["ref"] == parsed.ref and tuple(box["box"]) == parsed.box
    assert box["image_index"] == 0
    assert tuple(box["box_pixels"]) == parsed.to_pixels(*IMAGE.size)


def test_streamed_boxes_of_a_regex_come_in_the_closing_chunk(client):
    stream = client.chat.completions.create(
        model=SERVED_MODEL, messages=[{"role": "user", "content": IMAGE_QUESTION}], max_tokens=60, temperature=0,
        stream=True, extra_body={"structured_outputs": {"regex": BOX_REGEX}})
    text, boxes = "", None
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.finish_reason is not None:
                boxes = choice.delta.model_extra["boxes"]
    [parsed] = parse_grounding(text)
    assert [tuple(b["box"]) for b in boxes] == [parsed.box]


def test_a_choice_constraint_on_completions_answers_one_of_the_choices(server):
    body = {"model": SERVED_MODEL, "prompt": "Is the sky green?", "max_tokens": 8, "n": 3,
            "structured_outputs": {"choice": ["yes", "no", "maybe"]}}
    choices = ok(server, "/v1/completions", body)["choices"]
    assert {c["text"] for c in choices} <= {"yes", "no", "maybe"}


def test_a_grammar_constraint_answers_in_the_grammar(server):
    body = chat_body(max_tokens=8, structured_outputs={"grammar": 'root ::= "yes" | "no"'})
    assert ok(server, "/v1/chat/completions", body)["choices"][0]["message"]["content"] in ("yes", "no")


def test_a_regex_the_backend_cannot_compile_is_a_400(server):
    response = post(server, "/v1/chat/completions", chat_body(structured_outputs={"regex": "(("}))
    assert_error(response, 400, code="invalid_value", says="regex")


@pytest.mark.parametrize("constraint", [{}, {"regex": "a", "choice": ["a"]}], ids=["none", "two"])
def test_structured_outputs_take_exactly_one_constraint(server, constraint):
    response = post(server, "/v1/chat/completions", chat_body(structured_outputs=constraint))
    assert_error(response, 400, code="invalid_value", param="structured_outputs", says="exactly one")


@pytest.mark.parametrize("penalty", [5e-324, 1e-3])
def test_a_repetition_penalty_below_the_floor_is_refused(server, penalty):
    # 5e-324 is 0 in float32, where vLLM applies it: masked logits times 0 are NaN, and a
    # constrained request then sampled a token its grammar forbids (finish_reason "error").
    body = chat_body(repetition_penalty=penalty, structured_outputs={"choice": ["yes", "no"]})
    assert_error(post(server, "/v1/chat/completions", body), 400, code="invalid_value", param="repetition_penalty")


@pytest.mark.parametrize("temperature", [0, 1])
def test_a_choice_under_the_strongest_repetition_penalty_stays_a_choice(server, temperature):
    # The prompt holds both choices, so the penalty applies to their tokens.
    body = chat_body("yes or no?", max_tokens=2, temperature=temperature, seed=0,
                     repetition_penalty=0.01, structured_outputs={"choice": ["yes", "no"]})
    answer = ok(server, "/v1/chat/completions", body)["choices"][0]
    assert answer["message"]["content"] in ("yes", "no")
    assert answer["finish_reason"] == "stop"


# ---- sampling and output fields --------------------------------------------------


def test_allowed_token_ids_logit_bias_and_min_tokens_shape_the_tokens(server):
    body = chat_body(max_tokens=6, allowed_token_ids=[100, 200, IM_END_ID], logit_bias={str(IM_END_ID): 100},
                     min_tokens=3, return_token_ids=True)
    choice = ok(server, "/v1/chat/completions", body)["choices"][0]
    # <|im_end|> is forced by the bias as soon as min_tokens allows it.
    assert choice["token_ids"][3:] == [IM_END_ID] and set(choice["token_ids"][:3]) <= {100, 200}
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == IM_END_ID


def test_stop_token_ids_stop_and_are_the_stop_reason(server):
    body = chat_body(max_tokens=6, allowed_token_ids=[100, 200], logit_bias={"200": 100}, stop_token_ids=[200])
    choice = ok(server, "/v1/chat/completions", body)["choices"][0]
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", 200)


def test_bad_words_are_never_generated(server):
    [hello] = ok(server, "/tokenize", {"prompt": "Hello"})["tokens"]
    body = chat_body(max_tokens=4, ignore_eos=True, allowed_token_ids=[hello, 100], logit_bias={str(hello): 100},
                     return_token_ids=True)
    favoured = ok(server, "/v1/chat/completions", body)["choices"][0]["token_ids"]
    banned = ok(server, "/v1/chat/completions", {**body, "bad_words": ["Hello"]})["choices"][0]["token_ids"]
    assert favoured == [hello] * 4
    assert banned == [100] * 4


def test_include_stop_str_in_output_keeps_the_stop_string(server):
    body = {"model": SERVED_MODEL, "prompt": "Hi", "max_tokens": 8, "allowed_token_ids": [15], "stop": ["0"]}
    texts = [ok(server, "/v1/completions", {**body, "include_stop_str_in_output": keep})["choices"][0]
             for keep in (False, True)]
    assert texts[0]["text"] == "" and texts[1]["text"] == "0"
    assert texts[0]["stop_reason"] == texts[1]["stop_reason"] == "0"


def test_an_empty_stop_string_is_accepted_and_stops_nothing(server):
    body = chat_body(max_tokens=4, ignore_eos=True, stop="")
    assert ok(server, "/v1/chat/completions", body)["usage"]["completion_tokens"] == 4


def test_prompt_logprobs_cover_every_prompt_token(server):
    answer = ok(server, "/v1/chat/completions", chat_body(prompt_logprobs=2, return_token_ids=True))
    logprobs, ids = answer["prompt_logprobs"], answer["prompt_token_ids"]
    assert len(logprobs) == len(ids) == answer["usage"]["prompt_tokens"]
    assert logprobs[0] is None
    assert all(str(token) in position for token, position in zip(ids[1:], logprobs[1:]))


def test_return_tokens_as_token_ids_names_tokens_by_id(server):
    body = chat_body(max_tokens=3, logprobs=True, top_logprobs=2, return_token_ids=True,
                     return_tokens_as_token_ids=True)
    choice = ok(server, "/v1/chat/completions", body)["choices"][0]
    assert [e["token"] for e in choice["logprobs"]["content"]] == [f"token_id:{t}" for t in choice["token_ids"]]


def test_return_token_ids_in_a_stream_give_the_prompt_first_then_each_delta(server, image_host):
    body = chat_body(max_tokens=5, ignore_eos=True, stream=True, return_token_ids=True)
    prompt, tokens = None, []
    with http.stream("POST", f"{server}/v1/chat/completions", json=body, headers=AUTH, timeout=120) as response:
        for chunk in sse_chunks(response.iter_lines()):
            if "prompt_token_ids" in chunk:
                assert prompt is None
                prompt = chunk["prompt_token_ids"]
            for choice in chunk["choices"]:
                tokens += choice.get("token_ids", [])
    assert prompt == ok(server, "/tokenize", {"messages": body["messages"]})["tokens"]
    assert len(tokens) == 5


def test_a_request_id_names_the_response(server):
    assert ok(server, "/v1/chat/completions", chat_body(request_id="my-id-1"))["id"] == "chatcmpl-my-id-1"


def test_a_cache_salt_is_accepted_and_an_empty_one_refused(server):
    assert ok(server, "/v1/chat/completions", chat_body(cache_salt="s3cret"))["choices"]
    assert_error(post(server, "/v1/chat/completions", chat_body(cache_salt="")), 400, code="invalid_value",
                 param="cache_salt", says="at least 1 character")


def test_priority_is_refused_while_the_engine_schedules_first_come_first_served(server):
    assert ok(server, "/v1/chat/completions", chat_body(priority=0))["choices"]
    assert_error(post(server, "/v1/chat/completions", chat_body(priority=1)), 400, code="invalid_value",
                 param="priority", says="--scheduling-policy priority")


def test_truncate_prompt_tokens_keeps_the_first_or_last_tokens(server):
    prompt = {"model": SERVED_MODEL, "prompt": "one two three four five six", "max_tokens": 1,
              "return_token_ids": True}
    full = ok(server, "/v1/completions", prompt)["choices"][0]["prompt_token_ids"]
    right = ok(server, "/v1/completions", {**prompt, "truncate_prompt_tokens": 3})["choices"][0]
    left = ok(server, "/v1/completions", {**prompt, "truncate_prompt_tokens": 3, "truncation_side": "left"})
    assert right["prompt_token_ids"] == full[:3]
    assert left["choices"][0]["prompt_token_ids"] == full[-3:]


def test_truncating_through_an_image_is_refused(server):
    body = chat_body(IMAGE_QUESTION, truncate_prompt_tokens=30)
    assert_error(post(server, "/v1/chat/completions", body), 400, param="truncate_prompt_tokens",
                 says="cut through an image")


def test_several_prompts_give_n_choices_each_in_order(server):
    body = {"model": SERVED_MODEL, "prompt": ["Hello", "Good morning to you"], "n": 2, "max_tokens": 2,
            "ignore_eos": True, "return_token_ids": True}
    answer = ok(server, "/v1/completions", body)
    choices = answer["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert choices[0]["prompt_token_ids"] == choices[1]["prompt_token_ids"] != choices[2]["prompt_token_ids"]
    assert answer["usage"]["prompt_tokens"] == len(choices[0]["prompt_token_ids"]) + len(choices[2]["prompt_token_ids"])
    assert answer["usage"]["completion_tokens"] == 8


def test_echo_prepends_the_prompt_and_its_logprobs(server):
    body = {"model": SERVED_MODEL, "prompt": "Hello there", "max_tokens": 2, "ignore_eos": True, "echo": True,
            "logprobs": 1, "temperature": 0}
    choice = ok(server, "/v1/completions", body)["choices"][0]
    plain = ok(server, "/v1/completions", {**body, "echo": False, "logprobs": None})["choices"][0]
    assert choice["text"] == "Hello there" + plain["text"]
    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert logprobs["token_logprobs"][0] is None and all(lp is not None for lp in logprobs["token_logprobs"][1:])


def test_streamed_echo_starts_with_the_prompt(server):
    body = {"model": SERVED_MODEL, "prompt": "Hello there", "max_tokens": 2, "ignore_eos": True, "echo": True,
            "stream": True}
    with http.stream("POST", f"{server}/v1/completions", json=body, headers=AUTH, timeout=120) as response:
        texts = [chunk["choices"][0]["text"] for chunk in sse_chunks(response.iter_lines()) if chunk["choices"]]
    assert texts[0].startswith("Hello there")


# ---- refused -------------------------------------------------------------------


@pytest.mark.parametrize("field, value, says", [
    ("tools", [{"type": "function", "function": {"name": "f"}}], "tool-calling"),
    ("use_beam_search", True, "beam search"),
    ("chat_template", "{{ messages }}", "not built from a template"),
    ("continue_final_message", True, "ends with the assistant's turn"),
    ("mm_processor_kwargs", {"size": 1}, "448x448"),
    ("vllm_xargs", {"a": 1}, "custom extensions"),
])
def test_a_vllm_field_this_server_does_not_serve_is_refused_naming_it(server, field, value, says):
    response = post(server, "/v1/chat/completions", chat_body(**{field: value}))
    assert_error(response, 400, code="invalid_value", param=field, says=says)


def test_a_refused_field_at_its_default_is_accepted(server):
    body = chat_body(use_beam_search=False, tool_choice="none", add_generation_prompt=True, include_reasoning=True)
    assert ok(server, "/v1/chat/completions", body)["choices"]


def test_suffix_is_refused_on_completions(server):
    body = {"model": SERVED_MODEL, "prompt": "def f(", "suffix": "return 1", "max_tokens": 2}
    assert_error(post(server, "/v1/completions", body), 400, code="invalid_value", param="suffix",
                 says="fill-in-the-middle")


# ---- tokenize / detokenize -------------------------------------------------------


@pytest.mark.parametrize("path", ["/tokenize", "/v1/tokenize"])
def test_tokenize_counts_a_chat_with_images_as_the_chat_endpoint_does(server, path):
    messages = [{"role": "user", "content": [*IMAGE_QUESTION[:1], *IMAGE_QUESTION]}]
    counted = ok(server, path, {"model": SERVED_MODEL, "messages": messages})
    answer = ok(server, "/v1/chat/completions", chat_body(messages[0]["content"], return_token_ids=True))
    assert counted["tokens"] == answer["prompt_token_ids"]
    assert counted["count"] == answer["usage"]["prompt_tokens"] == len(counted["tokens"])
    assert counted["max_model_len"] == 8192
    assert counted["tokens"].count(IMG_PAD_ID) == 2 * 256  # two images, <img> + 256 pads + </img> each


def test_tokenize_a_prompt_with_an_image_counts_its_258_positions(server):
    with_image = ok(server, "/tokenize", {"prompt": "<img>http://x/a.png</img>Hello", "return_token_strs": True})
    without = ok(server, "/tokenize", {"prompt": "Hello"})
    assert with_image["count"] == without["count"] + 258
    assert with_image["token_strs"][:2] == ["<img>", "<imgpad>"]


@pytest.mark.parametrize("path", ["/detokenize", "/v1/detokenize"])
def test_detokenize_inverts_tokenize(server, path):
    tokens = ok(server, "/tokenize", {"prompt": "Hello, world <ref>a cat</ref>"})["tokens"]
    assert ok(server, path, {"tokens": tokens})["prompt"] == "Hello, world <ref>a cat</ref>"


def test_detokenize_refuses_an_id_beyond_the_vocabulary(server):
    assert_error(post(server, "/detokenize", {"tokens": [0, 151860]}), 400, code="invalid_value",
                 param="tokens.1", says="less than 151860")


# ---- auth first ------------------------------------------------------------------


def test_a_request_without_the_key_gets_401_even_with_invalid_json(server):
    response = http.post(f"{server}/v1/chat/completions", content=b"{not json",
                          headers={"Content-Type": "application/json"}, timeout=30)
    assert_error(response, 401, code="invalid_api_key", says="API key")


def test_a_request_without_the_key_gets_401_before_its_body_is_sent(server):
    """A terabyte declared and nothing sent: the answer comes at once, from the headers alone."""
    address = urlsplit(server)
    with socket.create_connection((address.hostname, address.port), timeout=30) as connection:
        connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 1000000000000\r\n\r\n")
        status_line = connection.makefile("rb").readline()
    assert status_line.split()[1] == b"401"
