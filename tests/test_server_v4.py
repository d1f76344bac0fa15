"""The OpenAI server with DeepSeek-V4's chat format: request-level tools and thinking, and answers with
reasoning_content and tool_calls (streamed and not), read back by the official `openai` client. The engine
is a scripted stand-in that answers with a fixed completion, so the server's shaping is what is tested."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import openai
import pytest
from test_chat_v4 import CALL_MARKUP, WEATHER, E
from test_server import KEY, MODEL, LiveServer, tiny_tokenizer

from dsv4.infer.chat_v4 import V4ChatFormat
from dsv4.infer.engine import Event
from dsv4.infer.server import Server, create_app


class ScriptedEngine:
    """A BackgroundEngine stand-in: every request is answered with `script`, a few characters per event;
    the prompts it was given are kept."""

    def __init__(self, tok, script: str) -> None:
        self.tok, self.script, self.prompts, self.error = tok, script, [], None
        self.engine = SimpleNamespace(max_context=4096, cfg=SimpleNamespace(vocab_size=512))

    def submit(self, prompt, params, on_event):
        self.prompts.append(prompt)
        req = SimpleNamespace(id=len(self.prompts), prompt=prompt, output=[0] * 7)

        def run():
            for i in range(0, len(self.script), 3):
                on_event(Event(req.id, [0], self.script[i : i + 3]))
            on_event(Event(req.id, [], "", "stop"))

        threading.Thread(target=run, daemon=True).start()
        return req

    def abort(self, request_id):
        pass


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def serve(tok, script: str, thinking: bool = False):
    eng = ScriptedEngine(tok, script)
    srv = Server(eng, tok, MODEL, api_key=KEY, chat_template=V4ChatFormat(thinking=thinking))
    live = LiveServer(create_app(srv))
    return eng, live, openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0)


MSGS = [{"role": "user", "content": "Weather in Paris?"}]


def test_tool_calls_come_back_as_openai_tool_calls(tok):
    eng, live, client = serve(tok, f"Let me check.{CALL_MARKUP}{E}")
    try:
        r = client.chat.completions.create(model=MODEL, messages=MSGS, tools=[WEATHER])
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and msg.content == "Let me check."
        (call,) = msg.tool_calls
        assert call.function.name == "get_weather" and call.function.arguments == '{"city": "Paris", "days": 3}'
        assert call.id.startswith("call_")
        assert "get_weather" in tok.decode(eng.prompts[-1])  # the tools section is in the prompt
        client.chat.completions.create(model=MODEL, messages=MSGS, tools=[WEATHER], tool_choice="none")
        assert "get_weather" not in tok.decode(eng.prompts[-1])
        stream = client.chat.completions.create(model=MODEL, messages=MSGS, tools=[WEATHER], stream=True)
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        calls = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
        assert text == "Let me check." and [t.function.name for t in calls] == ["get_weather"]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
    finally:
        live.stop()


def test_thinking_mode_returns_reasoning_content(tok):
    eng, live, client = serve(tok, f"Paris is in France.</think>It is sunny.{E}")
    try:
        r = client.chat.completions.create(
            model=MODEL, messages=MSGS, extra_body={"chat_template_kwargs": {"thinking": True}}
        )
        msg = r.choices[0].message
        assert msg.content == "It is sunny." and msg.model_extra["reasoning_content"] == "Paris is in France."
        assert tok.decode(eng.prompts[-1]).endswith("<think>") or "think" in tok.decode(eng.prompts[-1])
        chunks = list(
            client.chat.completions.create(
                model=MODEL, messages=MSGS, stream=True, extra_body={"chat_template_kwargs": {"thinking": True}}
            )
        )
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == "Paris is in France."
        assert "".join(d.content or "" for d in deltas) == "It is sunny."
        r = client.chat.completions.create(model=MODEL, messages=MSGS)  # chat mode: the text as it came
        assert r.choices[0].message.content == "Paris is in France.</think>It is sunny."
    finally:
        live.stop()


def test_bad_tools_and_tool_choice_are_400(tok):
    _eng, live, client = serve(tok, f"ok{E}")
    try:
        for extra, param in (
            ({"tools": [{"type": "function"}]}, "tools"),
            ({"tools": [WEATHER], "tool_choice": "required"}, "tool_choice"),
            ({"chat_template_kwargs": {"mode": 1}}, "chat_template_kwargs"),
        ):
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model=MODEL, messages=MSGS, extra_body=extra)
            assert e.value.body["param"] == param
    finally:
        live.stop()
