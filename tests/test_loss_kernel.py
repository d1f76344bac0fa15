"""The fused head + cross entropy equals F.cross_entropy(h @ W^T, y), forward and backward."""

import torch

from dsv4.kernels.loss import linear_cross_entropy, linear_cross_entropy_reference


def test_fused_linear_ce_matches_reference():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(70, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (70,), generator=g)
    ref = linear_cross_entropy_reference(h, w, y)
    gh, gw = torch.autograd.grad(ref * 3, [h, w])
    got = linear_cross_entropy(h, w, y, chunk=16)
    fh, fw = torch.autograd.grad(got * 3, [h, w])
    torch.testing.assert_close(got.double(), ref.double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fh, gh, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(fw, gw, rtol=1e-6, atol=1e-9)
    with torch.no_grad():
        torch.testing.assert_close(
            linear_cross_entropy(h, w, y, chunk=16).double(), ref.double().detach(), rtol=1e-6, atol=1e-7
        )


def test_fused_linear_ce_under_bf16_autocast():
    """Training with dtype=bf16 (or on a GPU): bf16 hidden states against the fp32 head weight, under autocast."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(300, 32, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(200, 32, generator=g) * 0.3).requires_grad_()
    y = torch.randint(0, 200, (300,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(h, w, y, chunk=64)
        fh, fw = torch.autograd.grad(got, [h, w])
        ref = linear_cross_entropy_reference(h, w, y)
        gh, gw = torch.autograd.grad(ref, [h, w])
    assert fh.dtype == torch.bfloat16 and fw.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fh.float(), gh.float(), rtol=5e-2, atol=2e-3)
    torch.testing.assert_close(fw, gw.float(), rtol=5e-2, atol=2e-3)


def test_ids_to_bytes_is_exact_even_when_cut_mid_character(tmp_path):
    from dsv4.data import ids_to_bytes, token_byte_lengths, train_tokenizer

    text = "def f(x):\n    return 'héllo ✓ 数据'  # tab\there\n" * 20
    tok = train_tokenizer([text], 300, tmp_path / "tok.json", show_progress=False)
    ids = tok.encode(text).ids
    assert ids_to_bytes(tok, ids) == text.encode()
    lengths = token_byte_lengths(tok)
    for cut in range(1, len(ids)):  # any window edge: bytes counted == bytes produced
        assert len(ids_to_bytes(tok, ids[:cut])) == int(lengths[ids[:cut]].sum())
