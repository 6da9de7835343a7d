"""What several test files share (no test module imports another): the repository root, a trained
LeNet, randomly pruned models of each architecture and their inputs, quantized LeNet checkpoints,
and a disk that fills up on demand."""
import builtins
import errno
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

import admm
import forkserver
import data
from config import load_config
from data import INFO
from deploy import exportfile
from models import build_model, model_from_config
from pruning import quant

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The variables that change a run's results, fixed for every script a test starts, whatever the
# caller exported: OpenMP's thread count changes float sums (a reference run in the test process
# uses torch.set_num_threads(1), conftest.py), cuBLAS needs a fixed workspace to be deterministic,
# and the hash seed orders sets and dict-of-set iterations.
SCRIPT_ENV = {"OMP_NUM_THREADS": "1", "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "PYTHONHASHSEED": "0"}


def script_env(**extra):
    """The environment of a script a test starts: the caller's, with ``SCRIPT_ENV`` set explicitly
    and ``extra`` (e.g. ``ADMM_AT_TEST_SIGNAL``) on top."""
    return {**os.environ, **SCRIPT_ENV, **extra}


def run_script(*args, cwd=ROOT, timeout=120):
    """``python *args`` as a test starts a script: through the fork server, with ``script_env()``,
    its output captured as text; the ``CompletedProcess``."""
    return forkserver.run([sys.executable, *args], cwd=cwd, env=script_env(), capture_output=True, text=True,
                          timeout=timeout)


def train_lenet(split, epochs, batch_size, width=2, lr=3e-3):
    """A LeNet of ``width`` trained naturally with Adam on ``split`` (seeded by the caller), in eval mode."""
    model = build_model("lenet", width)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for epoch in range(epochs):
        for x, y in data.batches(split, batch_size, "cpu", shuffle=True, seed=epoch):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


# --------------------------------------------------------------------------- pruned models (deploy)

SETUPS = {"lenet": (2, "demo"), "vgg16": (1, "cifar10"), "resnet18": (1, "cifar10")}  # width, dataset


def make(arch, scheme="irregular", ratio=0.5, seed=0):
    """(masked model in eval mode, cfg): random weights, every layer pruned at ``ratio`` (but the
    output layer for filter pruning), then BN statistics measured on random images (as after
    retraining; a pruned filter's channel gets mean 0, variance 0) and random BN affine
    parameters, so that such a channel carries a nonzero constant, its BN shift, half the time."""
    torch.manual_seed(seed)
    width, dataset = SETUPS[arch]
    cfg = load_config(None, [f"model.arch={arch}", f"model.width={width}", f"data.dataset={dataset}",
                             f"prune.sparsity_type={scheme}"])
    model = model_from_config(cfg, INFO[dataset], "cpu")
    weights = admm.prunable_weights(model)
    names = list(weights)[:-1] if scheme == "filter" else list(weights)
    if ratio:
        admm.hard_prune(weights, {n: ratio for n in names}, scheme)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:
            m.momentum = None  # cumulative average over the calibration batch
        model.train()(torch.rand(32, *exportfile.input_shape(cfg)))
        for m in bns:
            m.momentum = 0.1
            m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    return model.eval(), cfg


def inputs(cfg, n=16):
    return torch.rand(n, *exportfile.input_shape(cfg), generator=torch.Generator().manual_seed(1))


def max_rel_diff(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# --------------------------------------------------------------------------- quantized LeNet

def pruned_lenet(ratio=0.5, bits="4"):
    """(masked LeNet w=2 with random weights, cfg with quant.bits.*=``bits``, masks)."""
    torch.manual_seed(0)
    cfg = load_config(None, ["model.arch=lenet", "model.width=2", "data.dataset=demo", f"quant.bits.*={bits}",
                             f"prune.prune_ratios.*={ratio}"])
    model = model_from_config(cfg, INFO["demo"], "cpu")
    masks = admm.hard_prune(admm.prunable_weights(model), admm.resolve_ratios(model, cfg["prune"]["prune_ratios"]),
                            "irregular")
    return model.eval(), cfg, masks


def checkpoint(model, cfg, masks, stage, scales=None):
    """A checkpoint dict of ``stage`` as the training scripts write it, with the fields export and eval read."""
    return {"stage": stage, "epoch": 1, "arch": "lenet", "width": 2, "dataset": "demo", "config": cfg,
            "adversarial": False, "model": model.state_dict(), "masks": masks,
            "convergence": {"quantize": {"scale": scales}} if scales else {}}


def quantized_lenet(ratio=0.5, bits="4"):
    """(model, cfg, masks, float checkpoint of retrain, quantized checkpoint): the pruned LeNet
    hard-quantized as the quantize stage's end does, its scales recorded."""
    model, cfg, masks = pruned_lenet(ratio, bits)
    before = checkpoint(model, cfg, masks, "retrain")
    before["model"] = {k: v.clone() for k, v in before["model"].items()}
    scales, _ = quant.hard_quantize(admm.prunable_weights(model),
                                    quant.Quantization(quant.resolve_bits(model, cfg["quant"]["bits"]), masks))
    return model, cfg, masks, before, checkpoint(model, cfg, masks, "quantize", scales)


# --------------------------------------------------------------------------- a disk that fills up
#A disk that fills up, on demand, for the tests of write errors.
#
#``full_disk(monkeypatch, name, skip=0, after=0, calls=1)`` replaces ``open``: the first
#``skip`` times a file called ``name`` (or the temp file of its atomic save, ``.tmp-<name>-*``) is
#opened for writing behave normally; from then on each such file takes ``calls - 1`` writes and
#``after`` more bytes, and then fails with ENOSPC, as a write does when the disk fills up in the
#middle of it (the bytes before the failure are on disk). ``calls`` counts ``write`` calls (a
#log record is one), so a test can pick the line that fails whatever its paths' lengths. Every write of the project goes through ``open`` by name, so this reaches each
#write site: checkpoints, metrics.jsonl, log.txt, config.yaml, eval.json, exports, plots.

class _FillingFile:
    """A writable file that takes ``calls - 1`` writes and ``budget`` more bytes, then fails with ENOSPC."""

    def __init__(self, f, budget, calls):
        self._f, self._budget, self._calls = f, budget, calls

    def write(self, data):
        self._calls -= 1
        if self._calls > 0:
            return self._f.write(data)
        if len(data) <= self._budget:
            self._budget -= len(data)
            return self._f.write(data)
        self._f.write(data[:self._budget])
        self._f.flush()
        self._budget = 0
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def full_disk(monkeypatch, name, skip=0, after=0, calls=1):
    """Make writes to files called ``name`` fail as on a full disk (see the module docstring).
    Returns a dict whose "failed" counts the files that failed."""
    real_open, state = builtins.open, {"opened": 0, "failed": 0}

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        base = os.path.basename(str(file))
        if not any(c in mode for c in "wax") or not (base == name or base.startswith(f".tmp-{name}-")):
            return f
        state["opened"] += 1
        if state["opened"] <= skip:
            return f
        state["failed"] += 1
        return _FillingFile(f, after, calls)

    monkeypatch.setattr(builtins, "open", fake_open)
    return state


# --------------------------------------------------------------------------- a stop at a known step

class StopAt:
    """A stop request at the ``n``-th step check (deterministic, no signal race)."""
    signum = 15  # SIGTERM

    def __init__(self, n):
        self.n, self.calls = n, 0

    def requested(self, step=None):
        if step is None:
            return False
        self.calls += 1
        return self.calls == self.n
