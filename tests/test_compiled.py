"""torch.compile'd mHC maps (CPU: with the few-rows rule) equal the eager reference, forward and backward
(slow: compiles)."""

import pytest
import torch

from dsv4.kernels import compiled
from dsv4.model.mhc import hc_head, hc_post, hc_pre


@pytest.mark.slow
def test_compiled_hc_unit_matches_eager():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 33, 4, 32, generator=g, requires_grad=True)
    fn = (torch.randn(24, 128, generator=g) * 0.1).requires_grad_()
    scale = torch.tensor([0.5, 0.3, 0.8], requires_grad=True)
    base = (torch.randn(24, generator=g) * 0.5).requires_grad_()
    out = torch.randn(2, 33, 32, generator=g, requires_grad=True)
    res = []
    for flag in (False, True):
        compiled.enable(flag)
        try:
            u, post, r = hc_pre(x, fn, scale, base, 20, 1e-6, 1e-6)
            y = hc_post(out * u, x, post, r)
            y = y + hc_head(y, fn[:4], scale[:1], base[:4], 1e-6, 1e-6).unsqueeze(-2)
            loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum()
            res.append((y.detach(), torch.autograd.grad(loss, [x, fn, scale, base, out])))
        finally:
            compiled.enable(False)
    (y0, g0), (y1, g1) = res
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g0):  # fp32 sums in another order: compare to each gradient's own scale
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, b.abs().max().item()))
