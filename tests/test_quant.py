"""ADMM quantization: the projection onto a layer's levels (exact semantics), the ADMM state with
the quantization projection, and the quantize stage."""
import pytest
import torch

import quant


def weights_of(kind, n):
    """A synthetic weight vector of ``n`` entries: shapes seen in trained layers, plus an outlier."""
    if kind == "normal":
        return torch.randn(n)
    if kind == "uniform":
        return torch.rand(n) * 2 - 1
    if kind == "laplace":
        return torch.distributions.Laplace(0.0, 0.05).sample((n,))
    w = 0.1 * torch.randn(n)
    w[n // 3] = 4.0  # one outlier far outside the rest
    return w


KINDS = ["normal", "uniform", "laplace", "outlier"]
BITS = [1, 2, 3, 4, 8]


def rtn_error(w, bits, mask):
    """||W - Z|| of plain round-to-nearest at the projection's starting scale max|w| / L."""
    x = w * mask
    q = x.abs().max() / quant.top_code(bits)
    return (quant.nearest_codes(x, q, bits) * mask * q - x).norm()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("kind", KINDS)
def test_projection_is_on_the_levels_keeps_pruned_zeros_and_beats_round_to_nearest(kind, bits):
    for n in (7, 300, 2000):
        w, mask = weights_of(kind, n), torch.rand(n) > 0.4
        codes, q = quant.quantize(w, bits, mask)
        z = quant.project(w, bits, mask)
        L = quant.top_code(bits)
        assert q > 0
        assert torch.equal(codes, codes.round()) and codes.abs().max() <= L  # integer codes in [-L, L]
        assert torch.equal(z, codes * q)  # every output on a level
        assert torch.equal(z[~mask], torch.zeros(int((~mask).sum())))  # pruned: exactly zero
        if bits == 1:  # binary: no zero level, every kept weight is -q or q
            assert set(z[mask].unique().tolist()) <= {-q, q} and (z[mask] != 0).all()
        values = z[z != 0].unique()
        assert len(values) <= (2 if bits == 1 else 2 ** bits - 2)
        assert (values > 0).sum() <= L and (values < 0).sum() <= L
        assert (z - w * mask).norm() <= rtn_error(w, bits, mask) * (1 + 1e-6)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("kind", KINDS)
def test_projecting_a_projected_tensor_changes_nothing(kind, bits):
    for n in (7, 300, 2000):
        w, mask = weights_of(kind, n), torch.rand(n) > 0.4
        z = quant.project(w, bits, mask)
        assert torch.equal(quant.project(z, bits, mask), z)


def test_scale_and_codes_are_a_fixed_point_of_both_minimisations():
    """At the returned q the codes are the nearest levels, and q is their least-squares scale
    (to float32 rounding): a local minimum of ||W - Z||."""
    for bits in (2, 3, 4):
        w = torch.randn(500)
        codes, q = quant.quantize(w, bits)
        torch.testing.assert_close(codes, quant.nearest_codes(w, q, bits), rtol=0, atol=0)
        assert q == pytest.approx(float((w.double() * codes).sum() / codes.double().square().sum()), rel=1e-6)


def test_an_outlier_does_not_leave_the_other_weights_on_zero():
    """Round-to-nearest over the full range puts every weight but the outlier on 0 at 2 bits;
    the start from the bulk's mean |w| keeps them."""
    w = weights_of("outlier", 20000)
    z = quant.project(w, 2)
    assert (z != 0).sum() > 5000
    assert (z - w).norm() < 0.6 * rtn_error(w, 2, torch.ones_like(w, dtype=torch.bool))


def test_ternary_and_binary_by_hand():
    w = torch.tensor([0.9, -1.1, 0.2, -0.05, 1.0, 0.0])
    mask = torch.tensor([True, True, True, True, True, False])
    # b = 2, start q = 1.1: codes [1, -1, 0, 0, 1]; q = (0.9 + 1.1 + 1.0) / 3 = 1.0, same codes.
    codes, q = quant.quantize(w, 2, mask)
    assert codes.tolist() == [1, -1, 0, 0, 1, 0] and q == pytest.approx(1.0)
    # b = 1: codes sign(w) on the kept weights, q = mean |w| over them = 3.25 / 5.
    codes, q = quant.quantize(w, 1, mask)
    assert codes.tolist() == [1, -1, 1, -1, 1, 0] and q == pytest.approx(0.65)


def test_all_zero_and_low_precision_inputs():
    codes, q = quant.quantize(torch.zeros(4, 3), 4)
    assert q == 0.0 and not codes.any()
    w = torch.randn(6, 5).bfloat16()
    z = quant.project(w, 3)
    assert z.dtype == torch.bfloat16 and quant.distinct_nonzero(z) <= 6


def test_bits_out_of_range_raise():
    for bits in (0, 17):
        with pytest.raises(ValueError, match="bits"):
            quant.quantize(torch.randn(4), bits)
