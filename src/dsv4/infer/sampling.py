"""Sampling parameters and the per-request sampler (temperature, top-k, top-p, seed, penalties, logit bias).

p = softmax(logits / T) restricted to the k most likely tokens, then to the smallest set whose mass
reaches top_p (nucleus sampling, Holtzman et al. 2019), renormalised; T = 0 is greedy (argmax).

Before that, OpenAI's logit adjustments (adjust_logits, batched over rows): with c[t] the count of
token t in the request's output so far,
    logits[t] += logit_bias[t] - presence_penalty * (c[t] > 0) - frequency_penalty * c[t].
A request that leaves all three at their defaults is sampled from its logits untouched.

Whatever device the model runs on, the distribution is built and drawn from on the CPU with the
request's CPU generator (one [V] row per token; greedy only moves the argmax), so a seed gives the
same draw on every device. `sample` is the one token choice of the engine, the speculative decoder and
the reference generator (dsv4.infer.reference).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field

import torch

SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes 0 <= seed < 2**64
PENALTY_LIMIT = 2.0  # |presence_penalty|, |frequency_penalty| (as OpenAI)
BIAS_LIMIT = 100.0  # |logit_bias[t]| (as OpenAI)


class ParamError(ValueError):
    """A bad sampling parameter; `param` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0
    seed: int | None = None  # None = a fresh random seed
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the output)
    stop_token_ids: list[int] = field(default_factory=list)  # stop tokens (not included in the output)
    ignore_eos: bool = False
    frequency_penalty: float = 0.0  # subtracted once per occurrence of a token in the output so far
    presence_penalty: float = 0.0  # subtracted once from every token already in the output
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = dict(self.logit_bias or {})

    @property
    def adjusts_logits(self) -> bool:
        """Whether a penalty or a logit bias is set (otherwise adjust_logits leaves the row alone)."""
        return bool(self.frequency_penalty or self.presence_penalty or self.logit_bias)

    def validate(self, vocab_size: int | None = None) -> SamplingParams:
        """Raise ParamError (a ValueError) naming the bad field."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise ParamError("max_tokens", f"max_tokens must be an integer >= 0, got {self.max_tokens!r}")
        if not (self.temperature >= 0) or self.temperature != self.temperature:
            raise ParamError("temperature", f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ParamError("top_k", f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not (0 < self.top_p <= 1):
            raise ParamError("top_p", f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < SEED_LIMIT
        ):
            raise ParamError("seed", f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ParamError("stop", f"stop must be non-empty strings, got {self.stop!r}")
        if vocab_size is not None and any(not 0 <= t < vocab_size for t in self.stop_token_ids):
            raise ParamError(
                "stop_token_ids", f"stop_token_ids must be in [0, {vocab_size}), got {self.stop_token_ids!r}"
            )
        for name in ("frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            if not _number(v) or abs(v) > PENALTY_LIMIT:
                raise ParamError(name, f"{name} must be a number in [-2, 2], got {v!r}")
        for t, b in self.logit_bias.items():
            if isinstance(t, bool) or not isinstance(t, int) or t < 0 or (vocab_size is not None and t >= vocab_size):
                raise ParamError("logit_bias", f"logit_bias keys must be token ids in [0, {vocab_size}), got {t!r}")
            if not _number(b) or abs(b) > BIAS_LIMIT:
                raise ParamError("logit_bias", f"logit_bias values must be numbers in [-100, 100], got {b!r}")
        return self

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        return torch.Generator(device=device).manual_seed(seed)


def adjust_logits(logits: torch.Tensor, params: list[SamplingParams], outputs: list[list[int]]) -> torch.Tensor:
    """logits [B, V] with row b's logit bias and penalties applied (counts from outputs[b]), batched.
    Rows that adjust nothing keep their values; if no row adjusts, `logits` itself comes back, otherwise
    a new fp32 tensor (the conversion is exact, so untouched rows sample as before)."""
    rows = [b for b, p in enumerate(params) if p.adjusts_logits]
    if not rows:
        return logits
    out = logits.to(torch.float32, copy=True)
    dev, n, vocab = out.device, len(rows), out.shape[-1]
    counts = torch.zeros(n, vocab, device=dev)
    ri = [i for i, b in enumerate(rows) for _ in outputs[b]]
    if ri:
        ti = torch.tensor([t for b in rows for t in outputs[b]], device=dev)
        counts.index_put_((torch.tensor(ri, device=dev), ti), torch.ones(len(ri), device=dev), accumulate=True)
    bias = torch.zeros(n, vocab, device=dev)
    bi = [(i, t, v) for i, b in enumerate(rows) for t, v in params[b].logit_bias.items()]
    if bi:
        i, t, v = zip(*bi)
        bias[torch.tensor(i, device=dev), torch.tensor(t, device=dev)] = torch.tensor(v, device=dev)
    pres = torch.tensor([params[b].presence_penalty for b in rows], device=dev)[:, None]
    freq = torch.tensor([params[b].frequency_penalty for b in rows], device=dev)[:, None]
    idx = torch.tensor(rows, device=dev)
    out[idx] = out[idx] - (pres * (counts > 0) + freq * counts) + bias
    return out


def adjust_logits_reference(logits: torch.Tensor, p: SamplingParams, output: list[int]) -> torch.Tensor:
    """One row [V], token by token (the plain formula adjust_logits must match)."""
    out = logits.to(torch.float32, copy=True)
    for t, c in Counter(output).items():
        out[t] -= p.presence_penalty + p.frequency_penalty * c
    for t, b in p.logit_bias.items():
        out[t] += b
    return out


def _one_hot(logits: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()


def probabilities(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """logits [V] (any device) -> the distribution the sampler draws from (fp32, on the CPU; one-hot for
    greedy)."""
    logits = logits.detach().float().cpu()
    if p.temperature <= 0:
        return _one_hot(logits)
    raw, logits = logits, logits / p.temperature
    if 0 < p.top_k < logits.shape[-1]:
        kth = logits.topk(p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if not torch.isfinite(probs).all():  # T so small that logits / T overflow: its T -> 0 limit, greedy
        return _one_hot(raw)
    if p.top_p < 1:
        sp, si = probs.sort(descending=True)
        keep = sp.cumsum(-1) - sp < p.top_p  # keeps the most likely token ...
        keep[0] = True  # ... even when top_p rounds to 0 in fp32
        probs = torch.zeros_like(probs).scatter_(-1, si, sp * keep)
        probs = probs / probs.sum()
    return probs


def sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    """One token id from logits [V] (any device; `gen` is a CPU generator)."""
    if p.temperature <= 0:
        return int(logits.argmax())
    return int(torch.multinomial(probabilities(logits, p), 1, generator=gen))
