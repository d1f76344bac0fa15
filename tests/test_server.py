"""The OpenAI-compatible server (dsv4.infer.server): a real uvicorn server on a free loopback port,
a tiny random model and a tokenizer trained here, driven by the official `openai` client and httpx."""
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

from conftest import small_config
from dsv4.data import train_tokenizer
from dsv4.infer.chat import ChatError, ChatTemplate, load_template, render, validate_messages
from dsv4.infer.engine import BackgroundEngine, Engine
from dsv4.infer.server import create_app
from dsv4.model.transformer import Transformer

MODEL = "tiny-test"
KEY = "sk-test-key"
CONTEXT = 128


def tiny_tokenizer():
    texts = [Path(json.__file__).read_text(), Path(json.decoder.__file__).read_text(),
             Path(json.encoder.__file__).read_text()]
    tok = train_tokenizer(texts, 512, show_progress=False)
    assert tok.get_vocab_size() == 512     # every id the model can sample decodes
    return tok


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return Transformer(small_config(max_position_embeddings=CONTEXT)).eval()


class LiveServer:
    """uvicorn in a background thread on a free 127.0.0.1 port."""

    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            assert self.thread.is_alive() and time.time() - t0 < 30, "the server did not start"
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def bg(tok):
    b = BackgroundEngine(Engine(tiny_model(), tok, max_batch=4), max_waiting=8)
    yield b
    b.close()


@pytest.fixture(scope="module")
def live(bg, tok):
    s = LiveServer(create_app(bg, tok, MODEL, max_context=CONTEXT, default_max_tokens=8))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=60)


def wait_idle(bg, timeout=10.0) -> dict:
    t0 = time.time()
    while time.time() - t0 < timeout:
        load = bg.load()
        if load["running"] == 0 and load["waiting"] == 0:
            return load
        time.sleep(0.05)
    return bg.load()


def parse_sse(lines) -> list:
    """Events of an SSE body: every event is one `data: ...` line then a blank line; the last is [DONE]."""
    events, expect_blank = [], False
    for line in lines:
        if expect_blank:
            assert line == "", f"missing blank line after an event: {line!r}"
            expect_blank = False
            continue
        assert line.startswith("data: "), line
        payload = line[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
        expect_blank = True
    assert events and events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    return events[:-1]


# ----------------------------------------------------------------------------- chat template
def test_chat_template_render_and_validation(tmp_path):
    msgs = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi {content}!"}]
    assert render(msgs) == "<|system|>\nBe terse.\n<|user|>\nHi {content}!\n<|assistant|>\n"
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert validate_messages(parts) == [{"role": "user", "content": "ab"}]
    for bad, fact in [([], "non-empty"), ("hi", "non-empty"), ([{"role": "tool", "content": "x"}], "messages[0].role"),
                      ([{"role": "user"}], "messages[0].content is missing"),
                      ([{"role": "user", "content": "a"}, {"role": "user", "content": 3}], "messages[1].content"),
                      (["x"], "messages[0] must be an object")]:
        with pytest.raises(ChatError, match=__import__("re").escape(fact)):
            render(bad)
    (tmp_path / "tokenizer.json").write_text("{}")
    t = load_template(tmp_path)               # written on first use, read back afterwards
    assert (tmp_path / "chat_template.json").exists() and t == ChatTemplate()
    (tmp_path / "chat_template.json").write_text(json.dumps({"message": "[{role}] {content}\n", "bos": True}))
    t = load_template(tmp_path)
    assert t.render([{"role": "user", "content": "x"}]) == "[user] x\n<|assistant|>\n" and t.bos
    (tmp_path / "chat_template.json").write_text(json.dumps({"mesage": "x"}))
    with pytest.raises(ChatError, match="mesage"):
        load_template(tmp_path)


# ----------------------------------------------------------------------------- the openai client
def test_models_and_health(client, live):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].object == "model"
    assert client.models.retrieve(MODEL).id == MODEL
    h = httpx.get(f"{live.url}/health").json()
    assert h["status"] == "ok" and h["free_rows"] == 4


def test_completion_usage_and_length(client, tok):
    prompt = "def encode(self, o):"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.model == MODEL and len(r.choices) == 1
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(tok.encode(prompt).ids)
    assert r.usage.completion_tokens == 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5
    # a prompt given as token ids is the same request
    r2 = client.completions.create(model=MODEL, prompt=tok.encode(prompt).ids, max_tokens=5, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert r2.choices[0].text == r.choices[0].text and r2.usage == r.usage


def test_streamed_chat_matches_the_non_streamed_answer(client):
    msgs = [{"role": "system", "content": "You answer in JSON."}, {"role": "user", "content": "Encode a list."}]
    for kw in (dict(temperature=0), dict(temperature=0.9, seed=7, top_p=0.9, extra_body={"top_k": 50})):
        full = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, **kw)
        assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
        chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, stream=True,
                                                     stream_options={"include_usage": True}, **kw))
        assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        with_choices = [c for c in chunks if c.choices]
        assert [c.choices[0].finish_reason for c in with_choices][-1] == full.choices[0].finish_reason
        assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
        assert chunks[-1].choices == [] and chunks[-1].usage == full.usage     # the usage chunk comes last
        text = "".join(c.choices[0].delta.content or "" for c in with_choices)
        assert text == full.choices[0].message.content


def test_streamed_completion_is_well_formed_sse(live, tok):
    body = {"model": MODEL, "prompt": "import json", "max_tokens": 4, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{live.url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(r.iter_lines())
    assert all(e["object"] == "text_completion" for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "length" and "usage" not in events[-1]
    full = httpx.post(f"{live.url}/v1/completions", json={**body, "stream": False}, timeout=60).json()
    assert "".join(e["choices"][0]["text"] for e in events) == full["choices"][0]["text"]


def test_errors_through_the_client(client):
    with pytest.raises(openai.NotFoundError, match="no-such-model"):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="max_tokens") as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=-1)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="n=1"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=2)
    with pytest.raises(openai.BadRequestError, match=r"messages\[0\]\.role"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt="x", temperature=-1)


# ----------------------------------------------------------------------------- raw HTTP
def _error(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_malformed_requests_are_400_openai_errors(live):
    url = f"{live.url}/v1/completions"
    err = _error(httpx.post(url, content=b'{"model": ', headers={"content-type": "application/json"}), 400)
    assert "JSON" in err["message"] and err["type"] == "invalid_request_error"
    _error(httpx.post(url, content=b"[1, 2]"), 400)
    assert _error(httpx.post(url, json={"model": MODEL}), 400)["param"] == "prompt"
    assert _error(httpx.post(url, json={"prompt": "x"}), 400)["param"] == "model"
    assert _error(httpx.post(url, json={"model": MODEL, "prompt": "x", "max_tokens": "5"}), 400)["param"] == "max_tokens"
    assert _error(httpx.post(url, json={"model": MODEL, "prompt": ["a", "b"]}), 400)["param"] == "prompt"
    assert _error(httpx.post(url, json={"model": MODEL, "prompt": [1, 99999]}), 400)["param"] == "prompt"
    assert _error(httpx.post(url, json={"model": MODEL, "prompt": ""}), 400)["param"] == "prompt"
    _error(httpx.get(f"{live.url}/v1/nothing"), 404)


def test_prompt_longer_than_the_context_is_400(live, tok):
    long = "x = 1\n" * 200
    assert len(tok.encode(long).ids) >= CONTEXT
    err = _error(httpx.post(f"{live.url}/v1/completions", json={"model": MODEL, "prompt": long}), 400)
    assert err["code"] == "context_length_exceeded" and str(CONTEXT) in err["message"]
    msgs = [{"role": "user", "content": long}]
    err = _error(httpx.post(f"{live.url}/v1/chat/completions", json={"model": MODEL, "messages": msgs}), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
    # prompt + max_tokens beyond the context is refused up front too
    err = _error(httpx.post(f"{live.url}/v1/completions",
                            json={"model": MODEL, "prompt": "x", "max_tokens": CONTEXT}), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"


def test_api_key(bg, tok):
    s = LiveServer(create_app(bg, tok, MODEL, api_key=KEY, max_context=CONTEXT))
    try:
        assert _error(httpx.get(f"{s.url}/v1/models"), 401)["code"] == "invalid_api_key"
        assert _error(httpx.get(f"{s.url}/v1/models", headers={"Authorization": "Bearer nope"}), 401)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{s.url}/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{s.url}/v1", api_key=KEY, max_retries=0)
        assert good.completions.create(model=MODEL, prompt="x", max_tokens=2).usage.completion_tokens <= 2
        assert httpx.get(f"{s.url}/health").status_code == 200     # no key needed
    finally:
        s.stop()


def test_full_queue_is_503_with_retry_after(tok):
    full = BackgroundEngine(Engine(tiny_model(), tok, max_batch=1), max_waiting=0)
    s = LiveServer(create_app(full, tok, MODEL, max_context=CONTEXT))
    try:
        for path, body in [("completions", {"prompt": "x"}),
                           ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": True})]:
            r = httpx.post(f"{s.url}/v1/{path}", json={"model": MODEL, **body})
            assert _error(r, 503)["code"] == "overloaded" and int(r.headers["Retry-After"]) >= 1
        assert httpx.get(f"{s.url}/health").json()["status"] == "ok"       # still serving
    finally:
        s.stop()
        full.close()


def test_disconnecting_clients_free_their_slots(live, bg):
    assert wait_idle(bg)["running"] == 0
    body = {"model": MODEL, "prompt": "class JSONDecoder", "max_tokens": CONTEXT - 10, "ignore_eos": True,
            "stream": True}
    decoded = bg.engine.stats["decode_tokens"]
    with httpx.stream("POST", f"{live.url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert bg.load()["running"] == 1
    # the stream is closed after one event: the engine aborts the request long before it could finish
    assert wait_idle(bg, 10)["running"] == 0
    assert bg.engine.stats["decode_tokens"] - decoded < (CONTEXT - 10) // 2, "the request ran on"
    decoded = bg.engine.stats["decode_tokens"]
    # a non-streamed request whose client gives up is aborted as well
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{live.url}/v1/completions", json={**body, "stream": False}, timeout=0.3)
    assert wait_idle(bg, 10)["running"] == 0 and bg.load()["free_rows"] == 4
    assert bg.engine.stats["decode_tokens"] - decoded < (CONTEXT - 10) // 2, "the request ran on"


def test_concurrent_requests_all_complete(live, bg):
    results = [None] * 6

    def one(i):
        c = openai.OpenAI(base_url=f"{live.url}/v1", api_key="x", max_retries=0, timeout=60)
        stream = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"n={i}"}],
                                           max_tokens=3 + i, stream=True, stream_options={"include_usage": True})
        results[i] = list(stream)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, chunks in enumerate(results):
        assert chunks is not None, f"request {i} failed"
        assert chunks[-1].usage.completion_tokens <= 3 + i
        assert [c for c in chunks if c.choices][-1].choices[0].finish_reason in ("stop", "length")
    assert wait_idle(bg)["running"] == 0


def test_a_tokenizer_smaller_than_the_model_vocab_does_not_fail_the_engine():
    """Ids past the tokenizer's vocab (a tokenizer trained on little text) decode to no bytes."""
    small = train_tokenizer(["hello world, hello json"], 512, show_progress=False)
    assert small.get_vocab_size() < 512
    eng = BackgroundEngine(Engine(tiny_model(), small, max_batch=2), max_waiting=4)
    s = LiveServer(create_app(eng, small, MODEL, max_context=CONTEXT))
    try:
        c = openai.OpenAI(base_url=f"{s.url}/v1", api_key="x", max_retries=0, timeout=60)
        for seed in range(3):   # a random model samples ids the tokenizer lacks about every other token
            r = c.completions.create(model=MODEL, prompt="hello", max_tokens=30, temperature=1.0, seed=seed,
                                     extra_body={"ignore_eos": True})
            assert r.choices[0].finish_reason in ("stop", "length")
        assert eng.error is None and httpx.get(f"{s.url}/health").json()["status"] == "ok"
    finally:
        s.stop()
        eng.close()
