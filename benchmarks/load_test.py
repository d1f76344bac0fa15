"""Load test of `dsv4 serve`: many concurrent streaming clients against a real server process.

Starts `python -m dsv4 serve` on a free loopback port (a tiny random model with a tokenizer trained on a
few stdlib files by default, or --ckpt RUN), then runs --clients concurrent clients (asyncio + httpx) for
--seconds. Each client repeatedly sends a streamed request, alternating /v1/chat/completions and
/v1/completions with random prompts and max_tokens, and checks the stream:

- every event is `data: {json}` followed by a blank line, the body ends with `data: [DONE]`;
- one id per stream, the right object type, the role delta first (chat), exactly one finish_reason
  ("stop" or "length") on the last choice chunk, then the usage chunk (include_usage) with
  completion_tokens <= max_tokens.

A 503 (queue full; --max-waiting is below the number of clients on purpose) is counted, not an error: the
client waits Retry-After seconds and tries again. --disconnect-frac of the requests hang up after their
first event, deliberately: afterwards the server must be idle (every slot free). Anything else counts as
an error. The server's RSS is sampled every second (start / peak / end: memory must not grow).

Reports requests/s, generated tokens/s, latency p50/p95 and time to first token p50/p95 (first event
holding text; chat holds back a few characters for its stop strings, so its first text comes later).

Not part of `make test`. Usage
  .venv/bin/python benchmarks/load_test.py                       # 32 clients, 60 s, tiny random model
  .venv/bin/python benchmarks/load_test.py --clients 8 --seconds 10
  .venv/bin/python benchmarks/load_test.py --ckpt runs/demo --max-batch 8 --json /tmp/load.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import hardware_info  # noqa: E402

WORDS = (
    "the json module encodes and decodes python objects lists dicts strings numbers "
    "a decoder reads text and returns values an encoder writes them back"
).split()


def make_tiny_run(path: Path) -> Path:
    """A run directory with random weights (seed 0) and a 512-id tokenizer trained on stdlib json."""
    import torch

    from dsv4.config import ModelConfig
    from dsv4.data import train_tokenizer
    from dsv4.model.transformer import Transformer
    from dsv4.train.checkpoint import save_checkpoint

    texts = [Path(m.__file__).read_text() for m in (json, json.decoder, json.encoder, json.scanner)]
    tok = train_tokenizer(texts, 512, path / "tokenizer.json", show_progress=False)
    assert tok.get_vocab_size() == 512
    cfg = ModelConfig.preset("micro").replace(max_position_embeddings=1024)
    torch.manual_seed(0)
    model = Transformer(cfg)
    save_checkpoint(path, 1, model, torch.optim.SGD(model.parameters(), lr=0.1), {})
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


class StreamError(Exception):
    pass


def check_stream(kind: str, lines: list[str], max_tokens: int) -> dict:
    """Parse and check one SSE body; returns its usage."""
    if len(lines) % 2 or any(line != "" for line in lines[1::2]):
        raise StreamError("events are not `data: ...` lines each followed by a blank line")
    payloads = []
    for line in lines[0::2]:
        if not line.startswith("data: "):
            raise StreamError(f"not a data line: {line[:80]!r}")
        payloads.append(line[6:])
    if not payloads or payloads[-1] != "[DONE]" or "[DONE]" in payloads[:-1]:
        raise StreamError("the stream does not end with exactly one [DONE]")
    events = [json.loads(p) for p in payloads[:-1]]
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    if any("error" in e for e in events):
        raise StreamError(f"error event: {next(e for e in events if 'error' in e)}")
    if {e.get("object") for e in events} != {obj} or len({e.get("id") for e in events}) != 1:
        raise StreamError("mixed object types or ids in one stream")
    choice_events = [e for e in events if e["choices"]]
    if kind == "chat" and choice_events[0]["choices"][0]["delta"].get("role") != "assistant":
        raise StreamError("the first chat chunk has no assistant role delta")
    reasons = [e["choices"][0]["finish_reason"] for e in choice_events]
    if reasons[-1] not in ("stop", "length") or any(r is not None for r in reasons[:-1]):
        raise StreamError(f"bad finish_reason sequence {reasons}")
    usage = events[-1].get("usage")
    if (
        events[-1]["choices"]
        or not usage
        or usage["completion_tokens"] > max_tokens
        or usage["total_tokens"] != usage["prompt_tokens"] + usage["completion_tokens"]
    ):
        raise StreamError(f"bad usage chunk {events[-1]}")
    return usage


class Stats:
    def __init__(self):
        self.ok = self.rejected = self.disconnects = self.tokens = self.prompt_tokens = 0
        self.errors: list[str] = []
        self.latency: list[float] = []
        self.ttft: list[float] = []


async def client(i: int, base: str, args, deadline: float, st: Stats) -> None:
    rng = random.Random(args.seed * 1000 + i)
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(300.0)) as http:
        n = 0
        while time.perf_counter() < deadline:
            n += 1
            kind = "chat" if (i + n) % 2 else "completion"
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, args.prompt_words)))
            max_tokens = rng.randint(max(1, args.max_tokens // 4), args.max_tokens)
            body = {
                "model": args.model_name,
                "max_tokens": max_tokens,
                "stream": True,
                "stream_options": {"include_usage": True},
                "temperature": rng.choice([0.0, 0.8]),
                "seed": rng.randint(0, 1 << 30),
            }
            if kind == "chat":
                path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": text}]
            else:
                path, body["prompt"] = "/v1/completions", text
            hang_up = rng.random() < args.disconnect_frac
            t0, first, lines = time.perf_counter(), None, []
            try:
                async with http.stream("POST", path, json=body) as r:
                    if r.status_code == 503:
                        st.rejected += 1
                        await r.aread()
                        await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                        continue
                    if r.status_code != 200:
                        st.errors.append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                        continue
                    async for line in r.aiter_lines():
                        lines.append(line)
                        if first is None and line.startswith("data: {"):
                            ch = json.loads(line[6:]).get("choices") or [{}]
                            if ch[0].get("text") or (ch[0].get("delta") or {}).get("content"):
                                first = time.perf_counter()
                        if hang_up and line.startswith("data: "):
                            break
                if hang_up:
                    st.disconnects += 1
                    continue
                usage = check_stream(kind, lines, max_tokens)
            except (StreamError, json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
                st.errors.append(f"{kind}: {type(e).__name__}: {e}")
                continue
            except httpx.HTTPError as e:
                st.errors.append(f"{kind}: {type(e).__name__}: {e}")
                continue
            st.ok += 1
            st.latency.append(time.perf_counter() - t0)
            if first is not None:
                st.ttft.append(first - t0)
            st.tokens += usage["completion_tokens"]
            st.prompt_tokens += usage["prompt_tokens"]


async def sample_rss(pid: int, out: list, stop: asyncio.Event, every: float = 1.0) -> None:
    t0 = time.perf_counter()
    while not stop.is_set():
        out.append((time.perf_counter() - t0, rss_mb(pid)))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), every)


async def wait_idle(base: str, timeout: float = 30.0) -> dict:
    async with httpx.AsyncClient(base_url=base) as http:
        t0 = time.perf_counter()
        while True:
            h = (await http.get("/health")).json()
            if (h["running"] == 0 and h["waiting"] == 0) or time.perf_counter() - t0 > timeout:
                return h
            await asyncio.sleep(0.1)


async def run_load(base: str, pid: int, args) -> dict:
    st, samples, stop = Stats(), [], asyncio.Event()
    sampler = asyncio.create_task(sample_rss(pid, samples, stop))
    await asyncio.sleep(1.0)
    t0 = time.perf_counter()
    deadline = t0 + args.seconds
    await asyncio.gather(*(client(i, base, args, deadline, st) for i in range(args.clients)))
    elapsed = time.perf_counter() - t0
    health = await wait_idle(base)
    await asyncio.sleep(1.0)
    stop.set()
    await sampler
    rss = [m for _, m in samples if m is not None]
    q = max(1, len(rss) // 4)
    res = dict(
        clients=args.clients,
        seconds=round(elapsed, 1),
        requests_ok=st.ok,
        rejected_503=st.rejected,
        deliberate_disconnects=st.disconnects,
        errors=len(st.errors),
        first_errors=st.errors[:5],
        requests_per_s=st.ok / elapsed,
        tokens_per_s=st.tokens / elapsed,
        completion_tokens=st.tokens,
        prompt_tokens=st.prompt_tokens,
        latency_p50_s=pct(st.latency, 50),
        latency_p95_s=pct(st.latency, 95),
        ttft_p50_s=pct(st.ttft, 50),
        ttft_p95_s=pct(st.ttft, 95),
        rss_start_mb=rss[0] if rss else None,
        rss_peak_mb=max(rss) if rss else None,
        rss_end_mb=rss[-1] if rss else None,
        rss_first_quarter_peak_mb=max(rss[:q]) if rss else None,
        rss_last_quarter_peak_mb=max(rss[-q:]) if rss else None,
        health_after=health,
    )
    res["idle_after"] = health["running"] == 0 and health["waiting"] == 0 and health["status"] == "ok"
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default=None, help="a run directory (default: a tiny random model made here)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--max-tokens", type=int, default=32, help="per request: uniform in [max/4, max]")
    ap.add_argument("--prompt-words", type=int, default=40)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-waiting", type=int, default=16, help="below --clients so that some requests get 503")
    ap.add_argument("--disconnect-frac", type=float, default=0.05, help="requests that hang up after one event")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    tmp = None
    if args.ckpt is None:
        tmp = Path(tempfile.mkdtemp(prefix="dsv4-load-"))
        ckpt = make_tiny_run(tmp / "tiny-random")
    else:
        ckpt = Path(args.ckpt)
    args.model_name = "load-test"
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "dsv4",
        "serve",
        "--ckpt",
        str(ckpt),
        "--port",
        str(port),
        "--max-batch",
        str(args.max_batch),
        "--max-waiting",
        str(args.max_waiting),
        "--model-name",
        args.model_name,
        "--log-level",
        "warning",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while True:
            if server.poll() is not None:
                print(server.stdout.read(), file=sys.stderr)
                raise SystemExit("the server exited during start-up")
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() - t0 > 120:
                raise SystemExit("the server did not start within 120 s")
            time.sleep(0.2)
        print(f"server up in {time.time() - t0:.1f} s: {shlex.join(cmd)}", flush=True)
        res = asyncio.run(run_load(base, server.pid, args))
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    res.update(
        command=" ".join(shlex.quote(a) for a in sys.argv),
        server_exit=server.returncode,
        ckpt=str(args.ckpt or "tiny random model"),
        max_batch=args.max_batch,
        max_waiting=args.max_waiting,
        hardware=hardware_info(),
    )

    def f(x, unit="", nd=2):
        return "-" if x is None else f"{x:.{nd}f}{unit}"

    print(f"clients {res['clients']}, {res['seconds']} s, max_batch {args.max_batch}, max_waiting {args.max_waiting}")
    print(
        f"requests ok {res['requests_ok']}  503s {res['rejected_503']}  deliberate disconnects "
        f"{res['deliberate_disconnects']}  errors {res['errors']}"
    )
    for e in res["first_errors"]:
        print(f"  error: {e}")
    print(
        f"requests/s {f(res['requests_per_s'])}  tokens/s {f(res['tokens_per_s'], nd=1)}  "
        f"(completion tokens {res['completion_tokens']}, prompt tokens {res['prompt_tokens']})"
    )
    print(
        f"latency p50 {f(res['latency_p50_s'], ' s')}  p95 {f(res['latency_p95_s'], ' s')}   "
        f"time to first token p50 {f(res['ttft_p50_s'], ' s')}  p95 {f(res['ttft_p95_s'], ' s')}"
    )
    print(
        f"server RSS start {f(res['rss_start_mb'], ' MB', 0)}  peak {f(res['rss_peak_mb'], ' MB', 0)}  "
        f"end {f(res['rss_end_mb'], ' MB', 0)}  (peak in first quarter {f(res['rss_first_quarter_peak_mb'], ' MB', 0)}"
        f", last quarter {f(res['rss_last_quarter_peak_mb'], ' MB', 0)})"
    )
    print(
        f"server idle afterwards (every slot free): {res['idle_after']} {res['health_after']}; "
        f"server exit status {server.returncode}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0 if res["errors"] == 0 and res["idle_after"] else 1


if __name__ == "__main__":
    sys.exit(main())
