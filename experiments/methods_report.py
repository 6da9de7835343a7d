"""Finding 5, the robust-pruning arena (``arena.yaml``, issue 20): tables, answers and plot.

    python experiments/methods_report.py --summary runs/experiments/arena/summary.json --out docs

Writes ``<out>/results/pruning_methods.md`` (the Finding 5 section that ``report.py`` puts into
RESULTS.md), ``<out>/results/pruning_methods.json`` (one row per cell) and
``<out>/pruning_methods.png``; ``report.py`` calls ``write`` when it makes RESULTS.md. Every number
comes from the cells' ``eval.py`` reports and their runs' ``metrics.jsonl``. A cell is
``mean ± half-range`` over its seeds.

Rules, fixed in ``arena.yaml`` before the numbers were seen:
- Per seed, an ADMM-family cell whose largest per-layer pruned energy at a hard prune is above 5 %
  is dropped (not converged); the count is shown.
- The evaluation of record is PGD-20 on 1,000 test images (every seed) and the reference
  AutoAttack on 500 (seed 0); where the two order two methods differently, AutoAttack decides.
- Paired differences against one-shot at the fixed allocation, per seed: mean and sign count.
"""
import argparse
import json
import os
import statistics

import matplotlib

from sweep import ARENA  # the methods' own allocations

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METHODS = {"oneshot": "one-shot", "gradual": "gradual", "admm": "ADMM", "progressive": "progressive ADMM",
           "hydra": "HYDRA", "harp": "HARP", "admm_harp": "ADMM at HARP's rates"}
ADMM_FAMILY = ("admm", "progressive", "admm_harp")
NOT_CONVERGED = 0.05  # largest per-layer pruned energy above which an ADMM-family seed is dropped


def largest_energy(ev):
    """The largest per-layer pruned energy over every hard prune of a cell (``eval.json``)."""
    return max((e for stage, fig in ev.get("convergence", {}).items()
                for e in fig.get("pruned_energy", {}).values()), default=float("nan"))


def label(row):
    """A row's name in the tables: the method, and its allocation where it is not the method's own."""
    own = ARENA[row["method"]].get("allocation")
    return METHODS[row["method"]] + ("" if row["allocation"] == own else f" ({row['allocation']})")


def rows(summary):
    """One row per finished arena cell, with its AutoAttack accuracy where its ``-aa`` cell ran."""
    cells = {c["id"]: c for c in summary["cells"]}
    out = []
    for c in summary["cells"]:
        if c["kind"] not in METHODS or 5 not in c["finding"]:
            continue
        m, ev = c["meta"], c["eval"]
        on_500 = cells.get(f"{c['id']}-aa", {}).get("eval", {}).get("accuracy", {})  # AutoAttack, PGD-20
        energy = largest_energy(ev)
        out.append({"id": c["id"], "method": m["method"], "allocation": m["allocation"], "variant": m["variant"],
                    "target": m["target"], "seed": c["seed"], "natural": ev["accuracy"]["natural"],
                    "pgd": ev["accuracy"].get("pgd"), "autoattack": on_500.get("autoattack"),
                    "aa_pgd": on_500.get("pgd"), "energy": energy, "wall_s": c["wall_s"],
                    "excluded": m["method"] in ADMM_FAMILY and not energy <= NOT_CONVERGED,
                    "sparsity": ev["sparsity"]["overall"]})
    return out


class Table:
    """Rows grouped over seeds by the values of ``fields`` (a key is the tuple of them); excluded
    seeds are left out of every figure but ``excluded``."""

    def __init__(self, rows, fields=("variant", "target", "method", "allocation")):
        self.groups = {}
        for r in rows:
            self.groups.setdefault(tuple(r[f] for f in fields), []).append(r)

    def kept(self, key):
        return [r for r in self.groups.get(key, []) if not r.get("excluded")]

    def excluded(self, key):
        return sum(bool(r.get("excluded")) for r in self.groups.get(key, []))

    def values(self, key, metric):
        """The kept seeds' values of ``metric`` (None, a figure a cell lacks, left out)."""
        return [r[metric] for r in self.kept(key) if r[metric] is not None]

    def mean(self, key, metric):
        v = self.values(key, metric)
        return statistics.fmean(v) if v else None

    def spread(self, key, metric):
        v = self.values(key, metric)
        return (max(v) - min(v)) / 2 if v else 0.0

    def cell(self, key, metric):
        v = self.values(key, metric)
        if not v:
            return "-"
        m = 100 * statistics.fmean(v)
        return f"{m:.1f}" if len(v) == 1 else f"{m:.1f} ± {100 * self.spread(key, metric):.1f}"


def row_keys(T, variant, target):
    """The (variant, target, method, allocation) keys of one table, in the spec's method order."""
    keys = [k for k in T.groups if k[0] == variant and k[1] == target]
    return sorted(keys, key=lambda k: (list(METHODS).index(k[2]), k[3]))


def seed_of(T, key, seed, metric):
    return next((r[metric] for r in T.kept(key) if r["seed"] == seed), None)


def better(T, a, b):
    """Whether key ``a`` beats key ``b``: by AutoAttack (seed 0) where both have it and it orders
    them differently from the PGD means, else by the PGD means."""
    pa, pb = T.mean(a, "pgd"), T.mean(b, "pgd")
    aa, ab = T.mean(a, "autoattack"), T.mean(b, "autoattack")
    if pa is None or pb is None:
        return False
    if aa is not None and ab is not None and (aa > ab) != (pa > pb):
        return aa > ab
    return pa > pb


def winner(T, keys):
    """The key that no other beats under ``better`` (the best PGD mean on a cycle)."""
    keys = [k for k in keys if T.mean(k, "pgd") is not None]
    if not keys:
        return None
    unbeaten = [k for k in keys if not any(better(T, o, k) for o in keys if o != k)]
    return max(unbeaten or keys, key=lambda k: T.mean(k, "pgd"))


def paired(T, key, base):
    """(mean PGD difference key - base over the seeds both kept, wins, seeds)."""
    diffs = [r["pgd"] - b for r in T.kept(key) if (b := seed_of(T, base, r["seed"], "pgd")) is not None]
    if not diffs:
        return None
    return statistics.fmean(diffs), sum(d > 0 for d in diffs), len(diffs)


def lr_lines(summary, rs, A):
    """The lr of each epoch after pretraining, read from the runs' ``metrics.jsonl`` at the first
    seed and each variant's first target, the methods with the same lr at every epoch on one row: the proof
    that the schedules are equal."""
    table, first = {}, min((r["seed"] for r in rs), default=0)  # (variant, lrs) -> labels
    for r in sorted(rs, key=lambda r: list(METHODS).index(r["method"])):
        v = (A.get("variants") or {}).get(r["variant"], A)
        if r["seed"] != first or r["target"] != v["targets"][0]:
            continue
        path = os.path.join(summary["out"], "runs", r["id"], "metrics.jsonl")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            lrs = tuple(row["lr"] for row in map(json.loads, f)
                        if row["kind"] == "epoch" and not row["stage"].startswith("pretrain"))
        table.setdefault((r["variant"], lrs), []).append(label(r))
    if not table:
        return []
    width = max(len(lrs) for _, lrs in table)
    lines = ["The lr of each epoch after pretraining (read from the runs of seed 0 at each variant's first "
             "target; in the main rows a stage boundary does not restart it):", "",
             "| rows | methods | " + " | ".join(str(e + 1) for e in range(width)) + " |", "|---|---|" + "---|" * width]
    lines += [f"| {variant} | {', '.join(names)} | " + " | ".join(f"{v:.2e}" for v in lrs) + " |"
              for (variant, lrs), names in table.items()]
    return lines + [""]


def aa_pgd(T, key):
    """Seed 0's PGD-20 on AutoAttack's 500 images, in brackets, for the AutoAttack column ('' if none)."""
    v = seed_of(T, key, 0, "aa_pgd")
    return "" if v is None else f" ({100 * v:.1f})"


def table_lines(T, variant, target, base):
    lines = [f"**{100 * target:g} % of the prunable weights pruned** (natural / PGD-20 in %, mean ± half-range "
             "over the kept seeds; AutoAttack on 500 images, seed 0, with seed 0's PGD-20 on the same images; "
             "PGD difference to one-shot paired by seed)", "",
             "| method | natural | PGD-20 | AutoAttack (PGD-20), seed 0 | PGD vs one-shot | largest pruned energy % | "
             "seeds (dropped) |",
             "|---|---|---|---|---|---|---|"]
    for k in row_keys(T, variant, target):
        p = paired(T, k, base) if k != base else None
        diff = "-" if not p else f"{100 * p[0]:+.1f} ({p[1]}/{p[2]})"
        e = T.values(k, "energy")
        energy = "-" if not e or any(x != x for x in e) else f"{100 * max(e):.2f}"
        lines.append(f"| {label(T.kept(k)[0] if T.kept(k) else T.groups[k][0])} | {T.cell(k, 'natural')} | "
                     f"{T.cell(k, 'pgd')} | {T.cell(k, 'autoattack')}{aa_pgd(T, k)} | {diff} | {energy} | "
                     f"{len(T.kept(k))} ({T.excluded(k)}) |")
    return lines + [""]


def within_noise(T, a, b, metric, limit):
    """Whether the means of keys ``a`` and ``b`` of ``T`` (anything with ``mean`` and ``values``)
    differ by less than the larger half-range over seeds or the binomial standard error at 50 % on
    ``limit`` images."""
    ma, mb = T.mean(a, metric), T.mean(b, metric)
    if ma is None or mb is None:
        return False
    spread = max(((max(v) - min(v)) / 2 for v in (T.values(a, metric), T.values(b, metric))), default=0)
    return abs(ma - mb) < max(spread, (0.25 / limit) ** 0.5)


def close(T, w, keys, limit):
    """The note "(within noise: ...)" naming the rows of ``keys`` whose PGD mean is within noise of
    the pick ``w``'s; else ''."""
    near = [label(T.kept(k)[0]) for k in keys if k != w and within_noise(T, k, w, "pgd", limit)]
    return f" (within noise: {', '.join(near)})" if near else ""


def answers(T, A, limit):
    """The four pre-registered questions, answered by the main table under ``better``; the pick
    of question 4 names the rows within noise of it (``limit``: the PGD evaluation's images)."""
    alloc, out = A["allocation"], []
    key = lambda t, m, a=None: ("main", t, m, a or alloc)  # noqa: E731
    harp = lambda t: ("main", t, "harp", "learned")  # noqa: E731
    q1 = []
    for t in A["targets"]:
        base = [key(t, m) for m in ("oneshot", "gradual") if key(t, m) in T.groups]
        if key(t, "admm") in T.groups and base and T.kept(key(t, "admm")):
            best = winner(T, base)
            q1.append(f"{100 * t:g} %: {'yes' if better(T, key(t, 'admm'), best) else 'no'} (ADMM "
                      f"{100 * T.mean(key(t, 'admm'), 'pgd'):.1f} vs {METHODS[best[2]]} {100 * T.mean(best, 'pgd'):.1f} PGD)")
    out.append("1. Does converged ADMM beat magnitude pruning on equal schedules? " + ("; ".join(q1) or "not run") + ".")
    wins = sum(a.split(": ")[1].startswith("yes") for a in q1)
    q2 = []
    for t in [t for t in A["targets"] if t >= 0.98]:
        keys = row_keys(T, "main", t)
        w = winner(T, keys)
        if w:
            q2.append(f"{100 * t:g} %: {'yes' if w == harp(t) else 'no, ' + label(T.kept(w)[0]) + ' leads'}")
    out.append("2. Does HARP lead at 98-99 %, as in the benchmark? " + ("; ".join(q2) or "not run") + ".")
    q3 = []
    for t in A["targets"]:
        a, h = ("main", t, "admm_harp", "harp"), harp(t)
        if a in T.groups and h in T.groups and T.kept(a) and T.kept(h):
            p = paired(T, a, h)
            q3.append(f"{100 * t:g} %: {'yes' if better(T, a, h) else 'no'}"
                      + (f" (PGD {100 * p[0]:+.1f}, {p[1]}/{p[2]} seeds)" if p else ""))
    out.append("3. Does ADMM at HARP's rates beat HARP? " + ("; ".join(q3) or "not run") + ".")
    q4 = [f"{100 * t:g} %: {label(T.kept(w)[0])}" + close(T, w, row_keys(T, "main", t), limit)
          for t in A["targets"] if (w := winner(T, row_keys(T, "main", t)))]
    out.append("4. Which method should a user pick? " + ("; ".join(q4) or "not run") + ".")
    verdict = ("not decided" if not q1 else "**held**" if wins == len(q1) else "**partly held**" if wins
               else "**did not hold**")
    return out + ["", f"The paper's claim (ADMM beats magnitude pruning at high ratios), on equal terms. Verdict: {verdict}.", ""]


def variant_lines(T, A):
    """The ranking of the rows by PGD mean over each check's seeds: the main rows, then each
    variant's, at its targets. A variant that changes only the split ranks one-shot (no pruning
    phase to split) by its main cell, marked "(main)"."""
    lines, checks = [], {}
    for name, v in (A.get("variants") or {}).items():
        for t in v["targets"]:
            checks.setdefault((t, tuple(sorted(v["seeds"]))), []).append((name, v))
    for (t, seeds), variants in sorted(checks.items()):
        pgd = lambda k: [r["pgd"] for r in T.kept(k) if r["seed"] in seeds]  # noqa: E731
        mean = lambda k: statistics.fmean(pgd(k))  # noqa: E731
        for variant, v in [("main", A), *variants]:
            keys = [k for k in row_keys(T, variant, t) if pgd(k)]
            one = ("main", t, "oneshot", A["allocation"])
            split_only = "split" in v and "sets" not in v
            if variant != "main" and split_only and one[2] not in {k[2] for k in keys} and pgd(one):
                keys.append(one)
            if keys:
                lines.append(f"- {100 * t:g} %, {variant} (seeds {list(seeds)}): " + " > ".join(
                    f"{label(T.kept(k)[0])}{' (main)' if k[0] != variant else ''} {100 * mean(k):.1f}"
                    for k in sorted(keys, key=mean, reverse=True)))
    return (["Ranking checks (PGD-20 mean over the check's seeds; the main rows on the same seeds first):", ""]
            + lines + [""]) if lines else []


def section(summary, plot_name="pruning_methods.png"):
    spec, rs = summary["spec"], rows(summary)
    A, T = spec["arena"], Table(rs)
    cfg = lambda key: spec["set"].get(key, "the config's")  # noqa: E731
    lines = ["## Finding 5: the robust-pruning arena", "",
             f"{spec.get('dataset', 'fashion_mnist')} (the first {cfg('data.train_limit')} training images), LeNet "
             f"w={A['width']}, adversarial training (PGD-{cfg('adv.steps')}, cross-entropy) at the config's eps, "
             f"an overall target of {', '.join(f'{100 * t:g}' for t in A['targets'])} % of the prunable weights. "
             f"Every cell starts from its seed's pretrained model (pretraining: {cfg('pretrain.epochs')} epochs) "
             f"and gets {A['budget']} epochs after it, with one lr schedule across its stages (the lr of each "
             f"epoch below); a pruning phase takes {A['split'][0]} of the {A['budget']}. Allocation: "
             f"{A['allocation']} unless the row says otherwise; HARP learns its own. The rules (exclusion, "
             "evaluation of record, pairing) were fixed in `experiments/arena.yaml` before the runs.", ""]
    lines += lr_lines(summary, rs, A)
    base = ("main", None, "oneshot", A["allocation"])
    for t in A["targets"]:
        lines += table_lines(T, "main", t, base[:1] + (t,) + base[2:])
    lines += ["Answers to the pre-registered questions (AutoAttack decides where it orders two methods "
              "differently from PGD):", ""] + answers(T, A, spec["eval"]["limit"])
    lines += variant_lines(T, A) + [f"![robust accuracy vs sparsity]({plot_name})", ""]
    excluded = [r["id"] for r in rs if r["excluded"]]
    lines += [f"Seeds dropped as not converged (pruned energy above {100 * NOT_CONVERGED:g} %): "
              + (", ".join(excluded) if excluded else "none") + ".", ""]
    parts = [f"{sum(r['wall_s'] for r in rs) / 60:.0f} min in {len(rs)} pruning cells"]
    for kind, name in (("pretrain", "pretraining"), ("autoattack", "AutoAttack")):
        cs = [c["wall_s"] for c in summary["cells"] if c["kind"] == kind]
        parts += [f"{sum(cs) / 60:.0f} min in {len(cs)} {name} cells"] if cs else []
    lines += [f"Cost, the cells' wall times (two cells at once on 2 cores): {', '.join(parts)}.", ""]
    return "\n".join(lines), rs


def plot(summary, path):
    """Robust accuracy against sparsity, one line per row of the main table: AutoAttack (seed 0)
    on the left, PGD-20 (mean over the kept seeds, half-range bars) on the right."""
    A, T = summary["spec"]["arena"], Table(rows(summary))
    names = sorted({k[2:] for k in T.groups if k[0] == "main"}, key=lambda k: (list(METHODS).index(k[0]), k[1]))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    xs = list(range(len(A["targets"])))
    for i, (method, alloc) in enumerate(names):
        keys = [("main", t, method, alloc) for t in A["targets"]]
        name = label({"method": method, "allocation": alloc})
        for ax, metric in zip(axes, ("autoattack", "pgd")):
            pts = [(x, T.mean(k, metric), T.spread(k, metric)) for x, k in zip(xs, keys) if T.mean(k, metric) is not None]
            if pts:
                ax.errorbar([p[0] for p in pts], [100 * p[1] for p in pts], yerr=[100 * p[2] for p in pts],
                            fmt="osD^v<>p*h"[i % 10] + ("-" if alloc != "uniform" else ":"), capsize=3,
                            label=name, color=f"C{i}", markersize=5)
    for ax, title in zip(axes, ("AutoAttack, seed 0 (500 images)", "PGD-20, mean over seeds (1,000 images)")):
        ax.set_xticks(xs, [f"{100 * t:g}%" for t in A["targets"]])
        ax.set_xlabel("prunable weights pruned")
        ax.set_ylabel("robust accuracy (%)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle("Finding 5: robust accuracy vs sparsity (dotted: uniform allocation)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    fig.legend(*axes[1].get_legend_handles_labels(), loc="center right", fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_section(summary, out, stem, plot_fn, section_fn):
    """Write ``<out>/<stem>.png`` (``plot_fn``), the section ``<out>/results/<stem>.md`` and its rows
    ``<out>/results/<stem>.json`` (``section_fn``); return the section's text. Shared by the
    reports of the findings that have their own sweep."""
    os.makedirs(os.path.join(out, "results"), exist_ok=True)
    plot_fn(summary, os.path.join(out, f"{stem}.png"))
    text, rs = section_fn(summary, f"{stem}.png")
    with open(os.path.join(out, "results", f"{stem}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "results", f"{stem}.json"), "w") as f:
        json.dump(rs, f, indent=1)
    return text


def write(summary, out):
    """Write Finding 5's plot, section and rows under ``out``; return the section's text."""
    return write_section(summary, out, "pruning_methods", plot, section)


def cli(write_fn, stem, description, argv=None):
    """``--summary`` (default runs/experiments/<stem>/summary.json) -> ``write_fn`` into ``--out``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--summary", default=f"runs/experiments/{stem}/summary.json")
    p.add_argument("--out", default="docs", help="folder for the plot; the section goes to <out>/results/")
    a = p.parse_args(argv)
    with open(a.summary) as f:
        print(write_fn(json.load(f), a.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(cli(write, "arena", __doc__.splitlines()[0]))
