"""The reference generator: recompute the whole prefix for every new token (no cache, one sequence).

It is the engine's test oracle: greedy decoding through dsv4.infer.engine (cached, batched, chunked
prefill, speculative) must give exactly its tokens. Tokens are chosen by the engine's own sampler
(dsv4.infer.sampling.sample: temperature, then nucleus top-p, drawn on the CPU), so with the same seed
the two can differ only where their logits do. Slow by design: O(T^2) work for T tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dsv4.data.tokenizer import EOS_ID
from dsv4.infer.sampling import SamplingParams, sample
from dsv4.run import load_run

if TYPE_CHECKING:
    from dsv4.model.transformer import Transformer

__all__ = ["generate", "generate_text"]


@torch.no_grad()
def generate(
    model: Transformer,
    ids: list[int],
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
    stop_at_eos: bool = True,
    *,
    generator: torch.Generator | None = None,
) -> list[int]:
    """The new token ids after the prompt `ids` (temperature 0 = greedy); stops before EOS when
    stop_at_eos. The draw uses a CPU generator seeded with `seed` (same seed, same draw on any device),
    or `generator` when given."""
    if not ids:
        raise ValueError("the prompt is empty after tokenization")
    params = SamplingParams(temperature=temperature, top_p=top_p)
    gen = torch.Generator().manual_seed(seed) if generator is None else generator
    x = torch.tensor([ids], device=next(model.parameters()).device)
    new = []
    for _ in range(max_new_tokens):
        nxt = sample(model(x).logits[0, -1], params, gen)
        if stop_at_eos and nxt == EOS_ID:
            break
        new.append(nxt)
        x = torch.cat([x, x.new_tensor([[nxt]])], 1)
    return new


def generate_text(
    run_dir: str | Path,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
) -> str:
    """The prompt and its continuation from the run (or checkpoint) at run_dir."""
    model, tok = load_run(run_dir)
    ids = tok.encode(prompt).ids
    return prompt + tok.decode(generate(model, ids, max_new_tokens, temperature, top_p, seed))
