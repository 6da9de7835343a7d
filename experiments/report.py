"""Turn a sweep's ``summary.json`` into ``RESULTS.md`` (tables for findings 1-6, verdicts) and plots.

    python experiments/report.py                       # runs/experiments/paper_findings -> docs/
    python experiments/report.py --summary S --out D [--methods M] [--quantization Q]

Findings 1-4 come from the paper_findings sweep. Findings 5 (the pruning methods compared) and 6
(ADMM quantization vs round-to-nearest) have their own sweeps (``arena.yaml``,
``quantization.yaml``): each comes from its sweep's summary (``--methods``, ``--quantization``, or
the same summary when its spec has the section) through ``methods_report.py`` /
``quant_report.py``, or else from the section that last wrote (``results/<sweep name>.md``).

Every number comes from the cells' ``eval.py`` reports. Over seeds a cell is shown as
``mean ± half-range`` (for two seeds: the distance of each seed from the mean), with the number
of seeds; a cell that is missing (sweep still running or failed) shows as "-". The verdicts are
fixed rules on the means, printed next to the numbers they use.
"""
import argparse
import json
import os
import re
import shlex
import statistics
import sys
from collections import defaultdict

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from sweep import Sweep, plan, weight_counts  # noqa: E402
import methods_report  # noqa: E402
import quant_report  # noqa: E402


# --------------------------------------------------------------------------- numbers

def total_weights(width):
    """Weights of the dense LeNet of ``width`` (conv and linear layers)."""
    return sum(weight_counts("lenet", width).values())


class Results:
    """Cells grouped over seeds: ``get(key, metric)`` -> list of per-seed values."""

    def __init__(self, summary):
        self.summary, self.spec = summary, summary["spec"]
        self.by_key = defaultdict(list)
        for c in summary["cells"]:
            base = c["id"][:-3] if c["id"].endswith("-aa") else c["id"]  # AutoAttack cells: <id>-aa
            key = ("aa-" if base != c["id"] else "") + base.rsplit("-s", 1)[0]
            self.by_key[key].append(c)

    def values(self, key, metric):
        out = []
        for c in self.by_key.get(key, []):
            acc = c["eval"]["accuracy"]
            if metric == "nonzero":
                out.append(sum(L["nonzero"] for L in c["eval"]["sparsity"]["layers"]))
            elif metric == "worst_case":
                out.append(c["eval"]["worst_case"])
            elif metric in acc:
                out.append(acc[metric])
        return out

    def mean(self, key, metric):
        v = self.values(key, metric)
        return statistics.fmean(v) if v else None

    def cell(self, key, metric, pct=True):
        v = self.values(key, metric)
        if not v:
            return "-"
        scale = 100 if pct else 1
        m = statistics.fmean(v) * scale
        if len(v) == 1 or not pct and max(v) == min(v):
            return f"{m:.1f}" if pct else f"{m:,.0f}"
        half = (max(v) - min(v)) / 2 * scale
        return f"{m:.1f} ± {half:.1f}" if pct else f"{m:,.0f} ± {half:,.0f}"

    def seeds(self, key):
        return len(self.by_key.get(key, []))


HEADLINE = {}  # finding -> its key numbers, for the summary at the top
NAMES = {1: "capacity: robust accuracy needs width", 2: "pruning a wide model beats training the small one",
         3: "irregular >= column >= filter", 4: "natural pruning loses robustness, adversarial ADMM keeps it",
         5: "ADMM beats magnitude pruning at high ratios",
         6: "ADMM quantization keeps a pruned robust model's accuracy better than round-to-nearest"}


def noise_note(R, comparisons):
    """A sentence naming the comparisons ((label, a, b, metric)) that are within noise, or ''."""
    limit = R.spec["eval"]["limit"]
    weak = [label for label, a, b, metric in comparisons if methods_report.within_noise(R, a, b, metric, limit)]
    return (" Within noise (difference smaller than the seed spread or the binomial standard error): "
            + "; ".join(weak) + ".") if weak else ""


def pct(x):
    return "-" if x is None else f"{100 * x:.1f}"


def diff(a, b):
    return None if a is None or b is None else a - b


# --------------------------------------------------------------------------- tables and verdicts

def finding1(R, lines):
    widths = R.spec["widths"]
    lines += ["## Finding 1: capacity", "",
              "Dense LeNet of width w (conv 2w, conv 4w, fc 64w), trained naturally (`main.py`) or with "
              "PGD (`adv_main.py`). Accuracy in % on the evaluation subset.", "",
              "| w | weights | natural training: natural | natural training: PGD | adversarial training: natural "
              "| adversarial training: FGSM | adversarial training: PGD | seeds |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for w in widths:
        n, a = f"pre-nat-w{w}", f"pre-adv-w{w}"
        lines.append(f"| {w} | {total_weights(w):,} | {R.cell(n, 'natural')} | {R.cell(n, 'pgd')} "
                     f"| {R.cell(a, 'natural')} | {R.cell(a, 'fgsm')} | {R.cell(a, 'pgd')} | {R.seeds(a)} |")
    lo, hi = f"w{min(widths)}", f"w{max(widths)}"
    d_rob = diff(R.mean(f"pre-adv-{hi}", "pgd"), R.mean(f"pre-adv-{lo}", "pgd"))
    d_nat = diff(R.mean(f"pre-nat-{hi}", "natural"), R.mean(f"pre-nat-{lo}", "natural"))
    d_nat_adv = diff(R.mean(f"pre-adv-{hi}", "natural"), R.mean(f"pre-adv-{lo}", "natural"))
    if d_rob is None or d_nat is None:
        verdict = "not decided (cells missing)"
    elif d_rob >= 2 * max(d_nat, 0):
        verdict = "**held**"
    elif d_rob > d_nat:
        verdict = "**partly held** (robust accuracy rose more, but less than twice as much)"
    else:
        verdict = "**did not hold**"
    if verdict == "**held**" and d_nat_adv is not None and d_nat_adv >= d_rob / 2:
        verdict += (" for the rule as stated; but under adversarial training natural accuracy rose about as much "
                    "as robust accuracy, so capacity helps adversarial training as a whole, not robustness alone")
    HEADLINE[1] = (f"w={min(widths)} -> w={max(widths)}: adversarially trained PGD accuracy {pct(R.mean(f'pre-adv-{lo}', 'pgd'))} -> "
                   f"{pct(R.mean(f'pre-adv-{hi}', 'pgd'))} (+{pct(d_rob)}), naturally trained natural accuracy "
                   f"{pct(R.mean(f'pre-nat-{lo}', 'natural'))} -> {pct(R.mean(f'pre-nat-{hi}', 'natural'))} (+{pct(d_nat)})")
    lines += ["", f"From w={min(widths)} to w={max(widths)}: PGD accuracy of the adversarially trained models "
              f"rose by {pct(d_rob)} points; natural accuracy of the naturally trained models by {pct(d_nat)} "
              f"points (of the adversarially trained ones by {pct(d_nat_adv)}). Rule: held if the robust gain is "
              f"at least twice the natural gain. Verdict: {verdict}.", ""]
    return verdict


def finding2(R, lines):
    L, S = R.spec["large_width"], R.spec["small_width"]
    rows = [(f"dense w={L}, adversarial training (the model that is pruned)", f"pre-adv-w{L}"),
            (f"w={L} pruned to w={S}'s weight count: adversarial ADMM, irregular", f"admm-irregular-w{S}count"),
            (f"dense w={S}, adversarial training from scratch", f"pre-adv-w{S}"),
            (f"dense w={S}, inherited initialization from w={L}, then adversarial training", f"inherit-w{S}-from-w{L}")]
    has_aa = any(R.values("aa-" + k, "autoattack") for _, k in rows)
    lines += ["## Finding 2: pruning beats training the small model", "",
              "| model | nonzero weights | natural | PGD | " + (f"AutoAttack ({R.spec['autoattack']['limit']} images, seed {', '.join(map(str, R.spec['autoattack']['seeds']))}) | " if has_aa else "") + "seeds |",
              "| --- | --- | --- | --- | " + ("--- | " if has_aa else "") + "--- |"]
    for name, k in rows:
        aa = f"{R.cell('aa-' + k, 'autoattack')} (PGD {R.cell('aa-' + k, 'pgd')}) | " if has_aa else ""
        lines.append(f"| {name} | {R.cell(k, 'nonzero', pct=False)} | {R.cell(k, 'natural')} | {R.cell(k, 'pgd')} | "
                     f"{aa}{R.seeds(k)} |")
    p, s, i = rows[1][1], rows[2][1], rows[3][1]
    m = {k: (R.mean(k, "natural"), R.mean(k, "pgd")) for k in (p, s, i)}
    if any(v is None for t in m.values() for v in t):
        verdict = "not decided (cells missing)"
    else:
        wins = [m[p][j] > m[o][j] for o in (s, i) for j in (0, 1)]
        verdict = "**held**" if all(wins) else ("**partly held**" if any(wins) else "**did not hold**")
    note = noise_note(R, [("pruned vs scratch, natural", p, s, "natural"), ("pruned vs scratch, PGD", p, s, "pgd"),
                          ("pruned vs inherited, natural", p, i, "natural"), ("pruned vs inherited, PGD", p, i, "pgd")])
    if note and verdict.startswith("**"):
        verdict += " by the means, but some margins are within noise"
    HEADLINE[2] = (f"PGD accuracy: pruned {pct(m[p][1])}, from scratch {pct(m[s][1])}, inherited {pct(m[i][1])}; "
                   f"natural: {pct(m[p][0])}, {pct(m[s][0])}, {pct(m[i][0])}")
    aa = [R.mean("aa-" + k, "autoattack") for k in (p, s, i)]
    if None not in aa:
        note += (f" Under AutoAttack ({R.spec['autoattack']['limit']} images, seed "
                 f"{', '.join(map(str, R.spec['autoattack']['seeds']))}): pruned {pct(aa[0])}, from scratch "
                 f"{pct(aa[1])}, inherited {pct(aa[2])}.")
        HEADLINE[2] += f"; AutoAttack (100 images): {pct(aa[0])}, {pct(aa[1])}, {pct(aa[2])}"
    lines += ["", f"Pruned vs from scratch: natural {pct(diff(m[p][0], m[s][0]))}, PGD {pct(diff(m[p][1], m[s][1]))} "
              f"points; pruned vs inherited: natural {pct(diff(m[p][0], m[i][0]))}, PGD "
              f"{pct(diff(m[p][1], m[i][1]))} points. Rule: held if the pruned model's mean is higher than both "
              f"on both natural and PGD accuracy. Verdict: {verdict}." + note, "",
              f"The pruned model keeps w={L}'s biases ({70 * L + 10} vs {70 * S + 10} for w={S}) and a dense "
              "output layer (see Finding 3); its weight count is matched exactly. The pruned and inherited models "
              f"get {R.spec['admm_epochs'] + R.spec['retrain_epochs']} epochs of fine-tuning on top of w={L}'s "
              f"{R.spec['set'].get('pretrain.epochs', '?')} pretraining epochs; the small model from scratch gets "
              f"{R.spec['set'].get('pretrain.epochs', '?')} epochs.", ""]
    return verdict


def compression(R, key):
    """Total weights of the large model / nonzero weights of ``key``'s models (mean over seeds)."""
    nz = R.mean(key, "nonzero")
    return None if not nz else total_weights(R.spec["large_width"]) / nz


def finding3(R, lines):
    L, schemes = R.spec["large_width"], R.spec["schemes"]
    lines += ["## Finding 3: pruning schemes at the same ratio", "",
              f"w={L} (adversarially trained) pruned by adversarial ADMM + masked adversarial retraining to the "
              "weight count of a dense smaller width; conv1 and conv2 get that width's layer sizes, fc2 stays "
              "dense (filter pruning must not remove classes), fc1 takes up the rest, the same ratios for every "
              "scheme.", "",
              "| target | compression | scheme | natural | PGD | seeds |", "| --- | --- | --- | --- | --- | --- |"]
    verdicts, first_best, pairs = [], [], []
    for m in R.spec["prune_to_widths"]:
        for sch in schemes:
            k = f"admm-{sch}-w{m}count"
            c = compression(R, k)
            lines.append(f"| w={m} weights | {'-' if c is None else f'{c:.1f}x'} | {sch} | {R.cell(k, 'natural')} | "
                         f"{R.cell(k, 'pgd')} | {R.seeds(k)} |")
        d = f"dense w={m}, adversarial training"
        lines.append(f"| w={m} weights | {total_weights(L) / total_weights(m):.1f}x "
                     f"| ({d}) | {R.cell(f'pre-adv-w{m}', 'natural')} | {R.cell(f'pre-adv-w{m}', 'pgd')} | "
                     f"{R.seeds(f'pre-adv-w{m}')} |")
        rob = [R.mean(f"admm-{sch}-w{m}count", "pgd") for sch in schemes]
        if None not in rob:
            verdicts.append(all(a >= b for a, b in zip(rob, rob[1:])))
            first_best.append(rob[0] >= max(rob[1:]))
            pairs.append(", ".join(f"{x} {'>=' if a >= b else '<'} {y} ({100 * a:.1f} vs {100 * b:.1f})"
                                   for x, y, a, b in zip(schemes, schemes[1:], rob, rob[1:])) + f" at w={m}'s count")
    if not verdicts:
        verdict = "not decided (cells missing)"
    elif all(verdicts):
        verdict = "**held**"
    elif all(first_best):
        verdict = f"**partly held** ({schemes[0]} was best at every target, but the order of the others was not as claimed)"
    else:
        verdict = "**did not hold**"
    HEADLINE[3] = "PGD " + "; ".join(pairs)
    lines += ["", f"Mean PGD accuracy: {'; '.join(pairs)}. Rule: held if it is ordered {' >= '.join(schemes)} at "
              f"every target: {sum(verdicts)} of {len(verdicts)}. Verdict: {verdict}. "
              "See also `accuracy_vs_compression.png`.", ""]
    return verdict


def finding4(R, lines):
    L, S = R.spec["large_width"], R.spec["small_width"]
    a, n = f"admm-irregular-w{S}count", f"natadmm-irregular-w{S}count"
    lines += ["## Finding 4: adversarial training is needed while pruning", "",
              f"The same adversarially trained w={L} model, pruned (irregular) to w={S}'s weight count.", "",
              "| pruning | natural | FGSM | PGD | seeds |", "| --- | --- | --- | --- | --- |",
              f"| none (dense w={L}, adversarial training) | {R.cell(f'pre-adv-w{L}', 'natural')} | "
              f"{R.cell(f'pre-adv-w{L}', 'fgsm')} | {R.cell(f'pre-adv-w{L}', 'pgd')} | {R.seeds(f'pre-adv-w{L}')} |",
              f"| adversarial ADMM + adversarial retraining (`adv_main.py`) | {R.cell(a, 'natural')} | "
              f"{R.cell(a, 'fgsm')} | {R.cell(a, 'pgd')} | {R.seeds(a)} |",
              f"| natural ADMM + natural retraining (`main.py`) | {R.cell(n, 'natural')} | {R.cell(n, 'fgsm')} | "
              f"{R.cell(n, 'pgd')} | {R.seeds(n)} |"]
    dense, adv, nat = R.mean(f"pre-adv-w{L}", "pgd"), R.mean(a, "pgd"), R.mean(n, "pgd")
    if None in (dense, adv, nat):
        verdict = "not decided (cells missing)"
    else:
        lost, kept = dense - nat, dense - adv
        verdict = "**held**" if lost >= 0.10 and kept < lost / 2 else "**did not hold**"
    HEADLINE[4] = (f"PGD accuracy: dense {pct(dense)}, adversarial ADMM {pct(adv)}, natural ADMM + retraining {pct(nat)}")
    lines += ["", f"PGD accuracy lost against the dense model: natural pruning {pct(diff(dense, nat))} points, "
              f"adversarial pruning {pct(diff(dense, adv))} points. Rule: held if natural pruning loses at least "
              f"10 points and adversarial pruning less than half of that. Verdict: {verdict}.", ""]
    return verdict


def own_sweep_finding(n, title, key, writer, stem, summary, sweep_path, out):
    """(verdict, section) of Finding ``n``, which has its own sweep (a spec with section ``key``):
    from ``summary`` when its spec has that section, else from the sweep's summary at
    ``sweep_path``, else the section stored by the last run (``<out>/results/<stem>.md``). The
    reading of the numbers, written by hand, follows it from ``results/<stem>_notes.md``."""
    stored = os.path.join(out, "results", f"{stem}.md")
    if key not in summary["spec"] and os.path.isfile(sweep_path):
        with open(sweep_path) as f:
            summary = json.load(f)
    if key in summary["spec"]:
        text = writer.write(summary, out)
    elif os.path.isfile(stored):
        with open(stored) as f:
            text = f.read()
    else:
        return "not run", f"## Finding {n}: {title}\n\nNot run: python experiments/sweep.py --spec experiments/{stem}.yaml\n"
    notes = os.path.join(out, "results", f"{stem}_notes.md")
    if os.path.isfile(notes):
        with open(notes) as f:
            text = text.rstrip() + "\n\n" + f.read()
    verdict = next((line.split("Verdict: ", 1)[1].rstrip(".") for line in text.splitlines() if "Verdict: " in line),
                   "see the section")
    return verdict, text


# --------------------------------------------------------------------------- plots

def _err(R, key, metric):
    v = R.values(key, metric)
    if not v:
        return None, None
    return 100 * statistics.fmean(v), 100 * (max(v) - min(v)) / 2


def plot_width(R, path):
    widths = R.spec["widths"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for mode, metric, style, label in (("adv", "pgd", "o-", "adversarial training: PGD"),
                                       ("adv", "natural", "o--", "adversarial training: natural"),
                                       ("nat", "natural", "s--", "natural training: natural"),
                                       ("nat", "pgd", "s-", "natural training: PGD")):
        pts = [(w, *_err(R, f"pre-{mode}-w{w}", metric)) for w in widths]
        pts = [p for p in pts if p[1] is not None]
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt=style,
                        capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.set_xlabel("LeNet width w")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Finding 1: accuracy vs width")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_compression(R, path):
    L = R.spec["large_width"]
    total = total_weights(L)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for ax, metric in zip(axes, ("natural", "pgd")):
        dense = _err(R, f"pre-adv-w{L}", metric)
        for sch, mk in zip(R.spec["schemes"], "o^s"):
            pts = [(1.0, *dense)] if dense[0] is not None else []
            for m in R.spec["prune_to_widths"]:
                k = f"admm-{sch}-w{m}count"
                c, (y, e) = compression(R, k), _err(R, k, metric)
                if c is not None:
                    pts.append((c, y, e))
            pts.sort()
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt=mk + "-",
                            capsize=3, label=f"w={L} pruned: {sch}")
        ws = [w for w in R.spec["widths"] if w <= L]
        pts = [(total / total_weights(w), *_err(R, f"pre-adv-w{w}", metric), w) for w in ws]
        pts = [p for p in pts if p[1] is not None]
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt="k*", ms=11,
                        capsize=3, label="dense small model (adv. training)")
            for x, y, _, w in pts:
                ax.annotate(f"w={w}", (x, y), textcoords="offset points", xytext=(6, -10), fontsize=8)
        ax.set_xscale("log")
        ticks = [t for t in (1, 2, 4, 8, 16, 32, 64, 128) if t <= 1.5 * max(total / total_weights(w) for w in ws)]
        ax.set_xticks(ticks, [f"{t}x" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel(f"compression rate (weights of dense w={L} / nonzero weights)")
        ax.set_ylabel(f"{'natural' if metric == 'natural' else 'PGD'} accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Findings 2-3: accuracy vs compression, per scheme (adversarial ADMM)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- the document

def setup_section(R, summary_path):
    s, e = R.spec, R.spec["eval"]
    st = s["set"]
    cells = R.summary["cells"]
    an = next((c["eval"]["attack"] for c in cells if c["kind"] != "autoattack"), None)
    lines = ["## Setup", "",
             f"- Base config `{s['config']}`; every training run adds "
             + ", ".join(f"`{k}={v}`" for k, v in st.items())
             + f"; ADMM {s['admm_epochs']} epochs, masked retraining {s['retrain_epochs']} epochs "
               f"(inherited init and one-shot get {s['admm_epochs'] + s['retrain_epochs']}).",
             f"- Seeds {s['seeds']} (the `seed` config key: weights, data order, attack starts). Up to "
             f"{s['parallel']} cells run at once, each with `OMP_NUM_THREADS=1`.",
             f"- Evaluation: `eval.py` on the first {e['limit']} test images: natural, FGSM and L-inf PGD "
             f"({e['steps']} steps, {e['restarts']} restarts, worst case per example"
             + (f", eps {an['eps']:g}, step {an['step_size']:g}" if an else "") + f"), attack seed {e.get('seed', 0)}. "
             "The reported model is the last epoch's, never one picked on the test set.",
             ]
    if s.get("autoattack_skipped"):
        lines.append("- AutoAttack: skipped (eval.py had no `autoattack` or pyautoattack is missing).")
    elif s.get("autoattack", {}).get("cells"):
        a = s["autoattack"]
        # eval.py names the library in its report since it runs the authors' pyautoattack; the
        # reports of earlier sweeps do not, and those ran torchattacks' re-implementation.
        lib = next((c["eval"]["autoattack"]["autoattack"] for c in cells if c["kind"] == "autoattack"
                    and "autoattack" in (c.get("eval") or {}).get("autoattack", {})), None)
        what = (f"the reference AutoAttack, {lib['library']}, {lib['version']} version ({', '.join(lib['attacks'])})"
                if lib else "torchattacks' standard version")
        lines.append(f"- AutoAttack (`eval.py --attacks {a['attacks']}`, {what}) on the "
                     f"first {a['limit']} test images for the Finding 2 models of seed(s) {a['seeds']}.")
    lines += [f"- Cell results: one JSON per cell in the sweep folder (`cells/<id>.json`: commands, wall time, "
              f"the full eval.py report); summary `{os.path.relpath(summary_path, ROOT)}`; a compact copy of all "
              "numbers is in `docs/results/paper_findings.json`.", ""]
    return lines


def cost_section(R, spec_path):
    cells = [c for c in R.summary["cells"]]
    by_kind = defaultdict(list)
    for c in cells:
        by_kind[(c["kind"], c["meta"].get("width"), c["meta"].get("training"))].append(c)
    lines = ["## Cost (measured in this sweep)", "",
             "Wall seconds per cell (training + evaluation; two cells shared the 2 cores, and other jobs ran on "
             "the machine at the same time, so these are upper bounds for a quiet machine).", "",
             "| cell kind | width | training | cells | mean wall s | mean training s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for (kind, w, tr), cs in sorted(by_kind.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0, kv[0][2] or "")):
        lines.append(f"| {kind} | {w} | {tr} | {len(cs)} | {statistics.fmean(c['wall_s'] for c in cs):.0f} | "
                     f"{statistics.fmean(c.get('train_wall_s', 0) for c in cs):.0f} |")
    s = R.summary
    today = [c["id"] for c in plan(today_spec(R, spec_path))]
    changed = "" if sorted(today) == sorted(s["planned"]) else (
        f" (the spec then planned {len(s['planned'])} cells; today it plans {len(today)}"
        + (f", no longer {', '.join(sorted(set(s['planned']) - set(today)))}" if set(s["planned"]) - set(today) else "")
        + (f", and {len(set(today) - set(s['planned']))} new" if set(today) - set(s["planned"]) else "") + ")")
    lines += ["", f"Cells done: {len(s['done'])} of {len(s['planned'])}{changed}; failed: {len(s['failed'])}; "
              f"sum of cell wall times {sum(c['wall_s'] for c in cells) / 60:.1f} min; wall time of the last "
              f"sweep invocation {s['wall_s_this_invocation'] / 60:.1f} min"
              + (" (still running when this report was made)" if not s.get("finished") else "") + ".", ""]
    span = sweep_span(os.path.join(s["out"], "sweep.log"))
    if span:
        lines += [f"Sweep wall clock from its first start to its last finished cell (all invocations, "
                  f"`sweep.log`): {span / 60:.1f} min.", ""]
    if s["missing"] or s["failed"]:
        lines += ["Missing cells: " + (", ".join(s["missing"]) or "none") + ". Failed: "
                  + (", ".join(f"{k} ({v})" for k, v in s["failed"].items()) or "none") + ".", ""]
    return lines


def today_spec(R, spec_path):
    """The spec at ``spec_path`` as it is now, if it is the summary's sweep; else the summary's own."""
    path = os.path.join(ROOT, spec_path)
    if os.path.isfile(path):
        with open(path) as f:
            spec = yaml.safe_load(f)
        if spec.get("name") == R.spec["name"]:
            return spec
    return R.spec


def example_commands(R, spec_path):
    """The commands of one cell (finding 2's pruned model, seed 0) as ``sweep.py --dry-run`` prints
    them for the spec today: with its config defaults as they are now, which the recorded commands
    of an older sweep do not pin (a default that changed since, e.g. admm.lr, would run another
    experiment)."""
    spec = today_spec(R, spec_path)
    cell = next((c for c in plan(spec) if c["id"].startswith(f"admm-irregular-w{spec['small_width']}count")
                 and c["seed"] == 0), None)
    if cell is None:
        return ["(no such cell in the spec)"]
    sweep = Sweep(spec, os.path.join(ROOT, "runs", "experiments", spec["name"]))
    mark = ["# needs: internet (Fashion-MNIST)"] if "fashion" in spec["config"] else []  # the bundled digits need none
    return mark + [readable(shlex.join(c)) for c in sweep.commands(cell)]


def readable(cmd):
    """A recorded command line with the interpreter shown as ``python`` and paths relative to the repo."""
    return re.sub(r"^\S*python[\d.]*\s", "python ", cmd).replace(ROOT + os.sep, "")


def sweep_span(log):
    """Seconds from the first line of ``sweep.log`` to its last ``done`` line (HH:MM:SS stamps,
    so a sweep is assumed to span less than a day); None without the log."""
    if not os.path.isfile(log):
        return None
    stamps, last = [], None
    with open(log) as f:
        for line in f:
            h, m, sec = (int(x) for x in line[:8].split(":"))
            t = h * 3600 + m * 60 + sec
            while stamps and t < stamps[-1]:
                t += 86400
            stamps.append(t)
            if " done " in line:
                last = t
    return None if last is None else last - stamps[0]


def admm_residuals(summary):
    """{cell id: (first, last) largest per-layer ||W - Z|| / ||W|| over the Z/U updates}, from each
    run's metrics.jsonl, or from its log.txt for runs made before metrics.jsonl existed."""
    out = {}
    for c in summary["cells"]:
        rd = os.path.join(summary["out"], "runs", c["id"])
        if c["kind"] != "admm" or 5 in c["finding"]:  # findings 2-4; Finding 5 reports its own
            continue
        worst = []
        if os.path.isfile(os.path.join(rd, "metrics.jsonl")):
            with open(os.path.join(rd, "metrics.jsonl")) as f:
                rows = [json.loads(line) for line in f]
            worst = [max(r["residual"].values()) for r in rows if r["kind"] == "update" and r["stage"] == "admm"]
        elif os.path.isfile(os.path.join(rd, "log.txt")):
            with open(os.path.join(rd, "log.txt")) as f:
                rows = [line.split("||W-Z||/||W||:")[1].split("dual")[0] for line in f if "admm update after epoch" in line]
            worst = [max(float(x.split("=")[1]) for x in r.split()) for r in rows]
        if worst:
            out[c["id"]] = (worst[0], worst[-1])
    return out


def caveats(spec, summary=None):
    res = admm_residuals(summary) if summary else {}
    first, last = [v[0] for v in res.values()], [v[1] for v in res.values()]
    conv = ([f"ADMM did not converge in {spec['admm_epochs']} epochs: the largest per-layer ||W - Z|| / ||W|| "
             f"(from the run logs) was {min(first):.2f} to {max(first):.2f} at the first Z/U update and still "
             f"{min(last):.2f} to {max(last):.2f} at the last, over the {len(res)} ADMM cells of findings 2-4. The hard pruning "
             "before retraining therefore still removed weights the network used, and masked retraining had to "
             "recover; a longer ADMM stage or a faster-growing rho would be needed to see ADMM at its best."]
            if res and max(last) > 0.1 else [])
    return conv + [
    f"Small scale: a fixed {spec['set'].get('data.train_limit', 0):,}-image training subset and a few epochs per stage, so all models are "
    "under-trained compared with the paper; the comparisons are between models with the same budget.",
    "Spread is the half-range over seeds; with two seeds it is a rough guide, and differences smaller "
    f"than the spreads (or than ~{100 * (0.25 / spec['eval']['limit']) ** 0.5:.1f} points, the binomial standard "
    f"error on {spec['eval']['limit']:,} images at 50 %) are not evidence either way.",
    "The PGD numbers are an upper bound on robust accuracy (PGD-20 with 2 restarts); AutoAttack, where "
    "run, is the stronger check.",
    "Every model is the last epoch's; nothing was selected on the test set.",
    ]


def compact(summary):
    return [{"id": c["id"], "seed": c["seed"], "finding": c["finding"], "meta": c["meta"],
             "accuracy": c["eval"]["accuracy"], "worst_case": c["eval"]["worst_case"],
             "n_examples": c["eval"]["n_examples"],
             "nonzero_weights": sum(L["nonzero"] for L in c["eval"]["sparsity"]["layers"]),
             "wall_s": c["wall_s"], "commands": [readable(x) for x in c["commands"]]} for c in summary["cells"]]


def main(argv=None):
    p = argparse.ArgumentParser(description="Write RESULTS.md and the plots from a sweep's summary.json.")
    p.add_argument("--summary", default=os.path.join(ROOT, "runs", "experiments", "paper_findings", "summary.json"))
    p.add_argument("--out", default=os.path.join(ROOT, "docs"), help="folder for RESULTS.md and the PNGs")
    p.add_argument("--spec-path", default="experiments/paper_findings.yaml",
                   help="the spec path to print in the regeneration commands")
    p.add_argument("--methods", default=os.path.join(ROOT, "runs", "experiments", "arena", "summary.json"),
                   help="summary.json of the arena sweep (Finding 5), if it exists")
    p.add_argument("--quantization", default=os.path.join(ROOT, "runs", "experiments", "quantization", "summary.json"),
                   help="summary.json of the quantization sweep (Finding 6), if it exists")
    a = p.parse_args(argv)
    with open(a.summary) as f:
        summary = json.load(f)
    R = Results(summary)
    os.makedirs(a.out, exist_ok=True)
    plot_width(R, os.path.join(a.out, "robust_vs_width.png"))
    plot_compression(R, os.path.join(a.out, "accuracy_vs_compression.png"))
    os.makedirs(os.path.join(a.out, "results"), exist_ok=True)
    with open(os.path.join(a.out, "results", f"{R.spec['name']}.json"), "w") as f:
        json.dump(compact(summary), f, indent=1)

    body, verdicts = [], {}
    for n, fn in enumerate((finding1, finding2, finding3, finding4), 1):
        verdicts[n] = fn(R, body)
    for n, key, writer, stem, path in ((5, "arena", methods_report, "pruning_methods", a.methods),
                                       (6, "quantization", quant_report, "quantization", a.quantization)):
        verdicts[n], text = own_sweep_finding(n, NAMES[n], key, writer, stem, summary, path, a.out)
        body += text.splitlines()
    n_seeds = max((R.seeds(k) for k in R.by_key), default=0)
    head = [f"# Results: the paper's findings at small scale ({R.spec['name']})", "",
            "Ye et al., *Adversarial Robustness vs. Model Compression, or Both?* (ICCV 2019), tested on "
            "Fashion-MNIST with LeNet on a 2-core CPU. All numbers below were produced by the commands in "
            "*Regenerate*; accuracies are % on the evaluation subset, shown as mean ± half-range over "
            f"{'seeds' if n_seeds > 1 else '1 seed (no spread)'} (the seeds column says how many).", "",
            "## Summary", ""]
    head += [f"{n}. {NAMES[n]}: {verdicts[n]}." + (f" {HEADLINE[n]}." if n in HEADLINE else "") for n in NAMES] + [""]
    regen = ["## Regenerate", "", "```",
             "# Fashion-MNIST from Debian (dataset-fashion-mnist) is unpacked by the driver; otherwise torchvision downloads it",
             f"python experiments/sweep.py --spec {a.spec_path}          # resumable: rerun to continue; needs: internet",
             f"python experiments/report.py --summary {os.path.relpath(a.summary, ROOT)} --out docs",
             "python experiments/sweep.py --spec " + a.spec_path + " --dry-run   # every command of every cell",
             "```", "", "Example: the commands of one cell (finding 2, pruned model, seed 0), as the dry run prints "
             "them for the spec today:", "", "```"]
    regen += example_commands(R, a.spec_path) + ["```", ""]
    regen += ["Finding 5 comes from its own spec, the robust-pruning arena (139 cells, 2.5 h of sweep wall time",
              "on this machine, most of it AutoAttack). The Finding 5 it replaced, whose methods trained on",
              "unequal lr schedules, is in git history before issue 20:", "", "```",
              "python experiments/sweep.py --spec experiments/arena.yaml          # resumable: rerun to continue; "
              "needs: internet",
              "python experiments/methods_report.py --summary runs/experiments/arena/summary.json --out docs",
              "```", ""]
    figs = ["## Plots", "", "![robust accuracy vs width](robust_vs_width.png)", "",
            "![accuracy vs compression](accuracy_vs_compression.png)", ""]  # Finding 5's plot is in its section
    notes = ["## Caveats", ""] + [f"- {c}" for c in caveats(R.spec, summary)] + [""]
    # Findings measured outside this sweep (e.g. experiments/demo_methods.py) keep their section.
    extra = os.path.join(a.out, "results", "demo_methods.md")
    more = [open(extra).read()] if os.path.isfile(extra) else []
    text = "\n".join(head + setup_section(R, a.summary) + body + figs + notes + cost_section(R, a.spec_path) + regen + more)
    with open(os.path.join(a.out, "RESULTS.md"), "w") as f:
        f.write(text)
    print(f"wrote {os.path.join(a.out, 'RESULTS.md')} and its plots ({len(summary['cells'])} cells)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
