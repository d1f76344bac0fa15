"""The OpenAI-compatible server (dsv4.infer.server): a real uvicorn server on a free loopback port,
a tiny random model and a tokenizer trained here, driven by the official `openai` client and httpx."""

import contextlib
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
from dsv4.infer.engine import BackgroundEngine, Engine, QueueFull
from dsv4.infer.sampling import SamplingParams
from dsv4.infer.server import Server, create_app
from dsv4.model.transformer import Transformer

MODEL = "tiny-test"
KEY = "sk-test-key"
CONTEXT = 128


def tiny_tokenizer():
    texts = [
        Path(json.__file__).read_text(),
        Path(json.decoder.__file__).read_text(),
        Path(json.encoder.__file__).read_text(),
    ]
    tok = train_tokenizer(texts, 512, show_progress=False)
    assert tok.get_vocab_size() == 512  # every id the model can sample decodes
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
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", timeout_graceful_shutdown=1)
        )
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
    s = LiveServer(create_app(Server(bg, tok, MODEL, max_context=CONTEXT, default_max_tokens=8)))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=60)


def paused_engine(tok, max_batch: int, max_waiting: int):
    """(BackgroundEngine, gate): the engine thread takes requests in but runs no step until gate.set(), so
    admission is deterministic. Set the gate before bg.close()."""
    eng = Engine(tiny_model(), tok, max_batch=max_batch)
    gate, step = threading.Event(), eng.step
    eng.step = lambda: (gate.wait(), step())[1]
    return BackgroundEngine(eng, max_waiting=max_waiting), gate


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
        payload = line[len("data: ") :]
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
    for bad, fact in [
        ([], "non-empty"),
        ("hi", "non-empty"),
        ([{"role": "tool", "content": "x"}], "messages[0].role"),
        ([{"role": "user"}], "messages[0].content is missing"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": 3}], "messages[1].content"),
        (["x"], "messages[0] must be an object"),
    ]:
        with pytest.raises(ChatError, match=__import__("re").escape(fact)):
            render(bad)
    (tmp_path / "tokenizer.json").write_text("{}")
    t = load_template(tmp_path)  # the default, and nothing is written into the run
    assert not (tmp_path / "chat_template.json").exists() and t == ChatTemplate()
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
    r = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.object == "text_completion" and r.model == MODEL and len(r.choices) == 1
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(tok.encode(prompt).ids)
    assert r.usage.completion_tokens == 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5
    # a prompt given as token ids is the same request
    r2 = client.completions.create(
        model=MODEL, prompt=tok.encode(prompt).ids, max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r2.choices[0].text == r.choices[0].text and r2.usage == r.usage


def test_streamed_chat_matches_the_non_streamed_answer(client):
    msgs = [{"role": "system", "content": "You answer in JSON."}, {"role": "user", "content": "Encode a list."}]
    for kw in (dict(temperature=0), dict(temperature=0.9, seed=7, top_p=0.9, extra_body={"top_k": 50})):
        full = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, **kw)
        assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
        chunks = list(
            client.chat.completions.create(
                model=MODEL, messages=msgs, max_tokens=6, stream=True, stream_options={"include_usage": True}, **kw
            )
        )
        assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        with_choices = [c for c in chunks if c.choices]
        assert [c.choices[0].finish_reason for c in with_choices][-1] == full.choices[0].finish_reason
        assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
        assert chunks[-1].choices == [] and chunks[-1].usage == full.usage  # the usage chunk comes last
        text = "".join(c.choices[0].delta.content or "" for c in with_choices)
        assert text == full.choices[0].message.content


def test_streamed_completion_is_well_formed_sse(live, tok):
    body = {
        "model": MODEL,
        "prompt": "import json",
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
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
    assert (
        _error(httpx.post(url, json={"model": MODEL, "prompt": "x", "max_tokens": "5"}), 400)["param"] == "max_tokens"
    )
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
    err = _error(
        httpx.post(f"{live.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": CONTEXT}), 400
    )
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"


def test_api_key(bg, tok):
    s = LiveServer(create_app(Server(bg, tok, MODEL, api_key=KEY, max_context=CONTEXT)))
    try:
        assert _error(httpx.get(f"{s.url}/v1/models"), 401)["code"] == "invalid_api_key"
        assert _error(httpx.get(f"{s.url}/v1/models", headers={"Authorization": "Bearer nope"}), 401)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{s.url}/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{s.url}/v1", api_key=KEY, max_retries=0)
        assert good.completions.create(model=MODEL, prompt="x", max_tokens=2).usage.completion_tokens <= 2
        assert httpx.get(f"{s.url}/health").status_code == 200  # no key needed
    finally:
        s.stop()


def test_admission_is_rows_plus_waiting_slots(tok):
    """max_batch B, max_waiting W: B + W unfinished requests are admitted, wherever they are (inbox, queue or
    row); the next one is QueueFull until one finishes."""
    for b, w in [(2, 1), (1, 0), (3, 2)]:
        bg, gate = paused_engine(tok, b, w)
        try:
            done = []
            sp = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
            reqs = [bg.submit([5, 6, 7], sp, done.append) for _ in range(b + w)]
            with pytest.raises(QueueFull, match=f"{b} running \\+ {w} waiting"):
                bg.submit([5], sp, done.append)
            assert bg.load()["active"] == b + w
            gate.set()
            t0 = time.time()
            while not all(r.finished for r in reqs) and time.time() - t0 < 30:
                time.sleep(0.01)
            assert all(r.finish_reason == "length" for r in reqs)
            assert sum(e.finish_reason is not None for e in done) == b + w
            assert wait_idle(bg)["active"] == 0  # finished requests give their slots back
            again = [bg.submit([5], sp, done.append) for _ in range(b + w)]
            t0 = time.time()
            while not all(r.finished for r in again) and time.time() - t0 < 30:
                time.sleep(0.01)
            assert all(r.finished for r in again) and bg.load()["active"] == 0
        finally:
            gate.set()
            bg.close()


def test_aborted_requests_free_their_admission_slots(tok):
    bg, gate = paused_engine(tok, 1, 1)
    try:
        sp = SamplingParams(max_tokens=2, temperature=0)
        # `a` must outlive one step: if the engine thread took it before the gate closed, the first step
        # admits it, prefills and decodes (two tokens), and only then reads the abort from its inbox
        a = bg.submit([5], SamplingParams(max_tokens=16, temperature=0), None)
        bg.submit([6], sp, None)
        with pytest.raises(QueueFull):
            bg.submit([7], sp, None)
        bg.abort(a.id)
        gate.set()
        t0 = time.time()
        while bg.load()["active"] and time.time() - t0 < 120:
            time.sleep(0.01)
        assert a.finish_reason == "abort" and bg.load()["active"] == 0
        bg.submit([7], sp, None)
    finally:
        gate.set()
        bg.close()


def test_full_queue_is_503_with_retry_after(tok):
    """--max-batch 2 --max-waiting 1: three simultaneous requests are all served, the fourth gets a 503."""
    full, gate = paused_engine(tok, 2, 1)
    s = LiveServer(create_app(Server(full, tok, MODEL, max_context=CONTEXT)))
    try:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 3, "ignore_eos": True, "stream": True}
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "stream": True}
        with contextlib.ExitStack() as stack:
            streams = [
                stack.enter_context(httpx.stream("POST", f"{s.url}/v1/{path}", json=b, timeout=60))
                for path, b in [("completions", body), ("chat/completions", chat), ("completions", body)]
            ]
            assert [r.status_code for r in streams] == [200, 200, 200]
            for path, b in [("completions", {**body, "stream": False}), ("chat/completions", chat)]:
                r = httpx.post(f"{s.url}/v1/{path}", json=b)
                assert _error(r, 503)["code"] == "overloaded" and int(r.headers["Retry-After"]) >= 1
            assert httpx.get(f"{s.url}/health").json()["status"] == "ok"  # still serving
            gate.set()
            for r in streams:
                assert parse_sse(r.iter_lines())[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        assert httpx.post(f"{s.url}/v1/completions", json={**body, "stream": False}).status_code == 200
    finally:
        gate.set()
        s.stop()
        full.close()


def test_disconnecting_clients_free_their_slots(live, bg):
    assert wait_idle(bg)["running"] == 0
    body = {
        "model": MODEL,
        "prompt": "class JSONDecoder",
        "max_tokens": CONTEXT - 10,
        "ignore_eos": True,
        "stream": True,
    }
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
        stream = c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"n={i}"}],
            max_tokens=3 + i,
            stream=True,
            stream_options={"include_usage": True},
        )
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
    s = LiveServer(create_app(Server(eng, small, MODEL, max_context=CONTEXT)))
    try:
        c = openai.OpenAI(base_url=f"{s.url}/v1", api_key="x", max_retries=0, timeout=60)
        for seed in range(3):  # a random model samples ids the tokenizer lacks about every other token
            r = c.completions.create(
                model=MODEL, prompt="hello", max_tokens=30, temperature=1.0, seed=seed, extra_body={"ignore_eos": True}
            )
            assert r.choices[0].finish_reason in ("stop", "length")
        assert eng.error is None and httpx.get(f"{s.url}/health").json()["status"] == "ok"
    finally:
        s.stop()
        eng.close()


# ----------------------------------------------------------------------------- odd input, sampling fields
def _post(live, path: str, body):
    """POST a body as JSON text: a dict through json.dumps (a lone surrogate travels as the escape \\ud83d, NaN as
    the literal NaN), or a str as it is."""
    raw = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(
        f"{live.url}/v1/{path}", content=raw.encode(), headers={"content-type": "application/json"}, timeout=60
    )


def test_lone_surrogates_are_400_naming_the_field(live):
    """A lone surrogate (the JSON escape \\ud83d alone) is not text the tokenizer can take: a 400, not a 500."""
    cmpl, msg = {"model": MODEL, "prompt": "x"}, {"role": "user", "content": "x"}
    cases = [
        ("completions", {**cmpl, "prompt": "hi \ud83d"}, "prompt"),
        ("completions", {**cmpl, "prompt": ["\udc00"]}, "prompt"),
        ("completions", {**cmpl, "stop": ["\ud83d"]}, "stop"),
        ("completions", {**cmpl, "user": "\ud83d"}, "user"),
        ("completions", {**cmpl, "model": "\ud83d"}, "model"),
        ("chat/completions", {"model": MODEL, "messages": [{**msg, "content": "\ud83d"}]}, "messages"),
        (
            "chat/completions",
            {"model": MODEL, "messages": [{**msg, "content": [{"type": "text", "text": "a\udfff"}]}]},
            "messages",
        ),
        ("chat/completions", {"model": MODEL, "messages": [{**msg, "role": "\ud83d"}]}, "messages"),
    ]
    for path, body, param in cases:
        raw = json.dumps(body)
        assert "\\ud" in raw  # sent as the JSON escape
        err = _error(_post(live, path, raw), 400)
        assert err["param"] == param and "surrogate" in err["message"], (raw, err)
    # a proper surrogate pair is an ordinary character
    r = _post(live, "completions", {**cmpl, "prompt": "hi \ud83d\ude00", "max_tokens": 1})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] > 1, r.text


def test_odd_json_is_400(live):
    head = json.dumps({"model": MODEL, "prompt": "x"})[:-1]  # '{"model": ..., "prompt": "x"' and a field to add
    for raw in [
        "NaN",
        head + ', "temperature": NaN}',
        head + ', "temperature": -Infinity}',
        head + ', "top_p": 1e999}',
        head + ', "seed": ' + "9" * 5000 + "}",
        "[" * 10000 + "]" * 10000,
        head + ', "user": ' + "[" * 10000 + "]" * 10000 + "}",
    ]:
        assert _error(_post(live, "completions", raw), 400)["code"] == "invalid_json", raw[:80]
    deep = head + ', "user": ' + "[" * 100 + "]" * 100 + "}"  # parses, but nested too deeply
    assert _error(_post(live, "completions", deep), 400)["param"] == "user"
    for field, value in [
        ("temperature", 2**2000),
        ("top_p", -(2**80)),
        ("max_tokens", 1e308),
        ("n", 2**80),
        ("model", ["x"]),
        ("prompt", [1, "a"]),
        ("stop_token_ids", "abc"),
        ("a\nb", "\ud800"),
    ]:
        err = _error(_post(live, "completions", {"model": MODEL, "prompt": "x", field: value}), 400)
        assert err["param"] in (field, "a\\nb") and "\n" not in err["message"], (field, err)
    err = _error(httpx.post(f"{live.url}/v1/chat/completions", json={"model": MODEL, "messages": [[1]]}), 400)
    assert err["param"] == "messages"


def test_huge_prompts_are_refused_without_tokenizing(live):
    """10 MB of text is refused from its byte length (tokenizing it would take seconds)."""
    t0 = time.time()
    for path, body in [
        ("completions", {"prompt": "x = 1\n" * 2_000_000}),
        ("chat/completions", {"messages": [{"role": "user", "content": "é" * 5_000_000}]}),
    ]:
        err = _error(httpx.post(f"{live.url}/v1/{path}", json={"model": MODEL, **body}, timeout=60), 400)
        assert err["code"] == "context_length_exceeded" and "at least" in err["message"]
    assert time.time() - t0 < 20


def test_response_format_other_than_text_is_400(live):
    for path, base in [
        ("completions", {"prompt": "x"}),
        ("chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
    ]:
        for rf in [
            {"type": "json_object"},
            {"type": "json_schema", "json_schema": {"name": "a", "schema": {}}},
            "text",
            {"type": "text", "x": 1},
        ]:
            err = _error(httpx.post(f"{live.url}/v1/{path}", json={"model": MODEL, **base, "response_format": rf}), 400)
            assert err["param"] == "response_format" and "response_format is not supported" in err["message"]
        r = httpx.post(
            f"{live.url}/v1/{path}",
            json={"model": MODEL, **base, "max_tokens": 1, "response_format": {"type": "text"}},
            timeout=60,
        )
        assert r.status_code == 200, r.text


def test_seed_range(live):
    for seed in [2**70, 2**64, -1, -(2**80), 1.5, "7"]:
        err = _error(
            httpx.post(
                f"{live.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1, "seed": seed}
            ),
            400,
        )
        assert err["param"] == "seed", (seed, err)
    for seed in [0, 2**63, 2**64 - 1]:
        r = httpx.post(
            f"{live.url}/v1/completions",
            json={"model": MODEL, "prompt": "x", "max_tokens": 2, "seed": seed},
            timeout=60,
        )
        assert r.status_code == 200, r.text


def test_logit_bias_and_penalties_change_the_output(client, tok):
    """logit_bias +100 forces a token at temperature 0; presence / frequency penalties stop the repeats of
    plain greedy decoding (this random model's logits span < 1); all three default to no change."""
    x = tok.token_to_id("x")
    kw = dict(model=MODEL, prompt="def encode(self, o):", max_tokens=24, temperature=0)
    ignore = {"ignore_eos": True}
    plain = client.completions.create(**kw, extra_body=ignore).choices[0].text
    forced = client.completions.create(**kw, logit_bias={str(x): 100}, extra_body=ignore).choices[0].text
    assert forced == "x" * 24 != plain
    banned = client.completions.create(**kw, logit_bias={str(x): -100}, extra_body=ignore).choices[0].text
    assert "x" not in banned
    defaults = (
        client.completions.create(**kw, logit_bias={}, presence_penalty=0, frequency_penalty=0.0, extra_body=ignore)
        .choices[0]
        .text
    )
    assert defaults == plain
    ids = dict(kw, prompt=tok.encode(kw["prompt"]).ids)
    for field in ("presence_penalty", "frequency_penalty"):
        text = client.completions.create(**ids, **{field: 2.0}, extra_body=ignore).choices[0].text
        assert text != plain, field
    chat = dict(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0)
    assert (
        client.chat.completions.create(**chat, logit_bias={str(x): 100}, extra_body=ignore).choices[0].message.content
        == "x" * 6
    )


def test_bad_logit_bias_and_penalties_are_400(live):
    url = f"{live.url}/v1/completions"
    for field, value in [
        ("logit_bias", [1]),
        ("logit_bias", "x"),
        ("logit_bias", {"abc": 1}),
        ("logit_bias", {"-1": 1}),
        ("logit_bias", {"512": 1}),
        ("logit_bias", {"1": 101}),
        ("logit_bias", {"1": "2"}),
        ("logit_bias", {"1": True}),
        ("logit_bias", {"1.5": 1}),
        ("logit_bias", {" 1": 1}),
        ("logit_bias", {"1": None}),
        ("logit_bias", {"9" * 40: 1}),
        ("presence_penalty", 2.5),
        ("presence_penalty", "1"),
        ("frequency_penalty", -3),
        ("frequency_penalty", 2**80),
        ("frequency_penalty", [0]),
    ]:
        err = _error(httpx.post(url, json={"model": MODEL, "prompt": "x", field: value}), 400)
        assert err["param"] == field, (field, value, err)
