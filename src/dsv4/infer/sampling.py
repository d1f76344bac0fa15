"""Sampling parameters and the per-request sampler (temperature, top-k, top-p, seed).

p = softmax(logits / T) restricted to the k most likely tokens, then to the smallest set whose mass
reaches top_p (nucleus sampling, Holtzman et al. 2019), renormalised; T = 0 is greedy (argmax).

Whatever device the model runs on, the distribution is built and drawn from on the CPU with the
request's CPU generator (one [V] row per token; greedy only moves the argmax), so a seed gives the
same draw on every device.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0              # 0 = no top-k filter
    top_p: float = 1.0
    seed: int | None = None     # None = a fresh random seed
    stop: list[str] = field(default_factory=list)            # stop strings (not included in the output)
    stop_token_ids: list[int] = field(default_factory=list)  # stop tokens (not included in the output)
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])

    def validate(self, vocab_size: int | None = None) -> "SamplingParams":
        """Raise ValueError naming the bad field."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise ValueError(f"max_tokens must be an integer >= 0, got {self.max_tokens!r}")
        if not (self.temperature >= 0) or self.temperature != self.temperature:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        if vocab_size is not None and any(not 0 <= t < vocab_size for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be in [0, {vocab_size}), got {self.stop_token_ids!r}")
        return self

    def generator(self, device="cpu") -> torch.Generator:
        seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        return torch.Generator(device=device).manual_seed(seed)


def probabilities(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """logits [V] (any device) -> the distribution the sampler draws from (fp32, on the CPU; one-hot for
    greedy)."""
    logits = logits.detach().float().cpu()
    if p.temperature <= 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / p.temperature
    if 0 < p.top_k < logits.shape[-1]:
        kth = logits.topk(p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if p.top_p < 1:
        sp, si = probs.sort(descending=True)
        keep = sp.cumsum(-1) - sp < p.top_p   # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter_(-1, si, sp * keep)
        probs = probs / probs.sum()
    return probs


def sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    """One token id from logits [V] (any device; `gen` is a CPU generator)."""
    if p.temperature <= 0:
        return int(logits.argmax())
    return int(torch.multinomial(probabilities(logits, p), 1, generator=gen))
