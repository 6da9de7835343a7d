"""What the findings' plans share: the weight counts of a model, the ratios that prune one LeNet
to another's weight count, and the id of a dense (pretrained) cell."""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import admm  # noqa: E402
import data  # noqa: E402
from models import build_model  # noqa: E402


def weight_counts(arch, width, dataset="mnist"):
    """{prunable weight name: number of weights} of ``arch`` at ``width`` on ``dataset``'s images
    and classes (the default's 1 x 28 x 28 and 10 classes are what both specs' datasets have)."""
    info = data.INFO[dataset]
    with torch.device("meta"):  # shapes only: no memory, no random initialization
        model = build_model(arch, width, info.num_classes, info.in_channels, info.image_size)
    return {name: w.numel() for name, w in admm.prunable_weights(model).items()}


def total_weights(width):
    """Weights of the dense LeNet of ``width`` (conv and linear layers)."""
    return sum(weight_counts("lenet", width).values())


def matched_ratios(large, small, dense=("fc2.weight",), fill="fc1.weight"):
    """Prune ratios that take LeNet(large) to exactly LeNet(small)'s total number of weights.

    Each layer is cut to the small model's size of that layer, except the ``dense`` layers (kept
    whole: filter pruning must not prune the output layer, and the comparison of schemes uses the
    same ratios for all) and ``fill``, which absorbs the difference so the totals match.
    """
    L, S = weight_counts("lenet", large), weight_counts("lenet", small)
    ratios = {n: 1 - S[n] / L[n] for n in L if n not in dense and n != fill}
    ratios.update({n: 0.0 for n in dense})
    kept_elsewhere = sum(L[n] * (1 - r) for n, r in ratios.items())
    ratios[fill] = 1 - (sum(S.values()) - kept_elsewhere) / L[fill]
    return {n: round(r, 6) for n, r in ratios.items()}


def ratio_sets(ratios):
    return [f"prune.prune_ratios.{n}={r}" for n, r in ratios.items()]


def pre(mode, w, seed):
    """The id of the dense (pretrained) cell: ``mode`` adv or nat, LeNet width ``w``."""
    return f"pre-{mode}-w{w}-s{seed}"
