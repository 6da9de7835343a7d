"""Storage encodings of the export: sparse float tensors (values + bitmask or index) and
quantized layers (packed integer codes + one scale), each with its exact decoder and byte count.
A malformed entry is a ``ValueError`` naming it; ``exportfile`` turns it into a one-line error."""
import math

import numpy as np
import torch

from pruning import quant



def encode_sparse(t):
    """{"shape", "values", and "bitmask" (uint8, one bit per element) or "index" (int32 flat
    positions)}: the nonzero values in order and where they go, whichever of the two is smaller
    (a bitmask costs n/8 bytes, indices 4 bytes per nonzero). ``decode_sparse`` gives back ``t``
    bit for bit, except that a zero comes back as +0.0 (masking a negative weight leaves -0.0)."""
    flat = t.detach().cpu().reshape(-1)
    nz = flat != 0
    entry = {"shape": list(t.shape), "values": flat[nz].clone()}
    if 4 * entry["values"].numel() < math.ceil(flat.numel() / 8):
        entry["index"] = nz.nonzero().flatten().to(torch.int32)
    else:
        # Element 8k + i is bit i of byte k (the last byte zero-padded).
        entry["bitmask"] = torch.from_numpy(np.packbits(nz.numpy(), bitorder="little"))
    return entry


def sparse_nbytes(entry):
    return sum(entry[k].numel() * entry[k].element_size() for k in ("values", "bitmask", "index") if k in entry)


def _positions(entry, n, shape):
    """Flat positions (int64) an entry's ``bitmask`` or ``index`` marks, checked against ``n`` elements."""
    if "bitmask" in entry:
        bm = entry["bitmask"]
        if not (isinstance(bm, torch.Tensor) and bm.dtype == torch.uint8 and bm.shape == (math.ceil(n / 8),)):
            raise ValueError(f"bitmask must be uint8 of {math.ceil(n / 8)} bytes for shape {shape}")
        where = torch.from_numpy(np.unpackbits(bm.cpu().numpy(), bitorder="little")).bool()
        if where[n:].any():
            raise ValueError("bitmask sets bits past the end of the tensor")
        return where[:n].nonzero().flatten()
    where = entry["index"]
    if not (isinstance(where, torch.Tensor) and where.dim() == 1 and not where.is_floating_point()):
        raise ValueError("index must be a 1-D integer tensor")
    where = where.long()
    if len(where) and (where.min() < 0 or where.max() >= n or (where[1:] <= where[:-1]).any()):
        raise ValueError(f"index must be increasing positions in [0, {n})")
    return where


def decode_sparse(entry, name="tensor"):
    """The dense tensor of an ``encode_sparse`` entry; a malformed entry is a ``ValueError`` naming it."""
    try:
        shape, values = [int(s) for s in entry["shape"]], entry["values"]
        n = math.prod(shape)
        if not (isinstance(values, torch.Tensor) and values.dim() == 1 and values.is_floating_point()):
            raise ValueError("values must be a 1-D float tensor")
        where = _positions(entry, n, shape)
        if len(where) != len(values):
            raise ValueError(f"{len(values)} values for {len(where)} positions")
    except (KeyError, TypeError) as e:
        raise ValueError(f"sparse entry {name}: missing or wrong field ({e})") from None
    except ValueError as e:
        raise ValueError(f"sparse entry {name}: {e}") from None
    out = torch.zeros(n, dtype=values.dtype)
    out[where] = values
    return out.view(shape)


def encode_quantized(t, bits, scale=None):
    """{"shape", "bits", "scale" (float32 value as a float), "codes" (uint8, ``bits`` bits per code,
    ``quant.pack_codes``), and for the sparse form "bitmask" or "index" as ``encode_sparse``
    chooses them}: the weights of a quantized layer ``t`` (every value codes * scale) as integer
    codes. Dense form: the codes of every element; sparse form: the codes of the nonzero weights
    only, at the positions the sparse float export stores. The smaller form is taken (at 1 bit,
    which has no 0 code, the sparse one whenever a weight is zero). None when ``t`` is not on
    the levels of ``bits`` (``quant.levels_of``; ``scale`` is the recorded one, tried first)."""
    lv = quant.levels_of(t, bits, scale)
    if lv is None:
        return None
    codes, q = lv
    flat = codes.flatten()
    entry = {"shape": list(t.shape), "bits": int(bits), "scale": float(q)}
    pos = encode_sparse(t)
    pos.pop("values")
    nz = flat != 0
    sparse_bytes = math.ceil(int(nz.sum()) * bits / 8) + sum(pos[k].numel() * pos[k].element_size()
                                                              for k in ("bitmask", "index") if k in pos)
    if sparse_bytes < math.ceil(flat.numel() * bits / 8) or (bits == 1 and not nz.all()):
        entry.update({k: v for k, v in pos.items() if k != "shape"})
        flat = flat[nz]
    entry["codes"] = quant.pack_codes(flat, bits)
    return entry


def quantized_nbytes(entry):
    """Bytes of an ``encode_quantized`` entry's tensors, plus 4 for its float32 scale."""
    return 4 + sum(entry[k].numel() * entry[k].element_size() for k in ("codes", "bitmask", "index") if k in entry)


def decode_quantized(entry, name="tensor"):
    """The float32 tensor codes * scale of an ``encode_quantized`` entry, bit for bit the
    quantized weights it came from; a malformed entry is a ``ValueError`` naming it."""
    try:
        shape, bits, scale = [int(s) for s in entry["shape"]], entry["bits"], entry["scale"]
        n = math.prod(shape)
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
            raise ValueError(f"bits must be an integer in 1..16, got {bits!r}")
        if not isinstance(scale, float) or not scale >= 0:
            raise ValueError(f"scale must be a float >= 0, got {scale!r}")
        where = _positions(entry, n, shape) if ("bitmask" in entry or "index" in entry) else None
        codes = quant.unpack_codes(entry["codes"], bits, n if where is None else len(where))
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"quantized entry {name}: missing or wrong field ({e})") from None
    except ValueError as e:
        raise ValueError(f"quantized entry {name}: {e}") from None
    # The same float32 product as quant.hard_quantize's codes * q: the weights come back bit for bit.
    values = codes * scale
    if where is None:
        return values.view(shape)
    out = torch.zeros(n, dtype=values.dtype)
    out[where] = values
    return out.view(shape)

