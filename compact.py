"""Compact export of pruned models: pruned channels removed for real, irregular sparsity stored
sparsely, parameter / MAC / file-size figures, and the export file that ``export.py`` writes and
``load_model`` reads back (a checkpoint or an export, for ``eval.py``).

**Channel groups.** The channels of a feature map are removed together from the layers that write
it (``producers``: a conv or linear layer with its BN) and from the layers that read it
(``consumers``). Each model declares its groups next to its layers (``models.Group``,
``channel_groups()`` in ``models/<arch>.py``); a model without them is evaluated but not exported.

Channel ``c`` of a group is removed when

- every producer's filter ``c`` is zero (filter pruning). The channel then no longer depends on
  the input, but it is **not zero**: it carries a constant, the BN shift (or the conv bias) after
  ReLU, and in ResNet the sum of those along the stream. Dropping it would change the outputs
  (Torch-Pruning does, see docs/export.md), so its contribution is folded into each consumer: into the
  bias of a linear layer, and for a convolution into ``FoldedConv2d.const_kernel``, the
  convolution of an all-ones map, which is exact at the zero-padded borders too;
- or every consumer's input channel ``c`` is zero in all its columns (column pruning): nobody
  reads the channel, so its producers stop computing it. A channel read by some consumers of a
  group but not others is kept: the map has one width for all of its readers.

The compact model is the model's own class with each changed conv / BN / linear replaced by a
smaller one under the same name (``fit_to_state``), so parameter names stay the real ones and the
export needs no pickled modules: its state dict's shapes say how to rebuild it.
"""
import copy
import io
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

import admm as admm_lib
import data as data_lib
import quant
from common import UserError, load_file, reads
from evaluation import load_weights, model_from_config

FORMAT = "admm-at-export"  # the "format" entry that marks an export file
VERSION = 2  # 2: quantized layers as packed integer codes ("quantized"); a float export is still written as 1
VERSIONS = (1, 2)  # what this code reads
STORAGES = ("compact", "sparse")


# --------------------------------------------------------------------------- channel groups

def has_channel_groups(model):
    """Whether ``model`` declares its channel groups, which compact export needs."""
    return callable(getattr(model, "channel_groups", None))


def channel_groups(model):
    """The ``models.Group``s that ``model`` declares (``model.channel_groups()``)."""
    if not has_channel_groups(model):
        raise ValueError(f"no channel groups known for {type(model).__name__}: "
                         f"its class declares no channel_groups() (see models/__init__.py)")
    return model.channel_groups()


def keep_channels(state, group, keep):
    """Cut ``state`` (a state dict, changed in place) down to the channels ``keep`` (index tensor)
    of ``group``: rows of its producers (filters, biases, folded kernels, BN channels), columns of
    its consumers (per channel a block of in_features / n columns: kh*kw, or H*W after a flatten)."""
    n = state[f"{group.producers[0][0]}.weight"].shape[0]
    for layer, bn in group.producers:
        keys = [f"{layer}.{s}" for s in ("weight", "bias", "const_kernel")]
        keys += [f"{bn}.{s}" for s in ("weight", "bias", "running_mean", "running_var")] if bn else []
        for k in keys:
            if k in state:
                state[k] = state[k].index_select(0, keep).contiguous()
    for layer in group.consumers:
        w = state[f"{layer}.weight"]
        per = w.shape[1] // n
        state[f"{layer}.weight"] = (w.reshape(w.shape[0], n, per, *w.shape[2:]).index_select(1, keep)
                                    .reshape(w.shape[0], len(keep) * per, *w.shape[2:]).contiguous())


@torch.no_grad()
def plan_removal(model, groups):
    """{group name: (kept channels, removed channels whose constant must be folded)}, index tensors.

    Removed: every producer's filter is zero ("silent"), or every consumer's columns of the channel
    are zero ("unread"). Silent channels that are also unread contribute nothing: no fold.
    """
    mods = dict(model.named_modules())
    plans = {}
    for g in groups:
        n = mods[g.producers[0][0]].weight.shape[0]
        silent = torch.ones(n, dtype=torch.bool)
        for layer, _ in g.producers:
            w = mods[layer].weight.detach()
            if w.shape[0] != n:
                raise ValueError(f"group {g.name}: {layer} has {w.shape[0]} output channels, expected {n}")
            silent &= ~(w.reshape(n, -1) != 0).any(1).cpu()
        unread = torch.ones(n, dtype=torch.bool)
        for layer in g.consumers:
            w = mods[layer].weight.detach()
            if w.shape[1] % n:
                raise ValueError(f"group {g.name}: {layer} has {w.shape[1]} inputs, not a multiple of {n} channels")
            unread &= ~(w.reshape(w.shape[0], n, -1) != 0).any(2).any(0).cpu()
        keep = ~(silent | unread)
        if not keep.any():
            keep[0] = True  # a layer keeps at least one channel (zero-width layers are not supported)
        plans[g.name] = (keep.nonzero().flatten(), (silent & ~unread & ~keep).nonzero().flatten())
    return plans


@torch.no_grad()
def _removed_constants(model, groups, plans, input_shape):
    """{consumer: (group width, channels, values)}: the constant each silent removed channel carries at the
    consumer's input, read from one forward of ``model`` (eval mode) on a zero and a random image.
    Both images must give the same value at every position, else the grouping is wrong."""
    mods = dict(model.named_modules())
    seen, hooks = {}, []
    for g in groups:
        if len(plans[g.name][1]):
            for c in g.consumers:
                hooks.append(mods[c].register_forward_pre_hook(lambda m, args, c=c: seen.__setitem__(c, args[0])))
    if not hooks:
        return {}
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        x = torch.stack([torch.zeros(input_shape), torch.rand(input_shape, generator=torch.Generator().manual_seed(0))])
        model(x.to(p))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    out = {}
    for g in groups:
        fold = plans[g.name][1]
        if not len(fold):
            continue
        n = mods[g.producers[0][0]].weight.shape[0]
        for c in g.consumers:
            v = seen[c].detach().reshape(2, n, -1)[:, fold.to(seen[c].device)].cpu()
            if not (v == v[:1, :, :1]).all():
                raise RuntimeError(f"internal error: removed channels of {g.name} are not constant at the input of {c}")
            out[c] = (n, fold, v[0, :, 0])
    return out


class FoldedConv2d(nn.Conv2d):
    """A Conv2d that also adds the contribution of removed input channels that carried constants
    v_c: ``const_kernel`` [out, 1, kh, kw] = sum_c v_c * W[:, c], convolved with an all-ones map
    of the input's size with this layer's stride and zero padding. This equals the removed
    channels' share of the original convolution exactly, borders included, at any input size,
    for one extra single-channel convolution per batch (not per image)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("const_kernel", torch.zeros(self.out_channels, 1, *self.kernel_size))

    def forward(self, x):
        ones = x.new_ones(1, 1, *x.shape[2:])
        # In place: the convolution's output is not needed by its backward, and a new tensor costs more
        # than the single-channel convolution itself on small layers.
        share = F.conv2d(ones, self.const_kernel, None, self.stride, self.padding, self.dilation)
        return super().forward(x).add_(share)


@torch.no_grad()
def compact_state(model, input_shape):
    """(state dict of the compact model, {group name: [kept, total] channels}) for the pruned
    ``model`` (masks applied, any device) on inputs of ``input_shape`` ([C, H, W]). CPU tensors."""
    groups = channel_groups(model)
    plans = plan_removal(model, groups)
    consts = _removed_constants(model, groups, plans, input_shape)
    mods = dict(model.named_modules())
    sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    # Folds first, from the full weights: the removed channels' share of each consumer.
    for layer, (n, fold, vals) in consts.items():
        w, mod = sd[f"{layer}.weight"], mods[layer]
        share = torch.einsum("ofk,f->ok", w.reshape(w.shape[0], n, -1)[:, fold].double(), vals.double())
        if isinstance(mod, nn.Linear):  # after the flatten every column of a channel sees its constant
            sd[f"{layer}.bias"] = (sd[f"{layer}.bias"].double() + share.sum(1)).to(w.dtype)
        elif share.any():
            if mod.groups != 1 or mod.padding_mode != "zeros":
                raise ValueError(f"{layer}: folding needs groups=1 and zero padding")
            sd[f"{layer}.const_kernel"] = share.reshape(w.shape[0], 1, *w.shape[2:]).to(w.dtype)

    kept = {}
    for g in groups:
        keep = plans[g.name][0]
        n = sd[f"{g.producers[0][0]}.weight"].shape[0]
        kept[g.name] = [len(keep), n]
        if len(keep) < n:
            keep_channels(sd, g, keep)
    return sd, kept


def fit_to_state(model, state):
    """Replace, in place and under the same name, every conv / BN / linear of ``model`` whose
    tensors in ``state`` have other shapes (or that carries a ``const_kernel``) by one of those
    shapes with the same kernel, stride, padding and bias setting. Returns ``model``."""
    for name, mod in list(model.named_modules()):
        shape = state.get(f"{name}.weight", torch.empty(0)).shape
        new = None
        if isinstance(mod, nn.Conv2d) and len(shape) == 4:
            folded = f"{name}.const_kernel" in state
            if shape != mod.weight.shape or folded != isinstance(mod, FoldedConv2d):
                new = (FoldedConv2d if folded else nn.Conv2d)(
                    shape[1] * mod.groups, shape[0], mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                    mod.groups, mod.bias is not None, mod.padding_mode)
        elif isinstance(mod, nn.BatchNorm2d) and len(shape) == 1 and shape != mod.weight.shape:
            new = nn.BatchNorm2d(shape[0], mod.eps, mod.momentum, mod.affine, mod.track_running_stats)
        elif isinstance(mod, nn.Linear) and len(shape) == 2 and shape != mod.weight.shape:
            new = nn.Linear(shape[1], shape[0], bias=mod.bias is not None)
        if new is not None:
            parent, _, child = name.rpartition(".")
            # A new module starts in training mode: a BN would then use batch statistics (and overwrite its own).
            setattr(model.get_submodule(parent), child, new.to(mod.weight.device).train(mod.training))
    return model


def compact_model(model, input_shape, state=None):
    """The compact copy of the pruned ``model``: same outputs in eval mode, fewer channels.
    ``state``: its state dict if already computed by ``compact_state``."""
    state = compact_state(model, input_shape)[0] if state is None else state
    out = fit_to_state(copy.deepcopy(model), state)
    out.load_state_dict(state)
    return out


# --------------------------------------------------------------------------- sparse storage

_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128])  # element 8k + i is bit i of byte k


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
        bits = F.pad(nz.to(torch.uint8), (0, -flat.numel() % 8)).view(-1, 8).long()
        entry["bitmask"] = (bits * _BITS).sum(1).to(torch.uint8)
    return entry


def sparse_nbytes(entry):
    return sum(entry[k].numel() * entry[k].element_size() for k in ("values", "bitmask", "index") if k in entry)


def _positions(entry, n, shape):
    """Flat positions (int64) an entry's ``bitmask`` or ``index`` marks, checked against ``n`` elements."""
    if "bitmask" in entry:
        bm = entry["bitmask"]
        if not (isinstance(bm, torch.Tensor) and bm.dtype == torch.uint8 and bm.shape == (math.ceil(n / 8),)):
            raise ValueError(f"bitmask must be uint8 of {math.ceil(n / 8)} bytes for shape {shape}")
        where = ((bm.long().unsqueeze(1) & _BITS) != 0).reshape(-1)
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


# --------------------------------------------------------------------------- figures

@torch.no_grad()
def count(model, input_shape):
    """{"params", "nonzero", "macs", "nonzero_macs"} of ``model`` for one input of ``input_shape``
    ([C, H, W]). params: all parameters plus folded constant kernels; macs: multiply-accumulates
    of the conv and linear layers (out positions x weight size); nonzero_macs counts only nonzero
    weights (out positions x nonzero weights), what a perfect sparse kernel would do."""
    tensors = list(model.parameters()) + [m.const_kernel for m in model.modules() if isinstance(m, FoldedConv2d)]
    macs = nz_macs = 0

    def hook(mod, args, out):
        nonlocal macs, nz_macs
        positions = out[0, 0].numel() if isinstance(mod, nn.Conv2d) else 1
        weights = [mod.weight] + ([mod.const_kernel] if isinstance(mod, FoldedConv2d) else [])
        macs += positions * sum(w.numel() for w in weights)
        nz_macs += positions * sum(int((w != 0).sum()) for w in weights)

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, *input_shape, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return {"params": sum(t.numel() for t in tensors), "nonzero": sum(int((t != 0).sum()) for t in tensors),
            "macs": macs, "nonzero_macs": nz_macs}


def nbytes_saved(obj):
    """Bytes ``torch.save`` writes for ``obj``."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()


@torch.no_grad()
def latency(models, x, reps=5, warmup=1):
    """{name: seconds} per forward of each of ``models`` ({name: module}, eval mode) on ``x``, the
    best of ``reps`` runs after ``warmup``. The models run in turns (a, b, a, b, ...) so that on a
    shared machine every model sees the same load, which keeps ratios fair."""
    for m in models.values():
        m.eval()
        for _ in range(warmup):
            m(x)
    best = {k: float("inf") for k in models}
    for _ in range(reps):
        for k, m in models.items():
            t0 = time.perf_counter()
            m(x)
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


# --------------------------------------------------------------------------- export file

def input_shape(cfg):
    info = data_lib.INFO[cfg["data"]["dataset"]]
    return (info.in_channels, info.image_size, info.image_size)


def payload_bits(exp):
    """Bits of the tensors an export dict stores, as stored: dense tensors at their dtype's size,
    sparse float entries as values + bitmask or int32 index, quantized entries as packed codes
    (rounded up to whole bytes per layer) + bitmask or index + one float32 scale. No file overhead."""
    dense = sum(t.numel() * t.element_size() for t in exp["state"].values())
    return 8 * (dense + sum(sparse_nbytes(e) for e in exp["sparse"].values())
                + sum(quantized_nbytes(e) for e in (exp.get("quantized") or {}).values()))


def export_model(model, cfg, storage="compact", source=None, bits=None, scales=None):
    """The export dict of the pruned ``model`` built from ``cfg`` (plain data and tensors only).

    storage: ``compact`` stores each tensor dense; ``sparse`` stores each conv / linear weight as
    ``encode_sparse`` when that is smaller. Both hold the compact model (channels removed).
    source: what to record about the checkpoint it came from (path, stage, epoch, ...).
    bits: {name: b} of the layers quantized to b bits (``quantized_layers``), stored as
    ``encode_quantized`` (a layer not on its levels stays float); ``scales``: their recorded scales.
    Its figures record ``storage_bits``: {export, dense_float32} (``payload_bits``; dense_float32
    is the dense state dict's); a quantized export (version 2) also the size of the float export of
    the same storage (``bytes.float_export``, ``storage_bits.float_export``).
    """
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
    shape = input_shape(cfg)
    state, kept = compact_state(model, shape)
    dense_fig, small_fig = count(model, shape), count(compact_model(model, shape, state), shape)
    dense_sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    sparse = {}
    if storage == "sparse":
        for name in admm_lib.prunable_weights(model):
            entry = encode_sparse(state[name])
            if sparse_nbytes(entry) < state[name].numel() * state[name].element_size():
                sparse[name] = entry
    exp = {
        "format": FORMAT, "version": 1, "storage": storage,
        "arch": cfg["model"]["arch"], "width": cfg["model"]["width"], "dataset": cfg["data"]["dataset"],
        "config": cfg, "source": dict(source or {}),
        "shapes": {k: list(v.shape) for k, v in state.items()},
        "state": {k: v for k, v in state.items() if k not in sparse},
        "sparse": sparse,
        "channels": kept,
        "sparsity": sparsity_report(model, cfg),
        "figures": {"params": {"dense": dense_fig["params"], "nonzero": dense_fig["nonzero"],
                               "compact": small_fig["params"]},
                    "macs": {"dense": dense_fig["macs"], "nonzero": dense_fig["nonzero_macs"],
                             "compact": small_fig["macs"]},
                    "bytes": {"checkpoint": (source or {}).get("bytes"), "dense": nbytes_saved(dense_sd)}},
    }
    storage_bits = {"export": payload_bits(exp),
                    "dense_float32": 8 * sum(t.numel() * t.element_size() for t in dense_sd.values())}
    quantized = {n: e for n, b in (bits or {}).items() if n in state
                 for e in [encode_quantized(state[n], b, (scales or {}).get(n))] if e is not None}
    if quantized:
        exp["figures"]["bytes"]["float_export"] = nbytes_saved(exp)
        exp["version"], exp["quantized"] = VERSION, quantized
        exp["state"] = {k: v for k, v in exp["state"].items() if k not in quantized}
        exp["sparse"] = {k: v for k, v in exp["sparse"].items() if k not in quantized}
        storage_bits = {**storage_bits, "float_export": storage_bits["export"], "export": payload_bits(exp)}
    exp["figures"]["storage_bits"] = storage_bits
    return exp


def quantized_layers(cfg, stage, model):
    """{name: bits} of the layers a checkpoint or export of ``stage`` holds quantized: those of
    ``cfg``'s ``quant.bits`` resolved on ``model`` when the stage is the quantize stage (whose
    end, hard quantization, puts them on their levels); {} otherwise (a float model, or an
    earlier stage of a quantized run)."""
    qbits = (cfg.get("quant") or {}).get("bits") or {}
    return quant.resolve_bits(model, qbits) if stage == "quantize" and qbits else {}


def recorded_scales(ckpt):
    """{name: scale q} that the hard quantization of a quantize-stage checkpoint recorded (its
    convergence figures), or None."""
    return ((ckpt.get("convergence") or {}).get("quantize") or {}).get("scale")


def sparsity_report(model, cfg):
    """``admm.sparsity_report`` of ``model`` under ``cfg``'s prune ratios and sparsity type."""
    ratios = admm_lib.resolve_ratios(model, cfg["prune"]["prune_ratios"])
    return admm_lib.sparsity_report(model, ratios, cfg["prune"]["sparsity_type"])


def model_from_checkpoint(ckpt, path):
    """The masked (dense) model of a checkpoint dict, on the CPU."""
    cfg = ckpt["config"]
    model = model_from_config(cfg, data_lib.INFO[cfg["data"]["dataset"]], "cpu")
    load_weights(model, ckpt, path, cfg)
    return model


def export_checkpoint(ckpt, path, storage=None, model=None):
    """(export dict, masked model) of the checkpoint dict ``ckpt`` read from ``path``. storage
    defaults to ``sparse`` for irregular pruning (nothing to remove, much to skip) and ``compact``
    for filter and column pruning. model: the masked model, if already built."""
    cfg = ckpt["config"]
    storage = storage or ("sparse" if cfg["prune"]["sparsity_type"] == "irregular" else "compact")
    model = model_from_checkpoint(ckpt, path) if model is None else model
    bits, scales = quantized_layers(cfg, ckpt.get("stage"), model), recorded_scales(ckpt)
    source = {"path": str(path), "stage": ckpt.get("stage"), "epoch": ckpt.get("epoch"),
              "adversarial": ckpt.get("adversarial"), "git": ckpt.get("git"),
              "bytes": os.path.getsize(path) if os.path.isfile(path) else None}
    return export_model(model, cfg, storage, source, bits, scales), model


def is_export(obj):
    return isinstance(obj, dict) and "format" in obj


def model_from_export(exp, path="export"):
    """(compact model on the CPU, config) rebuilt from an export dict; anything malformed is a
    one-line UserError naming ``path`` and the entry."""
    def bad(msg):
        return UserError(f"{path} is not a valid export file: {msg}")

    if not is_export(exp) or exp["format"] != FORMAT:
        raise bad(f"no 'format': {FORMAT!r} entry (write exports with export.py)")
    if exp.get("version") not in VERSIONS:
        raise bad(f"version {exp.get('version')!r}, this code reads versions {', '.join(map(str, VERSIONS))}")
    for key, typ in (("storage", str), ("arch", str), ("config", dict), ("shapes", dict), ("state", dict),
                     ("sparse", dict)):
        if not isinstance(exp.get(key), typ):
            raise bad(f"entry {key!r} is missing or not a {typ.__name__}")
    quantized = exp.get("quantized", {})  # version 1 has none
    if not isinstance(quantized, dict):
        raise bad("entry 'quantized' is not a dict")
    cfg = exp["config"]
    try:
        if cfg["model"]["arch"] != exp["arch"] or cfg["data"]["dataset"] not in data_lib.INFO:
            raise bad("config and arch disagree or the dataset is unknown")
    except (KeyError, TypeError):
        raise bad("config lacks model.arch or data.dataset") from None
    state = {}
    for name, shape in exp["shapes"].items():
        if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise bad(f"'shapes' entry {name!r} is not a list of sizes")
        if name in exp["state"]:
            t = exp["state"][name]
            if not isinstance(t, torch.Tensor):
                raise bad(f"state[{name!r}] is not a tensor")
        elif name in exp["sparse"]:
            try:
                t = decode_sparse(exp["sparse"][name], name)
            except ValueError as e:
                raise bad(str(e)) from None
        elif name in quantized:
            try:
                t = decode_quantized(quantized[name], name)
            except ValueError as e:
                raise bad(str(e)) from None
        else:
            raise bad(f"tensor {name!r} is listed in 'shapes' but stored nowhere")
        if list(t.shape) != list(shape):
            raise bad(f"tensor {name!r} has shape {list(t.shape)}, 'shapes' says {list(shape)}")
        state[name] = t
    extra = (set(exp["state"]) | set(exp["sparse"]) | set(quantized)) - set(exp["shapes"])
    if extra:
        raise bad(f"tensors not listed in 'shapes': {', '.join(sorted(extra))}")
    try:
        model = model_from_config(cfg, data_lib.INFO[cfg["data"]["dataset"]], "cpu")
        fit_to_state(model, state)
        model.load_state_dict(state)
        with torch.no_grad():  # layer shapes must fit together, not only each one
            model.eval()(torch.zeros(1, *input_shape(cfg)))
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise bad(f"the tensors do not make a {exp['arch']} model ({(str(e).splitlines() or [''])[0][:200]})") from None
    return model, cfg


@reads("export")
def load_exported(path):
    """(compact model on the CPU in eval mode, config, export dict) of an export file."""
    exp = load_file(path)
    model, cfg = model_from_export(exp, path)
    return model.eval(), cfg, exp


def figures(exp, export_bytes):
    """The compression figures of an export dict whose file has ``export_bytes`` bytes:
    {"params": {dense, nonzero, compact}, "macs": {dense, nonzero, compact} (per image),
    "bytes": {checkpoint, dense, export}, "storage", "channels": {group: [kept, total]}}."""
    f = copy.deepcopy(exp["figures"])
    f["bytes"]["export"] = export_bytes
    f["storage"] = exp["storage"]
    f["channels"] = exp["channels"]
    return f


@reads("checkpoint or export")
def load_model(path, device="cpu"):
    """What ``eval.py --ckpt PATH`` needs from a training checkpoint or an export file:
    (model on ``device`` in eval mode, config, meta). meta: "format" ("checkpoint" or "export"),
    "stage", "adversarial", "sparsity" (the pruned model's ``admm.sparsity_report``, also for an
    export, whose compact layers no longer show the zeros), "compression" (``figures``; for a
    checkpoint the export is built in memory with the default storage and not written; None for a
    model that declares no channel groups) and "convergence" (a checkpoint's ADMM residuals and
    pruned energies by stage, ``TrainState.convergence``; empty for an export), and "quantization"
    (``quantization_meta`` of the quantized layers; None when none is, and for a checkpoint of
    an earlier stage)."""
    obj = load_file(path)
    if is_export(obj):
        model, cfg = model_from_export(obj, path)
        src = obj.get("source") or {}
        meta = {"format": "export", "stage": src.get("stage"), "adversarial": src.get("adversarial"),
                "sparsity": obj["sparsity"], "compression": figures(obj, os.path.getsize(path)), "convergence": {}}
        scales = {n: e["scale"] for n, e in (obj.get("quantized") or {}).items()}
        meta["quantization"] = quantization_meta(model, quantized_layers(cfg, meta["stage"], model), scales)
    else:
        if not isinstance(obj, dict) or "model" not in obj or "config" not in obj:
            raise UserError(f"{path} is neither a checkpoint nor an export written by this project")
        cfg = obj["config"]
        model = model_from_checkpoint(obj, path)
        exp = None
        if has_channel_groups(model):
            exp, _ = export_checkpoint(obj, path, model=model)
            sparsity, compression = exp["sparsity"], figures(exp, nbytes_saved(exp))
        else:  # every architecture evaluates; only the compact figures need to know its channel groups
            sparsity, compression = sparsity_report(model, cfg), None
        meta = {"format": "checkpoint", "stage": obj.get("stage"), "adversarial": obj.get("adversarial"),
                "sparsity": sparsity, "compression": compression,
                "convergence": (obj.get("metrics") or {}).get("convergence") or {}}
        meta["quantization"] = quantization_meta(model, quantized_layers(cfg, meta["stage"], model),
                                                 recorded_scales(obj))
    return model.to(device).eval(), cfg, meta


def quantization_meta(model, bits, scales):
    """None without quantized layers (``bits`` empty), else {"layers": {name: {bits,
    distinct_nonzero, scale}} (``quant.quantization_report`` on ``model``'s weights; ``scales``
    the recorded ones), "warnings": [lines]}."""
    if not bits:
        return None
    rows, warn = quant.quantization_report(admm_lib.prunable_weights(model), bits, scales)
    return {"layers": rows, "warnings": warn}


def _mb(n):
    return "n/a" if n is None else f"{n / 2**20:.3f} MiB"


def format_figures(f):
    """Text table of ``figures``."""
    p, m, b = f["params"], f["macs"], f["bytes"]
    lines = [f"{'':12} {'dense':>14} {'nonzero':>14} {'compact':>14}",
             f"{'parameters':12} {p['dense']:14,d} {p['nonzero']:14,d} {p['compact']:14,d}"
             f"   ({p['dense'] / max(p['compact'], 1):.2f}x fewer)",
             f"{'MACs/image':12} {m['dense']:14,d} {m['nonzero']:14,d} {m['compact']:14,d}"
             f"   ({m['dense'] / max(m['compact'], 1):.2f}x fewer)",
             f"file size: checkpoint {_mb(b['checkpoint'])}, dense weights {_mb(b['dense'])}, "
             f"export ({f['storage']}) {_mb(b['export'])} = {b['dense'] / max(b['export'], 1):.2f}x smaller "
             f"than the dense weights"
             + (f", {b['float_export'] / max(b['export'], 1):.2f}x smaller than the float export ({f['storage']}) "
                f"{_mb(b['float_export'])}" if b.get("float_export") else ""),
             "channels kept: " + ", ".join(f"{g} {k}/{n}" for g, (k, n) in f["channels"].items())]
    return "\n".join(lines)
