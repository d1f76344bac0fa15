"""A plain-text chat template, stored with the tokenizer of a run (RUN/chat_template.json).

The default template writes each message as a role marker line and the content, then opens the
assistant's turn:

    <|system|>
    You are terse.
    <|user|>
    Hi!
    <|assistant|>

The markers are ordinary text: the byte-level tokenizer encodes "<|user|>" as plain bytes (special
tokens inside text are never produced, see dsv4.data.tokenizer), so any run can use the template. A
generated answer ends at eos or when the model starts another turn (the template's stop strings).

Runs are packed with documents separated by <|eos|> only (no <|bos|>), so by default no bos id is
put in front; set "bos": true in chat_template.json to prepend the tokenizer's bos id.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer

ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role


class ChatError(ValueError):
    """Malformed messages or template (a client error: HTTP 400)."""


@dataclass
class ChatTemplate:
    message: str = "<|{role}|>\n{content}\n"  # one message; {role} and {content} are substituted
    generation_prompt: str = "<|assistant|>\n"  # opens the assistant's answer
    stop: list[str] = field(
        default_factory=lambda: [
            "\n<|user|>",
            "\n<|system|>",
            "\n<|assistant|>",
            "<|user|>",
            "<|system|>",
            "<|assistant|>",
        ]
    )
    bos: bool = False  # prepend the bos id (see the module docstring)
    bos_id: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> ChatTemplate:
        if not isinstance(d, dict):
            raise ChatError(f"a chat template must be a JSON object, got {type(d).__name__}")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ChatError(f"unknown chat template fields: {sorted(unknown)}")
        t = cls(**d)
        if not isinstance(t.message, str) or "{content}" not in t.message:
            raise ChatError("the chat template's 'message' must be a string containing {content}")
        if not isinstance(t.generation_prompt, str):
            raise ChatError("the chat template's 'generation_prompt' must be a string")
        if not isinstance(t.stop, list) or any(not isinstance(s, str) or not s for s in t.stop):
            raise ChatError("the chat template's 'stop' must be a list of non-empty strings")
        return t

    def to_dict(self) -> dict:
        return asdict(self)

    # ------------------------------------------------------------------ rendering
    def render(self, messages: object, add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation (validated), ending with the assistant prefix."""
        out = [
            self.message.replace("{role}", m["role"]).replace("{content}", m["content"])
            for m in validate_messages(messages)
        ]
        if add_generation_prompt:
            out.append(self.generation_prompt)
        return "".join(out)

    def encode(self, tokenizer: Tokenizer, messages: object, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered conversation (the bos id first if the template asks for it)."""
        ids = tokenizer.encode(self.render(messages, add_generation_prompt)).ids
        return ([self.bos_id] if self.bos else []) + list(ids)


def _content(m: dict, i: int) -> str:
    c = m.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list):  # OpenAI content parts: only text parts are supported
        parts = []
        for j, p in enumerate(c):
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise ChatError(
                    f"messages[{i}].content[{j}] must be a text part "
                    f'{{"type": "text", "text": "..."}} (only text is supported)'
                )
            parts.append(p["text"])
        return "".join(parts)
    if c is None:
        raise ChatError(f"messages[{i}].content is missing")
    raise ChatError(f"messages[{i}].content must be a string, got {type(c).__name__}")


def validate_messages(messages: object) -> list[dict]:
    """[{role, content}] with role in system/user/assistant (developer = system, as OpenAI treats it) and
    string content; raise ChatError naming the bad message otherwise."""
    if not isinstance(messages, list) or not messages:
        raise ChatError('messages must be a non-empty list of {"role", "content"} objects')
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatError(f"messages[{i}] must be an object with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        if role not in ROLES:
            raise ChatError(f"messages[{i}].role must be one of {', '.join((*ROLES, *ROLE_ALIASES))}; got {role!r}")
        out.append({"role": role, "content": _content(m, i)})
    return out


def load_template(run_dir: str | Path | None = None):
    """The chat format of a run or model directory: chat_template.json beside its tokenizer.json when there is
    one (write it there to change the format; {"format": "deepseek-v4", "thinking": true} selects DeepSeek-V4's
    format in thinking mode), else DeepSeek-V4's format (dsv4.infer.chat_v4) for a directory with DeepSeek's
    tokenizer, else the default template. Nothing is written. None -> the default."""
    if run_dir is None:
        return ChatTemplate()
    from dsv4.infer.chat_v4 import V4ChatFormat, is_v4_tokenizer
    from dsv4.run import RunDir, run_folder

    run = RunDir(run_folder(run_dir))
    path = run.chat_template
    if path.exists():
        try:
            d = json.loads(path.read_text())
            if isinstance(d, dict) and d.get("format") == "deepseek-v4":
                return V4ChatFormat(**{k: v for k, v in d.items() if k != "format"})
            return ChatTemplate.from_dict(d)
        except json.JSONDecodeError as e:
            raise ChatError(f"{path}: not valid JSON ({e})") from None
        except TypeError as e:
            raise ChatError(f"{path}: {e}") from None
    if run.tokenizer.exists() and is_v4_tokenizer(run.tokenizer):
        return V4ChatFormat()
    return ChatTemplate()


def render(messages: object, template: ChatTemplate | None = None, add_generation_prompt: bool = True) -> str:
    """Render with the given (default) template."""
    return (template or ChatTemplate()).render(messages, add_generation_prompt)
