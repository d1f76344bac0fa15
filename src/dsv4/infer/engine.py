"""The inference engine: chunked prefill, then batched decode of many requests (continuous batching).

Each request owns one row (slot) of a `ModelCache`. A step (1) admits waiting requests into free
rows, (2) runs one prefill chunk of every request still reading its prompt, (3) runs ONE decode
forward for all requests that are generating, whatever their lengths (mixed-length decode), and
samples each row with its own parameters and generator (logit bias and penalties applied batched first,
see dsv4.infer.sampling.adjust_logits). Finished requests free their row at once, so new ones join the
running batch on the next step. Optional MTP speculative decoding (dsv4.infer.speculative) replaces (3)
for requests at temperature-independent exactness; requests with a logit bias or penalties take (3).

`Engine` is single-threaded; `BackgroundEngine` runs it in a thread for the server and admits at most
max_batch + max_waiting unfinished requests (one per row plus a bounded waiting queue).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch

from dsv4.infer.cache import ModelCache
from dsv4.infer.sampling import SamplingParams, adjust_logits, sample

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from dsv4.infer.compiled import CompiledDecoder
    from dsv4.infer.speculative import MTPSpeculator
    from dsv4.model.transformer import Transformer


class QueueFull(RuntimeError):
    """The waiting queue is full; retry later (HTTP 503)."""


class Detokenizer:
    """Incremental UTF-8 text of a growing id list: only complete characters are released."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        from dsv4.data.tokenizer import ids_to_bytes

        self.tok, self.to_bytes, self.buf = tokenizer, ids_to_bytes, b""

    def push(self, ids: list[int]) -> str:
        self.buf += self.to_bytes(self.tok, ids)
        for cut in range(len(self.buf), max(len(self.buf) - 4, -1), -1):  # a UTF-8 char is <= 4 bytes
            try:
                text = self.buf[:cut].decode("utf-8")
            except UnicodeDecodeError:
                continue
            self.buf = self.buf[cut:]
            return text
        text, self.buf = self.buf.decode("utf-8", errors="replace"), b""  # not UTF-8 at all
        return text

    def flush(self) -> str:
        text, self.buf = self.buf.decode("utf-8", errors="replace"), b""
        return text


@dataclass
class Event:
    """What a step produced for one request: new token ids, new text (None without a tokenizer),
    and, on the last event, finish_reason ("stop", "length" or "abort")."""

    request_id: int
    token_ids: list[int]
    text: str | None
    finish_reason: str | None = None


@dataclass
class Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None] | None = None
    output: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already emitted
    row: int | None = None
    fed: int = 0  # prompt tokens already in the cache
    pending: int | None = None  # sampled, not yet fed to the model
    finish_reason: str | None = None
    gen: torch.Generator | None = None
    detok: Detokenizer | None = None
    t_arrival: float = field(default_factory=time.perf_counter)
    t_first: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Engine:
    """model: a Transformer (eval); tokenizer: optional (text + stop strings); max_batch: cache rows;
    max_context: tokens per request (prompt + output; default the model's limit); prefill_chunk:
    prompt tokens per forward; cache_dtype: kv / entries storage (default the model's dtype);
    speculative: draft with the model's MTP block and verify (needs num_nextn_predict_layers >= 1);
    compile: decode steps through dsv4.infer.compiled.CompiledDecoder (compiles on first use)."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer | None = None,
        max_batch: int = 8,
        max_context: int | None = None,
        prefill_chunk: int = 2048,
        cache_dtype: torch.dtype | None = None,
        speculative: bool = False,
        eos_id: int | None = None,
        compile: bool = False,
    ) -> None:
        if max_batch < 1 or prefill_chunk < 1:
            raise ValueError(f"max_batch and prefill_chunk must be >= 1, got {max_batch}, {prefill_chunk}")
        self.model, self.tok = model.eval(), tokenizer
        self.cfg, self.max_batch = model.cfg, max_batch
        self.device = next(model.parameters()).device  # inputs are made here; sampling runs on the CPU
        self.max_context = min(max_context or self.cfg.max_position_embeddings, self.cfg.max_position_embeddings)
        self.prefill_chunk = prefill_chunk
        self.eos_id = self.cfg.eos_token_id if eos_id is None else eos_id
        self.cache = ModelCache(model, batch=max_batch, capacity=min(self.max_context, 4096), dtype=cache_dtype)
        self.free_rows = list(range(max_batch))
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._ids = itertools.count()
        self.spec: MTPSpeculator | None = None
        if speculative:
            from dsv4.infer.speculative import MTPSpeculator

            self.spec = MTPSpeculator(self)
        self.stats = dict(steps=0, decode_tokens=0, prefill_tokens=0, drafted=0, accepted=0)
        self.decoder: CompiledDecoder | None = None
        if compile:  # decode steps through torch.compile (one compilation per batch size and store size)
            if any(getattr(m, "compile_safe", True) is False for m in model.modules()):
                raise ValueError(
                    "--compile cannot trace this model: its routed experts are streamed from the shards "
                    "(--max-resident-gb) by Python reads"
                )
            from dsv4.infer.compiled import CompiledDecoder

            self.decoder = CompiledDecoder(model)

    # ------------------------------------------------------------------ requests
    def add(
        self, prompt: list[int], params: SamplingParams | None = None, on_event: Callable[[Event], None] | None = None
    ) -> Request:
        """Validate and queue a request (ValueError names what is wrong)."""
        req = self.make_request(prompt, params, on_event)
        self.waiting.append(req)
        return req

    def make_request(
        self, prompt: list[int], params: SamplingParams | None = None, on_event: Callable[[Event], None] | None = None
    ) -> Request:
        """A validated Request, not queued yet."""
        params = (params or SamplingParams()).validate(self.cfg.vocab_size)
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("the prompt is empty")
        if any(not 0 <= t < self.cfg.vocab_size for t in prompt):
            raise ValueError(f"prompt token ids must be in [0, {self.cfg.vocab_size})")
        if len(prompt) >= self.max_context:
            raise ValueError(
                f"the prompt has {len(prompt)} tokens; the context holds {self.max_context} "
                f"(prompt + output), so at most {self.max_context - 1} prompt tokens fit"
            )
        if params.stop and self.tok is None:
            raise ValueError("stop strings need a tokenizer")
        return Request(
            next(self._ids),
            prompt,
            params,
            on_event,
            gen=params.generator(),
            detok=Detokenizer(self.tok) if self.tok is not None else None,
        )

    def abort(self, request_id: int) -> None:
        for req in list(self.waiting) + self.running:
            if req.id == request_id and not req.finished:
                self._finish(req, "abort", [])

    def abort_all(self) -> None:
        """Finish every waiting and running request with reason "abort" (after an engine failure)."""
        for req in list(self.waiting) + list(self.running):
            self._finish(req, "abort", [])

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self) -> list[Event]:
        events: list[Event] = []
        while self.waiting and self.free_rows:
            req = self.waiting.popleft()
            if req.finished:
                continue
            req.row = self.free_rows.pop(0)
            self.cache.reset([req.row])
            self.running.append(req)
            if req.params.max_tokens == 0:
                self._finish(req, "length", events)
        for req in [r for r in self.running if r.fed < len(r.prompt)]:
            self._prefill_chunk(req, events)
        ready = [r for r in self.running if r.fed == len(r.prompt) and r.pending is not None]
        if ready and self.spec is not None:  # the speculator does not adjust logits (bias, penalties):
            spec = [r for r in ready if not r.params.adjusts_logits]  # requests that need it decode plainly
            if spec:
                self.spec.step(spec, events)
            ready = [r for r in ready if r.params.adjusts_logits]
        if ready:
            self._decode(ready, events)
        self.stats["steps"] += 1
        return events

    def _prefill_chunk(self, req: Request, events: list[Event]) -> None:
        chunk = req.prompt[req.fed : req.fed + self.prefill_chunk]
        last = req.fed + len(chunk) == len(req.prompt)
        out = self.model(
            torch.tensor([chunk], device=self.device),
            cache=self.cache,
            rows=[req.row],
            last_only=True,
            compute_logits=last,
        )
        if self.spec is not None:
            self.spec.after_prefill(req, chunk, out)
        req.fed += len(chunk)
        self.stats["prefill_tokens"] += len(chunk)
        if last:
            assert req.gen is not None  # set by make_request
            logits = adjust_logits(out.logits[0, -1:].cpu(), [req.params], [req.output])
            self.accept(req, [sample(logits[0], req.params, req.gen)], events)

    def _decode(self, reqs: list[Request], events: list[Event]) -> None:
        ids = torch.tensor([[r.pending] for r in reqs], device=self.device)
        rows = cast("list[int]", [r.row for r in reqs])  # running requests own a row
        if self.decoder is not None:
            logits = self.decoder(ids, self.cache, rows).cpu()
        else:
            logits = self.model(ids, cache=self.cache, rows=rows, last_only=True).logits[:, -1].cpu()
        # (one device -> host copy per step: a no-op on the CPU)
        logits = adjust_logits(logits, [r.params for r in reqs], [r.output for r in reqs])
        self.stats["decode_tokens"] += len(reqs)
        for i, r in enumerate(reqs):
            assert r.gen is not None  # set by make_request
            r.pending = None
            self.accept(r, [sample(logits[i], r.params, r.gen)], events)

    # ------------------------------------------------------------------ outputs
    def context_len(self, req: Request) -> int:
        return int(self.cache.lengths[req.row]) if req.row is not None else 0

    def accept(self, req: Request, tokens: list[int], events: list[Event]) -> None:
        """Append sampled tokens (in order) and stop at eos / stop token / stop string / limits. Public for the
        decoders that produce tokens outside Engine.step's plain path (dsv4.infer.speculative)."""
        if req.t_first is None:
            req.t_first = time.perf_counter()
        new: list[int]
        reason: str | None
        new, reason = [], None
        p = req.params
        for t in tokens:
            if (t == self.eos_id and not p.ignore_eos) or t in p.stop_token_ids:
                reason = "stop"
                break
            new.append(t)
            if len(req.output) + len(new) >= p.max_tokens:
                reason = "length"
                break
            if len(req.prompt) + len(req.output) + len(new) >= self.max_context:
                reason = "length"
                break
        req.output += new
        text = None
        if req.detok is not None:
            req.text += req.detok.push(new)
            if p.stop:
                hit = [i for i in (req.text.find(s, max(0, req.sent - len(s) + 1)) for s in p.stop) if i >= 0]
                if hit:
                    req.text, reason = req.text[: min(hit)], "stop"
            if reason is None and p.stop:
                hold = max(len(s) for s in p.stop) - 1  # a stop string may still be completing
                upto = max(req.sent, len(req.text) - hold)
            else:
                if reason is not None:
                    req.text += req.detok.flush()
                upto = len(req.text)
            text, req.sent = req.text[req.sent : upto], upto
        if reason is None:
            req.pending = new[-1]
        if new or text or reason:
            ev = Event(req.id, new, text, reason)
            if reason is not None:
                self._release(req, reason)
            self._emit(req, ev, events)

    def _finish(self, req: Request, reason: str, events: list[Event]) -> None:
        text = None
        if req.detok is not None:
            rest = req.text + req.detok.flush()
            text, req.text, req.sent = rest[req.sent :], rest, len(rest)
        self._release(req, reason)
        self._emit(req, Event(req.id, [], text, reason), events)

    def _release(self, req: Request, reason: str) -> None:
        req.finish_reason, req.pending = reason, None
        if self.spec is not None:
            self.spec.pending_x.pop(req.id, None)
        if req in self.running:
            assert req.row is not None  # a running request owns a row
            self.running.remove(req)
            self.free_rows.append(req.row)
            self.free_rows.sort()
        elif req in self.waiting:
            self.waiting.remove(req)

    @staticmethod
    def _emit(req: Request, ev: Event, events: list[Event]) -> None:
        events.append(ev)
        if req.on_event is not None:
            req.on_event(ev)

    # ------------------------------------------------------------------ convenience
    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[Request]:
        """Run the given prompts to completion (batched); returns the finished requests in order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        reqs = [self.add(p, sp) for p, sp in zip(prompts, plist)]
        while not all(r.finished for r in reqs):
            self.step()
        return reqs

    def stream(self, prompt: list[int], params: SamplingParams | None = None) -> Iterator[Event]:
        """Yield the Events of one request as they are produced (other requests keep running)."""
        req = self.add(prompt, params)
        while not req.finished:
            for ev in self.step():
                if ev.request_id == req.id:
                    yield ev


class BackgroundEngine:
    """Runs an Engine in a daemon thread. submit() is thread-safe; on_event is called from the engine
    thread. At most engine.max_batch + max_waiting requests may be unfinished (one per cache row, the
    others waiting for a row, wherever they are: inbox, waiting queue or row); beyond that submit()
    raises QueueFull."""

    def __init__(self, engine: Engine, max_waiting: int = 64) -> None:
        self.engine, self.max_waiting = engine, max_waiting
        self._cv = threading.Condition()  # an RLock: an abort under it may finish a request (on_event)
        self._inbox: list[tuple[str, Any]] = []
        self._active = 0  # submitted and not finished (counted under _cv)
        self._stop = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="dsv4-engine", daemon=True)
        self._thread.start()

    @property
    def capacity(self) -> int:
        """Unfinished requests admitted at once: one per row plus max_waiting."""
        return self.engine.max_batch + self.max_waiting

    def submit(self, prompt: list[int], params: SamplingParams, on_event: Callable[[Event], None]) -> Request:
        def tracked(ev: Event) -> None:  # engine thread: the last event frees an admission slot
            if ev.finish_reason is not None:
                with self._cv:
                    self._active -= 1
            if on_event is not None:
                on_event(ev)

        with self._cv:
            if self._active >= self.capacity:
                raise QueueFull(
                    f"{self._active} requests are running or waiting (at most "
                    f"{self.engine.max_batch} running + {self.max_waiting} waiting)"
                )
            # validation errors surface here, in the caller's thread; the engine thread owns `waiting`
            req = self.engine.make_request(prompt, params, tracked)
            self._active += 1
            self._inbox.append(("add", req))
            self._cv.notify()
        return req

    def abort(self, request_id: int) -> None:
        with self._cv:
            self._inbox.append(("abort", request_id))
            self._cv.notify()

    def load(self) -> dict:
        e = self.engine
        return {
            "running": len(e.running),
            "waiting": len(e.waiting),
            "free_rows": len(e.free_rows),
            "active": self._active,
            "capacity": self.capacity,
        }

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._inbox and not self.engine.has_work():
                    self._cv.wait()
                if self._stop:
                    return
                inbox, self._inbox = self._inbox, []
                for kind, arg in inbox:
                    if kind == "add":
                        self.engine.waiting.append(arg)
                    else:
                        self.engine.abort(arg)
            try:
                self.engine.step()
            except Exception as exc:  # fail every request rather than hang their clients
                self.error = exc
                self.engine.abort_all()
