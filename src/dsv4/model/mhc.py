"""Manifold-constrained hyper-connections (mHC, arXiv 2512.24880; docs/spec.md section 1).

The residual is hc streams X [B, T, hc, d]. Each sublayer unit computes, from x' = rms(flatten(X)):
pre = sigmoid(a0 * x'phi_pre + b_pre) + eps, post = 2 sigmoid(a1 * x'phi_post + b_post),
res = SinkhornKnopp(a2 * x'phi_res + b_res); u = sum_j pre_j X_j; X'_k = post_k F(u) + sum_j res[j,k] X_j.

Two controls for the mHC ablation (config hc_mode; dsv4 ablate mhc):
- "hc": unconstrained dynamic hyper-connections (Zhu et al., arXiv 2409.19606): each map is its static part
  plus a tanh-bounded dynamic part, pre = b_pre + a0 tanh(x'phi_pre), post = b_post + a1 tanh(x'phi_post),
  res = b_res + a2 tanh(x'phi_res), with no sigmoid and no Sinkhorn projection (b starts at 1/hc, 1, I);
- "residual": a plain pre-norm residual, X' = X + F(X), with one stream (hc_mult = 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.kernels.compiled import fusable
from dsv4.model.norm import rms_norm


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Softmax over the last axis + eps, a column normalisation, then (iters-1) row/column passes."""
    p = logits.softmax(-1) + eps
    p = p / (p.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        p = p / (p.sum(-1, keepdim=True) + eps)
        p = p / (p.sum(-2, keepdim=True) + eps)
    return p


HC_MODES = ("mhc", "hc", "residual")


@fusable
def hc_pre(
    x: torch.Tensor,
    fn: torch.Tensor,
    scale: torch.Tensor,
    base: torch.Tensor,
    iters: int,
    eps: float,
    norm_eps: float,
    mode: str = "mhc",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (u [B,T,d], post [B,T,hc], res [B,T,hc,hc]) for one mHC unit; maps in fp32."""
    hc = x.shape[-2]
    if mode == "residual":  # u = X, X' = X + F(u): hc_post with post = res = 1 (one stream)
        ones = x.new_ones((*x.shape[:-2], hc), dtype=torch.float32)
        return x.sum(-2), ones, ones.unsqueeze(-1)
    flat = rms_norm(x.flatten(-2).float(), norm_eps)
    mixes = F.linear(flat, fn.float())
    scale, base = scale.float(), base.float()
    if mode == "hc":  # unconstrained: static + tanh-bounded dynamic part, no sigmoid, no Sinkhorn
        m = torch.tanh(mixes)
        pre = m[..., :hc] * scale[0] + base[:hc]
        post = m[..., hc : 2 * hc] * scale[1] + base[hc : 2 * hc]
        res = m[..., 2 * hc :].unflatten(-1, (hc, hc)) * scale[2] + base[2 * hc :].view(hc, hc)
        return (pre.unsqueeze(-1) * x).sum(-2).to(x.dtype), post, res
    pre = torch.sigmoid(mixes[..., :hc] * scale[0] + base[:hc]) + eps
    post = 2 * torch.sigmoid(mixes[..., hc : 2 * hc] * scale[1] + base[hc : 2 * hc])
    res_logits = mixes[..., 2 * hc :].unflatten(-1, (hc, hc)) * scale[2] + base[2 * hc :].view(hc, hc)
    res = sinkhorn(res_logits, iters, eps)
    u = (pre.unsqueeze(-1) * x).sum(-2).to(x.dtype)
    return u, post, res


@fusable
def hc_post(out: torch.Tensor, x: torch.Tensor, post: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
    """X'_k = post_k * out + sum_j res[j, k] X_j  (res applied transposed, as the official code does), mixed in
    fp32 with the fp32 maps (the official point; bf16 streams are cast back after the mix)."""
    mixed = post.unsqueeze(-1) * out.float().unsqueeze(-2) + torch.matmul(res.transpose(-1, -2), x.float())
    return mixed.to(x.dtype)


@fusable
def hc_head(
    x: torch.Tensor,
    fn: torch.Tensor,
    scale: torch.Tensor,
    base: torch.Tensor,
    eps: float,
    norm_eps: float,
    mode: str = "mhc",
) -> torch.Tensor:
    """Final collapse: w = sigmoid(a * x'phi + b) + eps; h = sum_j w_j X_j (no Sinkhorn).
    hc: w = b + a tanh(x'phi); residual: h = X (one stream)."""
    if mode == "residual":
        return x.sum(-2)
    flat = rms_norm(x.flatten(-2).float(), norm_eps)
    mix = F.linear(flat, fn.float())
    if mode == "hc":
        w = torch.tanh(mix) * scale.float() + base.float()
        return (w.unsqueeze(-1) * x).sum(-2).to(x.dtype)
    w = torch.sigmoid(mix * scale.float() + base.float()) + eps
    return (w.unsqueeze(-1) * x).sum(-2).to(x.dtype)


def init_hc_unit(
    fn: nn.Parameter, scale: nn.Parameter, base: nn.Parameter, hc: int, std: float, mode: str = "mhc"
) -> None:
    """Start near a plain residual: pre ~ 1/hc, post ~ 1, res ~ identity (mhc: diag logit 4), small gates."""
    with torch.no_grad():
        fn.normal_(0.0, std)
        scale.fill_(0.01)
        base.zero_()
        if mode == "hc":  # the maps themselves: pre = 1/hc, post = 1, res = I
            base[:hc] = 1.0 / hc
            base[hc : 2 * hc] = 1.0
            base[2 * hc :].view(hc, hc).diagonal().fill_(1.0)
            return
        base[:hc] = math.log(1.0 / (hc - 1)) if hc > 1 else 0.0  # sigmoid(b) = 1/hc
        base[2 * hc :].view(hc, hc).diagonal().fill_(4.0)


def init_hc_head(
    fn: nn.Parameter, scale: nn.Parameter, base: nn.Parameter, hc: int, std: float, mode: str = "mhc"
) -> None:
    with torch.no_grad():
        fn.normal_(0.0, std)
        scale.fill_(0.01)
        if mode == "hc":
            base.fill_(1.0 / hc)
        else:
            base.fill_(math.log(1.0 / (hc - 1)) if hc > 1 else 0.0)


@torch.no_grad()
def composite_gain(res_maps: list[torch.Tensor]) -> tuple[float, float]:
    """Forward/backward gain of prod_l res_l (max abs row sum / max abs column sum), worst token."""
    prod: torch.Tensor | None = None
    for r in res_maps:  # each [N, hc, hc], applied as X' = r^T X
        m = r.transpose(-1, -2).double()
        prod = m if prod is None else m @ prod
    assert prod is not None, "composite_gain needs at least one map"
    fwd = prod.abs().sum(-1).amax().item()
    bwd = prod.abs().sum(-2).amax().item()
    return fwd, bwd
