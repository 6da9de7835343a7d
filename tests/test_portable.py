"""Exports that need no repository: the pt2 program and the safetensors export
load in a fresh Python process with only torch, safetensors and numpy, this repository off its
path, and give the source checkpoint's logits and accuracy; eval.py attacks the pt2 program to
the source's accuracies; dense MACs agree with torch's FlopCounterMode; ``deterministic`` runs
repeat bit for bit."""
import json
import os
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from deploy import formats
from deploy import measure
from models import build_model
import forkserver
from helpers import script_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden", "retrain.pt")

# Run with ``python -I`` from another folder: no PYTHONPATH, no script folder, no repository.
# The demo's test split worked out here from the file: the last 100 of each digit's 500.
FRESH = r'''
import json, sys
import numpy as np, torch, torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
pt2, st, npz = sys.argv[1:4]
assert not any("admm" in p or p.endswith("wt-byom") for p in sys.path), sys.path
d = np.load(npz)
labels = d["labels"].astype(np.int64)
test = np.concatenate([np.flatnonzero(labels == c)[400:] for c in range(10)])
x = torch.from_numpy(d["images"][test]).float().div(255).unsqueeze(1)
y = torch.from_numpy(labels[test])

program = torch.export.load(pt2).module()          # torch alone

state = load_file(st)                              # the compact state dict
with safe_open(st, "pt") as f:
    meta = json.loads(f.metadata()["export"])
assert meta["arch"] == "lenet" and all(list(state[k].shape) == s for k, s in meta["shapes"].items())

def lenet(s, x):                                   # a LeNet built from those shapes, by hand
    x = (x - s["normalize.mean"]) / s["normalize.std"]
    def conv(name, h):
        out = F.conv2d(h, s[name + ".weight"], s[name + ".bias"], padding=2)
        if name + ".const_kernel" in s:                # removed channels' constant share
            out = out + F.conv2d(h.new_ones(1, 1, *h.shape[2:]), s[name + ".const_kernel"], padding=2)
        return out
    h = F.max_pool2d(F.relu(conv("conv1", x)), 2)
    h = F.max_pool2d(F.relu(conv("conv2", h)), 2)
    return F.linear(F.relu(F.linear(h.flatten(1), s["fc1.weight"], s["fc1.bias"])), s["fc2.weight"], s["fc2.bias"])

with torch.no_grad():
    a, b = program(x), lenet(state, x)
print(json.dumps({"pt2": (a.argmax(1) == y).float().mean().item(), "safetensors": (b.argmax(1) == y).float().mean().item(),
                  "n": len(y), "logits_pt2": a[:8].tolist(), "logits_safetensors": b[:8].tolist()}))
'''


def export(ckpt, out, fmt, *extra):
    proc = forkserver.run([sys.executable, "export.py", "--ckpt", ckpt, "--out", str(out), "--format", fmt,
                           "--no-latency", *extra], cwd=ROOT, capture_output=True, text=True, timeout=300, env=script_env())
    assert proc.returncode == 0, proc.stderr
    return out


def fresh_process_check(ckpt, tmp_path):
    """(the fresh process's report, the source checkpoint's logits on the first 8 test digits of
    class 0 and its natural accuracy on the demo's test split, computed here through this repository)."""
    pt2 = export(ckpt, tmp_path / "m.export.pt2", "pt2")
    st = export(ckpt, tmp_path / "m.export.safetensors", "safetensors", "--storage", "compact")
    script = tmp_path / "fresh.py"
    script.write_text(FRESH)
    proc = forkserver.run([sys.executable, "-I", str(script), str(pt2), str(st), os.path.join(ROOT, "data", "mnist_5k.npz")],
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=300, env=script_env())
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    import config
    import data
    import numpy as np
    model, cfg, _ = formats.load_model(ckpt)
    _, test, _ = data.load_data(config.load_config(None))
    with torch.no_grad():
        accuracy = (model(test.images.float() / 255).argmax(1) == test.labels).float().mean().item()
        d = np.load(os.path.join(ROOT, "data", "mnist_5k.npz"))  # the fresh process's first 8: digits 0, in file order
        first = np.flatnonzero(d["labels"] == 0)[400:408]
        ref = model(torch.from_numpy(d["images"][first]).float().div(255).unsqueeze(1))
    return got, ref, accuracy


def test_pt2_and_safetensors_run_without_this_repository(tmp_path):
    got, ref, accuracy = fresh_process_check(GOLDEN, tmp_path)
    assert got["n"] == 1000 and got["pt2"] == got["safetensors"] == accuracy
    for key in ("logits_pt2", "logits_safetensors"):
        torch.testing.assert_close(torch.tensor(got[key]), ref, rtol=0, atol=1e-5)


def test_eval_attacks_the_pt2_program_to_the_sources_accuracies(tmp_path):
    pt2 = export(GOLDEN, tmp_path / "g.export.pt2", "pt2")
    reports = {}
    for name, path in (("source", GOLDEN), ("pt2", str(pt2))):
        proc = forkserver.run([sys.executable, "eval.py", "--ckpt", path, "--attacks", "natural,fgsm,pgd", "--steps", "5",
                               "--no-checks", "--limit", "200", "--json", str(tmp_path / f"{name}.json")],
                              cwd=ROOT, capture_output=True, text=True, timeout=300, env=script_env())
        assert proc.returncode == 0, proc.stderr
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert reports["pt2"]["checkpoint"]["format"] == "export"
    for attack in ("natural", "fgsm", "pgd"):
        assert reports["pt2"]["accuracy"][attack] == reports["source"]["accuracy"][attack], attack


def test_a_layout_1_safetensors_export_still_reads(tmp_path):
    """The layout before this change (tensors under state/...), written here by hand."""
    from safetensors.torch import save_file
    new = export(GOLDEN, tmp_path / "n.export.safetensors", "safetensors", "--storage", "compact")
    from safetensors import safe_open
    with safe_open(str(new), "pt") as f:
        meta = f.metadata()
        tensors = {f"state/{k}": f.get_tensor(k) for k in f.keys()}
    old = tmp_path / "old.export.safetensors"
    save_file(tensors, str(old), metadata={"format": meta["format"], "export": meta["export"]})
    a, _, _ = formats.load_exported(str(old))
    b, _, _ = formats.load_exported(str(new))
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("arch,width,shape", [("lenet", 4, (1, 28, 28)), ("vgg16", 2, (3, 32, 32)),
                                              ("resnet18", 2, (3, 32, 32)), ("wrn", 1, (3, 32, 32))])
def test_dense_macs_match_torchs_flop_counter(arch, width, shape):
    model = build_model(arch, width, 10, shape[0], shape[1]).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, *shape))
    # torch counts 2 FLOPs per multiply-accumulate of convolutions and matrix products.
    assert counter.get_total_flops() == 2 * measure.count(model, shape)["macs"]


def test_deterministic_runs_repeat_bit_for_bit(tmp_path):
    ckpts = []
    for run in ("a", "b"):
        proc = forkserver.run([sys.executable, "adv_main.py", "--config", "configs/demo.yaml", "--out", str(tmp_path / run),
                               "--stage", "pretrain", "--set", "deterministic=true", "--set", "model.width=1",
                               "--set", "pretrain.epochs=1", "--set", "data.train_limit=256", "--set", "eval.limit=50",
                               "--set", "eval.steps=2", "--set", "adv.steps=2"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300, env=script_env())
        assert proc.returncode == 0, proc.stderr
        ckpts.append(torch.load(tmp_path / run / "pretrain.pt", weights_only=True))
    a, b = ckpts
    assert a["config"]["deterministic"] is True
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert not torch.equal(a["model"]["conv1.weight"], build_model("lenet", 1).state_dict()["conv1.weight"])  # it trained
