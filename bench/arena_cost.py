"""What the arena's deeper-net check would cost here: the time of one adversarial
training step of each deeper net over LeNet w=4's, and the arena's LeNet cells scaled by it.

    OMP_NUM_THREADS=1 python bench/arena_cost.py [--summary runs/experiments/arena/summary.json]

One step = PGD-5 (eps 0.1, step 0.05) on a batch of 64 Fashion-MNIST-shaped images, then the
update (Adam), as the arena's cells train. The nets take turns, so machine load hits them alike.
With ``--summary``, the projection multiplies the median wall time of the arena's finished LeNet
cells (training cells and AutoAttack cells apart) by the step ratio: a lower bound for BatchNorm
nets, whose evaluation also costs more per image.
"""
import argparse
import os
import statistics
import sys

import torch

from benchutil import machine, time_many

from config import load_config
from data import INFO
from training.methods import Precision, make_method
from models import build_model
from training.state import make_optimizer
from common import run_cli

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
from frame import read_summary  # noqa: E402

NETS = (("lenet", 4), ("resnet18", 2))  # vgg16 pools 28x28 images down to nothing


def stepper(cfg, info, arch, width, x, y):
    torch.manual_seed(0)
    model = build_model(arch, width, info.num_classes, info.in_channels, info.image_size)
    method = make_method(cfg, True, info, torch.device("cpu"))
    opt, precision = make_optimizer(model.parameters(), cfg["pretrain"]), Precision("off", torch.device("cpu"))
    model.train()
    return lambda: method.step(model, model, x, y, opt, None, precision)


SEEDS, METHODS, TARGETS = 2, 3, 2  # the check: 3 methods x 95/99 % x 2 seeds; AutoAttack at seed 0


def arena_cells(summary):
    """The arena's cells of a sweep summary (those that serve the finding with the ``arena`` key)."""
    from findings import FINDINGS
    number = next(f.number for f in FINDINGS if f.key == "arena")
    return [c for c in summary["cells"] if number in c["finding"]]


def projection(path, cells, ratios):
    wall = {}  # pretrain, autoattack, and "cell" for the pruning cells
    for c in cells:
        wall.setdefault(c["kind"] if c["kind"] in ("pretrain", "autoattack") else "cell", []).append(c["wall_s"])
    if len(wall) < 3:
        print(f"{path}: no finished training, pretrain and AutoAttack cells to scale")
        return
    med = {k: statistics.median(v) for k, v in wall.items()}
    print(f"arena LeNet w=4 cells here (median wall s): pretrain {med['pretrain']:.0f}, "
          f"cell {med['cell']:.0f}, AutoAttack {med['autoattack']:.0f}")
    n = {"pretrain": SEEDS, "cell": METHODS * TARGETS * SEEDS, "autoattack": METHODS * TARGETS}
    total = sum(n[k] * med[k] for k in n)
    for (arch, width), r in ratios.items():
        print(f"{arch} w={width}: {n['pretrain']} pretrains + {n['cell']} cells + {n['autoattack']} AutoAttack cells "
              f"~ {r * total / 3600:.1f} h of one core ({r * total / 7200:.1f} h two at a time)")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--summary", default=None)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    return run_cli(bench, args)


def bench(args):
    # the summary is read first: a missing or damaged one ends the command before the timing
    cells = arena_cells(read_summary(args.summary, "python experiments/sweep.py --spec experiments/arena.yaml")) \
        if args.summary else None
    cfg = load_config("configs/fashion_mnist.yaml", ["adv.steps=5", "adv.step_size=0.05"])  # the arena's attack
    info = INFO["fashion_mnist"]
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)
    print(machine())
    t = time_many({net: stepper(cfg, info, *net, x, y) for net in NETS}, warmup=1, reps=args.reps)
    base = t[NETS[0]]
    print(f"{'net':14} {'s/step':>7} {'vs lenet w=4':>13}")
    for (arch, width), s in t.items():
        print(f"{arch + ' w=' + str(width):14} {s:7.3f} {s / base:13.2f}")
    if args.summary:
        projection(args.summary, cells, {n: t[n] / base for n in NETS[1:]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
