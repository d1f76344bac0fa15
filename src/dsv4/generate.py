"""Sampling from a trained run (simple, non-cached: the whole prefix is recomputed per token).

Temperature scaling, then nucleus (top-p) filtering: keep the smallest set of tokens whose probability
mass reaches p (Holtzman et al. 2019); temperature 0 is greedy. The cached engine lives in dsv4.infer.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dsv4.data import EOS_ID, load_tokenizer
from dsv4.run import CheckpointError, find_checkpoint, run_folder
from dsv4.train.checkpoint import load_checkpoint


def load_run(run_dir: str | Path, device: str | torch.device = "cpu"):
    """(model, tokenizer) from a training run directory (its newest checkpoint), a checkpoint dir or a model
    dir (config.json + safetensors + tokenizer.json); the model is on `device` ("cpu", "cuda", "cuda:1", ...;
    ValueError when this machine has no such device)."""
    from dsv4.config import ModelConfig
    from dsv4.device import resolve_device
    from dsv4.model.transformer import Transformer
    from dsv4.weights import load_model

    device = resolve_device(device)
    ckpt = find_checkpoint(run_dir)
    run = run_folder(ckpt)
    if not (run / "tokenizer.json").exists():
        raise CheckpointError(f"no tokenizer.json in {run}")
    if (ckpt / "state.json").exists():
        model = Transformer(ModelConfig.from_json(ckpt / "config.json"))
        load_checkpoint(ckpt, model)
    else:   # weights only (a converted model), copied into the fp32 model whatever dtype they were stored in
        try:
            model = load_model(ckpt)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    if model.engrams():   # Engram tables (chunked safetensors in the checkpoint) and the canonical map
        from dsv4.memory import load_store
        from dsv4.model.engram import canonical_map_path, load_canonical_map

        for i, eng in model.engrams().items():
            eng.set_table(load_store(ckpt / "engram" / f"layer{i}"))
        if canonical_map_path(run / "tokenizer.json").exists():
            model.set_canonical_map(load_canonical_map(run / "tokenizer.json"))
    return model.to(device).eval(), load_tokenizer(run / "tokenizer.json")


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
def generate(model, ids: list[int], max_new_tokens: int = 64, temperature: float = 0.8, top_p: float = 0.95,
             seed: int = 0, stop_at_eos: bool = True) -> list[int]:
    if not ids:
        raise ValueError("the prompt is empty after tokenization")
    gen = torch.Generator().manual_seed(seed)   # sampling runs on the CPU: same seed, same draw on any device
    x = torch.tensor([ids], device=next(model.parameters()).device)
    new = []
    for _ in range(max_new_tokens):
        nxt = sample_next(model(x).logits[:, -1], temperature, top_p, gen)
        if stop_at_eos and nxt.item() == EOS_ID:
            break
        new.append(nxt.item())
        x = torch.cat([x, nxt[:, None]], 1)
    return new


def generate_text(run_dir, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8, top_p: float = 0.95,
                  seed: int = 0) -> str:
    model, tok = load_run(run_dir)
    ids = tok.encode(prompt).ids
    return prompt + tok.decode(generate(model, ids, max_new_tokens, temperature, top_p, seed))
