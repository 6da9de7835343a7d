"""Evaluation shared by the training scripts and ``eval.py``: per-example correctness under attacks
on the same examples, the worst case over attacks, the gradient-masking sanity checks, the eps
sweep, and the sparsity + accuracy report."""
import contextlib
import math
import time
import zlib

import torch

import admm as admm_lib
import data as data_lib
from training import distributed as dist
from pruning import quant
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
    With None the global RNG is used as it is (the training scripts, whose next epochs draw from it)."""
    if seed is None:
        yield
        return
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(zlib.crc32(f"{seed}/{name}/{batch}".encode()))
        yield


def _num_examples(split, limit):
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


# --------------------------------------------------------------------------- sanity checks

# (stronger, weaker) pairs of attacks in the same ball: the first must not leave a higher accuracy.
STRONGER = (("autoattack", "pgd"), ("apgd", "pgd"), ("autoattack", "apgd"),
            ("autoattack_l2", "pgd_l2"), ("apgd_l2", "pgd_l2"), ("autoattack_l2", "apgd_l2"))


def noise(p, n):
    """Sampling noise of an accuracy ``p`` measured on ``n`` examples: the half-width of its 95 %
    binomial interval, and at least one example."""
    n = max(n, 1)
    return max(1.96 * math.sqrt(p * (1 - p) / n), 1 / n)


def sanity_warnings(acc, n, worst_case, checks=None, sweep=None, num_classes=10):
    """The standard signs of gradient masking (Carlini et al. 2019, checklist), one sentence per
    failed check; [] when all pass. Differences within sampling ``noise`` are not flagged.

    acc: {attack name: accuracy}; n: number of examples; worst_case: accuracy under all attacks
    together; checks: {name: accuracy} of the ``check_attacks`` runs; sweep: {attack name:
    [(eps, accuracy), ...] sorted by eps}; num_classes: chance is 1 / num_classes. AutoAttack's own
    checks are not here: ``report`` adds the flags it raised.
    """
    checks, sweep, warn = checks or {}, sweep or {}, []

    def above(a, b):  # a exceeds b by more than noise
        return a > b + noise(b, n)

    # 1. Robust accuracy does not increase with eps: natural (eps 0) >= every attack, eps/2 >= eps,
    #    and each sweep curve falls.
    nat = acc.get("natural")
    for name, a in acc.items():
        if nat is not None and name != "natural" and above(a, nat):
            warn.append(f"{name} accuracy {a:.4f} is above natural accuracy {nat:.4f}: the attack helped the model")
    if "pgd" in checks and "pgd_half_eps" in checks and above(checks["pgd"], checks["pgd_half_eps"]):
        warn.append(f"accuracy rises with eps: PGD {checks['pgd_half_eps']:.4f} at eps/2 but "
                    f"{checks['pgd']:.4f} at eps")
    for name, curve in sweep.items():
        for (e0, a0), (e1, a1) in zip(curve, curve[1:]):
            if above(a1, a0):
                warn.append(f"accuracy rises with eps: {name} {a0:.4f} at eps={e0:g} but {a1:.4f} at eps={e1:g}")
    # 2. At eps = 1 every image is reachable: accuracy about chance or below.
    chance = 1 / num_classes
    if "pgd_large_eps" in checks and above(checks["pgd_large_eps"], chance):
        warn.append(f"PGD at eps=1 (any image reachable) leaves accuracy {checks['pgd_large_eps']:.4f}, above chance "
                    f"{chance:.2f}: the gradient does not lead the attack (masked or zero gradients)")
    # 3. More steps and restarts never make PGD weaker.
    if "pgd" in checks and "pgd_stronger" in checks and above(checks["pgd_stronger"], checks["pgd"]):
        warn.append(f"PGD with 2x steps and one more restart gives {checks['pgd_stronger']:.4f}, above "
                    f"{checks['pgd']:.4f}: the attack does not converge (step size, noisy gradients)")
    # 4. The worst case is at most each single attack (it is their per-example AND; this guards the bookkeeping).
    for name, a in acc.items():
        if worst_case > a:
            warn.append(f"worst case {worst_case:.4f} is above {name} accuracy {a:.4f}")
    # 5. One FGSM step is no stronger than PGD.
    for name in ("pgd", "pgd_cw"):
        if "fgsm" in acc and name in acc and above(acc[name], acc["fgsm"]):
            warn.append(f"FGSM accuracy {acc['fgsm']:.4f} is below {name} accuracy {acc[name]:.4f}: a single step "
                        f"beats the iterative attack, a sign of gradient masking")
    # 6. AutoAttack is no weaker than PGD in the same ball, nor than its own APGD part.
    for strong, weak in STRONGER:
        if strong in acc and weak in acc and above(acc[strong], acc[weak]):
            warn.append(f"{strong} accuracy {acc[strong]:.4f} is above {weak} accuracy {acc[weak]:.4f}: the "
                        f"stronger attack did worse (a failed run, or an attack that does not fit the model)")
    return warn


# --------------------------------------------------------------------------- report

def report(model, cfg, test, device, attacks, limit=0, seed=None, checks=None, sweep=None):
    """Sparsity of ``model`` against ``cfg``'s prune settings plus, on the first ``limit`` test
    examples (0 = all), all on the same examples: accuracy under each of ``attacks`` ({name: attack
    or None for natural}); ``worst_case``, the fraction correct under every attack (natural
    included if run); the ``checks`` runs ({name: attack}, see ``check_attacks``); an eps sweep
    ``sweep`` ({attack name: {eps: attack}}); the sanity ``warnings``, followed by the flags of
    AutoAttack's own checks; the ``seconds`` each run took; and, per AutoAttack run, its library,
    version and attacks (``autoattack``). ``seed``: see ``_rng``. Returns the dict that
    ``eval.py --json`` writes."""
    checks, sweep = checks or {}, sweep or {}
    ratios = admm_lib.resolve_ratios(model, cfg["prune"]["prune_ratios"])
    runs = dict(attacks)
    runs.update({f"check:{k}": a for k, a in checks.items() if k not in attacks})
    runs.update({f"sweep:{name}@{e!r}": a for name, curve in sweep.items() for e, a in curve.items()})
    flagging = {k: a for k, a in runs.items() if isinstance(a, AutoAttack)}
    for a in flagging.values():
        a.pop_flags()  # drop any left from an earlier report with the same attack objects
    correct, seconds = correct_per_example(model, test, runs, cfg["data"]["test_batch_size"], device, limit, "eval",
                                           seed)
    n = _num_examples(test, limit)

    def accuracy(key):
        return int(correct[key].sum()) / max(n, 1)

    acc = {name: accuracy(name) for name in attacks}
    worst = int(torch.stack([correct[k] for k in attacks]).all(0).sum()) / max(n, 1) if attacks else 0.0
    check_acc = {k: accuracy(k if k in attacks else f"check:{k}") for k in checks}
    curves = {name: [(e, accuracy(f"sweep:{name}@{e!r}")) for e in sorted(curve)] for name, curve in sweep.items()}
    num_classes = int(test.labels.max()) + 1

    pgd = next((a for a in attacks.values() if isinstance(a, PGD) and a.norm == "linf"), None)
    eps = next((a.eps for name, a in attacks.items() if a is not None and not name.endswith("_l2")), cfg["adv"]["eps"])
    rep = {"arch": cfg["model"]["arch"], "width": cfg["model"]["width"], "dataset": cfg["data"]["dataset"],
           "n_examples": n, "partial": n < len(test.labels),
           "sparsity": admm_lib.sparsity_report(model, ratios, cfg["prune"]["sparsity_type"]),
           "accuracy": acc, "worst_case": worst,
           "attack": {"eps": eps, "steps": pgd.steps if pgd else None, "step_size": pgd.step_size if pgd else None,
                      "restarts": pgd.restarts if pgd else None, "seed": seed,
                      "settings": {name: repr(a) for name, a in attacks.items() if a is not None}}}
    if checks:
        rep["checks"] = {k: {"accuracy": check_acc[k], "attack": repr(a)} for k, a in checks.items()}
    if sweep:
        rep["eps_sweep"] = {"eps": sorted({e for curve in sweep.values() for e in curve}),
                            "accuracy": {name: [a for _, a in c] for name, c in curves.items()}}
    if any(isinstance(a, AutoAttack) for a in attacks.values()):
        rep["autoattack"] = {name: {**a.info(), "seconds": round(seconds[name], 2)}
                             for name, a in attacks.items() if isinstance(a, AutoAttack)}
    rep["seconds"] = {k: round(s, 2) for k, s in seconds.items()}
    rep["warnings"] = sanity_warnings(acc, n, worst, check_acc, curves, num_classes) + [
        f"{k}: AutoAttack's own check: {flag}" for k, a in flagging.items() for flag in a.pop_flags()]
    return rep


def format_report(rep):
    s = rep["sparsity"]
    lines = [f"{'layer':28} {'shape':>18} {'target':>7} {'params':>9} {'nonzero':>9} {'element':>8} "
             f"{'column':>7} {'filter':>7}"]
    for L in s["layers"]:
        lines.append(f"{L['name']:28} {'x'.join(map(str, L['shape'])):>18} {L['ratio']:7.3f} {L['params']:9d} "
                     f"{L['nonzero']:9d} {L['element']:8.4f} {L['column']:7.4f} {L['filter']:7.4f}")
    lines.append(f"{s['type']} pruning: overall sparsity {s['overall']:.4f} of pruned layers, "
                 f"compression {s['compression_rate']:.2f}x")
    if "prunable" in s:  # reports from before it lack the line
        p = s["prunable"]
        lines.append(f"all prunable layers: {p['zeros']:,d} of {p['params']:,d} weights pruned ({p['fraction']:.6f})")
    lines += format_quantization(rep.get("quantization"), rep.get("storage_bits"))
    if "training" in rep:
        t = rep["training"]
        lines.append(f"trained with: {t['method']} training, {t['loss']} loss"
                     + (f" (beta {t['beta']:g})" if t.get("beta") is not None else ""))
    a = rep["attack"]
    what = f"{rep['n_examples']} test examples" + (" (partial, --limit)" if rep["partial"] else "")
    lines.append(f"accuracy on {what}, eps={a['eps']:.4f}"
                 + (f", PGD steps={a['steps']} step={a['step_size']:.4f} restarts={a['restarts']}" if a["steps"] else ""))
    lines.append("  " + "  ".join(f"{k}={v:.4f}" for k, v in rep["accuracy"].items())
                 + f"  worst_case={rep['worst_case']:.4f}")
    for name, aa in rep.get("autoattack", {}).items():
        lines.append(f"{name}: {aa['library']}, {aa['version']} version ({', '.join(aa['attacks'])}), "
                     f"{aa['norm']} eps={aa['eps']:.4f}, {aa['seconds']:.1f} s")
    if "checks" in rep:
        lines.append("sanity-check runs: " + "  ".join(f"{k}={v['accuracy']:.4f}" for k, v in rep["checks"].items()))
    if "eps_sweep" in rep:
        sw = rep["eps_sweep"]
        lines.append(f"eps sweep  {'eps':>10} " + " ".join(f"{e:7.4f}" for e in sw["eps"]))
        for name, accs in sw["accuracy"].items():
            lines.append(f"           {name:>10} " + " ".join(f"{v:7.4f}" for v in accs))
    sec = rep.get("seconds", {})
    if sec:
        runs = [f"{k}={v:.1f}" for k, v in sec.items() if ":" not in k]
        runs += [f"{kind}s={sum(v for k, v in sec.items() if k.startswith(kind + ':')):.1f}"
                 for kind in ("check", "sweep") if any(k.startswith(kind + ":") for k in sec)]
        lines.append("seconds: " + "  ".join(runs))
    lines += format_convergence(rep.get("convergence"))
    lines += [f"WARNING: {w}" for w in rep["warnings"]] or ["sanity checks: no warnings"]
    return "\n".join(lines)


def format_quantization(layers, storage_bits=None):
    """Report lines of the quantized layers ({name: {bits, distinct_nonzero, scale}}, see
    ``quant.quantization_report``) and of the model's storage (``exportfile.export_model``'s
    ``storage_bits``); none for a model without quantized layers."""
    if not layers:
        return []
    lines = [f"{'quantized layer':28} {'bits':>4} {'values':>6} {'allowed':>7} {'scale':>11}"]
    for n, q in layers.items():
        allowed = quant.allowed_values(q["bits"])
        scale = "off levels" if q["scale"] is None else f"{q['scale']:.5g}"
        lines.append(f"{n:28} {q['bits']:4d} {q['distinct_nonzero']:6d} {allowed:7d} {scale:>11}")
    if storage_bits:
        lines.append(format_storage(storage_bits))
    return lines


def format_storage(sb):
    """One line of ``exportfile.export_model``'s ``storage_bits`` ({export, float_export, dense_float32})."""
    vs_float = f"{sb['float_export'] / max(sb['export'], 1):.2f}x less than the float export, " if "float_export" in sb else ""
    return (f"storage (codes + sparse indices + float32 scales, float tensors at their size): {sb['export']:,d} bits, "
            f"{vs_float}{sb['dense_float32'] / max(sb['export'], 1):.2f}x less than dense float32")


def format_convergence(conv):
    """Report lines for a checkpoint's convergence figures (``metrics["convergence"]``): ADMM's
    residuals at its last Z/U update and the fraction of each layer's squared norm the hard prune
    removed; the same two for ADMM quantization (the ``quantize`` stage) and its hard quantization.
    A converged ADMM stage has small residuals and moves almost nothing at its hard step."""
    lines = []
    join = lambda d: "  ".join(f"{k}={v:.4f}" for k, v in d.items())  # noqa: E731
    for stage, what in (("admm", "ADMM"), ("quantize", "ADMM quantization")):
        if conv and "residual" in conv.get(stage, {}):
            a = conv[stage]
            lines.append(f"{what} at its last Z/U update (rho {a['rho']:.4g}): primal ||W-Z||/||W||  {join(a['residual'])}")
            if "dual_residual" in a:
                lines.append(f"  dual rho||Z-Z_prev||/||W||  {join(a['dual_residual'])}")
    for stage, key, what in (("retrain", "pruned_energy", "pruned energy at the hard prune (1 - ||Pi_S(W)||^2/||W||^2)"),
                             ("quantize", "quantized_energy", "energy moved by the hard quantization (||W - Q(W)||^2/||W||^2)")):
        if conv and key in conv.get(stage, {}):
            e = conv[stage][key]
            lines.append(f"{what}: {join(e)}  (largest {max(e.values(), default=0):.4f})")
    return lines
