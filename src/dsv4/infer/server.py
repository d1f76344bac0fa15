"""An OpenAI-compatible HTTP server over a BackgroundEngine (FastAPI + uvicorn).

  GET  /health                 engine load; 503 once the engine thread has failed
  GET  /v1/models              the one served model
  POST /v1/completions         prompt (string or token ids) -> text
  POST /v1/chat/completions    messages (rendered with the run's chat template) -> assistant message

Both POST endpoints stream server-sent events with "stream": true, as the OpenAI API does
(`data: {json}` chunks, then `data: [DONE]`). Errors are OpenAI-shaped:
{"error": {"message", "type", "param", "code"}}; no client input gives a 5xx other than 503 (overloaded):
bodies that are not JSON objects, NaN / Infinity literals, nesting deeper than MAX_DEPTH, strings that
are not Unicode (lone surrogates) and wrong types or ranges are 400s naming the field.

Admission: at most max_batch + max_waiting unfinished requests (BackgroundEngine); more get 503.

Threading: the engine runs in its own thread; each request owns an asyncio.Queue that the engine
thread fills through loop.call_soon_threadsafe. A request whose client goes away (a closed stream, or
a dropped connection while a non-streamed answer is computed) is aborted, so its cache row is freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsv4.infer.chat import ChatError, ChatTemplate
from dsv4.infer.chat_v4 import V4ChatFormat, V4StreamSplitter, with_call_id
from dsv4.infer.engine import BackgroundEngine, Event, QueueFull
from dsv4.infer.sampling import BIAS_LIMIT, PENALTY_LIMIT, ParamError, SamplingParams

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from dsv4.infer.engine import Request as EngineRequest

_T = TypeVar("_T")

DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks that its client is still there
MAX_DEPTH = 64  # deeper JSON nesting in a request body is refused (400)


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)


# ---------------------------------------------------------------------------- request parsing
def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _show(v: object, limit: int = 60) -> str:
    """A short one-line repr of client input for an error message."""
    r = repr(v)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, e.g. the JSON escape "\ud83d" alone
        return False
    return True


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v):
        raise ValueError(f"{_show(s)} overflows a double")
    return v


def parse_body(raw: bytes) -> dict:
    """A request body -> a JSON object of Unicode strings nested at most MAX_DEPTH deep (else APIError 400)."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, NaN / Infinity, a too long integer
        raise _bad(f"the request body is not valid JSON ({e})", None, "invalid_json") from None
    except RecursionError:
        raise _bad(
            f"the request body is nested too deeply (at most {MAX_DEPTH} levels)", None, "invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise _bad(f"the request body must be a JSON object, got {type(body).__name__}", None, "invalid_json")
    for name, value in body.items():
        param = name if name.isprintable() and len(name) <= 100 else name[:100].encode("unicode_escape").decode()
        stack = [(name, 0), (value, 1)]
        while stack:  # iterative: a deep body cannot exhaust the stack here
            v, depth = stack.pop()
            if depth > MAX_DEPTH:
                raise _bad(f"'{param}' is nested more than {MAX_DEPTH} levels deep", param)
            if isinstance(v, str):
                if not _utf8(v):
                    raise _bad(f"'{param}' holds a string that is not valid Unicode (a lone surrogate)", param)
            elif isinstance(v, list):
                stack.extend((x, depth + 1) for x in v)
            elif isinstance(v, dict):
                stack.extend(kv for k, x in v.items() for kv in ((k, depth), (x, depth + 1)))
    return body


def _get_int(body: dict, name: str, default: _T, minimum: int | None = None) -> int | _T:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise _bad(f"'{name}' must be an integer, got {_show(v)}", name)
    if minimum is not None and v < minimum:
        raise _bad(f"'{name}' must be >= {minimum}, got {_show(v)}", name, "invalid_value")
    return v


def _get_float(
    body: dict, name: str, default: float, lo: float | None = None, hi: float | None = None, lo_open: bool = False
) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and math.isnan(v)):
        raise _bad(f"'{name}' must be a number, got {_show(v)}", name)
    try:
        f = float(v)
    except OverflowError:  # an integer beyond any double
        f = math.inf if v > 0 else -math.inf
    if (lo is not None and (f < lo or (lo_open and f == lo))) or (hi is not None and f > hi) or math.isinf(f):
        rng = f"{'(' if lo_open else '['}{lo}, " + (f"{hi}]" if hi is not None else "inf)")
        raise _bad(f"'{name}' must be a finite number in {rng}, got {_show(v)}", name, "invalid_value")
    return f


def _get_bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(f"'{name}' must be a boolean, got {_show(v)}", name)
    return v


def _get_logit_bias(body: dict, vocab_size: int) -> dict[int, float]:
    """{"token id": bias} -> {id: bias}; ids in [0, vocab_size), biases in [-100, 100]."""
    v = body.get("logit_bias")
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _bad(f"'logit_bias' must be an object mapping token ids to numbers, got {_show(v)}", "logit_bias")
    out = {}
    for k, b in v.items():
        if not (k.isascii() and k.isdigit() and len(k) <= 20 and int(k) < vocab_size):
            raise _bad(f"logit_bias keys must be token ids in [0, {vocab_size}), got {_show(k)}", "logit_bias")
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not -BIAS_LIMIT <= b <= BIAS_LIMIT:
            raise _bad(f"logit_bias values must be numbers in [-100, 100], got {_show(b)} for token {k}", "logit_bias")
        out[int(k)] = float(b)
    return out


def _get_stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or any(not isinstance(s, str) for s in v):
        raise _bad("'stop' must be a string or a list of strings", "stop")
    return [s for s in v if s]


class Server:
    """The state behind the FastAPI app (one engine, one tokenizer, one model name)."""

    def __init__(
        self,
        engine_bg: BackgroundEngine,
        tokenizer: Tokenizer,
        model_name: str,
        api_key: str | None = None,
        max_context: int | None = None,
        chat_template: ChatTemplate | V4ChatFormat | None = None,
        default_max_tokens: int = 256,
        retry_after_s: int = 1,
    ) -> None:
        self.bg, self.tok, self.model_name, self.api_key = engine_bg, tokenizer, model_name, api_key
        eng = engine_bg.engine
        self.max_context = min(max_context or eng.max_context, eng.max_context)
        self.vocab_size = eng.cfg.vocab_size
        self.template: ChatTemplate | V4ChatFormat = chat_template or ChatTemplate()
        self.default_max_tokens, self.retry_after_s = default_max_tokens, retry_after_s
        self.created = int(time.time())
        self.max_token_bytes = max_token_bytes(tokenizer)

    # ------------------------------------------------------------------ checks
    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode("latin-1"), self.api_key.encode()
        ):
            raise APIError(
                401,
                "Incorrect API key provided. Pass it as 'Authorization: Bearer KEY'."
                if auth
                else "You didn't provide an API key. Pass it as 'Authorization: Bearer KEY'.",
                "invalid_request_error",
                None,
                "invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is None:
            raise _bad("you must provide a model parameter", "model")
        if not isinstance(model, str):
            raise _bad(f"'model' must be a string, got {_show(model)}", "model")
        if model != self.model_name:
            raise model_not_found(model, self.model_name)

    def check_unsupported(self, body: dict, chat: bool = False) -> None:
        """400 for the OpenAI fields this server does not implement (rather than ignoring them). Tools are
        implemented by chat requests to a model with DeepSeek-V4's chat format."""
        rf = body.get("response_format")
        if rf is not None and rf != {"type": "text"}:
            raise _bad('response_format is not supported (only {"type": "text"})', "response_format")
        tools_ok = chat and isinstance(self.template, V4ChatFormat)
        for name in ("tools", "functions"):
            if body.get(name) and not (tools_ok and name == "tools"):
                raise _bad(f"{name} are not supported" + (" by this model's chat format" if chat else ""), name)
        if body.get("suffix"):
            raise _bad("suffix is not supported", "suffix")

    async def read_json(self, request: Request) -> dict:
        return parse_body(await request.body())

    def sampling(
        self,
        body: dict,
        prompt_len: int,
        max_tokens_default: int | None,
        max_tokens_names: Sequence[str] = ("max_tokens",),
    ) -> SamplingParams:
        n = _get_int(body, "n", 1)
        if n != 1:
            raise _bad(f"only n=1 is supported, got n={n}", "n", "invalid_value")
        best_of = _get_int(body, "best_of", 1)
        if best_of != 1:
            raise _bad("best_of is not supported", "best_of")
        if body.get("logprobs") not in (None, False) or body.get("top_logprobs") is not None:
            raise _bad("logprobs are not supported", "logprobs")
        if body.get("echo"):
            raise _bad("echo is not supported", "echo")
        name, max_tokens = max_tokens_names[0], None
        for nm in max_tokens_names:
            if body.get(nm) is not None:
                name, max_tokens = nm, _get_int(body, nm, None, 0)
                break
        room = self.max_context - prompt_len
        if max_tokens is None:
            max_tokens = min(room, max_tokens_default if max_tokens_default is not None else room)
        elif prompt_len + max_tokens > self.max_context:
            raise _bad(
                f"This model's maximum context length is {self.max_context} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt; {max_tokens} for the "
                f"completion). Please reduce the prompt or the completion length.",
                name,
                "context_length_exceeded",
            )
        top_k = _get_int(body, "top_k", 0)
        if top_k == -1:  # vLLM's "no top-k"
            top_k = 0
        if top_k < 0:
            raise _bad(f"'top_k' must be >= 0 (or -1), got {top_k}", "top_k", "invalid_value")
        stop_ids = body.get("stop_token_ids")
        stop_ids = [] if stop_ids is None else stop_ids
        if not isinstance(stop_ids, list) or any(
            isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size for t in stop_ids
        ):
            raise _bad(f"'stop_token_ids' must be a list of token ids in [0, {self.vocab_size})", "stop_token_ids")
        penalty = (-PENALTY_LIMIT, PENALTY_LIMIT)
        p = SamplingParams(
            max_tokens=max_tokens,
            temperature=_get_float(body, "temperature", 1.0, 0.0),
            top_k=top_k,
            top_p=_get_float(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
            seed=_get_int(body, "seed", None),
            stop=_get_stop(body),
            stop_token_ids=stop_ids,
            ignore_eos=_get_bool(body, "ignore_eos"),
            frequency_penalty=_get_float(body, "frequency_penalty", 0.0, *penalty),
            presence_penalty=_get_float(body, "presence_penalty", 0.0, *penalty),
            logit_bias=_get_logit_bias(body, self.vocab_size),
        )
        try:
            return p.validate(self.vocab_size)
        except ParamError as e:
            raise _bad(str(e), e.param, "invalid_value") from None

    def check_prompt_len(self, n: int, param: str, at_least: bool = False) -> None:
        if n == 0:
            raise _bad(f"the {param} is empty", param)
        if n >= self.max_context:
            raise _bad(
                f"This model's maximum context length is {self.max_context} tokens. However, your "
                f"{param} has {'at least ' if at_least else ''}{n} tokens (at most {self.max_context - 1} "
                f"fit, leaving room for one generated token). Please reduce the length of the {param}.",
                param,
                "context_length_exceeded",
            )

    def check_text_len(self, text: str, param: str) -> None:
        """Refuse, without tokenizing it, a text too long for the context whatever its tokens."""
        if self.max_token_bytes and len(text) >= self.max_context:
            n = len(text.encode("utf-8")) // self.max_token_bytes
            if n >= self.max_context:
                self.check_prompt_len(n, param, at_least=True)

    def prompt_ids(self, body: dict) -> list[int]:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]  # a batch of one prompt
        if isinstance(p, str):
            self.check_text_len(p, "prompt")
            return list(self.tok.encode(p).ids)
        if isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            if any(not 0 <= t < self.vocab_size for t in p):
                raise _bad(f"prompt token ids must be in [0, {self.vocab_size})", "prompt")
            return list(p)
        if p is None:
            raise _bad("you must provide a prompt", "prompt")
        if isinstance(p, list) and len(p) > 1 and all(isinstance(x, (str, list)) for x in p):
            raise _bad("only one prompt per request is supported (a string or a list of token ids)", "prompt")
        raise _bad("'prompt' must be a string or a list of token ids", "prompt")

    # ------------------------------------------------------------------ running a request
    def submit(self, prompt: list[int], params: SamplingParams) -> tuple[EngineRequest, asyncio.Queue[Event]]:
        """(request, asyncio.Queue of Events). Raises APIError 503 when the queue is full."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[Event] = asyncio.Queue()

        def on_event(ev: Event) -> None:  # engine thread
            with contextlib.suppress(RuntimeError):  # the event loop is closed (server shutting down)
                loop.call_soon_threadsafe(q.put_nowait, ev)

        try:
            req = self.bg.submit(prompt, params, on_event)
        except QueueFull as e:
            raise APIError(
                503,
                f"The server is overloaded ({e}); retry after {self.retry_after_s} s.",
                "server_error",
                None,
                "overloaded",
                headers={"Retry-After": str(self.retry_after_s)},
            ) from None
        except ParamError as e:
            raise _bad(str(e), e.param) from None
        except ValueError as e:
            raise _bad(str(e), "prompt") from None
        return req, q

    async def collect(self, request: Request, req: EngineRequest, q: asyncio.Queue[Event]) -> tuple[str, str]:
        """Wait for the whole answer (text, finish_reason); abort if the client goes away."""
        parts, reason = [], None
        next_check = time.monotonic() + DISCONNECT_POLL_S
        try:
            while reason is None:
                try:
                    ev = await asyncio.wait_for(q.get(), DISCONNECT_POLL_S)
                    parts.append(ev.text or "")
                    reason = ev.finish_reason
                except asyncio.TimeoutError:
                    pass
                if reason is None and time.monotonic() >= next_check:
                    if await request.is_disconnected():
                        break
                    next_check = time.monotonic() + DISCONNECT_POLL_S
        finally:
            if reason is None:
                self.bg.abort(req.id)
        if reason is None:
            return "".join(parts), "abort"
        if reason == "abort":
            raise APIError(
                500,
                "the request was aborted by the engine" + (f" ({self.bg.error})" if self.bg.error else ""),
                "server_error",
                None,
                "engine_error",
            )
        return "".join(parts), reason

    @staticmethod
    def usage(req: EngineRequest) -> dict:
        return {
            "prompt_tokens": len(req.prompt),
            "completion_tokens": len(req.output),
            "total_tokens": len(req.prompt) + len(req.output),
        }

    def sse(
        self,
        req: EngineRequest,
        q: asyncio.Queue[Event],
        chunk: Callable[..., dict],
        include_usage: bool,
        first: dict | None = None,
        split: V4StreamSplitter | None = None,
    ) -> StreamingResponse:
        """Server-sent events: chunk(text, finish_reason) -> dict; abort the request if the client leaves.
        split: the text goes out as the splitter's deltas (reasoning, content, then tool calls at the end)."""

        def data(obj: object) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        async def gen() -> AsyncIterator[str]:
            reason = None
            try:
                if first is not None:
                    yield data(first)
                while reason is None:
                    ev = await q.get()
                    reason = ev.finish_reason
                    if reason == "abort":
                        msg = "the request was aborted by the engine" + (f" ({self.bg.error})" if self.bg.error else "")
                        yield data(error_body(msg, "server_error", None, "engine_error"))
                        break
                    if ev.text and split is None:
                        yield data(chunk(ev.text, None))
                    elif ev.text and split is not None:
                        for delta in split.feed(ev.text):
                            yield data(chunk(None, None, delta=delta))
                    if reason is not None:
                        tail = split.finish() if split is not None else []
                        for delta in tail:
                            yield data(chunk(None, None, delta=delta))
                        called = any("tool_calls" in d for d in tail) and reason == "stop"
                        yield data(chunk(None, "tool_calls" if called else reason))
                if include_usage and reason != "abort":
                    yield data(chunk(None, None, usage=self.usage(req)))
                yield "data: [DONE]\n\n"
            finally:  # GeneratorExit / CancelledError when the client disconnects
                if reason is None:
                    self.bg.abort(req.id)

        return StreamingResponse(
            gen(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    def stream_options(self, body: dict, stream: bool) -> bool:
        so = body.get("stream_options")
        if so is None:
            return False
        if not stream:
            raise _bad("stream_options is only allowed when stream is true", "stream_options")
        if not isinstance(so, dict):
            raise _bad("'stream_options' must be an object", "stream_options")
        return _get_bool(so, "include_usage")

    # ------------------------------------------------------------------ endpoints
    def model_card(self) -> dict:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "dsv4",
            "max_model_len": self.max_context,
        }

    def envelope(self, rid: str, obj: str, created: int, **fields: Any) -> dict:
        """The fields every completion object and chunk opens with, then `fields`."""
        return {
            "id": rid,
            "object": obj,
            "created": created,
            "model": self.model_name,
            "system_fingerprint": None,
        } | fields

    async def read_request(self, request: Request, chat: bool = False) -> tuple[dict, bool, bool]:
        """The checked body of a completion request -> (body, stream, include_usage)."""
        body = await self.read_json(request)
        self.check_model(body)
        self.check_unsupported(body, chat)
        stream = _get_bool(body, "stream")
        return body, stream, self.stream_options(body, stream)

    async def completions(self, request: Request) -> dict | StreamingResponse:
        body, stream, include_usage = await self.read_request(request)
        prompt = self.prompt_ids(body)
        self.check_prompt_len(len(prompt), "prompt")
        params = self.sampling(body, len(prompt), 16)
        req, q = self.submit(prompt, params)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str | None, reason: str | None, usage: dict | None = None) -> dict:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            out = self.envelope(rid, "text_completion", created, choices=[] if usage else [choice])
            if include_usage:
                out["usage"] = usage
            return out

        if stream:
            return self.sse(req, q, chunk, include_usage)
        text, reason = await self.collect(request, req, q)
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return self.envelope(rid, "text_completion", created, choices=[choice], usage=self.usage(req))

    def v4_request(self, body: dict) -> tuple[V4ChatFormat, list | None]:
        """(the format of this request, its tools) for a V4-format model: `chat_template_kwargs` {"thinking":
        bool} picks the mode; `tools` (OpenAI function tools) are written into the system prompt unless
        `tool_choice` is "none"."""
        fmt = self.template
        assert isinstance(fmt, V4ChatFormat)
        kwargs = body.get("chat_template_kwargs")
        if kwargs is not None:
            if not isinstance(kwargs, dict) or set(kwargs) - {"thinking"}:
                raise _bad('chat_template_kwargs takes only {"thinking": true|false}', "chat_template_kwargs")
            fmt = dataclasses.replace(fmt, thinking=_get_bool(kwargs, "thinking", fmt.thinking))
        tools = body.get("tools")
        if tools is None:
            return fmt, None
        if not isinstance(tools, list) or not all(
            isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) for t in tools
        ):  # fmt: skip
            raise _bad('tools must be a list of {"type": "function", "function": {"name": ...}} objects', "tools")
        choice = body.get("tool_choice", "auto")
        if choice not in ("auto", "none"):
            raise _bad('tool_choice must be "auto" or "none" (forced calls are not supported)', "tool_choice")
        return fmt, (tools or None) if choice == "auto" else None

    def v4_message(self, fmt: V4ChatFormat, text: str, reason: str) -> tuple[dict, str]:
        """A V4 completion as an OpenAI message (reasoning_content, content, tool_calls) and finish_reason."""
        parsed = fmt.parse(text)
        calls = [with_call_id(c) for c in parsed["tool_calls"]]
        message: dict[str, Any] = {"role": "assistant", "content": parsed["content"], "refusal": None}
        if fmt.thinking:
            message["reasoning_content"] = parsed["reasoning_content"]
        if calls:
            message["tool_calls"] = calls
            message["content"] = parsed["content"] or None
        return message, "tool_calls" if calls and reason == "stop" else reason

    async def chat_completions(self, request: Request) -> dict | StreamingResponse:
        body, stream, include_usage = await self.read_request(request, chat=True)
        messages = body.get("messages")
        fmt, tools = self.v4_request(body) if isinstance(self.template, V4ChatFormat) else (self.template, None)
        try:
            if isinstance(fmt, V4ChatFormat):
                self.check_text_len(fmt.render(messages, tools=tools), "messages")
                prompt = fmt.encode(self.tok, messages, tools=tools)
            else:
                self.check_text_len(fmt.render(messages), "messages")
                prompt = fmt.encode(self.tok, messages)
        except ChatError as e:
            raise _bad(str(e), "messages") from None
        self.check_prompt_len(len(prompt), "messages")
        params = self.sampling(body, len(prompt), self.default_max_tokens, ("max_completion_tokens", "max_tokens"))
        params.stop = params.stop + [s for s in self.template.stop if s not in params.stop]
        req, q = self.submit(prompt, params)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str | None, reason: str | None, usage: dict | None = None, delta: dict | None = None) -> dict:
            if delta is None:
                delta = {"content": text} if text is not None else {}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            out = self.envelope(rid, "chat.completion.chunk", created, choices=[] if usage else [choice])
            if include_usage:
                out["usage"] = usage
            return out

        if stream:
            split = V4StreamSplitter(fmt) if isinstance(fmt, V4ChatFormat) else None
            first = chunk(None, None, delta={"role": "assistant", "content": ""})
            return self.sse(req, q, chunk, include_usage, first=first, split=split)
        text, reason = await self.collect(request, req, q)
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        if isinstance(fmt, V4ChatFormat):
            message, reason = self.v4_message(fmt, text, reason)
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
        return self.envelope(rid, "chat.completion", created, choices=[choice], usage=self.usage(req))


def model_not_found(model: str, served: str) -> APIError:
    shown = model if len(model) <= 100 and model.isprintable() else _show(model)
    return APIError(
        404,
        f"The model `{shown}` does not exist; this server serves `{served}`.",
        "invalid_request_error",
        "model",
        "model_not_found",
    )


def max_token_bytes(tokenizer: Tokenizer) -> int | None:
    """An upper bound on the UTF-8 bytes one token of a byte-level BPE stands for (so a text of n bytes has at
    least n / bound tokens); None for other tokenizers."""
    try:
        if type(tokenizer.pre_tokenizer).__name__ != "ByteLevel" or tokenizer.normalizer is not None:
            return None
        return max(len(t.encode("utf-8")) for t in tokenizer.get_vocab()) or None
    except (AttributeError, TypeError, ValueError):
        return None


def create_app(srv: Server) -> FastAPI:
    """The FastAPI app over one Server (its engine, tokenizer, name, limits and key)."""
    app = FastAPI(title="dsv4", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = srv

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return _error_response(_bad(f"invalid request: {e.errors()}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            error_body(str(e.detail), kind, None, None), status_code=e.status_code, headers=getattr(e, "headers", None)
        )

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse(
            error_body(f"internal server error: {type(e).__name__}: {e}", "server_error"), status_code=500
        )

    @app.get("/health")
    async def health():
        load = srv.bg.load()
        if srv.bg.error is not None:
            return JSONResponse({"status": "error", "error": str(srv.bg.error), **load}, status_code=503)
        return {"status": "ok", **load}

    @app.get("/v1/models")
    async def models(request: Request):
        srv.check_auth(request)
        return {"object": "list", "data": [srv.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        srv.check_auth(request)
        if model_id != srv.model_name:
            raise model_not_found(model_id, srv.model_name)
        return srv.model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        srv.check_auth(request)
        return await srv.completions(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        srv.check_auth(request)
        return await srv.chat_completions(request)

    return app
