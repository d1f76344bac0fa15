"""Quantised execution: weights stay in their shipped format in memory and are dequantised at matmul time.

- `FP8Linear` replaces an nn.Linear whose official weight is FP8 e4m3 with block scales: it keeps the
  1-byte codes and the e8m0 scales, and each forward dequantises at most `SCRATCH_ROWS` output rows at a
  time into a scratch buffer in the input's dtype, then multiplies (y = x W^T, chunk by chunk).
- `MXFP4Experts` replaces a layer's routed experts: it keeps the packed e2m1 codes (half a byte per value)
  and the per-32 scales, and hands Experts' forward lazy stacks, so a forward dequantises only the
  experts its tokens route to (all of them only when more tokens than experts arrive).

The dequantised values are the ones dsv4.quant.formats gives the full-precision load, so a kept model
computes what the dequantised model computes (the tests compare the logits).

Measured on the 2-core AMD EPYC (a 1024 x 1024 FP8 weight, 64 rows of input, fp32): dequantise + matmul
3.2 ms; torch._scaled_mm on fp8 inputs 4.3 ms, and it takes one scale per tensor, not per 128 x 128 block,
so it could not reproduce the shipped values anyway. The dequantising path is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.model.moe import Experts
from dsv4.quant.formats import dequant_fp8_block, dequant_mxfp4

SCRATCH_ROWS = 4096  # output rows dequantised at once: the scratch is at most SCRATCH_ROWS x in_features


class FP8Linear(nn.Module):
    """y = x W^T with W kept as FP8 e4m3 codes [out, in] and e8m0 scales per block x block."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, block: int = 128) -> None:
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.block, self.dtype = block, torch.float32
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)

    @property
    def weight(self) -> torch.Tensor:
        """The whole dequantised matrix, for code that multiplies by it directly (the grouped output
        projection, the shared expert)."""
        return dequant_fp8_block(self.codes, self.scale, self.block, dtype=self.dtype)

    def _apply(self, fn, recurse=True):
        return _keep_codes(self, fn, ("codes", "scale"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = max(self.block, SCRATCH_ROWS // self.block * self.block)
        if self.out_features <= rows:
            return F.linear(x, dequant_fp8_block(self.codes, self.scale, self.block, dtype=x.dtype))
        outs = []
        for r0 in range(0, self.out_features, rows):
            codes = self.codes[r0 : r0 + rows]
            scale = self.scale[r0 // self.block : (r0 + codes.shape[0] + self.block - 1) // self.block]
            outs.append(F.linear(x, dequant_fp8_block(codes, scale, self.block, dtype=x.dtype)))
        return torch.cat(outs, -1)


class MXFP4Matrix:
    """One matrix kept in MXFP4 (packed [out, in/2], scales [out, in/32]); linear(x) = x W^T. fp32 inference
    on the CPU multiplies straight from the codes (C++ kernel, csrc/mxfp4.cpp); otherwise, and as its twin,
    the matrix is dequantised and F.linear runs (linear_reference)."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
        self.packed, self.scale, self.dtype = packed, scale, dtype

    def linear_reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequant_mxfp4(self.packed, self.scale, dtype=x.dtype))

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        fast = x.dtype == torch.float32 and self.dtype == torch.float32 and x.device.type == "cpu"
        fast = fast and not (torch.is_grad_enabled() and x.requires_grad) and not torch.compiler.is_compiling()
        from dsv4.kernels import native

        ext = native.ext() if fast else None
        if ext is None:
            return self.linear_reference(x)
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        packed, scale = self.packed.view(torch.uint8).contiguous(), self.scale.view(torch.uint8).contiguous()
        return ext.mxfp4_linear(flat, packed, scale).view(*x.shape[:-1], -1)


class MXFP4Stack:
    """E expert matrices kept in MXFP4 (packed [E, out, in/2], scales [E, out, in/32]); indexing by an expert
    id gives an MXFP4Matrix, by a tensor of ids the dequantised experts."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
        self.packed, self.scale, self.dtype = packed, scale, dtype

    def __getitem__(self, idx):
        if isinstance(idx, int):
            return MXFP4Matrix(self.packed[idx], self.scale[idx], self.dtype)
        return dequant_mxfp4(self.packed[idx], self.scale[idx], dtype=self.dtype)

    def full(self) -> torch.Tensor:
        return dequant_mxfp4(self.packed, self.scale, dtype=self.dtype)


class MXFP4Experts(Experts):
    """A drop-in for model.moe.Experts whose w1 / w2 / w3 stay MXFP4 (buffers w{1,2,3}_packed, _scale)."""

    def __init__(self, n: int, limit: float, packed: dict[str, torch.Tensor], scales: dict[str, torch.Tensor]):
        nn.Module.__init__(self)
        self.n, self.limit, self.weight_transform, self.act_transform = n, limit, None, None
        self.gather_experts = False  # decode runs the grouped loop: each used expert straight from its codes
        self.dtype = torch.float32
        for name in ("w1", "w2", "w3"):
            self.register_buffer(f"{name}_packed", packed[name])
            self.register_buffer(f"{name}_scale", scales[name])

    def weights(self):  # type: ignore[override]  # lazy stacks, indexable like the weight tensors
        return tuple(
            MXFP4Stack(getattr(self, f"{n}_packed"), getattr(self, f"{n}_scale"), self.dtype)
            for n in ("w1", "w2", "w3")
        )

    def _apply(self, fn, recurse=True):
        return _keep_codes(self, fn, tuple(f"{n}_{p}" for n in ("w1", "w2", "w3") for p in ("packed", "scale")))


def _keep_codes(module: nn.Module, fn, names: tuple[str, ...]) -> nn.Module:
    """Module._apply for kept weights: .to(dtype) sets the dtype they are dequantised to, .to(device) moves
    them; the codes and scales themselves are never cast (a cast would decode them)."""
    probe = fn(torch.zeros((), dtype=module.dtype))
    if probe.is_floating_point():
        module.dtype = probe.dtype
    for name in names:
        setattr(module, name, getattr(module, name).to(probe.device))
    return module


def resident_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers as they sit in memory (storage shared once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total
