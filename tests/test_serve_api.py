"""The HTTP API over real HTTP: uvicorn on a free loopback port, serving a tiny random model."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time

import httpx
import pytest
from PIL import Image

import janus
from janus.cli import main
from janus.eval.clause_judge import clause_judge
from janus.serve import create_app, serve_in_background
from janus.serve.api import _LimitBody, MAX_BODY_BYTES, MAX_CANDIDATES, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, MAX_IMAGES_PER_REQUEST
from janus.testing import save_tiny_checkpoint, steer_eos


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return janus.load(save_tiny_checkpoint(tmp_path_factory.mktemp("serve") / "tiny"), device="cpu")


@pytest.fixture(scope="module")
def client(model):
    with serve_in_background(create_app(model, model_name="tiny", api_only=True, concurrency=8)) as url:
        with httpx.Client(base_url=url, timeout=60) as http:
            yield http


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def user(text: str, *images: str) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text}, *({"type": "image_url", "image_url": {"url": u}} for u in images)]}


BLUE = data_url(Image.new("RGB", (20, 20), (0, 0, 255)))


def test_health(client):
    assert client.get("/health").json() == {"status": "ok", "model": "tiny", "queued": 0}


def test_images_are_reproducible_with_a_seed(client, model):
    body = {"prompt": "a red circle", "n": 2, "seed": 7, "cfg": 3.0, "temperature": 0.9, "response_format": "b64_json"}
    first = client.post("/v1/images/generations", json=body)
    assert first.status_code == 200, first.text
    data = first.json()["data"]
    assert set(first.json()) == {"created", "data"} and len(data) == 2
    assert all(png(d["b64_json"]).size == (32, 32) for d in data)
    assert client.post("/v1/images/generations", json=body).json()["data"] == data
    # exactly what the Python API gives for the same seed and settings
    direct = model.generate_image("a red circle", n=2, seed=7, cfg_weight=3.0, temperature=0.9)
    assert [png(d["b64_json"]).tobytes() for d in data] == [im.tobytes() for im in direct]


def test_chat_multi_turn_with_images_matches_the_python_api(client, model):
    messages = [
        user("What colour is it?", BLUE),
        {"role": "assistant", "content": "It is blue."},
        {"role": "user", "content": "And the size?"},
    ]
    reply = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8, "model": "anything"})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    assert body["choices"][0]["message"]["role"] == "assistant"
    history = [
        {"role": "user", "content": "What colour is it?", "images": [Image.new("RGB", (20, 20), (0, 0, 255))]},
        {"role": "assistant", "content": "It is blue."},
    ]
    stream = model.chat("And the size?", history=history, max_new_tokens=8, stream=True)
    assert body["choices"][0]["message"]["content"] == "".join(stream)
    usage = body["usage"]
    assert usage == {"prompt_tokens": stream.prompt_tokens, "completion_tokens": stream.completion_tokens, "total_tokens": stream.prompt_tokens + stream.completion_tokens}


def test_chat_system_message_is_the_system_prompt(client, model):
    messages = [{"role": "system", "content": "Answer in one word."}, user("What colour is it?", BLUE)]
    reply = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8})
    assert reply.status_code == 200, reply.text
    system = {"role": "system", "content": "Answer in one word."}
    image = Image.new("RGB", (20, 20), (0, 0, 255))
    expected = model.chat("What colour is it?", images=[image], history=[system], max_new_tokens=8)
    assert reply.json()["choices"][0]["message"]["content"] == expected
    assert expected != model.chat("What colour is it?", images=[image], max_new_tokens=8)  # not Janus's own prompt


def test_chat_stream_is_openai_sse_ending_with_done(client):
    body = {"messages": [user("Describe it.", BLUE)], "max_tokens": 12, "temperature": 0.8, "top_p": 0.9, "seed": 3}
    whole_reply = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    whole = whole_reply["message"]["content"]
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] == whole_reply["finish_reason"]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == whole  # same seed, same answer
    assert len(chunks) > 3  # streamed in pieces, not in one go


@pytest.mark.parametrize("towards_eos, expected", [(True, "stop"), (False, "length")])
def test_finish_reason_says_whether_max_tokens_cut_the_answer(tmp_path, towards_eos, expected):
    steered = janus.load(save_tiny_checkpoint(tmp_path / "tiny"), device="cpu")
    steer_eos(steered, towards=towards_eos)
    body = {"messages": [user("Describe it.", BLUE)], "max_tokens": 5}
    with serve_in_background(create_app(steered, model_name="tiny", api_only=True)) as url:
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()["choices"][0]
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as response:
            events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert reply["finish_reason"] == expected
    assert bool(reply["message"]["content"]) == (expected == "length")  # the steered model says EOS first
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == expected


def _big_png() -> str:
    side = int(MAX_IMAGE_PIXELS**0.5) + 1
    return data_url(Image.new("1", (side, side)))  # one bit per pixel: a small file with too many pixels


def _truncated_png() -> str:
    whole = base64.b64decode(BLUE.split(",")[1])
    return "data:image/png;base64," + base64.b64encode(whole[: len(whole) // 2]).decode()


CHAT_ERRORS = {
    "no messages": ({"messages": []}, "messages"),
    "missing messages": ({}, "messages: Field required"),
    "empty text": ({"messages": [{"role": "user", "content": "  "}]}, "messages[0] has no text"),
    "system not first": ({"messages": [user("a"), {"role": "system", "content": "be nice"}]}, "messages[1] has role 'system', expected 'assistant'"),
    "system with image": ({"messages": [{"role": "system", "content": [{"type": "text", "text": "s"}, {"type": "image_url", "image_url": {"url": BLUE}}]}, user("a")]}, "only user messages may carry images"),
    "system only": ({"messages": [{"role": "system", "content": "be nice"}]}, "last message"),
    "tool role": ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    "two user turns": ({"messages": [user("a"), user("b")]}, "messages[1] has role 'user', expected 'assistant'"),
    "ends with assistant": ({"messages": [user("a"), {"role": "assistant", "content": "b"}]}, "last message"),
    "unknown field": ({"messages": [user("a")], "frequency_penalty": 1}, "unknown field 'frequency_penalty'"),
    "unknown message field": ({"messages": [{"role": "user", "content": "a", "name": "x"}]}, "unknown field 'messages[0].name'"),
    "bad part type": ({"messages": [{"role": "user", "content": [{"type": "audio", "text": "a"}]}]}, "messages[0].content[0]"),
    "content not text": ({"messages": [{"role": "user", "content": 5}]}, "content must be a string or a list"),
    "max_tokens 0": ({"messages": [user("a")], "max_tokens": 0}, "max_tokens"),
    "max_tokens huge": ({"messages": [user("a")], "max_tokens": 10**6}, "max_tokens"),
    "max_tokens float": ({"messages": [user("a")], "max_tokens": 2.5}, "max_tokens"),
    "temperature < 0": ({"messages": [user("a")], "temperature": -0.1}, "temperature"),
    "temperature > 2": ({"messages": [user("a")], "temperature": 2.5}, "temperature"),
    "top_p 0": ({"messages": [user("a")], "top_p": 0}, "top_p"),
    "top_p > 1": ({"messages": [user("a")], "top_p": 1.5}, "top_p"),
    "negative seed": ({"messages": [user("a")], "seed": -1}, "seed"),
    "stream not bool": ({"messages": [user("a")], "stream": "yes"}, "stream"),
    "not a data url": ({"messages": [user("a", "https://example.com/a.png")]}, "base64 data URL"),
    "bad base64": ({"messages": [user("a", "data:image/png;base64,@@@@")]}, "not valid base64"),
    "not an image": ({"messages": [user("a", "data:image/png;base64," + base64.b64encode(b"hello" * 9).decode())]}, "not an image"),
    "truncated image": ({"messages": [user("a", _truncated_png())]}, "cannot decode the image"),
    "too many bytes": ({"messages": [user("a", "data:image/png;base64," + "A" * (MAX_IMAGE_BYTES * 4 // 3 + 8))]}, "larger than the limit"),
    "too many pixels": ({"messages": [user("a", _big_png())]}, f"the limit is {MAX_IMAGE_PIXELS} pixels"),
    "too many images": ({"messages": [user("a", *[BLUE] * (MAX_IMAGES_PER_REQUEST + 1))]}, "too many images"),
    "image from assistant": ({"messages": [user("a"), {**user("b", BLUE), "role": "assistant"}, user("c")]}, "only user messages"),
    "conversation too long": ({"messages": [user("word " * 600)]}, "conversation too long"),
}

IMAGE_ERRORS = {
    "empty prompt": ({"prompt": ""}, "prompt is empty"),
    "blank prompt": ({"prompt": " \n "}, "prompt is empty"),
    "missing prompt": ({"n": 1}, "prompt: Field required"),
    "n 0": ({"prompt": "a", "n": 0}, "n: Input should be greater than or equal to 1"),
    "n 9": ({"prompt": "a", "n": 9}, "n: Input should be less than or equal to 8"),
    "n string": ({"prompt": "a", "n": "2"}, "n: Input should be a valid integer"),
    "cfg < 0": ({"prompt": "a", "cfg": -1}, "cfg"),
    "cfg huge": ({"prompt": "a", "cfg": 1000}, "cfg"),
    "temperature < 0": ({"prompt": "a", "temperature": -1}, "temperature"),
    "top_p 0": ({"prompt": "a", "top_p": 0}, "top_p"),
    "top_k 0": ({"prompt": "a", "top_k": 0}, "top_k"),
    "candidates 0": ({"prompt": "a", "candidates": 0}, "candidates: Input should be greater than or equal to 1"),
    "candidates 9": ({"prompt": "a", "candidates": 9}, f"candidates: Input should be less than or equal to {MAX_CANDIDATES}"),
    "rank_by": ({"prompt": "a", "rank_by": "beauty"}, "rank_by: Input should be 'likelihood', 'match' or 'questions'"),
    "url format": ({"prompt": "a", "response_format": "url"}, "response_format"),
    "unknown field": ({"prompt": "a", "size": "1024x1024"}, "unknown field 'size'"),
    "prompt too long": ({"prompt": "word " * 600}, "prompt too long"),
}


@pytest.mark.parametrize("body, expected", CHAT_ERRORS.values(), ids=CHAT_ERRORS.keys())
def test_chat_validation_errors_are_400_with_a_message(client, body, expected):
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert expected in response.json()["error"]["message"]


@pytest.mark.parametrize("body, expected", IMAGE_ERRORS.values(), ids=IMAGE_ERRORS.keys())
def test_image_validation_errors_are_400_with_a_message(client, body, expected):
    response = client.post("/v1/images/generations", json=body)
    assert response.status_code == 400, response.text
    assert expected in response.json()["error"]["message"]


def test_malformed_json_is_400_and_the_server_still_serves(client):
    response = client.post("/v1/images/generations", content=b'{"prompt": ', headers={"content-type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    assert client.post("/v1/images/generations", json={"prompt": "still here"}).status_code == 200
    assert client.post("/v1/chat/completions", json={"messages": [user("still here?")], "max_tokens": 2}).status_code == 200


def test_internal_errors_are_500_json_and_the_server_keeps_serving(client, model, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("the accelerator caught fire")

    monkeypatch.setattr(model, "generate_image", broken)
    monkeypatch.setattr(model, "chat", broken)
    for path, body in [("/v1/images/generations", {"prompt": "a"}), ("/v1/chat/completions", {"messages": [user("a")]})]:
        response = client.post(path, json=body)
        assert response.status_code == 500
        assert "RuntimeError: the accelerator caught fire" in response.json()["error"]["message"]
    monkeypatch.undo()
    assert client.post("/v1/images/generations", json={"prompt": "a"}).status_code == 200
    assert client.get("/health").json()["status"] == "ok"


def test_concurrent_seedless_requests_share_one_batch(client, model, monkeypatch):
    calls, release = [], threading.Event()
    generate = model.generate_image

    def spy(prompts, **kwargs):
        calls.append(list(prompts))
        release.wait(10)  # hold the first call so that the others queue up behind it
        return generate(prompts, **kwargs)

    monkeypatch.setattr(model, "generate_image", spy)
    named_defaults = {"cfg": model.default_cfg_weight, "temperature": model.default_temperature}
    requests = [
        {"prompt": "first"}, {"prompt": "b", "n": 2}, {"prompt": "c"}, {"prompt": "d", **named_defaults},
        {"prompt": "seeded", "seed": 1}, {"prompt": "greedy", "temperature": 0},
        # 16 and 4 images drawn: together over the client's max_batch_images of 16
        {"prompt": "e", "n": 4, "candidates": 4}, {"prompt": "f", "candidates": 4},
    ]
    results = [None] * len(requests)

    def post(i: int) -> None:
        results[i] = client.post("/v1/images/generations", json=requests[i])

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(requests))]
    threads[0].start()
    while not calls:
        time.sleep(0.01)
    for t in threads[1:]:
        t.start()
    while client.get("/health").json()["queued"] < len(requests) - 1:
        time.sleep(0.01)
    release.set()
    for t in threads:
        t.join()
    assert [len(r.json()["data"]) for r in results] == [1, 2, 1, 1, 1, 1, 4, 1]
    # b, c and d share settings (d names the model's defaults, b and c leave them out) and no seed: one
    # call; the seeded and the greedy requests run alone, and so do e and f, which count their candidates
    assert sorted(sorted(call) for call in calls) == [
        ["b", "b", "c", "d"], ["e"] * 4, ["f"], ["first"], ["greedy"], ["seeded"]
    ]


def test_a_client_leaving_mid_stream_stops_the_model(client, model, monkeypatch):
    closed = threading.Event()

    def endless(message, stream, **kwargs):
        def pieces():
            try:
                while True:
                    time.sleep(0.01)
                    yield "la "
            finally:
                closed.set()

        return pieces()

    monkeypatch.setattr(model, "chat", endless)
    with client.stream("POST", "/v1/chat/completions", json={"messages": [user("sing")], "stream": True}) as response:
        lines = response.iter_lines()
        assert [next(lines) for _ in range(3)][-1].startswith("data: ")
    assert closed.wait(10)  # the worker noticed and closed the generator, freeing the model
    monkeypatch.undo()
    assert client.post("/v1/chat/completions", json={"messages": [user("next")], "max_tokens": 2}).status_code == 200


def test_serve_without_a_model_or_default_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(janus.pipeline, "DEFAULT_MODEL_DIR", tmp_path / "none")
    assert main(["serve", "--api-only"]) == 2
    assert "built-in default model is missing" in capsys.readouterr().err


def test_request_bodies_over_the_limit_are_413_and_the_server_still_serves(client):
    body = b'{"prompt": "' + b"a" * MAX_BODY_BYTES + b'"}'
    declared = client.post("/v1/images/generations", content=body, headers={"content-type": "application/json"})
    assert declared.status_code == 413 and str(MAX_BODY_BYTES) in declared.json()["error"]["message"]

    def chunks():  # no Content-Length: the server counts as the bytes arrive
        for start in range(0, len(body), 2**20):
            yield body[start : start + 2**20]

    chunked = client.post("/v1/images/generations", content=chunks(), headers={"content-type": "application/json"})
    assert chunked.status_code == 413
    ok = client.post("/v1/images/generations", json={"prompt": "a cat", "seed": 1})
    assert ok.status_code == 200 and len(ok.json()["data"]) == 1


@pytest.mark.parametrize(("content_length", "chunks", "reads"), [(b"1800", 3, 3), (None, 3, 3), (None, 100, 6)])
def test_the_rest_of_an_over_limit_body_is_read_before_the_413(content_length, chunks, reads):
    # Answering while the client still sends, then closing, resets the connection, and the client
    # can lose the answer; so the rest of the body is read (and dropped) before the response starts,
    # up to twice the limit: the third case's client would go on sending 60,000 bytes.
    events = []

    async def receive() -> dict:
        events.append("read")
        return {"type": "http.request", "body": b"x" * 600, "more_body": events.count("read") < chunks}

    async def send(message: dict) -> None:
        events.append(message["type"])

    async def app(scope, receive, send):
        raise AssertionError("an over-limit body must not reach the app")

    headers = [(b"content-length", content_length)] if content_length else []
    scope = {"type": "http", "method": "POST", "path": "/v1/images/generations", "headers": headers, "query_string": b""}
    asyncio.run(_LimitBody(app, limit=1000)(scope, receive, send))
    assert events == ["read"] * reads + ["http.response.start", "http.response.body"]


def test_images_without_cfg_or_temperature_use_the_models_defaults(client, model, monkeypatch):
    monkeypatch.setattr(model, "default_cfg_weight", 2.0)
    monkeypatch.setattr(model, "default_temperature", 0.5)
    body = {"prompt": "a red circle", "seed": 3, "response_format": "b64_json"}
    served = png(client.post("/v1/images/generations", json=body).json()["data"][0]["b64_json"])
    assert served.tobytes() == model.generate_image("a red circle", seed=3, cfg_weight=2.0, temperature=0.5)[0].tobytes()
    assert served.tobytes() != model.generate_image("a red circle", seed=3, cfg_weight=5.0, temperature=0.5)[0].tobytes()
    assert served.tobytes() != model.generate_image("a red circle", seed=3, cfg_weight=2.0, temperature=1.0)[0].tobytes()


def test_images_with_candidates_are_the_python_apis_best_of_n(client, model, monkeypatch):
    body = {"prompt": "a red circle", "n": 2, "seed": 5, "candidates": 3}
    served = [png(d["b64_json"]).tobytes() for d in client.post("/v1/images/generations", json=body).json()["data"]]
    kept = model.generate_image("a red circle", n=2, seed=5, candidates=3)
    assert served == [im.tobytes() for im in kept]
    assert served != [im.tobytes() for im in model.generate_image("a red circle", n=2, seed=5)]
    body = {"prompt": "a red circle above a blue square", "n": 2, "seed": 5, "candidates": 3, "rank_by": "questions"}
    served = [png(d["b64_json"]).tobytes() for d in client.post("/v1/images/generations", json=body).json()["data"]]
    kept = model.generate_image(body["prompt"], n=2, seed=5, candidates=3, rank_by=clause_judge(model))
    assert served == [im.tobytes() for im in kept]
    sampled = []
    monkeypatch.setattr(model, "generate_image_tokens", lambda *args, **kwargs: sampled.append(args))
    response = client.post("/v1/images/generations", json={**body, "prompt": "a dog"})
    assert response.status_code == 400 and "cannot read 'a dog' as objects" in response.json()["error"]["message"]
    assert not sampled  # refused before sampling, so it cannot fail a batch it would have joined
