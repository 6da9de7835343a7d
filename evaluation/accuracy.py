"""Accuracy on shared examples: per-example correctness of a model under a set of attacks, all on the
same examples, and the attacks by name built from a config."""
import contextlib
import time
import zlib

import torch

import data as data_lib
from training import distributed as dist
from attacks import FGSM, PGD, AutoAttack
from common import UserError, progress

ATTACKS = ("natural", "fgsm", "pgd", "pgd_cw", "pgd_l2", "autoattack", "apgd", "autoattack_l2", "apgd_l2")
LINF_ATTACKS = ("fgsm", "pgd", "pgd_cw", "autoattack", "apgd")  # what an eps sweep runs (its eps are L-inf radii)
APGD = ("apgd-ce", "apgd-t")  # the cheaper subset of AutoAttack, named apgd
# The L2 radius of pgd_l2, autoattack_l2 and apgd_l2: the usual L2 budget for CIFAR-10 (RobustBench)
# and for 28x28 digits.
EPS_L2 = {"cifar10": 0.5}
EPS_L2_DEFAULT = 2.0


@torch.no_grad()
def count_correct(model, x, y):
    return (model(x).argmax(1) == y).sum()


# --------------------------------------------------------------------------- accuracy on shared examples

@contextlib.contextmanager
def _rng(seed, name, batch, device):
    """With a ``seed``, each (attack, batch) draws its random numbers from its own stream, so an
    attack's result depends on the seed alone, not on which other attacks run or in what order.
    With None the global RNG is used as it is (the per-epoch evaluations during training, whose
    next epochs draw from it)."""
    if seed is None:
        yield
        return
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(zlib.crc32(f"{seed}/{name}/{batch}".encode()))
        yield


def num_examples(split, limit):
    return min(limit, len(split.labels)) if limit else len(split.labels)


def correct_per_example(model, split, attacks, batch_size, device, limit=0, desc="eval", seed=None, rank=0, world=1):
    """Which of the first ``limit`` examples of ``split`` (0 = all) ``model`` still classifies
    correctly under each attack in ``attacks`` ({name: attack, or None for natural}). Every attack
    sees the same examples, batched on ``device``, one attack after another, each with its own
    progress bar. An attack with ``whole_set`` (AutoAttack, whose checks are statistics of the set)
    gets all the examples (this rank's share under torchrun) in one call and batches them itself.
    With ``world`` > 1 only this ``rank``'s share (every world-th example) is evaluated.
    Returns ({name: bool tensor [n] on the CPU}, {name: wall-clock seconds the attack took})."""
    was_training = model.training
    model.eval()
    correct, seconds = {}, {}
    n_batches = data_lib.num_batches(split, batch_size, limit, world)
    try:
        for name, attack in attacks.items():
            t0 = time.perf_counter()
            batches = data_lib.batches(split, batch_size, device, limit=limit, rank=rank, world=world)
            if getattr(attack, "whole_set", False):
                batches = list(batches)
                if batches:  # (a rank's share can be empty)
                    x, y = (torch.cat(t) for t in zip(*batches))
                    with _rng(seed, name, 0, device):
                        x_adv = attack(model, x, y)
                    batches = list(zip(x_adv.split(batch_size), y.split(batch_size)))
                attack = None  # the batches below are already the adversarial examples
            hits = []
            for i, (x, y) in enumerate(progress(batches, n_batches, f"{desc} {name}") if rank == 0 else batches):
                with _rng(seed, name, i, device):
                    x_in = x if attack is None else attack(model, x, y)
                with torch.no_grad():
                    hits.append(model(x_in).argmax(1) == y)  # kept on the device: no sync per batch
            correct[name] = torch.cat(hits).cpu() if hits else torch.zeros(0, dtype=torch.bool)
            seconds[name] = time.perf_counter() - t0  # after .cpu(), which waits for the device
    finally:
        model.train(was_training)
    return correct, seconds


def evaluate(model, split, attacks, batch_size, device, limit=0, desc="eval", seed=None):
    """Accuracy (fraction in [0, 1]) of ``model`` on the first ``limit`` examples of ``split``
    under each attack in ``attacks`` ({name: attack or None for natural}), all on the same
    examples. Under torchrun each rank evaluates its share and the counts are all-reduced.
    Returns ({name: accuracy}, number of examples)."""
    correct, _ = correct_per_example(model, split, attacks, batch_size, device, limit, desc, seed,
                                     dist.rank(), dist.world())
    counts = dist.all_sum(torch.tensor([float(c.sum()) for c in correct.values()] + [float(len(next(iter(correct.values()))))],
                                       dtype=torch.float64, device=device if dist.launched() else "cpu"))
    n = int(counts[-1])
    return {name: c.item() / max(n, 1) for name, c in zip(correct, counts[:-1])}, n


# --------------------------------------------------------------------------- attacks by name

def standard_attacks(cfg, names=("natural", "fgsm", "pgd"), eps=None, steps=None, step_size=None, restarts=None,
                     eps_l2=None):
    """{name: attack} for ``names`` (any of ``ATTACKS``). Defaults: L-inf eps from ``adv.eps``,
    PGD steps / step size / restarts from ``eval``, random start from ``adv``. ``pgd_cw`` is that
    PGD with the Carlini & Wagner margin loss; ``pgd_l2`` is L2 PGD of radius ``eps_l2`` (default
    ``EPS_L2``) with step 2.5 * eps_l2 / steps (the rule of Madry et al.'s ``robustness`` library).
    ``autoattack`` is the reference AutoAttack, standard version, always at full strength; ``apgd``
    its APGD-CE + APGD-T only; ``autoattack_l2`` and ``apgd_l2`` the same in the L2 ball of radius
    ``eps_l2``. All four need the ``pyautoattack`` package."""
    e = cfg["eval"]
    eps = cfg["adv"]["eps"] if eps is None else eps
    steps = e["steps"] if steps is None else steps
    step_size = e["step_size"] if step_size is None else step_size
    restarts = e["restarts"] if restarts is None else restarts
    eps_l2 = EPS_L2.get(cfg["data"]["dataset"], EPS_L2_DEFAULT) if eps_l2 is None else eps_l2
    rs, bs = cfg["adv"]["random_start"], cfg["data"]["test_batch_size"]
    table = {"natural": lambda: None, "fgsm": lambda: FGSM(eps),
             "pgd": lambda: PGD(eps, step_size, steps, restarts, rs),
             "pgd_cw": lambda: PGD(eps, step_size, steps, restarts, rs, loss="cw"),
             "pgd_l2": lambda: PGD(eps_l2, 2.5 * eps_l2 / max(steps, 1), steps, restarts, rs, norm="l2"),
             "autoattack": lambda: AutoAttack(eps, batch_size=bs),
             "apgd": lambda: AutoAttack(eps, attacks=APGD, batch_size=bs),
             "autoattack_l2": lambda: AutoAttack(eps_l2, "l2", batch_size=bs),
             "apgd_l2": lambda: AutoAttack(eps_l2, "l2", APGD, batch_size=bs)}
    unknown = [n for n in names if n not in table]
    if unknown:
        raise UserError(f"--attacks: unknown attack(s) {', '.join(map(repr, unknown))}; choose from {', '.join(table)}")
    try:
        return {n: table[n]() for n in names}
    except ImportError as err:  # an optional dependency (pyautoattack) is missing
        raise UserError(str(err)) from None


def sweep_attacks(cfg, names, eps_values, eps=None, steps=None, step_size=None, restarts=None):
    """{name: {eps: attack}} for the L-inf attacks among ``names`` at each of ``eps_values``. PGD's
    step size scales with eps, keeping the evaluation's step_size / eps ratio (2.5 eps / steps when
    the base eps is 0), so every radius gets the same number of steps across its ball."""
    base = cfg["adv"]["eps"] if eps is None else eps
    step_size = cfg["eval"]["step_size"] if step_size is None else step_size
    steps = cfg["eval"]["steps"] if steps is None else steps
    ratio = step_size / base if base > 0 else 2.5 / max(steps, 1)
    linf = [n for n in names if n in LINF_ATTACKS]
    if not linf:
        raise UserError(f"--eps-sweep needs an L-inf attack in --attacks: one of {', '.join(LINF_ATTACKS)}")
    out = {n: {} for n in linf}
    for e in eps_values:
        for n, attack in standard_attacks(cfg, linf, e, steps, ratio * e, restarts).items():
            out[n][e] = attack
    return out


def check_attacks(pgd):
    """The extra runs behind the gradient-masking checks (Carlini et al. 2019, 'On Evaluating
    Adversarial Robustness', checklist), derived from the evaluation's L-inf PGD ``pgd``:

    - ``pgd``: the evaluation PGD itself (not rerun if it is among the attacks);
    - ``pgd_half_eps``: eps / 2 (step halved too), whose accuracy must not be below ``pgd``'s;
    - ``pgd_large_eps``: eps = 1, the whole [0, 1] image space, ``max(steps, 10)`` steps of
      2.5 / steps and no random start, so that only the gradient can move the input: accuracy must
      fall to about chance or below;
    - ``pgd_stronger``: twice the steps and one more restart, which must not raise accuracy.
    """
    steps = max(pgd.steps, 10)
    return {"pgd": pgd,
            "pgd_half_eps": PGD(pgd.eps / 2, pgd.step_size / 2, pgd.steps, pgd.restarts, pgd.random_start, pgd.loss),
            "pgd_large_eps": PGD(1.0, 2.5 / steps, steps, 1, random_start=False, loss=pgd.loss),
            "pgd_stronger": PGD(pgd.eps, pgd.step_size, 2 * pgd.steps, pgd.restarts + 1, pgd.random_start, pgd.loss)}
