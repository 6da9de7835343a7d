"""Measurement of models and exports: parameters and MACs (dense, nonzero, compact), bytes as
saved, CPU latency measured in turns, and the figures table that ``export.py`` and ``eval.py`` print."""
import copy
import io
import time

import torch
from torch import nn

from deploy.channels import FoldedConv2d


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



def figures(exp, export_bytes, file_format="torch"):
    """The compression figures of an export dict whose file (in ``file_format``, a name of
    ``formats.FORMATS``) has ``export_bytes`` bytes: {"params": {dense, nonzero, compact},
    "macs": {dense, nonzero, compact} (per image), "bytes": {checkpoint, dense, export}, "storage",
    "format", "channels": {group: [kept, total]}}."""
    f = copy.deepcopy(exp["figures"])
    f["bytes"]["export"] = export_bytes
    f["storage"] = exp["storage"]
    f["format"] = file_format
    f["channels"] = exp["channels"]
    return f


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
             f"export ({f['storage']}, {f.get('format', 'torch')}) {_mb(b['export'])} = {b['dense'] / max(b['export'], 1):.2f}x smaller "
             f"than the dense weights"
             + (f", {b['float_export'] / max(b['export'], 1):.2f}x smaller than the float export ({f['storage']}, torch) "
                f"{_mb(b['float_export'])}" if b.get("float_export") else ""),
             "channels kept: " + ", ".join(f"{g} {k}/{n}" for g, (k, n) in f["channels"].items())]
    return "\n".join(lines)
