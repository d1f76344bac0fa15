"""RMSNorm with an fp32 weight (official model.py keeps norm weights in fp32)."""

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.model.precision import KeepFP32


class RMSNorm(KeepFP32):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32, cast back to the input dtype."""

    fp32_names = ("weight",)

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Weightless RMS normalisation over the last axis (V4 per-head query norm, mHC input norm)."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)
