"""Finding 5 from the pruning-methods sweep (``pruning_methods.yaml``): tables, verdict and plot.

    python experiments/methods_report.py --summary runs/experiments/pruning_methods/summary.json --out docs

Writes ``<out>/results/pruning_methods.md`` (the Finding 5 section that ``report.py`` puts into
RESULTS.md), ``<out>/results/pruning_methods.json`` (one row per cell) and
``<out>/pruning_methods.png``; ``report.py`` calls ``write`` when it makes RESULTS.md. Every number comes from the cells' ``eval.py`` reports: accuracy on
the evaluation subset and the convergence figures the checkpoint carries (ADMM's residuals, the
pruned energy at each hard prune). A cell is ``mean ± half-range`` over its seeds.

Rules, fixed before the numbers were seen (issue 10):
- An ADMM or progressive-ADMM cell whose largest per-layer pruned energy, at any of its hard prunes
  and for any seed, is above 5 % is **not converged**: shown, and left out of the verdict.
- A comparison where every method is near chance (natural accuracy below 15 %) is left out too.
- ADMM wins a comparison when its mean accuracy (PGD for adversarial training, natural for
  natural training) is at least the better of one-shot's and gradual's.
"""
import argparse
import json
import os
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METHODS = {"admm": "ADMM", "progressive": "progressive ADMM", "oneshot": "one-shot", "gradual": "gradual"}
COLORS = {"admm": "C0", "progressive": "C1", "oneshot": "C2", "gradual": "C3"}  # the same in every panel
NOT_CONVERGED = 0.05  # largest per-layer pruned energy above which an ADMM cell has not converged
CHANCE = 0.15         # natural accuracy below which a model is at chance (10 classes)


def largest_energy(ev):
    """The largest per-layer pruned energy over every hard prune of a cell (``eval.json``)."""
    return max((e for stage, fig in ev.get("convergence", {}).items()
                for e in fig.get("pruned_energy", {}).values()), default=float("nan"))


def method_cells(summary):
    """The finished cells of the methods comparison (Finding 5) in ``summary``."""
    return [c for c in summary["cells"] if c["kind"] in METHODS and 5 in c["finding"]]


def rows(summary):
    """One row per finished cell: its setting, accuracies and largest pruned energy."""
    out = []
    for c in method_cells(summary):
        m, ev = c["meta"], c["eval"]
        out.append({"id": c["id"], "method": m["method"], "training": m["training"], "ratio": m["ratio"],
                    "budget": m["budget"], "seed": c["seed"], "natural": ev["accuracy"]["natural"],
                    "pgd": ev["accuracy"].get("pgd"), "energy": largest_energy(ev), "wall_s": c["wall_s"]})
    return out


class Table:
    """Rows grouped over seeds by the values of ``fields`` (a key is the tuple of them)."""

    def __init__(self, rows, fields=("training", "budget", "ratio", "method")):
        self.groups = {}
        for r in rows:
            self.groups.setdefault(tuple(r[f] for f in fields), []).append(r)

    def values(self, key, metric):
        """The seeds' values of ``metric`` (None, a figure a cell lacks, left out)."""
        return [r[metric] for r in self.groups.get(key, []) if r[metric] is not None]

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

    def converged(self, key):
        """Whether every seed's largest pruned energy is at most 5 % (always for the baselines)."""
        return key[3] not in ("admm", "progressive") or all(e <= NOT_CONVERGED for e in self.values(key, "energy"))


def metric_of(training):
    return "pgd" if training == "adversarial" else "natural"


def table_lines(T, training, budget, ratios, methods, limit):
    """The table of one training mode and budget, and the comparisons it decides:
    [(ratio, ADMM mean, best baseline mean, within noise)]."""
    metric = metric_of(training)
    lines = [f"**{training.capitalize()} training, {budget} epochs after pretraining** "
             f"({'PGD' if metric == 'pgd' else 'natural'} accuracy decides; natural / PGD in %, "
             "largest per-layer pruned energy at the hard prune(s) in %)", "",
             "| ratio | " + " | ".join(METHODS[m] for m in methods) + " | seeds |",
             "|---" * (len(methods) + 2) + "|"]
    decided = []
    for r in ratios:
        keys = {m: (training, budget, r, m) for m in methods}
        cells = []
        for m, k in keys.items():
            e = max(T.values(k, "energy"), default=float("nan"))
            flag = "" if T.converged(k) else " **not converged**"
            energy = "-" if e != e else f"{100 * e:.2f}"  # nan: no figure recorded
            cells.append(f"{T.cell(k, 'natural')} / {T.cell(k, 'pgd')} (energy {energy}){flag}")
        seeds = min(len(T.values(k, "natural")) for k in keys.values())
        lines.append(f"| {100 * r:g}% | " + " | ".join(cells) + f" | {seeds} |")
        at_chance = all((T.mean(k, "natural") or 0) < CHANCE for k in keys.values())
        base = [T.mean(keys[m], metric) for m in ("oneshot", "gradual") if T.mean(keys[m], metric) is not None]
        a = T.mean(keys["admm"], metric)
        if a is None or not base or at_chance or not T.converged(keys["admm"]):
            continue
        best = max(("oneshot", "gradual"), key=lambda m: T.mean(keys[m], metric) or -1)
        noise = max(T.spread(keys["admm"], metric), T.spread(keys[best], metric), (0.25 / limit) ** 0.5)
        decided.append((r, a, max(base), abs(a - max(base)) < noise))
    return lines + [""], decided


def section(summary, plot_name="pruning_methods.png"):
    spec, rs = summary["spec"], rows(summary)
    cfg = lambda key: spec["set"].get(key, "the config's")  # noqa: E731
    m, T = spec["methods"], Table(rs)
    limit = spec["eval"]["limit"]
    lines = ["## Finding 5: ADMM vs magnitude pruning at high ratios", "",
             f"{spec.get('dataset', 'fashion_mnist')} (the first {cfg('data.train_limit')} training images and "
             f"{limit:,} test images), LeNet w={m['width']}, every layer pruned (irregular) at the ratio. Each "
             f"cell starts from its seed's pretrained model ({cfg('pretrain.epochs')} epochs) and gets "
             "the same number of epochs after it:",
             "- **ADMM**: 80 % ADMM (Z/U update every epoch, rho "
             f"{cfg('prune.rho')} x{cfg('prune.rho_growth')} per update), 20 % masked "
             "retraining (at least one epoch).",
             f"- **progressive ADMM** (Ye, Feng et al.): {len(m['rounds'])} rounds, to "
             + " then ".join(f"{100 * f:g} %" for f in m["rounds"])
             + " of each layer's target, each with half the budget, split as ADMM's.",
             "- **one-shot**: magnitude pruning, then masked retraining for the whole budget.",
             "- **gradual** (Zhu & Gupta 2017): the cubic schedule over the pruning stage, then masked retraining.",
             f"- Every stage after pretraining trains with the same optimizer and lr (Adam, {cfg('admm.lr')}).",
             "", f"Adversarial training: PGD-{cfg('adv.steps')}; evaluation: PGD-"
             f"{spec['eval']['steps']} at the config's eps. *Energy* is the largest per-layer share of the "
             "squared weight norm removed by a hard prune (one-shot: the magnitude prune itself; gradual: its "
             "last pruning step; progressive: the larger of its two rounds'). "
             f"An ADMM cell above {100 * NOT_CONVERGED:g} % is **not converged** and kept out of the verdict.", ""]
    decided = {}
    for training in ("adversarial", "natural"):
        for budget in m["budgets"]:
            t, d = table_lines(T, training, budget, m["ratios"], m["methods"], limit)
            lines += t
            decided[(training, budget)] = d
    lines += verdict_lines(T, decided, m) + [f"![accuracy vs pruning rate]({plot_name})", ""]
    lines += trajectory_lines(summary, max(m["budgets"]))
    lines += cost_lines(rs)
    return "\n".join(lines), rs


def verdict_lines(T, decided, m):
    n = sum(len(d) for d in decided.values())
    wins = sum(a >= b for d in decided.values() for _, a, b, _ in d)
    noisy = [f"{t} {b} epochs {100 * r:g}%" for (t, b), d in decided.items() for r, _, _, w in d if w]
    unconv = [f"{t} {b} epochs {100 * r:g}%" for t in ("adversarial", "natural") for b in m["budgets"]
              for r in m["ratios"] if T.values((t, b, r, "admm"), "energy") and not T.converged((t, b, r, "admm"))]
    verdict = ("not decided (no comparison where ADMM converged)" if not n else
               "**held**" if wins == n else "**partly held**" if wins else "**did not hold**")
    if noisy and n:
        verdict += " by the means, but some margins are within noise"
    lines = [f"Rule: ADMM wins a comparison when its mean accuracy (PGD for adversarial, natural for natural "
             f"training) is at least the better baseline's (one-shot or gradual). ADMM won {wins} of the {n} "
             "comparisons where it converged and the models were above chance"
             + (f"; not converged: {', '.join(unconv)}" if unconv else "") + f". Verdict: {verdict}."]
    if noisy:
        lines.append(f"Within noise (difference below the seed spread or the binomial standard error): {', '.join(noisy)}.")
    for (t, b), d in decided.items():
        if d:
            lines.append(f"- {t}, {b} epochs: " + ", ".join(
                f"{100 * r:g}%: ADMM {100 * a:.1f} vs best baseline {100 * base:.1f}" for r, a, base, _ in d))
    return lines + [""]


def stage_ends(run_dir, key):
    """{stage kind: ``key`` (e.g. train_adv) at the stage's last epoch} from a run's metrics.jsonl."""
    path, out = os.path.join(run_dir, "metrics.jsonl"), {}
    if os.path.isfile(path):
        with open(path) as f:
            for row in map(json.loads, f):
                if row["kind"] == "epoch" and row.get(key) is not None:
                    out[row["stage"].split(".")[0]] = row[key]  # progressive: the last round's
    return out


def trajectory_lines(summary, budget):
    """Where the training accuracy goes, at the longest budget: the training-set accuracy (under
    the training attack for adversarial training) at the end of the pruning stage and at the end
    of masked retraining, mean over seeds and ratios, per method. Read from each run's
    metrics.jsonl (the sweep's run folders); nothing when they are not there."""
    acc = {}
    for c in method_cells(summary):
        m = c["meta"]
        if m["budget"] != budget:
            continue
        key = "train_adv" if m["training"] == "adversarial" else "train_natural"
        ends = stage_ends(os.path.join(summary["out"], "runs", c["id"]), key)
        for stage in ("admm", "gradual", "retrain"):
            if stage in ends:
                acc.setdefault((m["training"], m["method"], "retrain" if stage == "retrain" else "prune"),
                               {}).setdefault(m["ratio"], []).append(ends[stage])
    if not acc:
        return []
    ratios = sorted({r for v in acc.values() for r in v})
    lines = [f"Where the accuracy goes at {budget} epochs: training-set accuracy (adversarial training: under "
             "the training attack) at the end of the pruning stage -> at the end of masked retraining, mean "
             "over seeds, in % (from each run's `metrics.jsonl`):", "",
             "| training | method | " + " | ".join(f"{100 * r:g}%" for r in ratios) + " |",
             "|---|---|" + "---|" * len(ratios)]
    for training in ("adversarial", "natural"):
        for method in METHODS:
            if (training, method, "retrain") not in acc:
                continue
            cells = []
            for r in ratios:
                pr, rt = (acc.get((training, method, k), {}).get(r) for k in ("prune", "retrain"))
                cells.append(("" if not pr else f"{100 * statistics.fmean(pr):.1f} -> ")
                             + ("-" if not rt else f"{100 * statistics.fmean(rt):.1f}"))
            lines.append(f"| {training} | {METHODS[method]} | " + " | ".join(cells) + " |")
    return lines + [""]


def cost_lines(rs):
    by = {}
    for r in rs:
        by.setdefault((r["method"], r["training"], r["budget"]), []).append(r["wall_s"])
    lines = ["Wall seconds per cell (training and evaluation; two cells at once on the 2 cores):", "",
             "| method | training | budget | cells | mean wall s |", "|---|---|---|---|---|"]
    lines += [f"| {METHODS[k[0]]} | {k[1]} | {k[2]} | {len(v)} | {statistics.fmean(v):.0f} |"
              for k, v in sorted(by.items())]
    return lines + ["", f"Sum of cell wall times: {sum(r['wall_s'] for r in rs) / 60:.1f} min.", ""]


def plot(summary, path):
    """Accuracy vs pruning rate, one line per method; one panel per training mode and budget.
    Hollow markers: ADMM cells that did not converge."""
    spec, T = summary["spec"], Table(rows(summary))
    m = spec["methods"]
    panels = [(t, b) for t in ("adversarial", "natural") for b in m["budgets"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
    xs = list(range(len(m["ratios"])))
    for ax, (training, budget) in zip(axes[0], panels):
        metric = metric_of(training)
        for method, mk in zip(m["methods"], "osD^v"):
            keys = [(training, budget, r, method) for r in m["ratios"]]
            pts = [(x, T.mean(k, metric), T.spread(k, metric), T.converged(k)) for x, k in zip(xs, keys)
                   if T.mean(k, metric) is not None]
            if not pts:
                continue
            color = COLORS.get(method)
            ax.errorbar([p[0] for p in pts], [100 * p[1] for p in pts], yerr=[100 * p[2] for p in pts],
                        fmt=mk + "-", capsize=3, label=METHODS[method], markersize=5, color=color)
            for x, y, _, ok in pts:
                if not ok:
                    ax.plot(x, 100 * y, mk, markersize=9, mfc="white", mec=color)
        ax.set_xticks(xs, [f"{100 * r:g}%" for r in m["ratios"]])
        ax.set_title(f"{training}, {budget} epochs", fontsize=9)
        ax.set_xlabel("pruned, every layer")
        ax.set_ylabel(f"{'PGD' if metric == 'pgd' else 'natural'} accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Finding 5: accuracy vs pruning rate (hollow: ADMM not converged)", fontsize=10)
    fig.tight_layout()
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
    raise SystemExit(cli(write, "pruning_methods", __doc__.splitlines()[0]))
