"""`dsv4 generate` (cached engine, streamed to the terminal), `dsv4 chat` (stdin REPL) and the `serve`
arguments, on a tiny run directory made here (random weights, a tokenizer trained on a few KB)."""

import io
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import small_config

from dsv4.cli import build_parser, main
from dsv4.data import ids_to_bytes, load_tokenizer, train_tokenizer
from dsv4.infer.chat import ChatError, ChatTemplate
from dsv4.infer.engine import Detokenizer, Engine
from dsv4.infer.reference import generate
from dsv4.model.transformer import Transformer
from dsv4.run import load_run
from dsv4.train.checkpoint import save_checkpoint

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    texts = [
        Path(json.__file__).read_text(),
        Path(json.decoder.__file__).read_text(),
        Path(json.encoder.__file__).read_text(),
    ]
    tok = train_tokenizer(texts, 512, run / "tokenizer.json", show_progress=False)
    assert tok.get_vocab_size() == 512
    torch.manual_seed(0)
    model = Transformer(small_config(max_position_embeddings=256))
    save_checkpoint(run, 1, model, torch.optim.SGD(model.parameters(), lr=0.1), {})
    return run


def _cli(*args, stdin=None) -> subprocess.Popen:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")])),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "dsv4", *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


@pytest.fixture(scope="module")
def procs(run):
    """The subprocess runs of this file, started together (each pays torch's import time)."""
    chat_in = "hello there\n/reset\n\nwhat is json?\n/exit\nnever read\n"
    ps = {
        "generate": (
            _cli(
                "generate",
                "--ckpt",
                run,
                "--prompt",
                "import json",
                "--max-new-tokens",
                "6",
                "--temperature",
                "0",
                "--device",
                "cpu",
            ),
            None,
        ),
        "chat": (_cli("chat", "--ckpt", run, "--max-new-tokens", "4", "--temperature", "0"), chat_in),
        "bad_generate": (_cli("generate", "--ckpt", run, "--prompt", "x", "--top-p", "0"), None),
    }
    return {name: (p.communicate(stdin, timeout=300), p.returncode) for name, (p, stdin) in ps.items()}


class Recorder(io.StringIO):
    def __init__(self):
        super().__init__()
        self.flushed: list[str] = []

    def flush(self):
        self.flushed.append(self.getvalue())


def test_generate_streams_the_cached_engine_output(run, monkeypatch):
    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    prompt = "def decode(self, s):"
    assert (
        main(["generate", "--ckpt", str(run), "--prompt", prompt, "--max-new-tokens", "8", "--temperature", "0"]) == 0
    )
    text = out.getvalue()
    # the reference: the old non-cached sampler, detokenized one token at a time
    model, tok = load_run(run)
    ids = generate(model, tok.encode(prompt).ids, 8, temperature=0.0)
    detok = Detokenizer(tok)
    ref = "".join(detok.push([t]) for t in ids) + detok.flush()
    assert text == prompt + ref + "\n"
    # printed while generating: the prompt first, then growing text, each piece flushed
    grown = [s for i, s in enumerate(out.flushed) if i == 0 or s != out.flushed[i - 1]]
    assert grown[0] == prompt and len(grown) >= 3 and all(b.startswith(a) for a, b in itertools.pairwise(grown))


def test_generate_subprocess(procs):
    (out, err), rc = procs["generate"]
    assert rc == 0, err[-2000:]
    assert out.startswith("import json") and len(out.rstrip("\n")) > len("import json")


def test_generate_bad_options_are_one_line_errors(procs):
    (out, err), rc = procs["bad_generate"]
    assert rc == 2 and out == ""
    assert err.strip().startswith("dsv4: error: ") and "top_p" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
@pytest.mark.parametrize("device", ["cuda:99", "nonsense"])
def test_unusable_device_is_a_one_line_error(run, command, device, capsys, monkeypatch):
    loaded = []
    monkeypatch.setattr("dsv4.run.load_run", lambda *a, **k: loaded.append(a))
    extra = ["--prompt", "x"] if command == "generate" else []
    assert main([command, "--ckpt", str(run), "--device", device, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dsv4: error: --device {device}: ") and len(err.splitlines()) == 1, err
    assert ("CUDA device" in err) if device == "cuda:99" else ("not a device name" in err)
    assert loaded == []  # checked before the model is loaded


def test_device_option_defaults_to_cpu():
    for argv in (["generate", "--ckpt", "r", "--prompt", "x"], ["chat", "--ckpt", "r"], ["serve", "--ckpt", "r"]):
        assert build_parser().parse_args(argv).device == "cpu"
    a = build_parser().parse_args(["serve", "--ckpt", "r", "--device", "cuda:1"])
    assert a.device == "cuda:1"


def test_load_run_places_the_model_on_the_device(run):
    model, _ = load_run(run, device="cpu")
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    with pytest.raises(ValueError, match=r"no CUDA device|CUDA device"):
        load_run(run, device="cuda:99")


def test_chat_with_piped_stdin(procs, run):
    (out, err), rc = procs["chat"]
    assert rc == 0, err[-2000:]
    assert "(history cleared)" in out
    assert out.count("you: ") == 2 and "you: hello there\nassistant: " in out and "you: what is json?\n" in out
    assert not (run / "chat_template.json").exists()  # a read-only command writes nothing into the run


def test_piped_chat_labels_each_exchange(run, monkeypatch):
    """stdin not a terminal: "you: ..." / "assistant: ..." per exchange, a blank line between turns."""
    monkeypatch.setattr(
        Engine,
        "stream",
        lambda self, prompt, params=None: iter(
            [SimpleNamespace(text="Hi", finish_reason=None), SimpleNamespace(text=" there.", finish_reason="stop")]
        ),
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/reset\nsecond\n"))
    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["chat", "--ckpt", str(run)]) == 0
    assert out.getvalue() == (
        "you: hello\nassistant: Hi there.\n\n(history cleared)\nyou: second\nassistant: Hi there.\n\n"
    )


def test_developer_role_is_the_system_role(run):
    """OpenAI's `developer` role renders and encodes as `system` (so the server takes it too)."""
    tok = load_tokenizer(run)
    t = ChatTemplate()
    user = {"role": "user", "content": "Hi!"}
    as_developer = t.encode(tok, [{"role": "developer", "content": "Be terse."}, user])
    assert as_developer == t.encode(tok, [{"role": "system", "content": "Be terse."}, user])
    with pytest.raises(ChatError, match="system, user, assistant, developer; got 'tool'"):
        t.encode(tok, [{"role": "tool", "content": "x"}])


def test_chat_keeps_history_until_reset(run, monkeypatch):
    prompts = []
    real = Engine.stream

    def recording_stream(self, prompt, params=None):
        prompts.append(ids_to_bytes(self.tok, prompt).decode("utf-8"))
        return real(self, prompt, params)

    monkeypatch.setattr(Engine, "stream", recording_stream)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nsecond\n/reset\nthird\n/exit\nnever\n"))
    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    assert (
        main(["chat", "--ckpt", str(run), "--max-new-tokens", "3", "--temperature", "0", "--system", "Be brief."]) == 0
    )
    assert len(prompts) == 3
    assert prompts[0] == "<|system|>\nBe brief.\n<|user|>\nhello\n<|assistant|>\n"
    assert prompts[1].startswith(prompts[0]) and prompts[1].endswith("<|user|>\nsecond\n<|assistant|>\n")
    assert prompts[2] == "<|system|>\nBe brief.\n<|user|>\nthird\n<|assistant|>\n"
    assert "(history cleared)" in out.getvalue() and "never" not in "".join(prompts)


def test_serve_arguments():
    a = build_parser().parse_args(["serve", "--ckpt", "runs/x"])
    assert (a.host, a.port, a.api_key, a.max_batch, a.max_waiting, a.max_context) == (
        "127.0.0.1",
        8000,
        None,
        8,
        64,
        None,
    )
    a = build_parser().parse_args(
        [
            "serve",
            "--ckpt",
            "r",
            "--host",
            "0.0.0.0",
            "--port",
            "9",
            "--api-key",
            "k",
            "--max-batch",
            "2",
            "--max-waiting",
            "3",
            "--max-context",
            "512",
        ]
    )
    assert (a.host, a.port, a.api_key, a.max_batch, a.max_waiting, a.max_context) == ("0.0.0.0", 9, "k", 2, 3, 512)


class ClosedPipe(io.StringIO):
    def write(self, s):
        raise BrokenPipeError(32, "Broken pipe")


def test_closed_stdout_ends_a_streaming_command_quietly(run, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["generate", "--ckpt", str(run), "--prompt", "x", "--max-new-tokens", "2"]) == 141
    assert capsys.readouterr().err == ""


def test_a_run_directory_is_accepted_wherever_a_checkpoint_is(run, tmp_path, capsys):
    """info --config RUN and convert --to-transformers RUN take the run's newest checkpoint."""
    assert main(["info", "--config", str(run)]) == 0
    assert "total_params: " in capsys.readouterr().out
    assert main(["convert", "--to-transformers", str(run), str(tmp_path / "hf")]) == 0
    assert main(["convert", "--to-transformers", str(run / "ckpt-0000001"), str(tmp_path / "hf2")]) == 0
    capsys.readouterr()
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == (tmp_path / "hf2" / "model.safetensors").read_bytes()


def _one_line_error(capsys) -> str:
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsv4: error: ") and "Traceback" not in cap.err, cap.err
    return lines[0]


def test_convert_in_the_wrong_direction_is_a_one_line_error(run, tmp_path, capsys):
    ckpt = run / "ckpt-0000001"
    assert main(["convert", "--from-transformers", str(ckpt), str(tmp_path / "x")]) == 2
    assert f"{ckpt} is a dsv4 checkpoint, not a transformers model folder; use --to-transformers" in _one_line_error(
        capsys
    )
    assert main(["convert", "--from-transformers", str(run), str(tmp_path / "x")]) == 2
    assert "use --to-transformers" in _one_line_error(capsys)
    assert main(["convert", "--to-transformers", str(run), str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    assert main(["convert", "--to-transformers", str(tmp_path / "hf"), str(tmp_path / "y")]) == 2
    err = _one_line_error(capsys)
    assert "is a transformers model folder, not a dsv4 checkpoint" in err and "--from-transformers" in err
    assert main(["generate", "--ckpt", str(tmp_path / "hf"), "--prompt", "x"]) == 2  # same check on loading
    assert "--from-transformers" in _one_line_error(capsys)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_transformers_round_trip_of_a_run_loads_everywhere(run, tmp_path, monkeypatch, capsys):
    """RUN -> transformers (weights, config, tokenizer for AutoTokenizer) -> dsv4 folder that generate, chat
    and info load, with the same tokens out as the run itself."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf, back = tmp_path / "hf", tmp_path / "back"
    assert main(["convert", "--to-transformers", str(run), str(hf)]) == 0
    assert main(["convert", "--from-transformers", str(hf), str(back)]) == 0
    capsys.readouterr()
    ours, theirs = load_tokenizer(run), transformers.AutoTokenizer.from_pretrained(hf)
    text = "def decode(self, s):\n    return json.loads(s)"
    assert theirs(text)["input_ids"] == ours.encode(text).ids and theirs.decode(ours.encode(text).ids) == text
    assert (theirs.bos_token_id, theirs.eos_token_id) == (0, 1)

    def generated(ckpt) -> str:
        out = Recorder()
        monkeypatch.setattr(sys, "stdout", out)
        assert (
            main(
                [
                    "generate",
                    "--ckpt",
                    str(ckpt),
                    "--prompt",
                    "import json",
                    "--max-new-tokens",
                    "6",
                    "--temperature",
                    "0",
                ]
            )
            == 0
        )
        monkeypatch.undo()
        return out.getvalue()

    assert generated(back) == generated(run)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    assert main(["chat", "--ckpt", str(back), "--max-new-tokens", "2"]) == 0
    assert main(["info", "--config", str(back)]) == 0
    assert "assistant: " in capsys.readouterr().out
    assert sorted(p.name for p in back.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
