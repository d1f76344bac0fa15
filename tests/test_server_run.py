"""dsv4.app.serve build() / serve() on a run directory: the serving context defaults to the run's training seq_len (what
/v1/models advertises and requests are held to), --max-context overrides it, and the API key may come from
$DSV4_API_KEY."""

import json

import pytest
import torch
import uvicorn
from conftest import small_config
from starlette.testclient import TestClient
from test_server import tiny_tokenizer

from dsv4.app import serve as server
from dsv4.data import train_tokenizer
from dsv4.infer.server import max_token_bytes
from dsv4.model.transformer import Transformer
from dsv4.train.checkpoint import save_checkpoint

LIMIT = 256  # the model's max_position_embeddings
SEQ_LEN = 48  # the run's training seq_len


def make_run(root, seq_len: int | None):
    root.mkdir(parents=True)
    tok = tiny_tokenizer()
    tok.save(str(root / "tokenizer.json"))
    torch.manual_seed(0)
    model = Transformer(small_config(max_position_embeddings=LIMIT))
    save_checkpoint(root, 1, model, torch.optim.SGD(model.parameters(), lr=0.1), {})
    if seq_len is not None:
        (root / "train_config.json").write_text(json.dumps({"seq_len": seq_len, "batch_size": 2}))
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    return make_run(base / "trained", SEQ_LEN), make_run(base / "bare", None)


def _served(path, **kw) -> tuple[int, dict]:
    """(max_model_len of /v1/models, the error of a prompt of SEQ_LEN token ids) for build(path, **kw)."""
    app, bg, name = server.build(path, **kw)
    try:
        with TestClient(app) as c:
            card = c.get("/v1/models").json()["data"][0]
            assert card["id"] == name and c.get(f"/v1/models/{name}").json() == card
            r = c.post("/v1/completions", json={"model": name, "prompt": [5] * SEQ_LEN, "max_tokens": 1})
            return card["max_model_len"], (r.json().get("error") if r.status_code != 200 else None)
    finally:
        bg.close()


def test_serving_context_is_the_training_seq_len(runs):
    trained, bare = runs
    ckpt = next(trained.glob("ckpt-*"))
    for path in (trained, ckpt):  # a run folder, or a checkpoint inside it
        assert server.train_seq_len(path) == SEQ_LEN
        n, err = _served(path)
        assert n == SEQ_LEN and err["code"] == "context_length_exceeded" and f" {SEQ_LEN} tokens" in err["message"]
    assert _served(trained, max_context=100) == (100, None)  # --max-context overrides it
    assert _served(trained, max_context=10**6)[0] == LIMIT  # never beyond the model's positions
    assert server.train_seq_len(bare) is None and _served(bare) == (LIMIT, None)


def test_train_seq_len_ignores_what_is_not_a_seq_len(tmp_path):
    for text in ['{"seq_len": "512"}', '{"seq_len": 0}', '{"seq_len": true}', "[1]", "not json", '{"x": 1}']:
        (tmp_path / "train_config.json").write_text(text)
        assert server.train_seq_len(tmp_path) is None, text
        assert server.serving_context(tmp_path, 300) == 300


def test_api_key_from_the_environment(monkeypatch):
    assert server.resolve_api_key(None, {"DSV4_API_KEY": "sk-env"}) == "sk-env"
    assert server.resolve_api_key("sk-arg", {"DSV4_API_KEY": "sk-env"}) == "sk-arg"
    assert server.resolve_api_key(None, {}) is None and server.resolve_api_key(None, {"DSV4_API_KEY": ""}) is None
    monkeypatch.setenv("DSV4_API_KEY", "sk-from-env")
    assert server.resolve_api_key(None) == "sk-from-env"


def test_serve_takes_the_key_from_the_environment_and_prints_the_context(runs, monkeypatch, capsys):
    trained, _ = runs
    seen = {}

    def fake_run(app, host, port, log_level):  # instead of uvicorn's loop: a few requests, then return
        with TestClient(app) as c:
            seen["no_key"] = c.get("/v1/models").status_code
            seen["env_key"] = c.get("/v1/models", headers={"Authorization": "Bearer sk-from-env"}).json()
            seen["utf8_key"] = c.get("/v1/models", headers={"Authorization": "Bearer sk-ключ".encode()}).status_code

    monkeypatch.setattr(uvicorn, "run", fake_run)
    monkeypatch.setenv("DSV4_API_KEY", "sk-from-env")
    server.serve(trained, port=1234)
    assert seen["no_key"] == 401 and seen["env_key"]["data"][0]["max_model_len"] == SEQ_LEN
    banner = capsys.readouterr().out
    assert f"context {SEQ_LEN} tokens" in banner and "API key required" in banner and "sk-from-env" not in banner
    monkeypatch.setenv("DSV4_API_KEY", "sk-ключ")  # a key is bytes on the wire: UTF-8 keys work too
    server.serve(trained, port=1234)
    assert seen["no_key"] == 401 and seen["utf8_key"] == 200
    monkeypatch.delenv("DSV4_API_KEY")
    server.serve(trained, port=1234, max_context=64)
    assert seen["no_key"] == 200 and "context 64 tokens" in capsys.readouterr().out


def test_a_tokenizer_trained_here_bounds_token_bytes():
    tok = train_tokenizer(["hello world " * 50], 300, show_progress=False)
    bound = max_token_bytes(tok)
    text = "hello world, héllo wörld ✓ " * 20
    assert bound and len(tok.encode(text).ids) >= len(text.encode()) // bound
    assert max_token_bytes(object()) is None
