"""Wall time per epoch of the three adversarial training methods on the same data and model.

    python bench/fast_at.py [--device cpu|cuda] [--limit N]

pgd (k=10, Madry et al.), fgsm_rs (Wong et al. 2020) and free (Shafahi et al. 2019, m=4 replays;
a free epoch makes m optimizer steps per minibatch, and a free stage runs epochs / m epochs, so its
cost per *scheduled* epoch is the free epoch's time / m). LeNet w=4, bundled digits, batch 128.
"""
import argparse
import time

import torch

from benchutil import machine, sync

import config
import data as data_lib
from attacks import PGD
from training.methods import free_step, train_step
from training.state import make_optimizer
from models import build_model


def epoch_time(method, train, device, eps=0.2, replays=4):
    torch.manual_seed(0)
    model = build_model("lenet", 4).to(device)
    opt = make_optimizer(model.parameters(), {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0})
    attack = {"pgd": PGD(eps, eps / 4, 10), "fgsm_rs": PGD(eps, 1.25 * eps, 1)}.get(method)
    delta = torch.zeros(128, 1, 28, 28, device=device)
    sync(device)
    t = time.perf_counter()
    for x, y in data_lib.batches(train, 128, device, shuffle=True):
        if method == "free":
            free_step(model, x, y, opt, delta, eps, replays)
        else:
            train_step(model, model, x, y, opt, attack)
    sync(device)
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--limit", type=int, default=2048, help="training examples per epoch")
    args = p.parse_args()
    print(machine())
    train, _, _ = data_lib.load_data(config.load_config(None, [f"data.train_limit={args.limit}"]))
    device = torch.device(args.device)
    epoch_time("fgsm_rs", train, device)  # warm-up
    t = {m: epoch_time(m, train, device) for m in ("pgd", "fgsm_rs", "free")}
    print(f"LeNet w=4, {len(train.labels)} examples, batch 128, on {device}")
    print(f"  pgd (k=10)   {t['pgd']:7.2f} s/epoch")
    print(f"  fgsm_rs      {t['fgsm_rs']:7.2f} s/epoch   {t['pgd'] / t['fgsm_rs']:5.1f}x faster than pgd")
    print(f"  free (m=4)   {t['free']:7.2f} s/epoch   = {t['free'] / 4:.2f} s per scheduled epoch, "
          f"{t['pgd'] / (t['free'] / 4):5.1f}x faster than pgd")


if __name__ == "__main__":
    main()
