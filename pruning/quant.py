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
import numpy as np
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


# Layers with at most this many breakpoints (kept weights x top code) get the exact scale
# (``_exact_scale``); larger ones the alternating method. The bound keeps the exact method's sort
# short (bench/quant_exact.py times it).
EXACT_BREAKPOINTS = 2 ** 18


def quantize(w, bits, mask=None, iters=100):
    """Projection of ``w`` onto the levels of ``bits``, with the scale q that minimises
    ||W - Z|| over the weights ``mask`` keeps (the pruned ones are, and stay, zero): exactly on
    small layers, locally on large ones.

    For a fixed q the best codes are the nearest levels, so the error is
    E(q) = sum_i min_c (w_i - c q)^2, piecewise quadratic in q with breakpoints where a weight's
    nearest code changes, q = 2|w_i| / (2k + 1), k = 0 .. L-1. When the layer has at most
    ``EXACT_BREAKPOINTS`` of them, ``_exact_scale`` visits every interval between breakpoints
    and takes the best least-squares q of each: the global optimum. Larger layers (at 8 bits,
    over ~2,000 kept weights; at 4 bits over ~37,000) alternate the two exact partial minimisations (the alternating
    projection of Leng et al. 2018's Z-step, also used by Ye, Feng et al.; a 1-D Lloyd iteration):

        codes = nearest level at q          (exact minimiser for a fixed q)
        q     = <w, codes> / <codes, codes> (exact minimiser for fixed codes: least squares)

    until the codes no longer change (at most ``iters`` rounds), from two starts, keeping the
    better result (the first on a tie): q = max|w| / L (round-to-nearest over the full range: the
    result is never worse than it) and q = 2 mean|w| / L (the bulk of the weights, which an
    outlier would otherwise leave on the 0 level). It is a local optimum: on 9 normal weights at 4
    bits it ended above the exact one in 19 of 60 vectors, by up to 175 % (bench/quant_exact.py).

    At b = 1 the codes are sign(w) whatever q is, and q = mean |w| (the closed form of Leng et al.
    and XNOR-Net). The least squares run in float64, and the final scale is the float32 one
    (within 2 ulps) that fits best, so that projecting a projected tensor gives it back unchanged;
    kept weights that are all equal, or a single kept weight, are reproduced exactly.

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
    if bits >= 2 and v.numel() * L <= EXACT_BREAKPOINTS:
        q = _exact_scale(v, bits)
        kept_codes = nearest_codes(v.double(), q, bits).float()
    else:
        starts = (top / L, 2 * v.abs().mean() / L)
        kept_codes, q, _ = min((_alternate(v, bits, q, iters) for q in starts), key=lambda r: float(r[2]))
    codes = torch.zeros_like(x)
    if keep is None:
        codes = kept_codes.view_as(x)
    else:
        codes[keep] = kept_codes
    return codes, _nearest_float_scale(v, kept_codes, q)


def _exact_scale(v, bits):
    """The scale q > 0 (a float64 scalar tensor) that minimises E(q) = sum_i min_c (v_i - c q)^2
    over the codes c in {-L, ..., L} of ``bits`` >= 2, for the 1-D ``v`` (not all zero).

    As q falls from infinity, weight i's code magnitude steps from k to k + 1 at the breakpoint
    t = 2|v_i| / (2k + 1). Sorting the n L breakpoints in descending order, the codes between
    breakpoints j and j + 1 are fixed, with S1 = sum |v_i| |c_i| and S2 = sum c_i^2 the running
    sums of the steps (each adds |v_i| and (k+1)^2 - k^2 = 2k + 1), and
    E = sum v^2 - 2 q S1 + q^2 S2 is least at q = S1 / S2, clamped to the interval. The best of
    the n L intervals is the global minimum (E is continuous at the breakpoints, where the two
    codes tie); the largest q among equal errors. O(n L log(n L)) time and memory."""
    a = v.double().abs()
    a = a[a > 0]
    k = torch.arange(top_code(bits), dtype=torch.float64, device=a.device)
    t = (2 * a[:, None] / (2 * k + 1)).flatten()          # breakpoint of weight i, code k -> k + 1
    step_s1 = a[:, None].expand(-1, len(k)).flatten()       # what crossing it adds to S1
    step_s2 = (2 * k + 1).expand(len(a), -1).flatten()      # ... and to S2
    order = torch.argsort(t, descending=True, stable=True)
    t, s1, s2 = t[order], step_s1[order].cumsum(0), step_s2[order].cumsum(0)
    lower = torch.cat([t[1:], t.new_zeros(1)])              # interval j is [t_{j+1}, t_j]
    q = torch.minimum(torch.maximum(s1 / s2, lower), t)
    err = q * (q * s2 - 2 * s1)                             # E - sum v^2
    # Equal errors in exact arithmetic (all |v| equal: q = |v| / k fits for every k) differ in the
    # last bits; the largest q (smallest codes) within rounding of the least error is taken.
    near = err <= err.min() + 1e-12 * float(a.square().sum())
    return q[int(near.nonzero()[0])]


def _alternate(v, bits, q, iters):
    """(codes, q, squared error) of the 1-D ``v`` after alternating nearest codes and
    least-squares q from ``q``. A start whose codes are all 0 (every |v| below q / 2, e.g. all
    kept |v| equal at b = 2 from 2 mean|v|) has nothing to fit: it ends there, error sum v^2."""
    codes = nearest_codes(v, q, bits)
    v64 = v.double()
    for _ in range(iters):
        den = codes.double().square().sum()
        if den == 0:
            break
        q = ((v64 * codes).sum() / den).float()  # > 0: nearest codes share the sign of v
        new = nearest_codes(v, q, bits)
        if torch.equal(new, codes):
            break
        codes = new
    return codes, q, (codes * q - v).square().sum()


def _nearest_float_scale(x, codes, q, ulps=2):
    """The float32 scale within ``ulps`` of ``q`` (``_ulp_neighbours``) whose ``codes * scale`` is
    nearest to ``x`` (``q`` itself on a tie). The least squares q is exact in real numbers, but
    Z = codes * q is rounded to float32, and q of a projected Z can come back one ulp off; this
    step finds the scale that reproduces Z exactly (error 0), so that projecting Z gives Z."""
    cands = _ulp_neighbours(float(q), ulps)
    errors = torch.stack([(codes * s - x).square().sum() for s in cands])
    return cands[int(errors.argmin())]  # argmin returns the first minimum: q on a tie


def project(w, bits, mask=None):
    """``quantize``'s projection codes * q, in ``w``'s dtype and shape."""
    codes, q = quantize(w, bits, mask)
    return (codes * q).to(w.dtype)


def resolve_bits(model, bits):
    """``quant.bits`` ({parameter name or fnmatch pattern: b}) as {name: b}, resolved as
    ``prune.prune_ratios`` is (``admm.resolve_names``), its bits in 0..16 as ``config`` checks
    them; layers at 0 bits are dropped (left in float)."""
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


# --------------------------------------------------------------------------- codes on disk, and the report

def _step(bits):
    """Spacing of the codes: 1 for b >= 2; 2 for b = 1, whose codes are -1 and +1 only."""
    return 2 if bits == 1 else 1


@torch.no_grad()
def pack_codes(codes, bits):
    """The integer codes ``codes`` (any shape, values in [-L, L], L = ``top_code(bits)``; at b = 1
    only -1 and +1) packed ``bits`` bits each into a uint8 tensor of ceil(n * bits / 8) bytes.
    Code c is stored as the unsigned (c + L) / step (0 .. 2^b - 2 for b >= 2, 0 or 1 at b = 1),
    least significant bit first, code after code; ``unpack_codes`` reverses it."""
    L, flat = top_code(bits), codes.detach().flatten().cpu().round().to(torch.int32)
    u = flat + L
    if (u < 0).any() or (u > 2 * L).any() or (bits == 1 and (flat == 0).any()):
        raise ValueError(f"codes out of the {bits}-bit range [-{L}, {L}]" + (" (no 0 at 1 bit)" if bits == 1 else ""))
    u = u // _step(bits)
    # Each code's bits, least significant first, as one bit stream that fills each byte from its
    # least significant bit: numpy's packbits with bitorder="little" (the last byte zero-padded).
    stream = ((u.unsqueeze(1) >> torch.arange(bits, dtype=torch.int32)) & 1).to(torch.uint8).numpy()
    return torch.from_numpy(np.packbits(stream.reshape(-1), bitorder="little"))


@torch.no_grad()
def unpack_codes(packed, bits, n):
    """The ``n`` codes ``pack_codes`` packed into ``packed``, as a float32 1-D tensor."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != -(-n * bits // 8):
        raise ValueError(f"codes must be {-(-n * bits // 8)} uint8 bytes for {n} codes of {bits} bits")
    stream = np.unpackbits(packed.cpu().numpy(), count=n * bits, bitorder="little")
    u = (torch.from_numpy(stream).view(n, bits).to(torch.int32) << torch.arange(bits, dtype=torch.int32)).sum(1)
    if bits > 1 and (u > 2 * top_code(bits)).any():
        raise ValueError(f"a code is out of the {bits}-bit range")
    return (u * _step(bits) - top_code(bits)).float()


def _ulp_neighbours(q, ulps=2):
    """The float32 scale ``q`` and its ``ulps`` float32 neighbours on each side, nearest first."""
    q = torch.tensor(q, dtype=torch.float32)
    out, up, down = [q], q, q
    for _ in range(ulps):
        up, down = torch.nextafter(up, torch.tensor(float("inf"))), torch.nextafter(down, torch.tensor(0.0))
        out += [up, down]
    return [float(s) for s in out]


@torch.no_grad()
def levels_of(w, bits, scale=None):
    """(codes, q) with ``codes * q`` equal to ``w`` bit for bit (float32 product, codes integer
    in [-L, L], nonzero weights at b = 1 on ±1), or None when ``w`` is not on the levels of any
    scale: the integer codes of an already-quantized tensor, as the export stores them.

    ``scale``: the layer's recorded scale (``hard_quantize``'s, kept in the checkpoint's
    convergence figures), tried first. Without it, or if it does not fit, the largest |w| is
    k * q for some code k in 1..L, so q is searched among max|w| / k (each within 2 float32 ulps,
    the rounding of k * q); the search runs on the distinct values only (at most 2L of them).
    ``w``: any shape; codes come back float32 in ``w``'s shape, q as a float (0.0 if ``w`` is all zero).
    """
    x = w.detach().float().cpu()
    values = x[x != 0].unique()
    if not values.numel():
        return torch.zeros_like(x), 0.0
    L = top_code(bits)
    if values.numel() > (2 if bits == 1 else 2 * L):
        return None  # more values than levels: no scale can fit
    top = float(values.abs().max())
    candidates = ([scale] if scale else []) + [top / k for k in range(L, 0, -1)]

    def fits(v, s):
        c = torch.round(v / s)
        ok = c.abs().max() <= L and torch.equal(c * s, v)
        return ok and (bits > 1 or bool((c[v != 0].abs() == 1).all()))

    for q in candidates:
        for s in _ulp_neighbours(q) if q > 0 else []:
            if fits(values, s) and fits(x, s):
                return torch.round(x / s), s
    return None


def allowed_values(bits):
    """Most distinct nonzero values a layer at ``bits`` may hold: 2^b - 2 (b >= 2), 2 at b = 1."""
    return 2 if bits == 1 else 2 ** bits - 2


def quantization_report(weights, bits, scales=None):
    """({name: {"bits", "distinct_nonzero", "scale"}}, warnings) of the layers in ``bits``
    ({name: b}) among ``weights`` ({name: tensor}). ``scale`` is the float32 scale q the weights
    sit on (``levels_of``; ``scales`` {name: q} are the recorded ones, tried first), None when the
    layer is not on its levels. A warning line for each layer with more distinct nonzero values
    than ``allowed_values`` or off its levels."""
    rows, warn = {}, []
    for n, b in bits.items():
        if n not in weights:
            continue
        w = weights[n]
        lv = levels_of(w, b, (scales or {}).get(n))
        rows[n] = {"bits": b, "distinct_nonzero": distinct_nonzero(w), "scale": None if lv is None else lv[1]}
        if rows[n]["distinct_nonzero"] > allowed_values(b):
            warn.append(f"{n}: {rows[n]['distinct_nonzero']} distinct nonzero values, more than the "
                        f"{allowed_values(b)} of {b} bits: the layer is not quantized")
        elif lv is None:
            warn.append(f"{n}: its values are not the integer multiples of one scale that {b} bits allow")
    return rows, warn


# --------------------------------------------------------------------------- a checkpoint's quantized layers

def quantized_layers(cfg, stage, model):
    """{name: bits} of the layers a checkpoint or export of ``stage`` holds quantized: those of
    ``cfg``'s ``quant.bits`` resolved on ``model`` when the stage is the quantize stage (whose
    end, hard quantization, puts them on their levels); {} otherwise (a float model, or an
    earlier stage of a quantized run)."""
    qbits = (cfg.get("quant") or {}).get("bits") or {}
    return resolve_bits(model, qbits) if stage == "quantize" and qbits else {}


def recorded_scales(ckpt):
    """{name: scale q} that the hard quantization of a quantize-stage checkpoint recorded (its
    convergence figures), or None."""
    return ((ckpt.get("convergence") or {}).get("quantize") or {}).get("scale")


def quantization_meta(model, cfg, stage, scales):
    """None without quantized layers (see ``quantized_layers``: a model of an earlier stage, or
    none in ``cfg``), else {"layers": {name: {bits, distinct_nonzero, scale}}
    (``quantization_report`` on ``model``'s weights; ``scales`` the recorded ones), "warnings": [lines]}."""
    bits = quantized_layers(cfg, stage, model)
    if not bits:
        return None
    rows, warn = quantization_report(admm_lib.prunable_weights(model), bits, scales)
    return {"layers": rows, "warnings": warn}
