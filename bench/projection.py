"""Projection speed and exactness: our projections against a NumPy percentile reference written
the way the original ADMM code did it (tensor -> numpy, np.percentile, zero below, -> tensor).

    python bench/projection.py [--device cpu|cuda]

For every prunable layer of ResNet-18 and VGG-16 at w=16 and each scheme, at ratio 0.8.
Target: at least 5x faster, and exact (``n - round(ratio * n)`` groups kept) where the reference
is not.
"""
import argparse

import numpy as np
import torch

from benchutil import machine, time_many, verdict

import admm as admm_lib
from models import build_model

RATIO = 0.8


def reference(w, ratio, scheme):
    """The original code's way: a percentile threshold on |w| or group norms, computed in numpy."""
    w_np = w.detach().cpu().float().numpy()
    w2 = w_np.reshape(w_np.shape[0], -1)
    if scheme == "irregular":
        score = np.abs(w2)
    elif scheme == "filter":
        score = np.linalg.norm(w2, axis=1)[:, None].repeat(w2.shape[1], 1)
        th = np.percentile(np.linalg.norm(w2, axis=1), ratio * 100)
        return torch.from_numpy((w2 * (score >= th)).reshape(w_np.shape)).to(w.device)
    else:
        th = np.percentile(np.linalg.norm(w2, axis=0), ratio * 100)
        score = np.linalg.norm(w2, axis=0)[None, :].repeat(w2.shape[0], 0)
        return torch.from_numpy((w2 * (score >= th)).reshape(w_np.shape)).to(w.device)
    th = np.percentile(score, ratio * 100)
    w2 = w2.copy()
    w2[score < th] = 0
    return torch.from_numpy(w2.reshape(w_np.shape)).to(w.device)


def zero_groups(w, scheme):
    s = admm_lib.layer_sparsity(w)
    w2 = w.flatten(1)
    n = {"irregular": w2.numel(), "filter": w2.shape[0], "column": w2.shape[1]}[scheme]
    return round(s[{"irregular": "element", "filter": "filter", "column": "column"}[scheme]] * n), n


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    print(machine())
    ok = True
    for arch in ("resnet18", "vgg16"):
        torch.manual_seed(0)
        model = build_model(arch, 16, 10, 3, 32).to(args.device)
        weights = list(admm_lib.prunable_weights(model).values())
        # Quantize to a grid so that ties occur, as they do in trained, partly pruned weights.
        weights = [torch.round(w * 512) / 512 for w in weights]
        for scheme in admm_lib.SCHEMES:
            t = time_many({"ours": lambda: [admm_lib.project(w, RATIO, scheme) for w in weights],
                           "reference": lambda: [reference(w, RATIO, scheme) for w in weights]},
                          args.device, warmup=1, reps=5)
            exact_ours = exact_ref = 0
            for w in weights:
                k, n = zero_groups(admm_lib.project(w, RATIO, scheme), scheme)
                exact_ours += k == round(RATIO * n)
                k, n = zero_groups(reference(w, RATIO, scheme), scheme)
                exact_ref += k == round(RATIO * n)
            speedup = t["reference"] / t["ours"]
            print(f"{arch:9} {scheme:9} ours {t['ours'] * 1e3:8.1f} ms  reference {t['reference'] * 1e3:8.1f} ms  "
                  f"speed-up {speedup:5.1f}x  exact layers: ours {exact_ours}/{len(weights)}, "
                  f"reference {exact_ref}/{len(weights)}")
            ok &= verdict(speedup >= 5 and exact_ours == len(weights),
                          f"{arch} {scheme}: >= 5x faster ({speedup:.1f}x) and exact ({exact_ours}/{len(weights)})")
    print("\nall PASS" if ok else "\nsome FAIL")


if __name__ == "__main__":
    main()
