"""Finding 4: pruning a robust model keeps its robustness only if the pruning trains adversarially.

The same adversarially trained large LeNet pruned (irregular) to the small width's weight count by
adversarial ADMM + adversarial retraining and by natural ADMM + natural retraining. Held if natural
pruning loses at least 10 PGD points against the dense model and adversarial pruning less than half
of that.
"""
import paper
from frame import MISSING, Finding, Section, diff, pct, verdict


def plan(spec, cells):
    for seed in spec["seeds"]:
        for adversarial in (True, False):
            paper.plan_pruned(cells, FINDING.number, spec, seed, "irregular", spec["small_width"], adversarial)


def section(summary, out=None):
    spec, T = summary["spec"], paper.table(summary)
    L, S = spec["large_width"], spec["small_width"]
    d, a = paper.dense(T, "adversarial", L), paper.pruned(T, spec, "irregular", S)
    n = paper.pruned(T, spec, "irregular", S, training="natural")
    row = lambda name, k: f"| {name} | {T.cell(k, 'natural')} | {T.cell(k, 'fgsm')} | {T.cell(k, 'pgd')} | {T.seeds(k)} |"  # noqa: E731
    lines = [f"## Finding {FINDING.number}: adversarial training is needed while pruning", "",
             f"The same adversarially trained w={L} model, pruned (irregular) to w={S}'s weight count.", "",
             "| pruning | natural | FGSM | PGD | seeds |", "| --- | --- | --- | --- | --- |",
             row(f"none (dense w={L}, adversarial training)", d),
             row("adversarial ADMM + adversarial retraining (`adv_main.py`)", a),
             row("natural ADMM + natural retraining (`main.py`)", n)]
    dense, adv, nat = T.mean(d, "pgd"), T.mean(a, "pgd"), T.mean(n, "pgd")
    if None in (dense, adv, nat):
        v = MISSING
    else:
        lost, kept = dense - nat, dense - adv
        v = verdict(lost >= 0.10 and kept < lost / 2)
    lines += ["", f"PGD accuracy lost against the dense model: natural pruning {pct(diff(dense, nat))} points, "
              f"adversarial pruning {pct(diff(dense, adv))} points. Rule: held if natural pruning loses at least "
              f"10 points and adversarial pruning less than half of that. Verdict: {v}.", ""]
    return Section(v, lines, f"PGD accuracy: dense {pct(dense)}, adversarial ADMM {pct(adv)}, natural ADMM + retraining {pct(nat)}")


FINDING = Finding(4, "natural pruning loses robustness, adversarial ADMM keeps it", paper.KEY, plan, section)
