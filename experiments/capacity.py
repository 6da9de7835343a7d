"""Finding 1, capacity: does robust accuracy need width more than natural accuracy does?

Dense LeNets of every width in ``widths``, trained adversarially (``adv_main.py``) and naturally
(``main.py``). Held if, from the narrowest to the widest, the adversarially trained models' PGD
accuracy rose at least twice as much as the naturally trained models' natural accuracy.
"""
import paper
from cells import pre, total_weights
from frame import MISSING, Finding, Section, diff, pct, verdict


def plan(spec, cells):
    """The dense models, adversarial and natural, at every width; the large adversarial one first
    (every pruning cell of findings 2-4 starts from it)."""
    L = spec["large_width"]
    for seed in spec["seeds"]:
        for mode, script, training in (("adv", "adv_main.py", "adversarial"), ("nat", "main.py", "natural")):
            for w in [L] + [w for w in spec["widths"] if w != L]:
                cells.add(pre(mode, w, seed), [FINDING.number], "pretrain", seed, {"width": w, "training": training},
                          [{"script": script, "stage": "pretrain", "init": None, "sets": [f"model.width={w}"]}],
                          "pretrain.pt")


def section(summary, out=None):
    T, widths = paper.table(summary), summary["spec"]["widths"]
    lines = [f"## Finding {FINDING.number}: capacity", "",
             "Dense LeNet of width w (conv 2w, conv 4w, fc 64w), trained naturally (`main.py`) or with "
             "PGD (`adv_main.py`). Accuracy in % on the evaluation subset.", "",
             "| w | weights | natural training: natural | natural training: PGD | adversarial training: natural "
             "| adversarial training: FGSM | adversarial training: PGD | seeds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for w in widths:
        n, a = paper.dense(T, "natural", w), paper.dense(T, "adversarial", w)
        lines.append(f"| {w} | {total_weights(w):,} | {T.cell(n, 'natural')} | {T.cell(n, 'pgd')} "
                     f"| {T.cell(a, 'natural')} | {T.cell(a, 'fgsm')} | {T.cell(a, 'pgd')} | {T.seeds(a)} |")
    lo, hi = min(widths), max(widths)
    adv = {w: paper.dense(T, "adversarial", w) for w in (lo, hi)}
    nat = {w: paper.dense(T, "natural", w) for w in (lo, hi)}
    d_rob = diff(T.mean(adv[hi], "pgd"), T.mean(adv[lo], "pgd"))
    d_nat = diff(T.mean(nat[hi], "natural"), T.mean(nat[lo], "natural"))
    d_nat_adv = diff(T.mean(adv[hi], "natural"), T.mean(adv[lo], "natural"))
    if d_rob is None or d_nat is None:
        v = MISSING
    else:
        v = verdict(d_rob >= 2 * max(d_nat, 0), d_rob > d_nat, "robust accuracy rose more, but less than twice as much")
    if v == verdict(True) and d_nat_adv is not None and d_nat_adv >= d_rob / 2:
        v += (" for the rule as stated; but under adversarial training natural accuracy rose about as much "
              "as robust accuracy, so capacity helps adversarial training as a whole, not robustness alone")
    headline = (f"w={lo} -> w={hi}: adversarially trained PGD accuracy {pct(T.mean(adv[lo], 'pgd'))} -> "
                f"{pct(T.mean(adv[hi], 'pgd'))} (+{pct(d_rob)}), naturally trained natural accuracy "
                f"{pct(T.mean(nat[lo], 'natural'))} -> {pct(T.mean(nat[hi], 'natural'))} (+{pct(d_nat)})")
    lines += ["", f"From w={lo} to w={hi}: PGD accuracy of the adversarially trained models "
              f"rose by {pct(d_rob)} points; natural accuracy of the naturally trained models by {pct(d_nat)} "
              f"points (of the adversarially trained ones by {pct(d_nat_adv)}). Rule: held if the robust gain is "
              f"at least twice the natural gain. Verdict: {v}.", ""]
    return Section(v, lines, headline)


FINDING = Finding(1, "capacity: robust accuracy needs width", paper.KEY, plan, section)
