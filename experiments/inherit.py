"""Inherited initialization (Ye et al. ICCV 2019, Sec. 4.2): a narrow LeNet built from a wide one.

Per layer the units with the largest L2 norm are kept, and each later layer is cut down to the
inputs that survive, so the narrow network computes exactly what the wide one computes when its
other units are zeroed (weights and biases):

    conv1: keep the 2*w_small filters of largest norm                      -> kept channels k1
    conv2: keep its inputs k1; then the 4*w_small filters of largest norm   -> kept channels k2
    fc1:   keep the input columns of k2 (one 7x7 block per channel, channel-major as in
           ``x.flatten(1)``); then the 64*w_small rows of largest norm    -> kept units k3
    fc2:   keep the input columns k3 (all classes)

Kept indices stay in their original order. Any other entry of the state dict (the normalization
buffers) is copied as it is.

    python experiments/inherit.py --ckpt runs/w8/pretrain.pt --width 2 --out inherited.pt
"""
import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import load_checkpoint, save_checkpoint  # noqa: E402


def _top(rows, k):
    """Indices (ascending) of the ``k`` rows of ``rows`` ([N, ...]) with the largest L2 norm."""
    norms = rows.flatten(1).norm(dim=1)
    return torch.topk(norms, k).indices.sort().values


def inherit_lenet(state, width_small):
    """(state dict of LeNet(width_small), {layer: kept indices}) from a wider LeNet's ``state``."""
    w1, b1 = state["conv1.weight"], state["conv1.bias"]
    w2, b2 = state["conv2.weight"], state["conv2.bias"]
    f1, c1 = state["fc1.weight"], state["fc1.bias"]
    f2 = state["fc2.weight"]
    c_in_fc1 = w2.shape[0]
    spatial = f1.shape[1] // c_in_fc1  # (image_size // 4) ** 2
    if 2 * width_small > w1.shape[0]:
        raise ValueError(f"width {width_small} is not smaller than the source's {w1.shape[0] // 2}")

    k1 = _top(w1, 2 * width_small)
    w2k = w2[:, k1]
    k2 = _top(w2k, 4 * width_small)
    cols = (k2[:, None] * spatial + torch.arange(spatial)).flatten()
    f1k = f1[:, cols]
    k3 = _top(f1k, 64 * width_small)

    out = {k: v.clone() for k, v in state.items()}
    out.update({"conv1.weight": w1[k1].clone(), "conv1.bias": b1[k1].clone(),
                "conv2.weight": w2k[k2].clone(), "conv2.bias": b2[k2].clone(),
                "fc1.weight": f1k[k3].clone(), "fc1.bias": c1[k3].clone(),
                "fc2.weight": f2[:, k3].clone(), "fc2.bias": state["fc2.bias"].clone()})
    return out, {"conv1": k1.tolist(), "conv2": k2.tolist(), "fc1": k3.tolist()}


def inherited_checkpoint(src, width_small, source_path=""):
    """A checkpoint dict that ``--init`` accepts: the narrow model, its config (the source's
    resolved config with ``model.width`` replaced), no masks, no ADMM state."""
    if src["arch"] != "lenet":
        raise ValueError(f"inherited initialization is implemented for lenet, not {src['arch']}")
    state, kept = inherit_lenet(src["model"], width_small)
    cfg = copy.deepcopy(src["config"])
    cfg["model"]["width"] = width_small
    return {"stage": "inherited", "epoch": 0, "step": 0, "arch": "lenet", "width": width_small,
            "dataset": src.get("dataset", cfg["data"]["dataset"]), "adversarial": src.get("adversarial", True),
            "method": src.get("method", "pgd"), "config": cfg, "model": state, "optimizer": None,
            "admm": None, "masks": None, "metrics": {}, "inherited_from": {"path": source_path,
            "width": src["width"], "kept": kept}}


def main(argv=None):
    p = argparse.ArgumentParser(description="Build a narrow LeNet checkpoint from a wide one (inherited init).")
    p.add_argument("--ckpt", required=True, help="the wide model's checkpoint (e.g. pretrain.pt)")
    p.add_argument("--width", type=int, required=True, help="the narrow width")
    p.add_argument("--out", required=True, help="where to write the narrow checkpoint")
    a = p.parse_args(argv)
    ckpt = inherited_checkpoint(load_checkpoint(a.ckpt), a.width, a.ckpt)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    save_checkpoint(ckpt, a.out)
    load_checkpoint(a.out)  # the project's own loader must accept it
    print(f"wrote {a.out}: lenet w={a.width} inherited from w={ckpt['inherited_from']['width']}")


if __name__ == "__main__":
    main()
