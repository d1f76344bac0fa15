"""Manifold-constrained hyper-connections (mHC, arXiv 2512.24880; docs/spec.md section 1).

The residual is hc streams X [B, T, hc, d]. Each sublayer unit computes, from x' = rms(flatten(X)):
pre = sigmoid(a0 * x'phi_pre + b_pre) + eps, post = 2 sigmoid(a1 * x'phi_post + b_post),
res = SinkhornKnopp(a2 * x'phi_res + b_res); u = sum_j pre_j X_j; X'_k = post_k F(u) + sum_j res[j,k] X_j.
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


@fusable
def hc_pre(
    x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters: int, eps: float, norm_eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (u [B,T,d], post [B,T,hc], res [B,T,hc,hc]) for one mHC unit; maps in fp32."""
    hc = x.shape[-2]
    flat = rms_norm(x.flatten(-2).float(), norm_eps)
    mixes = F.linear(flat, fn.float())
    scale, base = scale.float(), base.float()
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
    x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, eps: float, norm_eps: float
) -> torch.Tensor:
    """Final collapse: w = sigmoid(a * x'phi + b) + eps; h = sum_j w_j X_j (no Sinkhorn)."""
    flat = rms_norm(x.flatten(-2).float(), norm_eps)
    w = torch.sigmoid(F.linear(flat, fn.float()) * scale.float() + base.float()) + eps
    return (w.unsqueeze(-1) * x).sum(-2).to(x.dtype)


def init_hc_unit(fn: nn.Parameter, scale: nn.Parameter, base: nn.Parameter, hc: int, std: float) -> None:
    """Start near a plain residual: pre ~ 1/hc, post ~ 1, res ~ identity (diag logit 4), small gates."""
    with torch.no_grad():
        fn.normal_(0.0, std)
        scale.fill_(0.01)
        base.zero_()
        base[:hc] = math.log(1.0 / (hc - 1)) if hc > 1 else 0.0  # sigmoid(b) = 1/hc
        base[2 * hc :].view(hc, hc).diagonal().fill_(4.0)


def init_hc_head(fn: nn.Parameter, scale: nn.Parameter, base: nn.Parameter, hc: int, std: float) -> None:
    with torch.no_grad():
        fn.normal_(0.0, std)
        scale.fill_(0.01)
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
