"""DeepSeek-V4's conversation format, for checkpoints that ship DeepSeek's tokenizer (docs/inference.md).

A prompt is the begin-of-sentence token followed by the messages:
- system: its text, then (if the request has tools) a blank line and the tools section;
- user: `<｜User｜>` and its text. Tool results become user turns made of `<tool_result>...</tool_result>`
  blocks (in the order of the calls that asked for them), joined with blank lines to any user text that
  follows them;
- assistant: in thinking mode its reasoning and `</think>`, then its text, then its tool calls, then the
  end-of-sentence token.

After every user turn comes `<｜Assistant｜>` and the mode switch: `<think>` when the model is to think
(thinking mode, the last user turn), `</think>` otherwise. In thinking mode the reasoning of earlier
turns is dropped (it is kept when the request has tools, whose loops need it).

Tool calls are written in DeepSeek's markup (DSML):

    <｜DSML｜tool_calls>
    <｜DSML｜invoke name="get_weather">
    <｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>
    <｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>
    </｜DSML｜invoke>
    </｜DSML｜tool_calls>

string="true" marks a string value written as is; other values are JSON. `parse` reads a completion back
into (reasoning_content, content, tool_calls). The format follows DeepSeek's public description of its
V4 encoding.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsv4.infer.chat import ChatError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
THINK, END_THINK = "<think>", "</think>"
DSML = "｜DSML｜"
CALLS_OPEN, CALLS_CLOSE = f"<{DSML}tool_calls>", f"</{DSML}tool_calls>"

MAX_EFFORT = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)

TOOLS_SECTION = (
    "## Tools\n\n"
    "You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "
    '"<{d}tool_calls>" block like the following:\n\n'
    "<{d}tool_calls>\n"
    '<{d}invoke name="$TOOL_NAME">\n'
    '<{d}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{d}parameter>\n'
    "...\n"
    "</{d}invoke>\n"
    '<{d}invoke name="$TOOL_NAME2">\n'
    "...\n"
    "</{d}invoke>\n"
    "</{d}tool_calls>\n\n"
    'String parameters should be specified as is and set `string="true"`. For all other types (numbers, '
    'booleans, arrays, objects), pass the value in JSON format and set `string="false"`.\n\n'
    "If thinking_mode is enabled (triggered by {think}), you MUST output your complete reasoning inside "
    "{think}...{end_think} BEFORE any tool calls or final response.\n\n"
    "Otherwise, output directly after {end_think} with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n"
    "{schemas}\n\n"
    "You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"
)


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def tools_section(tools: list[dict]) -> str:
    """The system prompt's tools section for OpenAI-style tools ({"type": "function", "function": {...}})."""
    fns = [t.get("function", t) if isinstance(t, dict) else t for t in tools]
    return TOOLS_SECTION.format(d=DSML, think=THINK, end_think=END_THINK, schemas="\n".join(_json(f) for f in fns))


def _call_markup(call: dict) -> str:
    fn = call.get("function", call)
    name, raw = fn.get("name"), fn.get("arguments", "{}")
    try:
        args = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError:
        args = {"arguments": raw}
    if not isinstance(args, dict):
        args = {"arguments": raw}
    params = [
        f'<{DSML}parameter name="{k}" string="{"true" if isinstance(v, str) else "false"}">'
        f"{v if isinstance(v, str) else _json(v)}</{DSML}parameter>"
        for k, v in args.items()
    ]
    return f'<{DSML}invoke name="{name}">\n' + "\n".join(params) + f"\n</{DSML}invoke>"


def _text(m: dict, i: int) -> str:
    c = m.get("content")
    if c is None or isinstance(c, str):
        return c or ""
    if isinstance(c, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in c):
        return "".join(p["text"] for p in c)
    raise ChatError(f"messages[{i}].content must be a string or a list of text parts")


def _normalise(messages: object) -> list[dict]:
    """Checked messages. Consecutive user and tool messages make one user turn of blocks (text, or a tool
    result), joined in order; its tool results follow the order of the calls that asked for them."""
    if not isinstance(messages, list) or not messages:
        raise ChatError('messages must be a non-empty list of {"role", "content"} objects')
    out: list[dict] = []
    order: dict[str, int] = {}
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatError(f"messages[{i}] must be an object, got {type(m).__name__}")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise ChatError(f"messages[{i}].role must be system, developer, user, assistant or tool; got {role!r}")
        if role == "assistant":
            calls = m.get("tool_calls") or []
            if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
                raise ChatError(f"messages[{i}].tool_calls must be a list of objects")
            order = {c["id"]: j for j, c in enumerate(calls) if c.get("id")}
            out.append({"role": role, "content": _text(m, i), "reasoning": m.get("reasoning_content") or "",
                        "calls": calls})  # fmt: skip
        elif role in ("user", "tool"):
            block = ("text", _text(m, i), "") if role == "user" else ("result", _text(m, i), m.get("tool_call_id", ""))
            if not (out and out[-1]["role"] == "user"):
                out.append({"role": "user", "blocks": [], "order": order})
            out[-1]["blocks"].append(block)
        else:
            out.append({"role": role, "content": _text(m, i)})
    for m in out:  # tool results in call order (stable), text blocks where they stand
        if m["role"] == "user":
            results = sorted((b for b in m["blocks"] if b[0] == "result"), key=lambda b: m["order"].get(b[2], 0))
            it = iter(results)
            m["blocks"] = [next(it) if b[0] == "result" else b for b in m["blocks"]]
    return out


@dataclass
class V4ChatFormat:
    """The V4 format with the ChatTemplate interface (render / encode / stop) plus parse. thinking: the
    model reasons first (`<think>`); reasoning_effort "max" adds DeepSeek's maximum-effort preamble."""

    thinking: bool = False
    reasoning_effort: str | None = None
    drop_thinking: bool = True

    @property
    def stop(self) -> list[str]:
        return [EOS]

    def render(self, messages: object, add_generation_prompt: bool = True, tools: list | None = None) -> str:
        msgs = _normalise(messages)
        if tools:
            if msgs[0]["role"] != "system":
                msgs.insert(0, {"role": "system", "content": ""})
            msgs[0] = {**msgs[0], "tools": tools}
        users = [i for i, m in enumerate(msgs) if m["role"] in ("user", "developer")]
        last_user = users[-1] if users else -1
        drop = self.thinking and self.drop_thinking and not tools
        if drop:  # earlier turns lose their reasoning, and developer messages before the last user turn go
            msgs = [m for i, m in enumerate(msgs) if not (m["role"] == "developer" and i < last_user)]
            users = [i for i, m in enumerate(msgs) if m["role"] in ("user", "developer")]
            last_user = users[-1] if users else -1
        out = [BOS]
        if self.thinking and self.reasoning_effort == "max":
            out.append(MAX_EFFORT)
        for i, m in enumerate(msgs):
            role = m["role"]
            if role == "system":
                out.append(m["content"] + ("\n\n" + tools_section(m["tools"]) if m.get("tools") else ""))
            elif role == "developer":
                out.append(USER + m["content"])
            elif role == "user":
                parts = [
                    f"<tool_result>{text}</tool_result>" if kind == "result" else text for kind, text, _ in m["blocks"]
                ]
                out.append(USER + "\n\n".join(parts))
            else:  # assistant
                think = ""
                if self.thinking and (not drop or i > last_user):
                    think = m["reasoning"] + END_THINK
                calls = ""
                if m["calls"]:
                    calls = (
                        "\n\n" + CALLS_OPEN + "\n" + "\n".join(_call_markup(c) for c in m["calls"]) + "\n" + CALLS_CLOSE
                    )
                out.append(think + m["content"] + calls + EOS)
            last = i + 1 == len(msgs)
            if role in ("user", "developer") and (not last or add_generation_prompt):
                if not last and msgs[i + 1]["role"] != "assistant":
                    continue
                out.append(ASSISTANT + (THINK if self.thinking and (not drop or i >= last_user) else END_THINK))
        return "".join(out)

    def encode(
        self, tokenizer: Tokenizer, messages: object, add_generation_prompt: bool = True, tools: list | None = None
    ) -> list[int]:
        """Token ids: each marker the tokenizer holds as a token (DeepSeek's tokenizer.json holds them all) is
        its one id, and the text between markers is encoded as text, as DeepSeek's own encoding of the
        prompt string does (dsv4's loader makes tokenizers encode special-token text as plain bytes, so the
        markers are matched here)."""
        text = self.render(messages, add_generation_prompt, tools)
        vocab = tokenizer.get_vocab()
        markers = [m for m in (BOS, EOS, USER, ASSISTANT, THINK, END_THINK) if m in vocab]
        ids: list[int] = []
        for piece in re.split("(" + "|".join(map(re.escape, markers)) + ")", text) if markers else [text]:
            if piece in vocab and piece in markers:
                ids.append(vocab[piece])
            elif piece:
                ids.extend(tokenizer.encode(piece, add_special_tokens=False).ids)
        return ids

    def parse(self, completion: str) -> dict:
        """A completion (the text after the prompt) -> {"reasoning_content", "content", "tool_calls"}: the
        reasoning before `</think>` (thinking mode; all of the text when it never ends), the text, the
        calls as OpenAI tool_calls."""
        text = completion.split(EOS, 1)[0]
        reasoning = None
        if self.thinking:  # no `</think>` yet (a cut-off answer): all of it is reasoning
            reasoning, _, text = text.partition(END_THINK) if END_THINK in text else (text, "", "")
        calls = []
        if CALLS_OPEN in text:
            text, block = text.split(CALLS_OPEN, 1)
            text = text.rstrip("\n")
            for name, body in re.findall(rf'<{DSML}invoke name="(.*?)">\n(.*?)\n?</{DSML}invoke>', block, re.DOTALL):
                args = {}
                for key, is_str, value in re.findall(
                    rf'<{DSML}parameter name="(.*?)" string="(true|false)">(.*?)</{DSML}parameter>', body, re.DOTALL
                ):
                    try:
                        args[key] = value if is_str == "true" else json.loads(value)
                    except json.JSONDecodeError:
                        args[key] = value
                calls.append({"type": "function", "function": {"name": name, "arguments": _json(args)}})
        return {"reasoning_content": reasoning, "content": text, "tool_calls": calls}


class V4StreamSplitter:
    """Splits a streamed V4 completion into OpenAI deltas as its text arrives: `reasoning_content` until
    `</think>` (thinking mode), then `content`; once the tool-call block opens, its text is held back and
    `finish` returns the parsed calls. Text that could still become a marker is held until it cannot.
    feed(text) -> list of deltas; finish() -> the last deltas (the tool calls, if any)."""

    def __init__(self, fmt: V4ChatFormat) -> None:
        self.fmt = fmt
        self.state = "reasoning" if fmt.thinking else "content"
        self.pending = ""  # text not yet sent (a possible marker prefix)
        self.calls = ""  # the tool-call block, from its opening marker

    def _markers(self) -> list[str]:
        return [END_THINK] if self.state == "reasoning" else [CALLS_OPEN, EOS]

    def _delta(self, text: str) -> dict[str, Any]:
        return {"reasoning_content" if self.state == "reasoning" else "content": text}

    def feed(self, text: str) -> list[dict]:
        out: list[dict] = []
        if self.state == "calls":
            self.calls += text
            return out
        self.pending += text
        while self.state != "calls":
            hits = [(self.pending.find(m), m) for m in self._markers() if m in self.pending]
            if not hits:
                break
            at, marker = min(hits)
            head = self.pending[:at].rstrip("\n") if marker == CALLS_OPEN else self.pending[:at]
            if head:  # the blank lines before a tool-call block are not content (parse drops them too)
                out.append(self._delta(head))
            rest = self.pending[at + len(marker) :]
            if marker == END_THINK:
                self.state, self.pending = "content", rest
            elif marker == CALLS_OPEN:
                self.state, self.calls, self.pending = "calls", CALLS_OPEN + rest, ""
            else:  # EOS: nothing after it is part of the answer
                self.state, self.pending = "calls", ""
        if self.state == "calls":
            return out
        keep = max((k for m in self._markers() for k in range(1, len(m)) if self.pending.endswith(m[:k])), default=0)
        send = self.pending[: len(self.pending) - keep]
        if self.state == "content":  # trailing newlines wait: they may precede a tool-call block
            send = send.rstrip("\n")
        self.pending = self.pending[len(send) :]
        if send:
            out.append(self._delta(send))
        return out

    def finish(self) -> list[dict]:
        """The held-back text and the tool calls (OpenAI delta form, with ids and indices)."""
        out: list[dict[str, Any]] = []
        if self.pending and self.state != "calls":
            out.append(self._delta(self.pending))
        self.pending = ""
        calls = V4ChatFormat(thinking=False).parse(self.calls)["tool_calls"] if self.calls else []
        if calls:
            out.append({"tool_calls": [{"index": j, **with_call_id(c)} for j, c in enumerate(calls)]})
        return out


def with_call_id(call: dict) -> dict:
    """An OpenAI tool call with a fresh id."""
    import uuid

    return {"id": f"call_{uuid.uuid4().hex[:24]}", **call}


def is_v4_tokenizer(path: str | Path) -> bool:
    """A tokenizer.json whose added tokens include V4's turn markers (DeepSeek's own); False for any other
    file, readable or not."""
    try:
        added = {t.get("content") for t in json.loads(Path(path).read_text()).get("added_tokens", [])}
    except (OSError, ValueError, AttributeError, TypeError):
        return False
    return {USER, ASSISTANT, EOS} <= added
