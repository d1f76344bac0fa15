"""FP4 quantisation-aware training of the routed experts (docs/spec.md section 7), as V4 post-trains them.

The forward multiplies by the MXFP4-quantised-dequantised expert weights, so the model learns weights that
survive the shipped format; the backward passes the gradient straight through the quantiser to the fp32
master weights (STE: d fq(w) / dw = 1):

    fq(w) = w + (dequant(quant_mxfp4(w)) - w).detach()

Exporting such a model (`dsv4 convert --to-official`) quantises the experts with the same quant_mxfp4, so
the shipped weights are exactly the ones the training forward used.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4.quant.formats import fake_mxfp4


def fake_quant_mxfp4_ste(w: torch.Tensor) -> torch.Tensor:
    """fq(w) of the module docstring: MXFP4 values forward, identity gradient backward."""
    return w + (fake_mxfp4(w.detach()) - w).detach()


def enable_fp4_qat(model: nn.Module, on: bool = True) -> int:
    """Route every MoE layer's routed experts through fake_quant_mxfp4_ste (on) or not (off); returns the
    number of expert stacks switched."""
    from dsv4.model.moe import Experts

    n = 0
    for m in model.modules():
        if isinstance(m, Experts):
            if m.w1.shape[-1] % 32 or m.w2.shape[-1] % 32:
                raise ValueError(
                    "FP4 QAT needs expert input dims that are multiples of 32, "
                    f"got {m.w1.shape[-1]} and {m.w2.shape[-1]}"
                )
            m.weight_transform = fake_quant_mxfp4_ste if on else None
            n += 1
    return n
