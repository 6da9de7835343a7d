"""Adversarial training step against its floor, and the ADMM step against the plain step.

    python bench/train_step.py [--device cpu|cuda]

floor = k x (attack forward + input backward) + 1 x (clean training step), all measured here.
TRADES' floor: one clean forward (its target f(x)) + k KL attack iterations + one training step on
two forwards (x and x'); MART's: k attack iterations + that two-forward step.
Targets: adversarial, TRADES and MART steps <= 1.10 x their floors; ADMM-stage step <= 1.05 x
adversarial step; a HYDRA or HARP score step <= 1.10 x adversarial step (``bench_scores``).
Also reports what switching the parameters' requires_grad off during the attack would save, and
the cost of the extra clean forward that measures natural training accuracy.
"""
import argparse

import torch
import torch.nn.functional as F

from benchutil import machine, time_many, verdict

import admm as admm_lib
from attacks import PGD
from training.losses import MART, TRADES
from training.methods import train_step
from training.state import make_optimizer
from models import build_model

CASES = [("lenet", 4, 1, 28, 128, 10), ("vgg16", 4, 3, 32, 32, 3)]


def bench(arch, width, channels, size, batch, k, device):
    torch.manual_seed(0)
    model = build_model(arch, width, 10, channels, size).to(device)
    opt = make_optimizer(model.parameters(), {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4})
    x = torch.rand(batch, channels, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    attack = PGD(eps=8 / 255, step_size=2 / 255, steps=k, random_start=True)
    weights = admm_lib.prunable_weights(model)
    ratios = {n: 0.8 for n in weights}
    state = admm_lib.ADMM(weights, admm_lib.Sparsity("irregular", ratios), 1e-3)

    trades, mart = TRADES(6.0), MART(6.0)
    trades_attack = trades.adversary(PGD(eps=8 / 255, step_size=2 / 255, steps=k, **trades.attack_settings))
    with torch.no_grad():
        target = model.eval()(x).softmax(1)
    model.train()

    def attack_iter():  # one PGD iteration's work: forward + gradient w.r.t. the input, eval mode
        model.eval()
        xr = x.detach().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)
        model.train()

    def attack_iter_kl():  # the same on TRADES' objective, KL(f(x) || f(x')) against a fixed f(x)
        model.eval()
        xr = x.detach().requires_grad_(True)
        torch.autograd.grad(F.kl_div(F.log_softmax(model(xr), 1), target, reduction="sum"), xr)
        model.train()

    def pair_step():  # a training step on two forwards (x and x'), the least TRADES and MART can do
        opt.zero_grad(set_to_none=True)
        (F.cross_entropy(model(x), y) + F.cross_entropy(model(x.flip(0)), y)).backward()
        opt.step()

    def attack_iter_frozen():
        for p in model.parameters():
            p.requires_grad_(False)
        attack_iter()
        for p in model.parameters():
            p.requires_grad_(True)

    def clean_forward():
        model.eval()
        with torch.no_grad():
            model(x)
        model.train()

    t = time_many({
        "attack_iter": attack_iter,
        "attack_iter_frozen": attack_iter_frozen,
        "clean_step": lambda: train_step(model, model, x, y, opt),
        "adv_step": lambda: train_step(model, model, x, y, opt, attack),
        "admm_step": lambda: train_step(model, model, x, y, opt, attack, lambda: state.penalty(weights)),
        "clean_forward": clean_forward,
        "attack_iter_kl": attack_iter_kl,
        "pair_step": pair_step,
        "trades_step": lambda: train_step(model, model, x, y, opt, trades_attack, loss=trades),
        "mart_step": lambda: train_step(model, model, x, y, opt, attack, loss=mart),
    }, device, warmup=2, reps=9 if arch == "lenet" else 5)
    return summary(t, arch, width, size, batch, k, device)


def summary(t, arch, width, size, batch, k, device):
    """Print the timings ``t`` of one case against their floors; whether every target was met."""
    floor = k * t["attack_iter"] + t["clean_step"]
    floor_trades = t["clean_forward"] + k * t["attack_iter_kl"] + t["pair_step"]
    floor_mart = k * t["attack_iter"] + t["pair_step"]
    r_adv, r_admm = t["adv_step"] / floor, t["admm_step"] / t["adv_step"]
    r_trades, r_mart = t["trades_step"] / floor_trades, t["mart_step"] / floor_mart
    print(f"\n{arch} w={width} {size}x{size} batch {batch} PGD-{k} on {device}")
    print(f"  attack iteration {t['attack_iter'] * 1e3:8.2f} ms   (params requires_grad off: "
          f"{t['attack_iter_frozen'] * 1e3:.2f} ms, ratio {t['attack_iter_frozen'] / t['attack_iter']:.3f})")
    print(f"  clean train step {t['clean_step'] * 1e3:8.2f} ms")
    print(f"  floor            {floor * 1e3:8.2f} ms   = {k} x attack iteration + clean step")
    print(f"  adversarial step {t['adv_step'] * 1e3:8.2f} ms   ratio to floor {r_adv:.3f}")
    print(f"  ADMM-stage step  {t['admm_step'] * 1e3:8.2f} ms   ratio to adversarial step {r_admm:.3f}")
    print(f"  clean forward (natural train accuracy) {t['clean_forward'] * 1e3:.2f} ms = "
          f"{t['clean_forward'] / t['adv_step']:.1%} of a step; sampled every 10th step: "
          f"{t['clean_forward'] / t['adv_step'] / 10:.2%}")
    print(f"  two-forward step {t['pair_step'] * 1e3:8.2f} ms   KL attack iteration {t['attack_iter_kl'] * 1e3:.2f} ms")
    print(f"  TRADES step      {t['trades_step'] * 1e3:8.2f} ms   floor {floor_trades * 1e3:.2f} ms "
          f"(clean forward + {k} x KL iteration + two-forward step), ratio {r_trades:.3f}")
    print(f"  MART step        {t['mart_step'] * 1e3:8.2f} ms   floor {floor_mart * 1e3:.2f} ms "
          f"({k} x attack iteration + two-forward step), ratio {r_mart:.3f}")
    ok = [verdict(r_adv <= 1.10, f"{arch}: adversarial step / floor = {r_adv:.3f} <= 1.10"),
          verdict(r_admm <= 1.05, f"{arch}: ADMM step / adversarial step = {r_admm:.3f} <= 1.05"),
          verdict(r_trades <= 1.10, f"{arch}: TRADES step / its floor = {r_trades:.3f} <= 1.10"),
          verdict(r_mart <= 1.10, f"{arch}: MART step / its floor = {r_mart:.3f} <= 1.10")]
    return all(ok)


def bench_scores(arch, width, channels, size, batch, k, device):
    """A HYDRA and a HARP score step (weights frozen, masked forward by functional_call, top-k
    masks cached between optimizer steps) against a plain adversarial step on the same model.
    Target: <= 1.10 x the adversarial step."""
    import copy
    from config import load_config
    from pruning.plan import make_stage
    torch.manual_seed(0)
    plain = build_model(arch, width, 10, channels, size).to(device)
    x = torch.rand(batch, channels, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    attack = PGD(eps=8 / 255, step_size=2 / 255, steps=k, random_start=True)
    scfg = {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4}
    steps = {"adv_step": lambda m=plain, o=make_optimizer(plain.parameters(), scfg): train_step(m, m, x, y, o, attack)}
    for kind in ("hydra", "harp"):
        model = copy.deepcopy(plain)
        cfg = load_config(None, [f"model.arch={arch}", f"model.width={width}", f"prune.method={kind}", "prune.target=0.99"])
        _, stage = make_stage(kind, model, cfg)
        opt = make_optimizer(stage.parameters(model), scfg)
        stage.begin({})
        net = stage.network(model)
        steps[f"{kind}_step"] = lambda n=net, o=opt, s=stage: train_step(n, n, x, y, o, attack, s.penalty)
    t = time_many(steps, device, warmup=2, reps=9 if arch == "lenet" else 5)
    print(f"\n{arch} w={width} {size}x{size} batch {batch} PGD-{k} on {device}: score stages (99 % pruned)")
    ok = True
    for kind in ("hydra", "harp"):
        r = t[f"{kind}_step"] / t["adv_step"]
        print(f"  {kind} score step {t[f'{kind}_step'] * 1e3:8.2f} ms   adversarial step {t['adv_step'] * 1e3:8.2f} ms"
              f"   ratio {r:.3f}")
        ok = verdict(r <= 1.10, f"{arch}: {kind} score step / adversarial step = {r:.3f} <= 1.10") and ok
    return ok


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    print(machine())
    results = [bench(*case, torch.device(args.device)) for case in CASES]
    results += [bench_scores(*case, torch.device(args.device)) for case in CASES]
    print("\nall PASS" if all(results) else "\nsome FAIL")


if __name__ == "__main__":
    main()
