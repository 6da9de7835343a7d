"""Our PGD against torchattacks.PGD: throughput on the same model, batch and steps, and the
robust accuracy each reaches (random start off, so both are deterministic).

    python bench/attack.py [--device cpu|cuda]

Needs, beyond requirements.txt: scipy and torchattacks 3.5.1, installed without its dependencies
(its requests~=2.25.1 pin would downgrade requests; it never imports requests):
``pip install scipy && pip install --no-deps torchattacks==3.5.1``.

Target: at least 1.0x torchattacks' throughput, with equal robust accuracy.
The model is a LeNet w=4 trained naturally for one epoch on the bundled digits, in this script.
"""
import argparse

import torch
import torch.nn.functional as F

from benchutil import machine, time_many, verdict

import config
import data as data_lib
from attacks import PGD
from models import build_model


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    try:
        import torchattacks
    except ImportError as e:
        # torchattacks 3.5.1 imports torch, torchvision, numpy, tqdm (requirements.txt) and scipy; it also
        # declares requests~=2.25.1, which it never imports and which would downgrade requests: --no-deps.
        raise SystemExit(f"this benchmark needs torchattacks 3.5.1 and scipy ({e}): "
                         "pip install scipy && pip install --no-deps torchattacks==3.5.1")
    print(machine(), f"torchattacks {torchattacks.__version__}")
    device = torch.device(args.device)
    torch.manual_seed(0)
    train, test, _ = data_lib.load_data(config.load_config(None))
    model = build_model("lenet", 4).to(device)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for x, y in data_lib.batches(train, 64, device, shuffle=True):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    x, y = next(data_lib.batches(test, args.batch, device))
    eps, alpha = 0.2, 0.02
    ours = PGD(eps, alpha, args.steps, random_start=False)
    theirs = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=args.steps, random_start=False)
    t = time_many({"ours": lambda: ours(model, x, y), "torchattacks": lambda: theirs(x, y)}, device, warmup=2, reps=9)
    x_ours, x_theirs = ours(model, x, y), theirs(x, y)
    with torch.no_grad():
        acc_ours = (model(x_ours).argmax(1) == y).float().mean().item()
        acc_theirs = (model(x_theirs).argmax(1) == y).float().mean().item()
        natural = (model(x).argmax(1) == y).float().mean().item()
    ratio = t["torchattacks"] / t["ours"]
    print(f"LeNet w=4, batch {args.batch}, PGD-{args.steps}, eps {eps}, step {alpha}, no random start, on {device}")
    print(f"  ours          {t['ours'] * 1e3:8.2f} ms/batch  {args.batch / t['ours']:9.0f} images/s  robust acc {acc_ours:.4f}")
    print(f"  torchattacks  {t['torchattacks'] * 1e3:8.2f} ms/batch  {args.batch / t['torchattacks']:9.0f} images/s  "
          f"robust acc {acc_theirs:.4f}   (natural {natural:.4f})")
    ok = verdict(ratio >= 1.0, f"throughput ratio ours / torchattacks = {ratio:.3f} >= 1.0")
    ok &= verdict(abs(acc_ours - acc_theirs) <= 1 / args.batch + 1e-9,
                  f"equal robust accuracy ({acc_ours:.4f} vs {acc_theirs:.4f}, at most one example apart)")
    print("\nall PASS" if ok else "\nsome FAIL")


if __name__ == "__main__":
    main()
