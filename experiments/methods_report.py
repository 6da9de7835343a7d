"""Finding 5, the robust-pruning arena (``arena.yaml``): its cells, tables, answers and plot.

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
import json
import os
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cells import ROOT, pre  # noqa: E402
from frame import Finding, Section, Table, cli, tally, verdict_in, within_noise, write_section  # noqa: E402

sys.path.insert(0, ROOT)
from config import load_config  # noqa: E402
from pruning.plan import stage_names  # noqa: E402

METHODS = {"oneshot": "one-shot", "gradual": "gradual", "admm": "ADMM", "progressive": "progressive ADMM",
           "hydra": "HYDRA", "harp": "HARP", "admm_harp": "ADMM at HARP's rates"}
ADMM_FAMILY = ("admm", "progressive", "admm_harp")
NOT_CONVERGED = 0.05  # largest per-layer pruned energy above which an ADMM-family seed is dropped


# The arena's methods: the --set overrides that pick each, and the allocation it prunes
# at when it does not take the spec's fixed one ("learned": HARP's own; "harp": a HARP cell's). A
# method with a pruning phase splits the epochs after pretraining (pruning stage, masked
# fine-tuning) by the spec's split; progressive ADMM splits them evenly over its rounds.
ARENA = {
    "oneshot": {"sets": {"prune.method": "oneshot"}},      # magnitude prune, then fine-tuning throughout
    "gradual": {"sets": {"prune.method": "gradual"}},      # Zhu & Gupta's cubic schedule, then fine-tuning
    "admm": {"sets": {"prune.method": "admm"}},
    "progressive": {"sets": {"prune.method": "admm"}},     # with the target's prune.rate_rounds
    "hydra": {"sets": {"prune.method": "hydra"}},          # scores under the adversarial loss, then fine-tuning
    "harp": {"sets": {"prune.method": "harp"}, "allocation": "learned"},  # scores and per-layer rates
    "admm_harp": {"sets": {"prune.method": "admm", "prune.allocation": "from_checkpoint"}, "allocation": "harp"},
}


def arena_sets(method, budget, split, rates=()):
    """--set overrides that give arena ``method`` ``budget`` epochs after pretraining, split
    (pruning phase, fine-tuning) in the ratio ``split``; ``rates``: progressive ADMM's rounds."""
    sets = [f"{k}={v}" for k, v in ARENA[method]["sets"].items()]
    if method == "oneshot":
        return sets + [f"retrain.epochs={budget}"]
    n = len(rates) if method == "progressive" else 1
    prune, tune = (budget * s // sum(split) // n for s in split)
    if n * (prune + tune) != budget or not prune or not tune:
        raise ValueError(f"arena: {budget} epochs do not split {split[0]}:{split[1]} into {n} round(s) of whole epochs")
    sets += [f"admm.epochs={prune}", f"retrain.epochs={tune}"]
    return sets + ([f"prune.rate_rounds={list(rates)}"] if method == "progressive" else [])


# The keys a variant may add besides seeds, targets, split, sets, methods and uniform: its own
# budget, --set overrides per target ({target: [...]}, after all others), the pretrained model it
# starts from (a name in arena.starts: {name: {sets, arch, width}}; default the spec's pretraining),
# the variant whose HARP cells its admm_harp rows read (default its own), and the name of the
# protocol-(b) setting it runs (one of the candidates a method's setting of record is chosen from
# on the validation split, ``fair_arena.py``).
VARIANT_KEYS = ("budget", "target_sets", "start", "harp_from", "setting")


def pre_id(w, seed, start=None, st=None):
    """The id of an arena row's pretrained cell: the spec's own (``pre``), or start ``start``'s."""
    st = st or {}
    return pre("adv", st.get("width", w), seed) + (f"-{start}" if start else "")


def start_sets(w, st):
    """--set overrides of a pretrained start ``st`` ({sets, arch, width}) and of the rows from it."""
    return ([f"model.arch={st['arch']}"] if "arch" in st else []) + [f"model.width={st.get('width', w)}", *st["sets"]]


def arena_runs(A, spec):
    """The main rows and each variant of ``arena`` ``A``, checked: [{name, seeds, targets, split,
    sets, methods, uniform, budget, target_sets, start, harp_from}]."""
    starts = {None: {"sets": []}, **(A.get("starts") or {})}
    runs = [{"name": "main", "seeds": spec["seeds"], "targets": A["targets"], "split": A["split"], "sets": [],
             "methods": A["methods"], "uniform": A.get("uniform", []), "budget": A["budget"], "target_sets": {},
             "start": None, "harp_from": None}]
    for name, v in (A.get("variants") or {}).items():
        unknown = set(v) - {"seeds", "targets", "split", "sets", "methods", "uniform", *VARIANT_KEYS}
        if unknown or not {"seeds", "targets"} <= set(v):
            raise ValueError(f"arena.variants.{name}: keys {', '.join(sorted(v))}; a variant takes seeds and targets, "
                             f"and may take split, sets, methods, uniform, {', '.join(VARIANT_KEYS)}")
        runs.append({**runs[0], "name": name, "sets": [], **v})
    for run in runs:
        bad = [m for m in (*run["methods"], *run["uniform"]) if m not in ARENA]
        if bad:
            raise ValueError(f"arena ({run['name']}): unknown methods {', '.join(bad)}; choose from {', '.join(ARENA)}")
        own = [m for m in run["uniform"] if "allocation" in ARENA[m]]
        if own:
            raise ValueError(f"arena ({run['name']}): uniform rows of {', '.join(own)}, which prune at their own allocation")
        if "admm_harp" in run["methods"] and "harp" not in run["methods"] and not run["harp_from"]:
            raise ValueError(f"arena ({run['name']}): admm_harp reads its rates from harp's cells; add harp to its methods "
                             "(or name the variant whose harp cells it reads in harp_from)")
        if run["start"] not in starts:
            raise ValueError(f"arena ({run['name']}): start {run['start']!r} is not in arena.starts")
    return runs, starts


def plan(spec, cells):
    """The robust-pruning arena's cells: every method of ``arena.methods`` at each
    overall target, from its seed's pretrained model, with the same epochs and lr at every epoch
    after it (``lr_span: run`` in the spec's ``set``); the fixed allocation for all but HARP (which
    learns its own) and, for ``arena.uniform``'s methods, uniform rows too. ``arena.variants``
    repeat some methods' rows (``methods``, ``uniform``; the main ones by default) at some targets
    and seeds with another schedule, split, budget or pretrained start."""
    A, cfg = spec["arena"], os.path.join(ROOT, spec["config"])
    w = A["width"]
    runs, starts = arena_runs(A, spec)
    for run in runs:  # the pretrained models the rows start from, one per seed and start
        for seed in run["seeds"] if run["start"] else spec["seeds"]:
            st = starts[run["start"]]
            cells.add(pre_id(w, seed, run["start"], st), [FINDING.number], "pretrain", seed,
                      {"width": st.get("width", w), "training": "adversarial", "start": run["start"] or "spec",
                       "arch": st.get("arch", "config")},
                      [{"script": "adv_main.py", "stage": "pretrain", "init": None, "sets": start_sets(w, st)}],
                      "pretrain.pt")
    for run in runs:
        variant, split, extra, budget, st = run["name"], run["split"], run["sets"], run["budget"], starts[run["start"]]
        for seed in run["seeds"]:
            for t in run["targets"]:
                rows = [(m, ARENA[m].get("allocation", A["allocation"])) for m in run["methods"]]
                rows += [(m, "uniform") for m in run["uniform"]]
                for method, alloc in rows:
                    tag = f"t{round(t * 100, 2):g}-{variant}-s{seed}"
                    sets = [*start_sets(w, st), "prune.sparsity_type=irregular", f"prune.target={t}",
                            *A.get("sets", []), *extra,
                            *arena_sets(method, budget, split, A["rate_rounds"].get(t, ()))]
                    sets += [] if alloc in ("learned", "harp") else [f"prune.allocation={alloc}"]
                    if method == "harp":
                        sets.append(f"prune.allocation={A['allocation']}")  # where its rates start
                    sets += run["target_sets"].get(t, [])  # last: they may change even that
                    pre_cell = pre_id(w, seed, run["start"], st)
                    deps = [pre_cell]
                    if method == "admm_harp":
                        harp = f"harp-learned-t{round(t * 100, 2):g}-{run['harp_from'] or variant}-s{seed}"
                        sets.append(f"prune.rates_from={os.path.join('{out}', 'runs', harp, 'retrain.pt')}")
                        deps.append(harp)
                    names = stage_names(load_config(cfg, [*(f"{k}={v}" for k, v in spec["set"].items()), *sets]))
                    steps = [{"script": "adv_main.py", "stage": name, "sets": sets,
                              "init": ("cell", pre_cell, "pretrain.pt") if i == 0 else None}
                             for i, name in enumerate(names[1:])]
                    meta = {"width": st.get("width", w), "training": "adversarial", "target": t, "budget": budget,
                            "method": method, "allocation": alloc, "variant": variant, "split": list(split)}
                    meta.update({k: v for k, v in (("start", run["start"]), ("arch", st.get("arch"))) if v})
                    cells.add(f"{method}-{alloc}-{tag}", [FINDING.number], method, seed, meta, steps, "retrain.pt",
                              deps)


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
        if c["kind"] not in METHODS or FINDING.number not in c["finding"]:
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


FIELDS = ("variant", "target", "method", "allocation")  # a table row: its cells over seeds


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
    verdict = "not decided" if not q1 else tally(wins, len(q1))
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
    A, T = spec["arena"], Table(rs, FIELDS)
    cfg = lambda key: spec["set"].get(key, "the config's")  # noqa: E731
    lines = [f"## Finding {FINDING.number}: the robust-pruning arena", "",
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
    A, T = summary["spec"]["arena"], Table(rows(summary), FIELDS)
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
    fig.suptitle(f"Finding {FINDING.number}: robust accuracy vs sparsity (dotted: uniform allocation)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    fig.legend(*axes[1].get_legend_handles_labels(), loc="center right", fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(summary, out):
    """Write Finding 5's plot, section and rows under ``out``; return the section's text."""
    return write_section(summary, out, "pruning_methods", plot, section)


def report_section(summary, out):
    text = write(summary, out)
    return Section(verdict_in(text), text.splitlines())


FINDING = Finding(5, "ADMM beats magnitude pruning at high ratios", "arena", plan, report_section,
                  stem="pruning_methods", sweep="arena")


if __name__ == "__main__":
    raise SystemExit(cli(write, "arena", __doc__.splitlines()[0]))
