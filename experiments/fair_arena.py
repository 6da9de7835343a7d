"""Finding 5, the arena fair to every method (``arena_fair.yaml``): its tables, answers and plot.

    python experiments/fair_arena.py --summary docs/results/arena_fair_cells.json --out docs
    python experiments/fair_arena.py --summary docs/results/arena_fair_cells.json --after-b12

The summary is the sweep's ``summary.json`` or its committed record (the spec's ``record``: the
same spec and cells). Writes ``<out>/results/arena_fair.md`` (the section ``report.py`` puts into
RESULTS.md), ``<out>/results/arena_fair.json`` (one row per cell) and ``<out>/arena_fair.png``.
Every number comes from the cells' records: ``eval.py``'s report, the validation figures and the
lr of each epoch (``sweep.py``).

The rules, fixed in ``arena_fair.yaml`` before the runs, as this module applies them:
- A table is a group of rows: protocol (a) at each budget (``a12``, ``a36``), protocol (b) at each
  budget (``b12``, ``b36``: one setting of record per method, target and seed), and the rows from
  another start (``e10``: today's start, the check row; ``r18``: the second network).
- Protocol (b): a method's candidates at a target, budget and seed are its protocol-(a) cell and
  its registered settings (variants with ``setting``), in the spec's order. The setting of record
  is the candidate with the highest validation PGD (the cell's ``val.pgd``), ties to the first;
  a dropped candidate cannot be chosen; no choice until every candidate has finished. The test
  set is never read for it.
- Dropping, the evaluation of record (AutoAttack decides where it orders two methods differently
  from PGD), paired differences and the noise rule: as in the first arena (``methods_report.py``).
"""
import os
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from torch import nn  # noqa: E402

from frame import MISSING, Finding, Section, Table, UserError, cli, tally, verdict_in, within_noise, write_section  # noqa: E402
from methods_report import ARENA, FIELDS, METHODS, arena_runs, better, close, label, paired, plan, pre_id, row_keys, rows, \
    table_lines, winner  # noqa: E402
from training.state import EarlyStop  # noqa: E402

STEM = "arena_fair"


# --------------------------------------------------------------------------- rows and the choice

def group(run):
    """The table a run's rows belong to: its start's name (a check or another network), else its
    protocol and budget (``a12``, ``b36``)."""
    if run["start"]:
        return run["start"]
    return f"{'b' if run.get('setting') else 'a'}{run['budget']}"


def fair_rows(summary):
    """``methods_report.rows`` with each cell's run: its group, budget, start, setting ("a" for a
    protocol-(a) cell), validation PGD and lrs; a protocol-(b) candidate's table is
    ``<group>:<setting>`` (only its setting of record goes into ``<group>``)."""
    spec = summary["spec"]
    runs = {r["name"]: r for r in arena_runs(spec["arena"], spec)[0]}
    cells = {c["id"]: c for c in summary["cells"]}
    out = []
    for r in rows(summary):
        run, c = runs[r["variant"]], cells[r["id"]]
        g, setting = group(run), run.get("setting") or "a"
        out.append({**r, "run": r["variant"], "variant": f"{g}:{setting}" if g[0] == "b" and not run["start"] else g,
                    "budget": run["budget"], "start": run["start"], "setting": setting,
                    "val_pgd": (c.get("val") or {}).get("pgd"), "lrs": c.get("lrs")})
    return out


def choose(rs, spec):
    """Protocol (b)'s rows of record: per method, target, budget and seed, the candidate (the
    protocol-(a) cell, then each registered setting) with the best validation PGD, put into table
    ``b<budget>``. Returns (rows, {(method, target, budget, seed): chosen setting or None while a
    candidate is still to run})."""
    runs = arena_runs(spec["arena"], spec)[0]
    order = [r["name"] for r in runs]
    chosen, settings = [], {}
    keys = dict.fromkeys((m, t, r["budget"], seed) for r in runs if r.get("setting") and not r["start"]
                         for m in r["methods"] for t in r["targets"] for seed in r["seeds"])
    for key in keys:
        method, t, budget, seed = key
        names = [r["name"] for r in runs if not r["start"] and r["budget"] == budget and method in r["methods"]
                 and t in r["targets"] and seed in r["seeds"]]
        own = ARENA[method].get("allocation", spec["arena"]["allocation"])
        cands = sorted((x for x in rs if x["run"] in names and x["method"] == method and x["allocation"] == own
                        and x["target"] == t and x["seed"] == seed), key=lambda x: order.index(x["run"]))
        if len(cands) < len(names):
            settings[key] = None
            continue
        ok = [x for x in cands if not x["excluded"] and x["val_pgd"] is not None]
        best = max(ok, key=lambda x: x["val_pgd"]) if ok else cands[0]  # max keeps the first of equals
        settings[key] = best["setting"]
        chosen.append({**best, "variant": f"b{budget}"})
    return chosen, settings


def tables(summary):
    """(every row, the Table of the groups and the settings of record, the choice per key)."""
    rs = fair_rows(summary)
    chosen, settings = choose(rs, summary["spec"])
    return rs, Table(rs + chosen, FIELDS), settings


def kept_epoch(curve, sets):
    """(epoch, validation PGD) of the weights a pretraining run kept: ``EarlyStop``'s rule replayed
    on its curve [[epoch, val_pgd], ...] with the run's settings ``sets``; without early stopping
    (patience 0) its last epoch, (``pretrain.epochs``, None) where it ran no validation; (None,
    None) for a curve missing."""
    rule = EarlyStop(int(sets.get("pretrain.patience", 0)), float(sets.get("pretrain.min_delta", 0)))
    if not rule.patience:
        return tuple(curve[-1]) if curve else (sets.get("pretrain.epochs"), None)
    if not curve:
        return None, None
    for epoch, v in curve:
        rule.observe(epoch, v, nn.Module())
    return rule.best_epoch, rule.best


def run_sets(spec, start):
    """The --set values a pretraining run of ``start`` (a name in arena.starts, or "spec") trained with."""
    extra = (spec["arena"].get("starts") or {}).get(start, {}).get("sets", [])
    return {**spec["set"], **dict(kv.split("=", 1) for kv in extra)}


# --------------------------------------------------------------------------- the section's parts

def start_lines(summary):
    """The converged starts (one per seed and start): epochs run, the kept epoch, validation PGD,
    the test figures, and each curve."""
    spec, cells = summary["spec"], {c["id"]: c for c in summary["cells"]}
    pre = [c for c in summary["cells"] if c["kind"] == "pretrain" and FINDING.number in c["finding"]]
    if not pre:
        return []
    lines = ["**The pretrained starts** (PGD-20 on the validation split after every epoch; the start is the kept "
             f"epoch's weights; test figures on {spec['eval']['limit']:,} test images, AutoAttack on "
             f"{(spec.get('autoattack') or {}).get('limit', '-')} where it ran):", "",
             "| start | seed | epochs run | kept epoch | validation PGD-20 there | test natural | test PGD-20 | "
             "AutoAttack |", "|---|---|---|---|---|---|---|---|"]
    curves = []
    for c in sorted(pre, key=lambda c: (c["meta"].get("start", "spec"), c["meta"].get("arch", ""), c["seed"])):
        curve = (c.get("val") or {}).get("pretrain_curve") or []
        start = c["meta"].get("start", "spec")
        name = "main" if start == "spec" else start
        aa = cells.get(c["id"] + "-aa", {}).get("eval", {}).get("accuracy", {}).get("autoattack")
        acc = c["eval"]["accuracy"]
        kept = kept_epoch(curve, run_sets(spec, start))
        ran = len(curve) or kept[0]  # without early stopping, no validation curve: the epochs configured
        lines.append(f"| {name} | {c['seed']} | {ran or '-'} | {kept[0] or '-'} | "
                     f"{'-' if kept[1] is None else f'{100 * kept[1]:.1f}'} | {100 * acc['natural']:.1f} | "
                     f"{100 * acc['pgd']:.1f} | {'-' if aa is None else f'{100 * aa:.1f}'} |")
        if len(curve) > 1:
            curves.append(f"- {name}, seed {c['seed']}: " + " ".join(f"{100 * v:.1f}" for _, v in curve))
    return lines + [""] + (["Validation PGD-20 (%) after each pretraining epoch:", "", *curves, ""] if curves else [])


def lr_lines(rs):
    """The lr of each epoch after pretraining, per table and method (first seed, first target), the
    methods with the same lrs on one row: the proof that protocol (a)'s schedules are equal."""
    table = {}
    for g in sorted({r["variant"] for r in rs if r["variant"][0] == "a"}):
        mine = [r for r in rs if r["variant"] == g and r["lrs"]]
        if not mine:
            continue
        seed, t = min(r["seed"] for r in mine), min(r["target"] for r in mine)
        for r in sorted(mine, key=lambda r: list(METHODS).index(r["method"])):
            if r["seed"] == seed and r["target"] == t:
                table.setdefault((g, tuple(r["lrs"])), []).append(label(r))
    if not table:
        return []
    lines = ["The lr of each epoch after pretraining under protocol (a) (seed and target: the first of each table's):", "",
             "| table | methods | lr of epoch 1, 2, ... |", "|---|---|---|"]
    lines += [f"| {g} | {', '.join(names)} | " + " ".join(f"{v:.2e}" for v in lrs) + " |" for (g, lrs), names in table.items()]
    return lines + [""]


def setting_lines(settings):
    """Which setting each method's row of record is, per target, budget and seed."""
    if not settings:
        return []
    lines = ["Settings of record under protocol (b), chosen on the validation split (a: the protocol-(a) cell; "
             "... : a candidate still to run):", "", "| budget | target | method | settings by seed |", "|---|---|---|---|"]
    keys = sorted({k[:3] for k in settings}, key=lambda k: (k[2], k[1], list(METHODS).index(k[0])))
    for method, t, budget in keys:
        seeds = sorted(s for m, tt, b, s in settings if (m, tt, b) == (method, t, budget))
        picks = ", ".join(f"{s}: {settings[(method, t, budget, s)] or '...'}" for s in seeds)
        lines.append(f"| {budget} | {100 * t:g} % | {METHODS[method]} | {picks} |")
    return lines + [""]


TITLES = {"a": "protocol (a), equal terms", "b": "protocol (b), each method at its own protocol"}


def group_title(g, rs):
    mine = [r for r in rs if r["variant"] == g]
    if g[0] in TITLES and g[1:].isdigit():
        return f"{TITLES[g[0]]}, {g[1:]} epochs after pretraining"
    return f"from the start {g!r}, {mine[0]['budget'] if mine else '?'} epochs, each row at its variant's settings"


def groups(T):
    """The tables that have rows, in reading order: a12, b12, a36, b36, then the other starts."""
    names = {k[0] for k in T.groups if ":" not in k[0]}
    std = sorted((g for g in names if g[0] in TITLES and g[1:].isdigit()), key=lambda g: (int(g[1:]), g[0]))
    return std + sorted(names - set(std))


def ranking(T, g, t):
    return sorted((k for k in row_keys(T, g, t) if T.mean(k, "pgd") is not None), key=lambda k: -T.mean(k, "pgd"))


def discord(T, g, h, t, limit):
    """Pairs of methods that tables ``g`` and ``h`` order differently at target ``t`` by PGD mean,
    each marked "*" where both margins are beyond noise."""
    mine = {k[2:]: k for k in ranking(T, g, t)}
    other = {k[2:]: k for k in ranking(T, h, t)}
    common = [m for m in mine if m in other]
    out = []
    for i, a in enumerate(common):
        for b in common[i + 1:]:
            da = T.mean(mine[a], "pgd") - T.mean(mine[b], "pgd")
            db = T.mean(other[a], "pgd") - T.mean(other[b], "pgd")
            if da * db < 0:
                firm = not within_noise(T, mine[a], mine[b], "pgd", limit) and \
                    not within_noise(T, other[a], other[b], "pgd", limit)
                out.append(f"{label({'method': a[0], 'allocation': a[1]})} / {label({'method': b[0], 'allocation': b[1]})}"
                           + ("*" if firm else ""))
    return out, len(common)


def answers(T, spec, limit, dense):
    """The pre-registered questions of ``arena_fair.yaml``, answered from the tables (``dense``:
    the AutoAttack accuracy of seed 0's converged start)."""
    A, out = spec["arena"], []
    gs = groups(T)
    q1 = []
    for t in A["targets"]:
        ref = "a12" if "a12" in gs else (gs[0] if gs else None)
        for g in gs:
            if g == ref or not row_keys(T, g, t):
                continue
            pairs, n = discord(T, ref, g, t, limit)
            if n > 1:
                q1.append(f"{ref} vs {g} at {100 * t:g} %: " + (f"{len(pairs)} of {n * (n - 1) // 2} pairs swap "
                                                                 f"({', '.join(pairs)})" if pairs else "the same order"))
    out.append("1. Does the ranking hold across protocols, budgets and networks (PGD-20 means; * a swap beyond "
               "noise in both tables)? " + ("; ".join(q1) or "not run yet") + ".")
    own = [g for g in gs if g[0] == "b" or other_network(A, g)]
    q2 = []
    for g in own:
        keys = row_keys(T, g, 0.99)
        w = winner(T, keys)
        hh = winner(T, [k for k in keys if k[2] in ("hydra", "harp")])
        if not w or not hh:
            continue
        if w == hh:
            q2.append(f"{g}: {label(T.kept(w)[0])} is best")
            continue
        p = paired(T, w, hh)
        noise = "within noise" if within_noise(T, w, hh, "pgd", limit) else "beyond noise"
        q2.append(f"{g}: {label(T.kept(w)[0])}, {100 * (T.mean(w, 'pgd') - T.mean(hh, 'pgd')):+.1f} PGD points "
                  f"ahead of {label(T.kept(hh)[0])} ({noise}" + (f"; {p[1]}/{p[2]} seeds" if p else "") + ")")
    out.append("2. At 99 %, which method is best under (b), and is it ahead of the best of HYDRA and HARP by more "
               "than the noise? " + ("; ".join(q2) or "not run yet") + ".")
    out.append("3. Does any pipeline keep at least 90 % of the dense model's AutoAttack accuracy at 99 %? "
               + q3(T, gs, dense) + ".")
    q4 = []
    for g in own:
        for t in A["targets"]:
            w = winner(T, row_keys(T, g, t))
            if w:
                where = f"{g[1:]} epochs" if g[0] == "b" else f"{T.kept(w)[0]['budget']} epochs, {network(A, g)}"
                q4.append(f"{100 * t:g} %, {where}: {label(T.kept(w)[0])}" + close(T, w, row_keys(T, g, t), limit))
    out.append("4. What should a user pick (under protocol (b); the second network at the settings chosen on LeNet)? " + ("; ".join(q4) or "not run yet") + ".")
    return out


def other_network(A, g):
    """Whether the table ``g`` comes from a start of ``arena.starts`` on another network (its ``arch``)."""
    return bool((A.get("starts") or {}).get(g, {}).get("arch"))


def network(A, g):
    """The network of the start ``g`` of ``arena.starts`` ("ResNet-18 w=2")."""
    start = A["starts"][g]
    name = {"resnet18": "ResNet-18"}.get(start["arch"], start["arch"])
    return f"{name} w={start.get('width', A['width'])}"


def q3(T, gs, dense):
    if dense is None:
        return "not run yet (the dense start's AutoAttack)"
    best = [(T.mean(k, "autoattack") / dense, k) for g in gs for k in row_keys(T, g, 0.99)
            if T.mean(k, "autoattack") is not None and not T.groups[k][0]["start"]]
    if not best:
        return "not run yet (AutoAttack at 99 %)"
    kept = sorted((x for x in best if x[0] >= 0.9), reverse=True)
    top = max(best)
    where = lambda x: f"{label(T.kept(x[1])[0])} in {x[1][0]} ({100 * x[0]:.0f} %)"  # noqa: E731
    return (f"yes: {', '.join(map(where, kept))}" if kept else f"no; the closest is {where(top)}") + \
        f" of the dense start's {100 * dense:.1f} % (seed 0)"


def missing(summary):
    """The planned cells (the summary's or the record's ``planned``) that have not finished."""
    done = {c["id"] for c in summary["cells"]}
    return [i for i in summary.get("planned", []) if i not in done]


def claim_reads(spec, still):
    """The cells of ``still`` that the claim reads: every cell from the seeds' converged starts (the
    protocol-(b) candidates) and their AutoAttack, not the check row's or the other network's."""
    A = spec["arena"]
    runs, starts = arena_runs(A, spec)
    other = [(r, seed) for r in runs if r["start"] for seed in r["seeds"]]
    pres = {pre_id(A["width"], seed, r["start"], starts[r["start"]]) for r, seed in other}
    tails = tuple(f"-{r['name']}-s{seed}" for r, seed in other)  # a row's id ends with its variant and seed
    return [i for i in still if i.removesuffix("-aa") not in pres and not i.removesuffix("-aa").endswith(tails)]


def claim(T, spec, still):
    """The paper's claim (ADMM beats magnitude pruning at high ratios), under protocol (b): ADMM's
    row of record against the better of one-shot and gradual, per target and budget; not decided
    while cells it reads (``still``, from ``claim_reads``) are to run."""
    if still:
        return f"{MISSING[:-1]}: {len(still)} still to run)"
    wins = n = 0
    for g in [g for g in groups(T) if g[0] == "b"]:
        for t in spec["arena"]["targets"]:
            admm = (g, t, "admm", spec["arena"]["allocation"])
            base = [k for k in row_keys(T, g, t) if k[2] in ("oneshot", "gradual")]
            if admm in T.groups and T.kept(admm) and base:
                n += 1
                wins += better(T, admm, winner(T, base))
    return MISSING if not n else tally(wins, n)


def start_check_lines(T, A, g):
    """What the converged start did, where ``g`` is a check start (one of ``arena.starts`` on the
    same network): per target, each method's PGD-20 from the converged start minus from ``g``,
    under the same protocol-(a) budget, paired by seed ("dropped": the check cell was; "-": no
    seed has both)."""
    if g not in (A.get("starts") or {}) or other_network(A, g):
        return []
    parts = []
    for t in A["targets"]:
        diffs = []
        for k in row_keys(T, g, t):
            p = paired(T, (f"a{T.groups[k][0]['budget']}", *k[1:]), k)
            diffs.append(f"{label(T.groups[k][0])} " + (f"{100 * p[0]:+.1f}" if p else "dropped" if T.excluded(k) else "-"))
        if diffs:
            parts.append(f"{100 * t:g} %: {', '.join(diffs)}")
    return [f"**What the start did.** PGD-20 points that the converged start gave each method over the start {g!r} "
            f"({', '.join(A['starts'][g].get('sets', []))}), protocol (a), paired by seed: {'; '.join(parts)}.", ""] if parts else []


def cost_lines(summary, rs):
    """The cost of every kind of cell: count, median and total wall time."""
    kinds = {}
    for c in [c for c in summary["cells"] if FINDING.number in c["finding"]]:
        r = next((r for r in rs if r["id"] == c["id"]), None)
        name = c["kind"] if r is None else f"{r['variant'].split(':')[0]} cell"
        kinds.setdefault(name, []).append(c["wall_s"])
    if not kinds:
        return []
    parts = [f"{name} {len(v)} x median {statistics.median(v):.0f} s ({sum(v) / 60:.0f} min)"
             for name, v in sorted(kinds.items())]
    total = sum(sum(v) for v in kinds.values())
    return [f"Cost, the cells' wall times ({summary['spec'].get('parallel', 1)} cells at once): {'; '.join(parts)}; "
            f"{total / 3600:.1f} h of cells in all.", ""]


# --------------------------------------------------------------------------- section and plot

def section(summary, plot_name=f"{STEM}.png"):
    spec = summary["spec"]
    A, E = spec["arena"], spec["eval"]
    S = {**spec["set"], **dict(s.split("=", 1) for s in A.get("sets", []))}
    rs, T, settings = tables(summary)
    limit = E["limit"]
    lines = [f"## Finding {FINDING.number}: the arena, fair to every method", "",
             f"{spec.get('dataset', 'fashion_mnist')} (the first {S.get('data.train_limit')} training images; "
             f"validation: {S.get('data.val_size')} held-out training images), LeNet w={A['width']}, adversarial "
             f"training (PGD-{S.get('adv.steps')}), {', '.join(f'{100 * t:g}' for t in A['targets'])} % of the "
             "prunable weights pruned. Every row starts from its seed's converged start (pretraining stopped on "
             "validation PGD). Protocol (a) gives every method the same epochs and the same lr at each epoch; "
             "protocol (b) runs each method at its authors' protocol, with the same tuning budget for all, the "
             f"setting of record chosen on the validation split. PGD-{E['steps']} on {limit:,} test images for "
             "every cell. The "
             "rules were fixed in `experiments/arena_fair.yaml` before the runs; a missing cell shows as \"-\". "
             f"Cells finished: {sum(FINDING.number in c['finding'] for c in summary['cells'])}.", ""]
    still = missing(summary)
    if still:
        lines += [f"**The sweep is still running: {len(summary['cells'])} of its {len(summary['planned'])} cells have "
                  "finished. Every figure and answer below is provisional.**", ""]
    lines += start_lines(summary) + lr_lines(rs) + setting_lines(settings)
    for g in groups(T):
        lines += [f"### {group_title(g, rs)}", ""]
        for t in A["targets"]:
            if row_keys(T, g, t):
                lines += table_lines(T, g, t, (g, t, "oneshot", A["allocation"]))
        lines += start_check_lines(T, A, g)
    lines += ["### Answers to the pre-registered questions", ""] + answers(T, spec, limit, dense_aa(summary)) + [""]
    lines += [f"The paper's claim (ADMM beats magnitude pruning at high ratios), at each method's own protocol. "
              f"Verdict: {claim(T, spec, claim_reads(spec, still))}.", "", f"![the starts and robust accuracy at 99 %]({plot_name})", ""]
    dropped = [r["id"] for r in rs if r["excluded"]]
    lines += ["Seeds dropped as not converged (largest pruned energy above 5 %): " + (", ".join(dropped) or "none") + ".", ""]
    return "\n".join(lines + rebuilt_lines(summary) + cost_lines(summary, rs) + [""]), rs  # a blank line after


def rebuilt_lines(summary):
    """The cells that started from a checkpoint rebuilt in a later session (its run folder gone,
    not kept) whose figures differ from its record: the same command on another CPU
    (``sweep.check_again``)."""
    by = {}
    for c in summary["cells"]:
        for d, f in c.get("rebuilt_inputs", {}).items():
            by.setdefault(d, (f, []))[1].append(c["id"])
    if not by:
        return []
    fig = lambda a: " / ".join(f"{100 * a[k]:.1f}" for k in ("natural", "pgd") if k in a)  # noqa: E731
    return ["**Rebuilt inputs.** These checkpoints were lost between sessions and rebuilt by the same command on "
            "another machine, whose float sums gave other figures (natural / PGD on the test images, recorded -> "
            "rebuilt); the cells listed started from the rebuilt one, the cells that finished before from the "
            "recorded one:", ""] + \
        [f"- {d}: {fig(f['record'])} -> {fig(f['rebuilt'])}; {len(ids)} cell{'s' * (len(ids) > 1)}: {', '.join(sorted(ids))}"
         for d, (f, ids) in sorted(by.items())] + [""]


def dense_aa(summary):
    """AutoAttack accuracy of seed 0's converged start (its ``-aa`` cell), or None."""
    return next((c["eval"]["accuracy"].get("autoattack") for c in summary["cells"] if c["kind"] == "autoattack"
                 and c["seed"] == 0 and c["meta"].get("start") == "spec" and c["meta"].get("of", "").startswith("pre-")),
                None)


def plot(summary, path):
    """Left: each start's validation PGD curve. Right: PGD-20 at 99 % per method and table."""
    rs, T, _ = tables(summary)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for c in summary["cells"]:
        curve = (c.get("val") or {}).get("pretrain_curve") or []
        if c["kind"] == "pretrain" and len(curve) > 1:
            axes[0].plot([e for e, _ in curve], [100 * v for _, v in curve], marker=".",
                         label=f"{c['meta'].get('start', 'spec')} s{c['seed']}")
    axes[0].set(xlabel="pretraining epoch", ylabel="validation PGD-20 (%)", title="the starts")
    gs = [g for g in groups(T) if row_keys(T, g, 0.99)]
    for i, method in enumerate(METHODS):
        pts = [(x, T.mean(k, "pgd")) for x, g in enumerate(gs) for k in row_keys(T, g, 0.99) if k[2] == method
               and T.mean(k, "pgd") is not None]
        if pts:
            axes[1].plot([p[0] for p in pts], [100 * p[1] for p in pts], "osD^v<>"[i % 7] + "-", label=METHODS[method])
    axes[1].set_xticks(range(len(gs)), gs)
    axes[1].set(xlabel="table", ylabel="PGD-20 (%), mean over seeds", title="99 % of the prunable weights pruned")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def after_b12(summary):
    """The spec lines that ``arena_fair.yaml``'s PLANNER step 1 adds once every 12-epoch
    protocol-(b) candidate has finished: the ResNet-18 variants (the best three methods under (b)
    at 99 % by the mean test PGD of their rows of record, then HYDRA and HARP; each at the
    setting chosen most often over the seeds, ties to the first listed) and the ids of the
    12-epoch rows of record of seed 0, for ``autoattack.cells``."""
    spec = summary["spec"]
    A, runs = spec["arena"], arena_runs(spec["arena"], spec)[0]
    rs, T, settings = tables(summary)
    twelve = {k: v for k, v in settings.items() if k[2] == 12}
    waiting = sorted({k[0] for k, v in twelve.items() if v is None})
    if waiting or not twelve:
        raise UserError(f"the 12-epoch protocol-(b) candidates have not all finished (waiting: {', '.join(waiting) or 'all'})")
    alloc = lambda m: ARENA[m].get("allocation", A["allocation"])  # noqa: E731
    methods = sorted({k[0] for k in twelve if k[1] == 0.99}, key=list(METHODS).index)
    mean = lambda m: T.mean(("b12", 0.99, m, alloc(m)), "pgd")  # noqa: E731
    ranked = sorted(methods, key=lambda m: -1 if mean(m) is None else -mean(m))
    order = ["a"] + [r["setting"] for r in runs if r.get("setting")]
    lines = ["# ResNet-18 rows (PLANNER 1): the best three under (b) at 99 %, 12 epochs, then HYDRA and HARP"]
    for m in ranked[:3] + [m for m in ("hydra", "harp") if m not in ranked[:3]]:
        picks = [v for k, v in twelve.items() if k[0] == m and k[1] == 0.99]
        s = max(dict.fromkeys(sorted(picks, key=order.index)), key=picks.count)
        base = f"methods: [{m}], " if s == "a" else f"<<: *{s}, "
        extra = ", harp_from: r18-harp" if m == "admm_harp" else ""
        lines.append(f"r18-{m}: {{{base}seeds: [0, 1], targets: [0.99], start: r18{extra}}}"
                     f"   # setting {s} ({', '.join(picks)}), PGD-20 {100 * mean(m):.1f}")
    chosen = [r["id"] for k, group in T.groups.items() if k[0] == "b12" for r in group
              if r["seed"] == 0 and r["setting"] != "a"]
    return lines + ["# autoattack.cells, the 12-epoch rows of record of seed 0 that are not protocol-(a) cells:",
                    f"[{', '.join(sorted(chosen))}]"]


def write(summary, out):
    """Write Finding 5's plot, section and rows under ``out``; return the section's text."""
    return write_section(summary, out, STEM, plot, section)


def report_section(summary, out):
    text = write(summary, out)
    return Section(verdict_in(text), text.splitlines())


FINDING = Finding(5, "ADMM beats magnitude pruning at high ratios", "arena", plan, report_section, stem=STEM,
                  sweep="arena_fair")


def main(argv=None):
    return cli(write, STEM, __doc__.splitlines()[0], argv,
               [("--after-b12", "print the spec lines of PLANNER step 1 (ResNet-18 rows, AutoAttack ids) instead",
                 lambda summary, out: "\n".join(after_b12(summary)))])


if __name__ == "__main__":
    raise SystemExit(main())
