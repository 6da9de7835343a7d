"""The experiments driver: inherited initialization, matched pruning ratios, and a --quick sweep
end to end (cells, summary, report tables and plots). These test the driver, not the paper's numbers."""
import json
import os
import subprocess
import sys

import torch

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "experiments"))
from inherit import inherit_lenet, inherited_checkpoint  # noqa: E402
from sweep import lenet_weight_counts, matched_ratios, plan  # noqa: E402

from common import load_checkpoint, save_checkpoint  # noqa: E402
from config import load_config  # noqa: E402
from evaluation import load_weights  # noqa: E402
from models.lenet import LeNet  # noqa: E402


def test_inherited_model_is_the_large_model_restricted_to_the_kept_units():
    large = LeNet(width=4)
    with torch.no_grad():  # distinct norms so the kept set is not decided by ties
        for p in large.parameters():
            p.mul_(torch.rand_like(p) + 0.5)
    state, kept = inherit_lenet(large.state_dict(), 2)
    small = LeNet(width=2)
    small.load_state_dict(state)
    assert [len(kept[k]) for k in ("conv1", "conv2", "fc1")] == [4, 8, 128]

    # Zero every unit of the large model that was not kept (weights and bias): it then computes
    # the small model's function exactly (ReLU(0) = 0 and max-pool of zeros is zero).
    cut = {k: v.clone() for k, v in large.state_dict().items()}
    for layer, n in (("conv1", 8), ("conv2", 16), ("fc1", 256)):
        drop = torch.ones(n, dtype=torch.bool)
        drop[kept[layer]] = False
        cut[f"{layer}.weight"][drop] = 0
        cut[f"{layer}.bias"][drop] = 0
    large.load_state_dict(cut)
    x = torch.rand(5, 1, 28, 28)
    assert torch.allclose(small(x), large(x), atol=1e-5)
    # and the kept filters are the ones of largest norm
    norms = large.conv1.weight.flatten(1).norm(dim=1)
    assert set(kept["conv1"]) == set(torch.topk(norms, 4).indices.tolist())


def test_inherited_checkpoint_loads_into_the_project(tmp_path):
    cfg = load_config(os.path.join(ROOT, "configs", "demo.yaml"), ["model.width=4"])
    src = {"arch": "lenet", "width": 4, "config": cfg, "model": LeNet(width=4).state_dict(), "adversarial": True}
    path = str(tmp_path / "inherited.pt")
    save_checkpoint(inherited_checkpoint(src, 1), path)
    ckpt = load_checkpoint(path)
    assert ckpt["width"] == 1 and ckpt["config"]["model"]["width"] == 1 and ckpt["masks"] is None
    load_weights(LeNet(width=1), ckpt, path, ckpt["config"])  # raises if arch/width/shapes disagree


def test_matched_ratios_hit_the_small_models_weight_count():
    for large, small in ((8, 2), (8, 4), (16, 1)):
        ratios = matched_ratios(large, small)
        counts = lenet_weight_counts(large)
        kept = sum(n * (1 - ratios[k]) for k, n in counts.items())
        assert abs(kept - sum(lenet_weight_counts(small).values())) < 2
        assert ratios["fc2.weight"] == 0.0  # the output layer stays dense (filter pruning)


def test_plan_shares_the_large_pretrained_model():
    import yaml
    with open(os.path.join(ROOT, "experiments", "paper_findings.yaml")) as f:
        spec = yaml.safe_load(f)
    cells = {c["id"]: c for c in plan(spec)}
    pruning = [c for c in cells.values() if c["kind"] in ("admm", "oneshot", "inherited")]
    assert pruning and all(c["deps"] == [f"pre-adv-w{spec['large_width']}-s{c['seed']}"] for c in pruning)
    assert all(d in cells for c in cells.values() for d in c["deps"])


def test_quick_sweep_end_to_end(tmp_path):
    out, docs = tmp_path / "sweep", tmp_path / "docs"
    run = lambda *a: subprocess.run([sys.executable, *a], cwd=ROOT, capture_output=True, text=True,  # noqa: E731
                                    timeout=600)
    proc = run("experiments/sweep.py", "--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and not summary["failed"]
    assert sorted(summary["done"]) == sorted(summary["planned"])
    for cid in summary["planned"]:
        cell = json.loads((out / "cells" / f"{cid}.json").read_text())
        assert 0.0 <= cell["eval"]["accuracy"]["pgd"] <= cell["eval"]["accuracy"]["natural"] + 1e-9
    assert {f for c in summary["cells"] for f in c["finding"]} == {1, 2, 3, 4, 5}

    # Resumable: a second run finds every cell done and runs nothing.
    again = run("experiments/sweep.py", "--quick", "--out", str(out))
    assert again.returncode == 0 and f"{len(summary['planned'])} already done" in again.stdout

    proc = run("experiments/report.py", "--summary", str(out / "summary.json"), "--out", str(docs))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (docs / "RESULTS.md").read_text()
    for n in range(1, 6):
        assert f"## Finding {n}" in text
    assert "±" in text or "1 seed" in text
    for png in ("robust_vs_width.png", "accuracy_vs_compression.png", "admm_vs_oneshot.png"):
        assert (docs / png).stat().st_size > 1000
