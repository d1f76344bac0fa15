"""Sampling from a trained run (simple, non-cached: the whole prefix is recomputed per token).

Temperature scaling, then nucleus (top-p) filtering: keep the smallest set of tokens whose probability
mass reaches p (Holtzman et al. 2019); temperature 0 is greedy. The cached engine lives in dsv4.infer.
"""

from __future__ import annotations

import torch

from dsv4.data import EOS_ID
from dsv4.run import load_run

__all__ = ["generate", "generate_text", "load_run", "sample_next"]


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """logits [B, V] -> token ids [B] (on the logits' device; a non-greedy draw is made on the CPU)."""
    if temperature <= 0:
        return logits.argmax(-1)
    dev, logits = logits.device, logits.cpu()
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        keep = sp.cumsum(-1) - sp < top_p  # always keeps the most likely token
        sp = sp * keep
        probs = torch.zeros_like(probs).scatter_(-1, si, sp)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=gen).squeeze(-1).to(dev)


@torch.no_grad()
def generate(
    model,
    ids: list[int],
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
    stop_at_eos: bool = True,
) -> list[int]:
    if not ids:
        raise ValueError("the prompt is empty after tokenization")
    gen = torch.Generator().manual_seed(seed)  # sampling runs on the CPU: same seed, same draw on any device
    x = torch.tensor([ids], device=next(model.parameters()).device)
    new = []
    for _ in range(max_new_tokens):
        nxt = sample_next(model(x).logits[:, -1], temperature, top_p, gen)
        if stop_at_eos and nxt.item() == EOS_ID:
            break
        new.append(nxt.item())
        x = torch.cat([x, nxt[:, None]], 1)
    return new


def generate_text(
    run_dir, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8, top_p: float = 0.95, seed: int = 0
) -> str:
    model, tok = load_run(run_dir)
    ids = tok.encode(prompt).ids
    return prompt + tok.decode(generate(model, ids, max_new_tokens, temperature, top_p, seed))
