"""Seconds per training epoch of each adversarial loss (adv.loss: ce, trades, mart) on the demo.

    python bench/loss_epoch.py [--config configs/demo.yaml] [--rounds 2]

One epoch = one pass of the demo config's training data through the training method's step
(the demo's PGD-7 at eps 0.3, batch 64, LeNet w=4), as in the pretrain stage, without the
per-epoch test. The losses take turns (ce, trades, mart, ce, ...) so the machine's load hits
them alike; the figures are medians over ``--rounds``, and the ratio to ce is the load-robust one.
"""
import argparse
import statistics
import time

import torch

from benchutil import machine

import data as data_lib
from config import load_config
from training.methods import Precision, make_method
from models import build_model
from training.state import make_optimizer

LOSSES = ("ce", "trades", "mart")


def epoch_seconds(cfg, train, info, loss, device):
    torch.manual_seed(0)
    cfg = {**cfg, "adv": {**cfg["adv"], "loss": loss}}
    model = build_model(cfg["model"]["arch"], cfg["model"]["width"], info.num_classes, info.in_channels,
                        info.image_size).to(device)
    method = make_method(cfg, True, info, device)
    opt, precision = make_optimizer(model.parameters(), cfg["pretrain"]), Precision("off", device)
    model.train()
    t = time.perf_counter()
    for x, y in data_lib.batches(train, cfg["data"]["batch_size"], device, shuffle=True, augment=False,
                                 seed=0, epoch=0):
        method.step(model, model, x, y, opt, None, precision)
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    cfg = load_config(args.config)
    device = torch.device("cpu")
    train, _, info = data_lib.load_data(cfg)
    print(machine())
    print(f"{cfg['data']['dataset']}: {len(train.labels)} training examples, batch {cfg['data']['batch_size']}, "
          f"PGD-{cfg['adv']['steps']} at eps {cfg['adv']['eps']}, {cfg['model']['arch']} w={cfg['model']['width']}")
    times = {loss: [] for loss in LOSSES}
    for _ in range(args.rounds):
        for loss in LOSSES:
            times[loss].append(epoch_seconds(cfg, train, info, loss, device))
    ce = statistics.median(times["ce"])
    print(f"{'loss':8} {'s/epoch':>8} {'vs ce':>6}")
    for loss in LOSSES:
        s = statistics.median(times[loss])
        print(f"{loss:8} {s:8.1f} {s / ce:6.2f}")


if __name__ == "__main__":
    main()
