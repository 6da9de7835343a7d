"""Finding 2: pruning a wide robust model beats training the small one.

The large adversarially trained LeNet pruned (adversarial ADMM, irregular) to the small width's
weight count, against the small model trained from scratch and the small model inherited from the
large one (its strongest channels) and then trained. Held if the pruned model's mean is higher than
both on natural and on PGD accuracy.
"""
import paper
from cells import pre
from frame import MISSING, NOISY, Finding, Section, diff, pct, tally, within_noise


def plan(spec, cells):
    L, S, n = spec["large_width"], spec["small_width"], FINDING.number
    tune = spec["admm_epochs"] + spec["retrain_epochs"]
    for seed in spec["seeds"]:
        paper.plan_pruned(cells, n, spec, seed, "irregular", S)
        cells.add(f"inherit-w{S}-from-w{L}-s{seed}", [n], "inherited", seed,
                  {"width": S, "source_width": L, "training": "adversarial"},
                  [{"inherit": ("cell", pre("adv", L, seed), "pretrain.pt"), "width": S},
                   {"script": "adv_main.py", "stage": "pretrain", "init": ("self", "inherited.pt"),
                    "sets": [f"model.width={S}", f"pretrain.epochs={tune}"]}],
                  "pretrain.pt", [pre("adv", L, seed)])


def noise_note(T, limit, comparisons):
    """A sentence naming the comparisons ((label, a, b, metric)) that are within noise, or ''."""
    weak = [label for label, a, b, metric in comparisons if within_noise(T, a, b, metric, limit)]
    return (" Within noise (difference smaller than the seed spread or the binomial standard error): "
            + "; ".join(weak) + ".") if weak else ""


def section(summary, out=None):
    spec, T = summary["spec"], paper.table(summary)
    L, S = spec["large_width"], spec["small_width"]
    keys = lambda aa=False: [paper.dense(T, "adversarial", L, aa), paper.pruned(T, spec, "irregular", S, aa=aa),  # noqa: E731
                             paper.dense(T, "adversarial", S, aa), paper.inherited(T, spec, aa)]
    names = [f"dense w={L}, adversarial training (the model that is pruned)",
             f"w={L} pruned to w={S}'s weight count: adversarial ADMM, irregular",
             f"dense w={S}, adversarial training from scratch",
             f"dense w={S}, inherited initialization from w={L}, then adversarial training"]
    aa_keys = keys(aa=True)
    has_aa = any(T.values(k, "autoattack") for k in aa_keys)
    A = spec.get("autoattack") or {}
    lines = [f"## Finding {FINDING.number}: pruning beats training the small model", "",
             "| model | nonzero weights | natural | PGD | " + (f"AutoAttack ({A['limit']} images, seed {', '.join(map(str, A['seeds']))}) | " if has_aa else "") + "seeds |",
             "| --- | --- | --- | --- | " + ("--- | " if has_aa else "") + "--- |"]
    for name, k, a in zip(names, keys(), aa_keys):
        aa = f"{T.cell(a, 'autoattack')} (PGD {T.cell(a, 'pgd')}) | " if has_aa else ""
        lines.append(f"| {name} | {T.count(k, 'nonzero')} | {T.cell(k, 'natural')} | {T.cell(k, 'pgd')} | "
                     f"{aa}{T.seeds(k)} |")
    p, s, i = keys()[1:]
    m = {k: (T.mean(k, "natural"), T.mean(k, "pgd")) for k in (p, s, i)}
    if any(v is None for t in m.values() for v in t):
        v = MISSING
    else:
        v = tally(sum(m[p][j] > m[o][j] for o in (s, i) for j in (0, 1)), 4)
    note = noise_note(T, spec["eval"]["limit"],
                      [("pruned vs scratch, natural", p, s, "natural"), ("pruned vs scratch, PGD", p, s, "pgd"),
                       ("pruned vs inherited, natural", p, i, "natural"), ("pruned vs inherited, PGD", p, i, "pgd")])
    if note and v.startswith("**"):
        v += NOISY
    headline = (f"PGD accuracy: pruned {pct(m[p][1])}, from scratch {pct(m[s][1])}, inherited {pct(m[i][1])}; "
                f"natural: {pct(m[p][0])}, {pct(m[s][0])}, {pct(m[i][0])}")
    aa = [T.mean(k, "autoattack") for k in aa_keys[1:]]
    if None not in aa:
        note += (f" Under AutoAttack ({A['limit']} images, seed {', '.join(map(str, A['seeds']))}): pruned "
                 f"{pct(aa[0])}, from scratch {pct(aa[1])}, inherited {pct(aa[2])}.")
        headline += f"; AutoAttack (100 images): {pct(aa[0])}, {pct(aa[1])}, {pct(aa[2])}"
    epochs = spec["set"].get("pretrain.epochs", "?")
    lines += ["", f"Pruned vs from scratch: natural {pct(diff(m[p][0], m[s][0]))}, PGD {pct(diff(m[p][1], m[s][1]))} "
              f"points; pruned vs inherited: natural {pct(diff(m[p][0], m[i][0]))}, PGD "
              f"{pct(diff(m[p][1], m[i][1]))} points. Rule: held if the pruned model's mean is higher than both "
              f"on both natural and PGD accuracy. Verdict: {v}." + note, "",
              f"The pruned model keeps w={L}'s biases ({70 * L + 10} vs {70 * S + 10} for w={S}) and a dense "
              "output layer (see Finding 3); its weight count is matched exactly. The pruned and inherited models "
              f"get {spec['admm_epochs'] + spec['retrain_epochs']} epochs of fine-tuning on top of w={L}'s "
              f"{epochs} pretraining epochs; the small model from scratch gets {epochs} epochs.", ""]
    return Section(v, lines, headline)


FINDING = Finding(2, "pruning a wide model beats training the small one", paper.KEY, plan, section)
