"""Inherited initialization (Ye et al. ICCV 2019, Sec. 4.2): a narrow model built from a wide one.

For any architecture that declares its channel groups (``models.Group``), each group keeps its
channels of largest L2 norm, as many as the narrow model has, and every layer is cut down to the
channels that survive (``channels.keep_channels``), so the narrow network computes what the wide
one computes when its other channels are zeroed (filters, biases, BN scale and shift).

The groups are scored in the order the model declares them, each on its producers' filters
restricted to the inputs kept so far. For LeNet:

    conv1: the 2*w_small filters of largest norm                              -> kept channels k1
    conv2: its filters restricted to the inputs k1; the 4*w_small largest     -> kept channels k2
    fc1:   its rows restricted to the input columns of k2 (one 7x7 block per channel,
           channel-major as in ``x.flatten(1)``); the 64*w_small largest     -> kept units k3
    fc2:   keeps the input columns k3 (all classes)

A group with several producers (a ResNet stream, written by the stem or a shortcut and every
block's conv2) scores a channel by the norm of all its producers' filters together, i.e. the sum
of their squared norms: the channel is one map, whatever writes it. A producer whose inputs
belong to a group scored later (in ResNet a block's conv1 reads the stream, which is scored after
the block's inner group) is scored on all those inputs. Kept indices stay in ascending order; any
other entry of the state dict (normalization buffers, BN batch counts) is copied as it is.

    python experiments/inherit.py --ckpt runs/w8/pretrain.pt --width 2 --out inherited.pt
"""
import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from deploy import channels  # noqa: E402
import data as data_lib  # noqa: E402
from common import load_checkpoint, save_checkpoint  # noqa: E402
from models import model_from_config  # noqa: E402


def inherit(state, small):
    """(state dict of the narrow model ``small``, {group name: kept channel indices}) from the
    state dict ``state`` of a wider model of the same architecture. Each group keeps as many
    channels as ``small``'s producers have; ``small`` is then loaded with the result (strictly,
    so a tensor that no group cut to the narrow shape is an error)."""
    out = {k: v.clone() for k, v in state.items()}
    mods, kept = dict(small.named_modules()), {}
    for g in channels.channel_groups(small):
        n, k = out[f"{g.producers[0][0]}.weight"].shape[0], mods[g.producers[0][0]].weight.shape[0]
        if k > n:
            raise ValueError(f"group {g.name}: the narrow model has {k} channels, the source only {n}")
        filters = torch.cat([out[f"{layer}.weight"].flatten(1) for layer, _ in g.producers], 1)  # [n, fan-in]
        keep = torch.topk(filters.norm(dim=1), k).indices.sort().values
        channels.keep_channels(out, g, keep)
        kept[g.name] = keep.tolist()
    small.load_state_dict(out)
    return out, kept


def inherited_checkpoint(src, width_small, source_path=""):
    """A checkpoint dict that ``--init`` accepts: the narrow model, its config (the source's
    resolved config with ``model.width`` replaced), no masks, no ADMM state."""
    cfg = copy.deepcopy(src["config"])
    cfg["model"]["width"] = width_small
    small = model_from_config(cfg, data_lib.INFO[cfg["data"]["dataset"]], "cpu")
    state, kept = inherit(src["model"], small)
    return {"stage": "inherited", "epoch": 0, "step": 0, "arch": src["arch"], "width": width_small,
            "dataset": src.get("dataset", cfg["data"]["dataset"]), "adversarial": src.get("adversarial", True),
            "method": src.get("method", "pgd"), "config": cfg, "model": state, "optimizer": None,
            "admm": None, "masks": None, "metrics": {}, "inherited_from": {"path": source_path,
            "width": src["width"], "kept": kept}}


def main(argv=None):
    p = argparse.ArgumentParser(description="Build a narrow model's checkpoint from a wide one (inherited init).")
    p.add_argument("--ckpt", required=True, help="the wide model's checkpoint (e.g. pretrain.pt)")
    p.add_argument("--width", type=int, required=True, help="the narrow width")
    p.add_argument("--out", required=True, help="where to write the narrow checkpoint")
    a = p.parse_args(argv)
    ckpt = inherited_checkpoint(load_checkpoint(a.ckpt), a.width, a.ckpt)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    save_checkpoint(ckpt, a.out)
    load_checkpoint(a.out)  # the project's own loader must accept it
    print(f"wrote {a.out}: {ckpt['arch']} w={a.width} inherited from w={ckpt['inherited_from']['width']}")


if __name__ == "__main__":
    main()
