"""DeepSeek-V4's conversation format (dsv4.infer.chat_v4) against hand-written prompts."""

from __future__ import annotations

import json

import pytest

from dsv4.infer.chat import ChatError, ChatTemplate, load_template
from dsv4.infer.chat_v4 import MAX_EFFORT, V4ChatFormat, tools_section

B, E, U, A = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}},
    },
}
CALL = {
    "id": "c1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'},
}
CALL_MARKUP = (
    "\n\n<｜DSML｜tool_calls>\n"
    '<｜DSML｜invoke name="get_weather">\n'
    '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n"
    "</｜DSML｜tool_calls>"
)


def test_chat_mode_opens_the_answer_without_thinking():
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}]
    assert V4ChatFormat().render(msgs) == f"{B}You are terse.{U}Hi{A}</think>"
    two = [*msgs, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    assert V4ChatFormat().render(two) == f"{B}You are terse.{U}Hi{A}</think>Hello.{E}{U}Bye{A}</think>"


def test_thinking_mode_drops_the_reasoning_of_earlier_turns():
    msgs = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "Hello! I am DeepSeek.", "reasoning_content": "thinking..."},
        {"role": "user", "content": "1+1=?"},
    ]
    want = f"{B}{U}hello{A}</think>Hello! I am DeepSeek.{E}{U}1+1=?{A}<think>"
    assert V4ChatFormat(thinking=True).render(msgs) == want
    kept = f"{B}{U}hello{A}<think>thinking...</think>Hello! I am DeepSeek.{E}{U}1+1=?{A}<think>"
    assert V4ChatFormat(thinking=True, drop_thinking=False).render(msgs) == kept
    assert V4ChatFormat(thinking=True, reasoning_effort="max").render(msgs[:1]) == f"{B}{MAX_EFFORT}{U}hello{A}<think>"


def test_tool_calls_and_results_in_thinking_mode():
    """With tools the reasoning of earlier turns stays (tool loops need it); calls are DSML, results are
    user turns of <tool_result> blocks."""
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "reasoning_content": "need the tool", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    want = (
        f"{B}S\n\n{tools_section([WEATHER])}{U}Weather in Paris?{A}<think>need the tool</think>{CALL_MARKUP}{E}"
        f"{U}<tool_result>sunny</tool_result>{A}<think>"
    )
    assert V4ChatFormat(thinking=True).render(msgs, tools=[WEATHER]) == want
    section = tools_section([WEATHER])
    assert section.startswith("## Tools\n\nYou have access to a set of tools to help answer the user's question.")
    assert "\n### Available Tool Schemas\n\n" + json.dumps(WEATHER["function"], ensure_ascii=False) + "\n\n" in section
    assert section.endswith(
        "You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"
    )


def test_tool_results_follow_the_call_order_and_join_the_user_text():
    second = {"id": "c2", "type": "function", "function": {"name": "f", "arguments": '{"x": [1, 2]}'}}
    msgs = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "", "tool_calls": [CALL, second]},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "user", "content": "thanks"},
    ]
    out = V4ChatFormat().render(msgs)
    assert out.endswith(f"{U}<tool_result>one</tool_result>\n\n<tool_result>two</tool_result>\n\nthanks{A}</think>")
    assert '<｜DSML｜parameter name="x" string="false">[1, 2]</｜DSML｜parameter>' in out


def test_a_completion_parses_into_reasoning_text_and_tool_calls():
    fmt = V4ChatFormat(thinking=True)
    got = fmt.parse(f"I should look it up.</think>Let me check.{CALL_MARKUP}{E}")
    assert got["reasoning_content"] == "I should look it up." and got["content"] == "Let me check."
    assert got["tool_calls"] == [
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}}
    ]
    assert V4ChatFormat().parse(f"Just text{E}") == {
        "reasoning_content": None,
        "content": "Just text",
        "tool_calls": [],
    }


def test_bad_messages_are_chat_errors():
    with pytest.raises(ChatError, match=r"messages\[0\].role"):
        V4ChatFormat().render([{"role": "robot", "content": "x"}])
    with pytest.raises(ChatError, match="non-empty list"):
        V4ChatFormat().render([])


def test_a_directory_with_deepseeks_tokenizer_chats_in_the_v4_format(tmp_path):
    """load_template picks the V4 format when the tokenizer knows its markers; each marker is one token."""
    from dsv4.data import train_tokenizer

    tok = train_tokenizer(["hello world, how are you?"] * 20, 300, show_progress=False)
    plain = tmp_path / "plain"
    plain.mkdir()
    tok.save(str(plain / "tokenizer.json"))
    (plain / "config.json").write_text("{}")
    assert isinstance(load_template(plain), ChatTemplate)
    tok.add_special_tokens([B, E, U, A, "<think>", "</think>"])
    real = tmp_path / "real"
    real.mkdir()
    tok.save(str(real / "tokenizer.json"))
    (real / "config.json").write_text("{}")
    from dsv4.data import load_tokenizer

    tok = load_tokenizer(real / "tokenizer.json")  # as load_run loads it: special-token text encodes as bytes
    fmt = load_template(real)
    assert isinstance(fmt, V4ChatFormat) and not fmt.thinking
    ids = fmt.encode(tok, [{"role": "user", "content": "hello"}])
    vocab = tok.get_vocab()
    assert ids[0] == vocab[B] and ids[1] == vocab[U] and ids[-2:] == [vocab[A], vocab["</think>"]]
    (real / "chat_template.json").write_text(json.dumps({"format": "deepseek-v4", "thinking": True}))
    assert load_template(real).thinking


COMPLETIONS = [
    f"I should look it up.</think>Let me check.{CALL_MARKUP}{E}",
    f"Short.</think>No tools needed, 5 < 6 and </thin is not a marker.{E}",
    "No end of thinking at all",
    f"</think>{CALL_MARKUP}",
]


@pytest.mark.parametrize("completion", COMPLETIONS)
@pytest.mark.parametrize("thinking", [True, False])
def test_streamed_deltas_add_up_to_the_parsed_completion(completion, thinking):
    """However the text is cut into pieces (one character at a time, or chunks), the streamed deltas add up
    to what parse() reads from the whole completion, and no marker text leaks into them."""
    import random

    from dsv4.infer.chat_v4 import V4StreamSplitter

    fmt = V4ChatFormat(thinking=thinking)
    want = fmt.parse(completion)
    rng = random.Random(len(completion))
    cuts = [[1] * len(completion), [rng.randint(1, 9) for _ in completion], [len(completion)]]
    for sizes in cuts:
        split, deltas, i = V4StreamSplitter(fmt), [], 0
        for n in sizes:
            if i >= len(completion):
                break
            deltas += split.feed(completion[i : i + n])
            i += n
        deltas += split.finish()
        reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
        content = "".join(d.get("content", "") for d in deltas)
        calls = [c for d in deltas for c in d.get("tool_calls", [])]
        assert (reasoning or None) == (want["reasoning_content"] or None)
        assert content == want["content"]
        assert [{k: c[k] for k in ("type", "function")} for c in calls] == want["tool_calls"]
        assert all(c["id"].startswith("call_") and c["index"] == j for j, c in enumerate(calls))
        assert not any("｜" in d.get("content", "") + d.get("reasoning_content", "") for d in deltas)
