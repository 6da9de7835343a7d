"""The sanity checks of a set of accuracies: the standard signs of gradient masking, judged against
the sampling noise of an accuracy measured on n examples."""
import math




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
