"""ADMM quantization: the projection onto a layer's quantization levels, and its projection object.

ADMM handles quantization with the machinery it uses for pruning (Leng et al., *Extremely Low
Bit Neural Network: Squeeze the Last Bit Out with ADMM*, AAAI 2018; Ye, Feng et al.,
*Progressive DNN Compression*, arXiv:1903.09769): the Z-step projects W + U onto the set
of weights that take values on a layer's levels instead of onto a sparsity set.

Levels of a layer at b bits, with a per-layer scale q > 0:

    b >= 2:  {-(2^(b-1) - 1), ..., -1, 0, 1, ..., 2^(b-1) - 1} * q    (b = 2: ternary {-q, 0, q})
    b == 1:  {-q, q}                                                 (binary: no zero level)

Pruned weights (``mask`` False) are exactly zero for every b, b = 1 included: their zero is kept
by the sparse index, not by a code, so a pruned binary layer holds {-q, 0, q}, and every weight
the mask keeps is -q or q. A kept weight of a layer at b >= 2 may round to the 0 level; it is
then zero but not pruned (its mask stays True).
"""
import torch

import admm as admm_lib


def top_code(bits):
    """The largest code L of a layer at ``bits``: 2^(b-1) - 1 for b >= 2, 1 for b = 1 (codes ±1)."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be an integer in 1..16, got {bits}")
    return max(2 ** (bits - 1) - 1, 1)


def nearest_codes(w, q, bits):
    """The integer code of the level nearest to each entry of ``w`` at scale ``q`` > 0:
    clamp(round(w / q), -L, L) for b >= 2 (ties to even), sign(w) for b = 1 with sign(0) = +1."""
    if bits == 1:
        return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)
    L = top_code(bits)
    return torch.clamp(torch.round(w / q), -L, L)


def quantize(w, bits, mask=None, iters=100):
    """Projection of ``w`` onto the levels of ``bits``, with a scale q that (locally) minimises
    ||W - Z|| over the weights ``mask`` keeps (the pruned ones are, and stay, zero).

    q and the codes are found by alternating the two exact partial minimisations (the
    alternating projection of Leng et al. 2018's Z-step, also used by Ye, Feng et al.; a 1-D
    Lloyd iteration):

        codes = nearest level at q          (exact minimiser for a fixed q)
        q     = <w, codes> / <codes, codes> (exact minimiser for fixed codes: least squares)

    until the codes no longer change (at most ``iters`` rounds; hundreds of thousands of weights
    at 6-8 bits can need that many). The error is not convex in q, so this runs from two starts
    and keeps the better result (the first on a tie):

        q = max|w| / L       plain round-to-nearest over the full range: the result is never
                             worse than it (neither step can increase the error);
        q = 2 mean|w| / L    the bulk of the weights, which an outlier would otherwise leave
                             on the 0 level (half the error of the first start on a 2-bit layer of
                             20,000 weights with one outlier).

    At b = 1 both end after one round with q = mean |w| (the closed form of Leng et al. and
    XNOR-Net). The codes never all vanish: nearest codes share the sign of w, so
    q = <w,c>/<c,c> > 0, and q <= max|w| sum|c| / sum c^2 <= max|w|, so the largest |w| keeps a
    nonzero code. The least squares run in float64, and the final scale is the float32 one
    (within 2 ulps) that fits best, so that projecting a projected tensor gives it back unchanged.

    ``w``: any shape, any float dtype (computed in float32); ``mask``: bool, shape of ``w``, or
    None (nothing pruned). Returns (codes, q): float32 integer-valued codes in [-L, L], zero where
    ``mask`` is False, and the scale as a float (0.0 when every kept weight is zero, codes then 0).
    The projection is ``codes * q``.
    """
    x = w.detach().float()
    # Only the kept weights take part (pruned ones get code 0): 10x less work on a 90 % pruned layer.
    keep = None if mask is None else mask.to(x.device, torch.bool)
    v = x.flatten() if keep is None else x[keep]
    top = v.abs().max() if v.numel() else v.new_zeros(())
    if top == 0:  # nothing to scale: every kept weight is zero; the zero tensor is on every level set
        return torch.zeros_like(x), 0.0
    L = top_code(bits)
    starts = (top / L, 2 * v.abs().mean() / L)
    kept_codes, q, _ = min((_alternate(v, bits, q, iters) for q in starts), key=lambda r: float(r[2]))
    codes = torch.zeros_like(x)
    if keep is None:
        codes = kept_codes.view_as(x)
    else:
        codes[keep] = kept_codes
    return codes, float(_nearest_float_scale(v, kept_codes, q))


def _alternate(v, bits, q, iters):
    """(codes, q, squared error) of the 1-D ``v`` after alternating nearest codes and
    least-squares q from ``q``."""
    codes = nearest_codes(v, q, bits)
    v64 = v.double()
    for _ in range(iters):
        q = ((v64 * codes).sum() / codes.double().square().sum()).float()  # > 0: see quantize
        new = nearest_codes(v, q, bits)
        if torch.equal(new, codes):
            break
        codes = new
    return codes, q, (codes * q - v).square().sum()


def _nearest_float_scale(x, codes, q, ulps=2):
    """The float32 scale within ``ulps`` of ``q`` whose ``codes * scale`` is nearest to ``x``
    (``q`` itself on a tie). The least squares q is exact in real numbers, but Z = codes * q is
    rounded to float32, and q of a projected Z can come back one ulp off; this step finds the
    scale that reproduces Z exactly (error 0), so that projecting Z gives Z."""
    cands = [q]
    for direction in (float("inf"), float("-inf")):
        s = q
        for _ in range(ulps):
            s = torch.nextafter(s, torch.tensor(direction))
            cands.append(s)
    errors = torch.stack([(codes * s - x).square().sum() for s in cands])
    return cands[int(errors.argmin())]  # argmin returns the first minimum: q on a tie


def project(w, bits, mask=None):
    """``quantize``'s projection codes * q, in ``w``'s dtype and shape."""
    codes, q = quantize(w, bits, mask)
    return (codes * q).to(w.dtype)


def resolve_bits(model, bits):
    """``quant.bits`` ({parameter name or fnmatch pattern: b}) as {name: b}, resolved as
    ``prune.prune_ratios`` is (``admm.resolve_names``); layers at 0 bits are dropped (left in float)."""
    for key, b in bits.items():
        if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b <= 16:
            raise ValueError(f"quant.bits.{key}: bits must be an integer in 1..16 (0: not quantized), got {b!r}")
    return {n: b for n, b in admm_lib.resolve_names(model, bits, "quant.bits").items() if b}


@torch.no_grad()
def distinct_nonzero(w):
    """Number of distinct nonzero values in ``w``: at most 2^b - 2 for a layer quantized at b >= 2
    bits, 2 at b = 1."""
    return int(torch.unique(w.detach()[w.detach() != 0]).numel())


class Quantization:
    """The quantization sets of ADMM's Z-step: each layer in ``bits`` ({name: b}) projects onto
    its levels, with its pruned weights (``masks`` {name: bool tensor}, False = pruned; a layer
    without a mask has none) held at exactly zero."""

    def __init__(self, bits, masks=None):
        self.bits = dict(bits)
        self.masks = {n: m for n, m in (masks or {}).items() if n in self.bits}

    @property
    def names(self):
        return list(self.bits)

    def project(self, name, w):
        return project(w, self.bits[name], self.masks.get(name))

    def quantize(self, name, w):
        """(codes, scale) of ``w`` for layer ``name`` (see ``quantize``)."""
        return quantize(w, self.bits[name], self.masks.get(name))

    def state_dict(self):
        return {"bits": dict(self.bits), "masks": {n: m.cpu() for n, m in self.masks.items()}}

    @classmethod
    def from_state_dict(cls, state, device=None):
        return cls(state["bits"], {n: m.to(device) for n, m in state["masks"].items()})

    def __repr__(self):
        return f"Quantization(bits={self.bits}, masked={list(self.masks)})"


@torch.no_grad()
def hard_quantize(weights, projection):
    """Put every weight of ``projection``'s layers on its level, in place: W = codes * q.
    Returns ({name: scale q}, {name: quantized energy}), the energy being the fraction of the
    layer's squared norm the rounding moved, ||W - Q(W)||^2 / ||W||^2 (small when the ADMM stage
    has brought W close to its levels)."""
    scales, energy = {}, {}
    for n in projection.names:
        w = weights[n]
        codes, scales[n] = projection.quantize(n, w)
        z = (codes * scales[n]).to(w.dtype)
        before = w.detach().float()
        energy[n] = float((before - z.float()).square().sum()) / max(float(before.square().sum()), 1e-30)
        w.copy_(z)
    return scales, energy
