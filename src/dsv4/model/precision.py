"""Tensors that stay fp32 when `model.to(dtype)` asks for a narrower float (official model.py keeps them fp32):
RoPE frequencies, norm weights, mHC maps, attention sinks, compressor position biases, the MoE
balancing bias and load counters. Device moves are honoured; only the dtype cast is skipped.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class KeepFP32(nn.Module):
    fp32_names: tuple[str, ...] = ()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> KeepFP32:
        kept: dict[str, torch.Tensor] = {}
        for name in self.fp32_names:
            t = self._parameters.get(name, self._buffers.get(name))
            if t is not None and t.dtype == torch.float32:
                kept[name] = t.data
        super()._apply(fn, recurse)
        for name, orig in kept.items():
            if name in self._parameters:
                p = self._parameters[name]
                assert p is not None  # kept holds only names that had a tensor
                if p.dtype.is_floating_point and p.dtype.itemsize < 4:
                    p.data = orig.to(p.device, torch.float32)
            else:
                b = self._buffers[name]
                assert b is not None
                if b.dtype.is_floating_point and b.dtype.itemsize < 4:
                    self._buffers[name] = orig.to(b.device, torch.float32)
        return self
