"""The OpenAI-compatible server (svlm/serve/): a random-init tiny model served
on 127.0.0.1 in a thread, spoken to with the official `openai` client and raw
HTTP. These check the protocol (formats, streaming, limits, errors, the queue,
cancellation), not the quality of the answers."""

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn
from conftest import REPO, compose, path_overrides, tiny_train_overrides
from PIL import Image

from svlm.config import ConfigError, load_train_config
from svlm.model_folder import save_model
from svlm.serve import build_app, load_serve_config
from svlm.serve.app import exposure_warning
from svlm.serve.config import LimitsConfig
from svlm.serve.engine import Result
from svlm.serve.messages import APIError, parse_chat_request
from svlm.training.prepare import build_model

CONTEXT = 1024  # the test model's max_seq_len: room for long generations (disconnect test)
LIMITS = [  # small limits, so tests can cross them cheaply
    "serve.max_body_bytes=1000000",
    "serve.max_image_bytes=200000",
    "serve.max_image_pixels=65536",  # 256 x 256
    "serve.max_images=2",
    "serve.max_batch=2",
    "serve.max_queue=1",
    "serve.max_tokens=900",
    "serve.default_max_tokens=8",
]


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, cache_dir, shapes_root, tokenizer):
    """A random-init tiny model folder (no training: the protocol is what is tested)."""
    base = tmp_path_factory.mktemp("serve_model")
    overrides = [o for o in tiny_train_overrides("stage2") if not o.startswith("model.lm.max_seq_len")]
    cfg = load_train_config(
        compose("train", [*overrides, f"model.lm.max_seq_len={CONTEXT}", *path_overrides(base, cache_dir)])
    )
    model = build_model(cfg, tokenizer)
    return save_model(base / "model", model, tokenizer, {"stage": "stage2", "finished": True})


@pytest.fixture(scope="module")
def pictures(tmp_path_factory, shapes_root):
    """serve.image_root with one picture and a symlink out of it, and a picture outside."""
    base = tmp_path_factory.mktemp("pictures")
    root, outside = base / "root", base / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    picture = sorted((shapes_root / "images").glob("test-*.png"))[0]
    shutil.copy(picture, root / "shape.png")
    shutil.copy(picture, root / "sub" / "other shape.png")
    shutil.copy(picture, outside / "secret.png")
    (root / "escape.png").symlink_to(outside / "secret.png")
    (root / "escape_dir").symlink_to(outside)
    return root


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def running(cfg):
    """Serve `cfg` on 127.0.0.1 (a free port) in a thread; yields (base URL, engine)."""
    app, _ = build_app(cfg)
    sock = free_socket()
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app.state.engine
    finally:
        server.should_exit = True
        thread.join(15)


def serve_config(model_dir: Path, tmp: Path, cache_dir: Path, *extra: str):
    overrides = [f"ckpt={model_dir}", "hardware=cpu", *path_overrides(tmp, cache_dir), *LIMITS, *extra]
    return load_serve_config(compose("serve", overrides))


@pytest.fixture(scope="module")
def server(model_dir, pictures, tmp_path_factory, cache_dir):
    cfg = serve_config(model_dir, tmp_path_factory.mktemp("serve"), cache_dir, f"serve.image_root={pictures}")
    with running(cfg) as (url, engine):
        yield url, engine


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=60)


def png(size: tuple[int, int] = (32, 32), colour: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_message(url: str, text: str = "What colour is the shape?") -> dict:
    return {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}],
    }


def post(url: str, body: object, **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60, **kw)


def expect_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


# -------------------------------------------------------------- the protocol


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["svlm"]
    assert client.models.retrieve("svlm").owned_by == "svlm"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_chat_completion(client, server):
    engine = server[1]
    done = engine.stats.total()
    r = client.chat.completions.create(model="any-name", messages=[image_message(data_url(png()))], max_tokens=5)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "svlm"
    (choice,) = r.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    # the prompt: template tokens plus one placeholder per visual token
    ids, _ = engine.encoder.encode([("user", "<image>\nWhat colour is the shape?")], add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(ids)
    assert 1 <= r.usage.completion_tokens <= 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert engine.stats.total() == done + 1
    # without max_tokens: serve.default_max_tokens
    r = client.chat.completions.create(model="svlm", messages=[{"role": "user", "content": "Hello"}])
    assert r.usage.completion_tokens <= 8


def test_two_images_in_one_question(client, server):
    """Each image_url part takes its own image's visual tokens: the answer is ours for those two pictures."""
    from svlm.inference.generation import generate

    engine = server[1]
    red, blue = png(colour="red"), png(colour="blue")
    parts = [{"type": "image_url", "image_url": {"url": data_url(red)}}, {"type": "text", "text": "or"},
             {"type": "image_url", "image_url": {"url": data_url(blue)}}, {"type": "text", "text": "Which is red?"}]  # fmt: skip
    r = client.chat.completions.create(model="svlm", messages=[{"role": "user", "content": parts}], max_tokens=6)
    ids = engine.encoder.prompt("<image>\nor\n<image>\nWhich is red?")
    assert r.usage.prompt_tokens == len(ids) and ids.count(engine.encoder.image_id) == 2 * engine.model.num_image_tokens
    pixels = torch.stack([engine.processor(Image.open(io.BytesIO(b)).convert("RGB")) for b in (red, blue)])
    (want,) = generate(engine.model, torch.tensor([ids]), pixels, engine.encoder.stop_ids, 6)
    assert r.choices[0].message.content == engine.tokenizer.decode(want, skip_special_tokens=True)


def test_stream_matches_non_stream(client, server):
    messages = [image_message(data_url(png(colour="blue")))]
    whole = client.chat.completions.create(model="svlm", messages=messages, max_tokens=12)
    chunks = list(
        client.chat.completions.create(
            model="svlm", messages=messages, max_tokens=12, stream=True, stream_options={"include_usage": True}
        )
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content  # greedy: the same answer
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    # the raw stream: server-sent events ending with [DONE]
    r = post(server[0], {"messages": messages, "max_tokens": 12, "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert r.text.endswith("data: [DONE]\n\n")
    assert json.loads(events[0][6:])["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_sampling_settings(client):
    def ask(**kw) -> str:
        messages = [image_message(data_url(png()))]
        r = client.chat.completions.create(model="svlm", messages=messages, max_tokens=16, **kw)
        return r.choices[0].message.content

    first = ask(temperature=1.0, top_p=0.95, seed=1)
    assert ask(temperature=1.0, top_p=0.95, seed=1) == first  # a seed repeats a sample
    assert any(ask(temperature=1.0, top_p=0.95, seed=s) != first for s in (2, 3, 4))
    assert ask(temperature=0.0) == ask(temperature=0.0)


def test_multi_turn_system_and_local_images(client, server, pictures):
    engine = server[1]
    messages = [
        {"role": "system", "content": "Answer in one word."},
        image_message("shape.png"),  # relative to serve.image_root
        {"role": "assistant", "content": "red"},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": (pictures / "sub" / "other shape.png").as_uri()}},
                {"type": "text", "text": "And this one?"},
            ],
        },
    ]
    r = client.chat.completions.create(model="svlm", messages=messages, max_tokens=3)
    turns = [
        ("user", "Answer in one word.\n\n<image>\nWhat colour is the shape?"),  # system text goes first
        ("assistant", "red"),
        ("user", "<image>\nAnd this one?"),
    ]
    ids, _ = engine.encoder.encode(turns, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(ids)
    # an absolute path inside the root works too
    r = client.chat.completions.create(
        model="svlm", messages=[image_message(str(pictures / "shape.png"))], max_tokens=2
    )
    assert r.choices[0].finish_reason in ("stop", "length")


def test_system_message_options(pictures):
    body = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
    assert parse_chat_request(body, LimitsConfig(), None).turns == [("user", "Be brief.\n\nHi")]
    assert parse_chat_request(body, LimitsConfig(system="ignore"), None).turns == [("user", "Hi")]
    with pytest.raises(APIError, match="system messages are refused"):
        parse_chat_request(body, LimitsConfig(system="reject"), None)


def test_local_images_refused_without_image_root(pictures):
    body = {"messages": [image_message(str(pictures / "shape.png"))]}
    with pytest.raises(APIError) as e:
        parse_chat_request(body, LimitsConfig(), None)
    assert (e.value.status, e.value.code) == (403, "image_root_unset")


# ---------------------------------------------------------------- refusals


def test_bad_requests(server, client):
    url = server[0]
    r = httpx.post(
        f"{url}/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"}
    )
    expect_error(r, 400, "invalid_json")
    expect_error(post(url, {"model": "svlm"}), 400, param="messages")
    expect_error(post(url, {"messages": []}), 400, param="messages")
    expect_error(post(url, [1, 2]), 400)
    expect_error(post(url, {"messages": [{"role": "assistant", "content": "hi"}]}), 400, param="messages")
    expect_error(post(url, {"messages": [{"role": "tool", "content": "x"}]}), 400, param="messages[0].role")
    expect_error(post(url, {"messages": [{"role": "user", "content": 5}]}), 400, param="messages[0].content")
    hi = [{"role": "user", "content": "hi"}]
    expect_error(post(url, {"messages": hi, "n": 2}), 400, "unsupported_parameter", "n")
    expect_error(post(url, {"messages": hi, "stop": ["x"]}), 400, "unsupported_parameter", "stop")
    expect_error(post(url, {"messages": hi, "max_tokens": 901}), 400, param="max_tokens")
    expect_error(post(url, {"messages": hi, "max_completion_tokens": 0}), 400, param="max_completion_tokens")
    expect_error(post(url, {"messages": hi, "temperature": -1}), 400, param="temperature")
    expect_error(post(url, {"messages": hi, "top_p": 0}), 400, param="top_p")
    expect_error(post(url, {"messages": hi, "stream": "yes"}), 400, param="stream")
    expect_error(post(url, {"messages": [{"role": "user", "content": "what is <image>?"}]}), 400)
    assistant_image = [
        image_message(data_url(png())),
        {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": data_url(png())}}]},
        image_message(data_url(png())),
    ]
    expect_error(post(url, {"messages": assistant_image}), 400, param="messages[1].content[0]")
    three = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png())}}] * 3}
    expect_error(post(url, {"messages": [three]}), 400, "too_many_images")
    long = {"role": "user", "content": "a " * 2000}
    expect_error(post(url, {"messages": [long]}), 400, "context_length_exceeded")
    # not JSON
    r = httpx.post(f"{url}/v1/chat/completions", content=b"messages=hi", headers={"content-type": "text/plain"})
    expect_error(r, 415)
    expect_error(httpx.get(f"{url}/v1/chat/completions"), 405)
    expect_error(httpx.get(f"{url}/v1/nothing"), 404)
    expect_error(httpx.get(f"{url}/v1/models", headers={"host": "attacker.example"}), 400, "host_not_allowed")
    # the official client raises with the same fields
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="svlm", messages=hi, max_tokens=10_000)
    assert e.value.status_code == 400 and e.value.param == "max_tokens"
    # refusals are not crashes: the server still answers
    assert client.chat.completions.create(model="svlm", messages=hi, max_tokens=2).choices


@pytest.mark.parametrize(
    "ref",
    [
        "../outside/secret.png",
        "sub/../../outside/secret.png",
        "escape.png",  # a symlink out of the root
        "escape_dir/secret.png",
        "OUTSIDE",  # the absolute path of the outside picture
        "FILE_URL",  # its file:// URL
        "/etc/passwd",
    ],
)
def test_images_outside_image_root(server, pictures, ref):
    secret = pictures.parent / "outside" / "secret.png"
    ref = {"OUTSIDE": str(secret), "FILE_URL": secret.as_uri()}.get(ref, ref)
    expect_error(post(server[0], {"messages": [image_message(ref)]}), 403, "image_outside_root")


def test_bad_images(server):
    url = server[0]

    def refused(ref: str, status: int = 400, code: str | None = None) -> dict:
        return expect_error(post(url, {"messages": [image_message(ref)]}), status, code, "messages[0].content[0]")

    refused(data_url(b"hello, not a picture"), code="invalid_image")
    refused(data_url(png()[:60]), code="invalid_image")  # a truncated PNG
    refused("data:image/png;base64,%%%not base64%%%", code="invalid_image")
    refused("data:image/png,rawbytes", code="invalid_image_url")
    refused(data_url(png((300, 300))), code="image_too_large")  # 90,000 pixels, over 65,536
    assert len(png((1, 250_000))) < 200_000  # a thin picture: few bytes, too many pixels
    refused(data_url(png((1, 250_000))), code="image_too_large")
    noisy = Image.frombytes("RGBA", (256, 256), os.urandom(256 * 256 * 4))
    buf = io.BytesIO()
    noisy.save(buf, format="PNG")
    assert len(buf.getvalue()) > 200_000  # within the pixel limit, over the byte limit
    refused(data_url(buf.getvalue()), code="image_too_large")
    refused("https://example.com/cat.png", code="invalid_image_url")
    refused("missing.png", code="image_not_found")
    refused("file://otherhost/shape.png", code="invalid_image_url")
    # a decompression bomb: a small file whose header claims a huge picture
    bomb = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(bomb, format="PNG")
    assert len(bomb.getvalue()) < 200_000
    refused(data_url(bomb.getvalue()), code="image_too_large")
    # other pictures PIL opens are fine: grayscale, RGBA, palette, JPEG
    for mode, fmt in [("L", "PNG"), ("RGBA", "PNG"), ("P", "GIF"), ("RGB", "JPEG")]:
        buf = io.BytesIO()
        Image.new(mode, (40, 30)).save(buf, format=fmt)
        r = post(url, {"messages": [image_message(data_url(buf.getvalue(), f"image/{fmt.lower()}"))], "max_tokens": 1})
        assert r.status_code == 200, r.text


def test_oversized_body(server):
    url = server[0]
    big = {"messages": [{"role": "user", "content": "x" * 1_100_000}]}
    expect_error(post(url, big), 413, "request_too_large")

    def chunks():  # no Content-Length: the limit is counted while reading
        body = json.dumps(big).encode()
        for i in range(0, len(body), 65536):
            yield body[i : i + 65536]

    r = httpx.post(f"{url}/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    expect_error(r, 413, "request_too_large")


# ------------------------------------------------------ queue and cancelling


def test_queue_full_is_429(server, client):
    """serve.max_batch=2 may run and serve.max_queue=1 wait; the next is refused with 429; then all finish."""
    url, engine = server
    gate = threading.Event()
    engine.submit(lambda job: (gate.wait(30), Result("", 0, 0, "stop"))[1])  # hold the worker
    waiting: list[httpx.Response] = []
    threads = [
        threading.Thread(target=lambda: waiting.append(post(url, {"messages": [{"role": "user", "content": "hi"}]})))
        for _ in range(engine.capacity - 1)
    ]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 20
        while engine.pending < engine.capacity:
            assert time.monotonic() < deadline, "the requests never reached the queue"
            time.sleep(0.02)
        r = post(url, {"messages": [{"role": "user", "content": "hi"}], "stream": True})
        error = expect_error(r, 429, "rate_limit_exceeded")
        assert error["type"] == "rate_limit_error" and r.headers["retry-after"] == "1"
        assert "2 requests run (serve.max_batch) and 1 wait (serve.max_queue)" in error["message"]
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="svlm", messages=[{"role": "user", "content": "hi"}])
    finally:
        gate.set()
        for t in threads:
            t.join(30)
    assert [r.status_code for r in waiting] == [200, 200], [r.text for r in waiting]  # the queued ones were answered
    assert engine.pending == 0
    assert client.chat.completions.create(model="svlm", messages=[{"role": "user", "content": "hi"}]).choices


def test_concurrent_requests_get_their_sequential_answers(server, client):
    """Requests decoded together (different prompts, lengths, pictures and
    budgets) get the greedy answers each gets alone."""
    url, engine = server
    bodies = [  # as many as the batch and the queue hold (serve.max_batch=2, serve.max_queue=1)
        {"messages": [image_message(data_url(png(colour=c)), q)], "max_tokens": n}
        for c, q, n in (("red", "What colour is the shape?", 8), ("blue", "Shape?", 5))
    ] + [{"messages": [{"role": "user", "content": "Say something about shapes, please."}], "max_tokens": 6}]
    alone = [post(url, b).json()["choices"][0]["message"]["content"] for b in bodies]
    assert len(set(alone)) == len(bodies)  # different answers: rows that mixed would show
    steps = engine.steps
    together: dict[int, str] = {}
    threads = [threading.Thread(target=lambda k=k, b=b: together.update({k: post(url, b).json()["choices"][0]
                                                                         ["message"]["content"]}))
               for k, b in enumerate(bodies)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [together[k] for k in range(len(bodies))] == alone
    assert engine.steps - steps < sum(b["max_tokens"] for b in bodies)  # some steps served several requests


def test_many_clients_each_answered_or_refused_once(server):
    """More concurrent requests than batch and queue hold: each ends answered
    (200) or refused (429), none hangs, none is answered twice."""
    url, engine = server
    results: list[tuple[int, int]] = []
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

    def one(k: int) -> None:
        r = post(url, {**body, "seed": k})
        results.append((k, r.status_code))

    threads = [threading.Thread(target=one, args=(k,)) for k in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(k for k, _ in results) == list(range(12))  # every request ended, once
    assert {code for _, code in results} <= {200, 429} and 200 in {code for _, code in results}
    wait_until(lambda: engine.pending == 0)


def wait_until(condition, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_disconnect_stops_generation(server, monkeypatch):
    """Closing a stream (or a waiting request) stops the generation between two tokens."""
    url, engine = server
    forward = engine.model.lm.forward

    def slow_forward(*args, **kwargs):  # 900 tokens would take 9 s or more
        time.sleep(0.01)
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.model.lm, "forward", slow_forward)
    body = {"messages": [image_message(data_url(png()))], "max_tokens": 900, "stream": True}
    before = engine.stats["cancelled"]
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # the role chunk
        while not next(lines).startswith("data: "):  # the first piece of text
            pass
    wait_until(lambda: engine.stats["cancelled"] == before + 1 and engine.pending == 0)
    assert engine.last.finish_reason == "cancelled" and engine.last.completion_tokens < 900
    # a non-stream request whose client gives up
    body["stream"] = False
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/chat/completions", json=body, timeout=0.5)
    wait_until(lambda: engine.stats["cancelled"] == before + 2 and engine.pending == 0)
    assert engine.last.completion_tokens < 900


def test_cancel_frees_the_slot_within_one_step(server, monkeypatch):
    """A cancelled request leaves the batch before the next decode step, while
    the others go on."""
    url, engine = server
    forward = engine.model.lm.forward
    monkeypatch.setattr(engine.model.lm, "forward", lambda *a, **kw: (time.sleep(0.01), forward(*a, **kw))[1])
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 900}
    long, other = engine.submit(engine.prepare(body)), engine.submit(engine.prepare({**body, "max_tokens": 60}))
    start = engine.steps
    wait_until(lambda: engine.steps >= start + 5)
    at_cancel = engine.steps
    long.cancel()
    wait_until(lambda: engine.stats["cancelled"] and engine.last.finish_reason == "cancelled")
    assert engine.steps - at_cancel <= 1  # at most the step under way when it was cancelled
    wait_until(lambda: engine.pending == 0)
    assert engine.last.finish_reason in ("stop", "length")  # the other request went on to its end
    del other


def test_api_key(model_dir, tmp_path, cache_dir):
    cfg = serve_config(model_dir, tmp_path, cache_dir, "serve.api_key=s3cret")
    with running(cfg) as (url, _):
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        expect_error(post(url, body), 401, "invalid_api_key")
        wrong = expect_error(post(url, body, headers={"Authorization": "Bearer nope"}), 401, "invalid_api_key")
        assert wrong["message"] == "Incorrect API key provided." and "nope" not in str(wrong)
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/").status_code == 200  # the page itself asks for the key
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0, timeout=60)
        assert good.chat.completions.create(model="svlm", messages=body["messages"], max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="bad", max_retries=0).models.list()
    with pytest.raises(ConfigError, match="serve.api_key is empty"):
        serve_config(model_dir, tmp_path, cache_dir, "serve.api_key=' '")


def test_exposure_warning():
    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("0.0.0.0", "k") is None
    warning = exposure_warning("0.0.0.0", None)
    assert "without serve.api_key" in warning and "anyone who can reach this port" in warning


# -------------------------------------------------- configuration and the command


def test_serve_config(tmp_path, cache_dir):
    cfg = load_serve_config(compose("serve", path_overrides(tmp_path, cache_dir)))
    assert (cfg.host, cfg.port, cfg.serve.image_root, cfg.serve.max_queue) == ("127.0.0.1", 8000, None, 8)
    for bad, key in [
        ("serve.max_queue=-1", "serve.max_queue"),
        ("serve.system=shout", "serve.system"),
        ("port=70000", "port"),
        ("serve.default_max_tokens=2000", "serve.default_max_tokens"),  # more than serve.max_tokens (1024)
        ("serve.max_body_bytes=big", "serve.max_body_bytes"),
    ]:
        with pytest.raises(ConfigError, match=key):
            load_serve_config(compose("serve", [*path_overrides(tmp_path, cache_dir), bad]))


def test_command_line(model_dir, tmp_path, cache_dir):
    """`python -m svlm.serve`: binds 127.0.0.1, answers, stops cleanly on Ctrl-C; a bad setting is one line."""
    env = {**os.environ, "SVLM_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    r = subprocess.run(
        [sys.executable, "-m", "svlm.serve", f"ckpt={tmp_path / 'nothing'}", f"paths.outputs={tmp_path / 'err'}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.startswith("error: ckpt=") and "Traceback" not in r.stderr
    with free_socket() as sock:
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "svlm.serve",
            f"ckpt={model_dir}",
            f"port={port}",
            f"paths.outputs={tmp_path}",
            "hardware=cpu",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the server did not start"
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).json()
                break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert models["data"][0]["id"] == "svlm"
        r = post(f"http://127.0.0.1:{port}", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
        page = httpx.get(f"http://127.0.0.1:{port}/")
        assert page.status_code == 200 and "/v1/chat/completions" in page.text
        assert "script-src 'unsafe-inline'" in page.headers["content-security-policy"]
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert f"Uvicorn running on http://127.0.0.1:{port}" in out and "Traceback" not in out
    (log,) = (tmp_path / "serve").glob("*/serve.log")  # Hydra's run folder keeps the server's log
    assert "POST /v1/chat/completions" in log.read_text()


# ------------------------------------------------------- where images are placed


@pytest.fixture(scope="module")
def answering_model(model_dir, tmp_path_factory, tokenizer):
    """The test model with its weights moved off their initial values, so that
    its greedy answers depend on the prompt (a fresh init answers alike)."""
    from svlm.model_folder import load_model

    model, _, meta = load_model(model_dir)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return save_model(tmp_path_factory.mktemp("answering") / "model", model, tokenizer, meta)


def test_text_first_requests_get_the_answers_of_eval(answering_model, tmp_path, cache_dir, tokenizer):
    """OpenAI's own vision example sends the text part before the image part;
    the model was trained on `<image>\\n{question}`. Either order gets the
    answer eval.py's path gives to the same question and picture."""
    from conftest import DATA_OVERRIDES

    from svlm.config import load_eval_config
    from svlm.data.chat import ChatEncoder
    from svlm.evaluation.evaluate import evaluate

    n, max_tokens = 6, 8
    overrides = ["data=shapes", *DATA_OVERRIDES, *path_overrides(tmp_path / "eval", cache_dir), "hardware=cpu"]
    evaluate(load_eval_config(compose("eval", [f"ckpt={answering_model}", *overrides, f"max_test={n}",
                                               f"max_new_tokens={max_tokens}", "batch_size=1"])))  # fmt: skip
    predictions = [json.loads(x) for x in (tmp_path / "eval" / "run" / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == n
    cfg = serve_config(answering_model, tmp_path / "serve", cache_dir, "serve.max_queue=8")
    with running(cfg) as (url, engine):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        for p in predictions:
            file, line = p["where"].rsplit(":", 1)
            record = json.loads(Path(file).read_text().splitlines()[int(line) - 1])
            image = {"type": "image_url", "image_url": {"url": data_url((Path(file).parent / "images" / Path(
                record["image"]).name).read_bytes())}}  # fmt: skip
            text = {"type": "text", "text": p["prompt"]}
            answers = []
            for content in ([image, text], [text, image]):
                reply = client.chat.completions.create(
                    model="svlm", messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0
                )
                answers.append(reply.choices[0].message.content)
            assert answers == [p["answer"], p["answer"]], p["prompt"]
        # Without placing images first, the text-first prompt is another sequence altogether.
        inline = ChatEncoder(tokenizer, engine.model.num_image_tokens, "inline")
        turns = [("user", f"{predictions[0]['prompt']}\n<image>")]
        assert inline.encode(turns, True) != engine.encoder.encode(turns, True)
        assert engine.encoder.encode(turns, True) == inline.encode([("user", f"<image>\n{predictions[0]['prompt']}")],
                                                                   True)  # fmt: skip
