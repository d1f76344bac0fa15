"""The terminal commands: `dsv4 generate` (one prompt, streamed) and `dsv4 chat` (a REPL over stdin).

Both run on the cached engine (dsv4.infer.engine.Engine); dsv4.cli parses the flags and calls them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO


def _stream_to(out, events) -> str | None:
    """Print text deltas as they come; the finish reason."""
    reason = None
    for ev in events:
        if ev.text:
            out.write(ev.text)
            out.flush()
        reason = ev.finish_reason or reason
    return reason


def generate_to(out: TextIO, engine, tok, prompt: str, params) -> int:
    """`dsv4 generate`: print the prompt, then its continuation as the engine produces it."""
    ids = tok.encode(prompt).ids
    if not ids:
        raise ValueError("the prompt is empty after tokenization")
    req = engine.add(ids, params)  # validates the prompt before anything is printed
    out.write(prompt)
    out.flush()
    while not req.finished:
        _stream_to(out, engine.step())
    out.write("\n")
    out.flush()
    return 0


def chat_repl(
    engine,
    tok,
    template,
    sampling: Callable,
    system_text: str | None,
    seed: int | None,
    stdin: TextIO,
    out: TextIO,
) -> int:
    """`dsv4 chat`: read messages line by line, keep the history (dropping the oldest turns when the
    context is full), stream each answer. sampling(stop) gives the SamplingParams of a turn."""
    system = [{"role": "system", "content": system_text}] if system_text else []
    history: list[dict] = []
    interactive = stdin.isatty()  # piped input: each exchange is printed as "you: ..." / "assistant: ..."
    if interactive:
        print("dsv4 chat: type a message; /reset clears the history, /exit (or Ctrl-D) quits.", file=out)
    turn = 0
    while True:
        if interactive:
            out.write("> ")
            out.flush()
        line = stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            break
        if cmd == "/reset":
            history.clear()
            print("(history cleared)", file=out, flush=True)
            continue
        history.append({"role": "user", "content": line})
        # drop the oldest turns until the conversation (plus one answer token) fits the context
        while True:
            ids = template.encode(tok, system + history)
            if len(ids) < engine.max_context or len(history) <= 1:
                break
            del history[:2]
        if len(ids) >= engine.max_context:
            history.clear()
            print(
                f"dsv4: the message is too long ({len(ids)} tokens; the context holds {engine.max_context})",
                file=sys.stderr,
                flush=True,
            )
            continue
        p = sampling(template.stop)
        if seed is not None:
            p.seed = seed + turn
        p.max_tokens = min(p.max_tokens, engine.max_context - len(ids))
        turn += 1
        answer = []
        if not interactive:
            out.write(f"you: {line}\nassistant: ")
        for ev in engine.stream(ids, p):
            if ev.text:
                answer.append(ev.text)
                out.write(ev.text)
                out.flush()
        out.write("\n" if interactive else "\n\n")
        out.flush()
        history.append({"role": "assistant", "content": "".join(answer).strip()})
    return 0
