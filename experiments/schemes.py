"""Finding 3: irregular >= column >= filter pruning at the same ratio.

The large adversarially trained LeNet pruned by adversarial ADMM + masked retraining, by each
scheme, to the weight count of each width in ``prune_to_widths``. Held if the mean PGD accuracy is
ordered as ``schemes`` at every target.
"""
import paper
from cells import total_weights
from frame import MISSING, Finding, Section, verdict


def plan(spec, cells):
    for seed in spec["seeds"]:
        for m in spec["prune_to_widths"]:
            for scheme in spec["schemes"]:
                paper.plan_pruned(cells, FINDING.number, spec, seed, scheme, m)


def compression(T, spec, key):
    """Total weights of the large model / nonzero weights of ``key``'s models (mean over seeds)."""
    nz = T.mean(key, "nonzero")
    return None if not nz else total_weights(spec["large_width"]) / nz


def section(summary, out=None):
    spec, T = summary["spec"], paper.table(summary)
    L, schemes = spec["large_width"], spec["schemes"]
    lines = [f"## Finding {FINDING.number}: pruning schemes at the same ratio", "",
             f"w={L} (adversarially trained) pruned by adversarial ADMM + masked adversarial retraining to the "
             "weight count of a dense smaller width; conv1 and conv2 get that width's layer sizes, fc2 stays "
             "dense (filter pruning must not remove classes), fc1 takes up the rest, the same ratios for every "
             "scheme.", "",
             "| target | compression | scheme | natural | PGD | seeds |", "| --- | --- | --- | --- | --- | --- |"]
    ordered, first_best, pairs = [], [], []
    for m in spec["prune_to_widths"]:
        for sch in schemes:
            k = paper.pruned(T, spec, sch, m)
            c = compression(T, spec, k)
            lines.append(f"| w={m} weights | {'-' if c is None else f'{c:.1f}x'} | {sch} | {T.cell(k, 'natural')} | "
                         f"{T.cell(k, 'pgd')} | {T.seeds(k)} |")
        d = paper.dense(T, "adversarial", m)
        lines.append(f"| w={m} weights | {total_weights(L) / total_weights(m):.1f}x "
                     f"| (dense w={m}, adversarial training) | {T.cell(d, 'natural')} | {T.cell(d, 'pgd')} | "
                     f"{T.seeds(d)} |")
        rob = [T.mean(paper.pruned(T, spec, sch, m), "pgd") for sch in schemes]
        if None not in rob:
            ordered.append(all(a >= b for a, b in zip(rob, rob[1:])))
            first_best.append(rob[0] >= max(rob[1:]))
            pairs.append(", ".join(f"{x} {'>=' if a >= b else '<'} {y} ({100 * a:.1f} vs {100 * b:.1f})"
                                   for x, y, a, b in zip(schemes, schemes[1:], rob, rob[1:])) + f" at w={m}'s count")
    v = MISSING if not ordered else verdict(
        all(ordered), all(first_best),
        f"{schemes[0]} was best at every target, but the order of the others was not as claimed")
    lines += ["", f"Mean PGD accuracy: {'; '.join(pairs)}. Rule: held if it is ordered {' >= '.join(schemes)} at "
              f"every target: {sum(ordered)} of {len(ordered)}. Verdict: {v}. "
              "See also `accuracy_vs_compression.png`.", ""]
    return Section(v, lines, "PGD " + "; ".join(pairs))


FINDING = Finding(3, "irregular >= column >= filter", paper.KEY, plan, section)
