"""CPU inference latency of compact exports against the dense (masked) models they come from.

    python bench/compact.py [--archs vgg16,resnet18] [--width 16] [--batch 64] [--threads 1] [--reps 5]

VGG-16 and ResNet-18 on 32x32 inputs with random weights and random BN statistics, hard-pruned
with ``admm.hard_prune`` at the same ratio in every conv (the output layer stays dense, as in
the shipped configs): filter pruning at 50 % and 75 %, column pruning at 75 %. For each, the
compact model of ``channels.compact_model`` is checked against the masked model, then both are
timed in turns in this one process (median of ``--reps`` after a warm-up). Printed: MAC
reduction (dense / compact), measured speed-up, and for filter pruning PASS/FAIL of the target
"speed-up >= half the MAC reduction".

Column pruning removes a channel only where all its columns are pruned; what remains are
partially pruned convolutions. ``ColumnConv2d`` tries the other way to save their work: im2col
of the kept columns only (a gather) and one smaller matmul. Its row is "column im2col".
"""
import argparse
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from benchutil import machine, time_many, verdict  # also puts the repo root on sys.path
import admm  # noqa: E402
from deploy import channels  # noqa: E402
from deploy import exportfile  # noqa: E402
from deploy import measure  # noqa: E402
from config import load_config  # noqa: E402
from data import INFO  # noqa: E402
from models import model_from_config  # noqa: E402

CASES = [("filter", 0.5), ("filter", 0.75), ("column", 0.75)]


class ColumnConv2d(nn.Module):
    """A column-pruned Conv2d computed as im2col of the kept columns only + one matmul.

    weight: [out, kept columns]; the gather index into the zero-padded, flattened input is built
    once per input size. Same outputs as the conv it replaces (groups=1, zero padding)."""

    def __init__(self, conv):
        super().__init__()
        w = conv.weight.detach()
        self.keep = (w.flatten(1) != 0).any(0).nonzero().flatten()
        self.weight = nn.Parameter(w.flatten(1)[:, self.keep].contiguous())
        self.bias = conv.bias
        self.const = conv if isinstance(conv, channels.FoldedConv2d) else None
        self.k, self.stride, self.padding, self.in_channels = conv.kernel_size, conv.stride, conv.padding, w.shape[1]
        self._index = {}

    def index(self, h, w):
        if (h, w) not in self._index:
            (kh, kw), (sh, sw), (ph, pw) = self.k, self.stride, self.padding
            hp, wp = h + 2 * ph, w + 2 * pw
            ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
            c, r = self.keep // (kh * kw), self.keep % (kh * kw)
            start = c * hp * wp + (r // kw) * wp + r % kw                                   # [K] column origin
            pos = (torch.arange(ho) * sh * wp).view(-1, 1) + torch.arange(wo) * sw          # [ho, wo] offsets
            self._index[(h, w)] = ((start.view(-1, 1) + pos.flatten()).flatten(), ho, wo)
        return self._index[(h, w)]

    def forward(self, x):
        n, _, h, w = x.shape
        idx, ho, wo = self.index(h, w)
        cols = F.pad(x, (self.padding[1],) * 2 + (self.padding[0],) * 2).flatten(1).index_select(1, idx)
        out = (self.weight @ cols.view(n, len(self.keep), ho * wo)).view(n, -1, ho, wo)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        if self.const is not None:
            out = out + F.conv2d(x.new_ones(1, 1, h, w), self.const.const_kernel, None, self.stride, self.padding)
        return out


def with_column_convs(model):
    """``model`` with every conv that has pruned columns replaced by a ``ColumnConv2d``."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Conv2d) and not (mod.weight.flatten(1) != 0).any(0).all():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, ColumnConv2d(mod))
    return model


def pruned_model(arch, width, scheme, ratio, seed=0):
    """Random-weight ``arch`` with random BN statistics, hard-pruned at ``ratio`` in every conv."""
    torch.manual_seed(seed)
    cfg = load_config(None, [f"model.arch={arch}", f"model.width={width}", "data.dataset=cifar10",
                             f"prune.sparsity_type={scheme}"])
    model = model_from_config(cfg, INFO["cifar10"], "cpu")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    weights = admm.prunable_weights(model)
    admm.hard_prune(weights, {n: ratio for n in list(weights)[:-1]}, scheme)
    return model.eval(), cfg


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default="vgg16,resnet18")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (set explicitly; default 1)")
    p.add_argument("--reps", type=int, default=5, help="timed runs per model (the median is kept), after one warm-up")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{machine()} (load average {load:.2f}); batch {args.batch}, median of {args.reps} after 1 warm-up")
    print(f"{'arch':9} {'pruning':13} {'model':15} {'MACs/img':>14} {'MAC red.':>9} {'latency':>10} "
          f"{'speed-up':>9}  target")
    x = torch.rand(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t_start, verdicts = time.time(), []
    for arch in args.archs.split(","):
        for scheme, ratio in CASES:
            masked, cfg = pruned_model(arch, args.width, scheme, ratio)
            shape = exportfile.input_shape(cfg)
            models = {"dense (masked)": masked, "compact": channels.compact_model(masked, shape).eval()}
            dense_fig = measure.count(masked, shape)
            macs = {"dense (masked)": dense_fig["macs"], "compact": measure.count(models["compact"], shape)["macs"]}
            if scheme == "column":
                models["column im2col"] = with_column_convs(channels.compact_model(masked, shape)).eval()
                macs["column im2col"] = dense_fig["nonzero_macs"]  # a column-pruned conv's nonzero work
            with torch.no_grad():
                ref = masked(x[:8])
                for name, m in models.items():  # a fast but wrong model would make a false figure
                    err = ((m(x[:8]) - ref).abs().max() / ref.abs().max()).item()
                    assert err < 1e-4, f"{arch} {scheme} {name}: outputs differ from the masked model ({err:.2e})"
            with torch.no_grad():
                t = time_many({k: (lambda m=m: m(x)) for k, m in models.items()}, warmup=1, reps=args.reps)
            for name in models:
                red, speed = macs["dense (masked)"] / macs[name], t["dense (masked)"] / t[name]
                target = ""
                if name != "dense (masked)" and scheme == "filter":
                    target = f"{'PASS' if speed >= red / 2 else 'FAIL'} (>= {red / 2:.2f}x)"
                    verdicts.append(speed >= red / 2)
                print(f"{arch:9} {f'{scheme} {ratio:.0%}':13} {name:15} {macs[name]:14,d} {red:8.2f}x "
                      f"{t[name] * 1e3:8.1f}ms {speed:8.2f}x  {target}", flush=True)
    verdict(all(verdicts), f"filter pruning, speed-up >= MAC reduction / 2 in {sum(verdicts)} of {len(verdicts)} "
                           f"cases (total time {time.time() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
