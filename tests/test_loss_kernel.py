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
        torch.testing.assert_close(linear_cross_entropy(h, w, y, chunk=16).double(), ref.double().detach(),
                                   rtol=1e-6, atol=1e-7)


def test_ids_to_bytes_is_exact_even_when_cut_mid_character(tmp_path):
    from dsv4.data import ids_to_bytes, token_byte_lengths, train_tokenizer

    text = "def f(x):\n    return 'héllo ✓ 数据'  # tab\there\n" * 20
    tok = train_tokenizer([text], 300, tmp_path / "tok.json", show_progress=False)
    ids = tok.encode(text).ids
    assert ids_to_bytes(tok, ids) == text.encode()
    lengths = token_byte_lengths(tok)
    for cut in range(1, len(ids)):  # any window edge: bytes counted == bytes produced
        assert len(ids_to_bytes(tok, ids[:cut])) == int(lengths[ids[:cut]].sum())
