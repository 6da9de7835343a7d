"""GPU fast paths: images/s of ResNet-18 PGD-10 adversarial training, fp32 against bf16 autocast +
channels_last (+ torch.compile). Needs a CUDA GPU.

    python bench/gpu.py [--width 16] [--batch 128] [--steps 20] [--no-compile]

Target: bf16 + channels_last (+ compile) at least 2x the fp32 images/s.
"""
import argparse
import time

import torch

from benchutil import machine, verdict

from attacks import PGD
from training.methods import Precision, train_step
from training.state import make_optimizer
from models import build_model


def images_per_s(amp, channels_last, compile_, args):
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = build_model("resnet18", args.width, 10, 3, 32).to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if compile_ else model
    opt = make_optimizer(model.parameters(), {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4})
    precision = Precision(amp, device)
    attack = PGD(8 / 255, 2 / 255, 10)
    x = torch.rand(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for _ in range(3):  # warm-up (and compilation)
        train_step(net, net, x, y, opt, attack, precision=precision)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(args.steps):
        train_step(net, net, x, y, opt, attack, precision=precision)
    torch.cuda.synchronize()
    return args.batch * args.steps / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA GPU")
    torch.backends.cudnn.benchmark = True
    print(machine())
    base = images_per_s("off", False, False, args)
    fast = images_per_s("bf16", True, False, args)
    print(f"ResNet-18 w={args.width}, batch {args.batch}, PGD-10 training")
    print(f"  fp32                        {base:9.0f} images/s")
    print(f"  bf16 + channels_last        {fast:9.0f} images/s   {fast / base:.2f}x")
    best = fast
    if not args.no_compile:
        comp = images_per_s("bf16", True, True, args)
        print(f"  bf16 + channels_last + compile {comp:6.0f} images/s   {comp / base:.2f}x")
        best = max(best, comp)
    verdict(best / base >= 2.0, f"fast paths / fp32 = {best / base:.2f} >= 2.0")


if __name__ == "__main__":
    main()
