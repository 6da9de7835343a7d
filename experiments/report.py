"""Turn a sweep's ``summary.json`` into ``RESULTS.md`` (tables for findings 1-6, verdicts) and plots.

    python experiments/report.py                       # runs/experiments/paper_findings -> docs/
    python experiments/report.py --summary S --out D [--methods M] [--quantization Q]

The findings are those of ``findings.py``, each a module that writes its own section. Findings
1-4 come from the paper_findings sweep. Findings 5 (the pruning methods compared, fair to each) and
6 (ADMM quantization vs round-to-nearest) have their own sweeps (``arena_fair.yaml``,
``quantization.yaml``): each comes from its sweep's summary (``--methods``: by default the fair
arena's committed record; ``--quantization``; or the same summary when its spec has the section),
or else from the section that last wrote (``results/<stem>.md``).

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
from collections import Counter, defaultdict

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import capacity  # noqa: E402
import paper  # noqa: E402
import schemes  # noqa: E402
from cells import total_weights  # noqa: E402
from common import run_cli  # noqa: E402
from findings import FINDINGS  # noqa: E402
from frame import Section, read_summary, verdict_in  # noqa: E402
from sweep import Sweep, plan  # noqa: E402


# --------------------------------------------------------------------------- sections

PAPER = {f.number for f in FINDINGS if f.key == paper.KEY}  # the findings of paper_findings.yaml


def finding_section(finding, summary, sweeps, out):
    """The ``Section`` of ``finding``: from ``summary`` when its spec has the finding's key, else
    from its own sweep's summary (``sweeps[finding.sweep]``) when that exists, else the section
    stored by the last run (``<out>/results/<stem>.md``). The reading of the numbers, written by
    hand, follows a finding with its own sweep, from ``results/<stem>_notes.md``."""
    path = sweeps.get(finding.sweep)
    if finding.key not in summary["spec"] and path and os.path.isfile(path):
        summary = read_summary(path, f"python experiments/sweep.py --spec experiments/{finding.sweep}.yaml")
    if finding.key in summary["spec"]:
        sec = finding.section(summary, out)
    elif finding.stem and os.path.isfile(os.path.join(out, "results", f"{finding.stem}.md")):
        with open(os.path.join(out, "results", f"{finding.stem}.md")) as f:
            text = f.read()
        sec = Section(verdict_in(text), text.splitlines())
    else:
        spec = finding.sweep or "paper_findings"
        return Section("not run", [f"## Finding {finding.number}: {finding.title}", "",
                                   f"Not run: python experiments/sweep.py --spec experiments/{spec}.yaml"])
    notes = os.path.join(out, "results", f"{finding.stem}_notes.md") if finding.stem else None
    if notes and os.path.isfile(notes):
        with open(notes) as f:
            text = "\n".join(sec.lines).rstrip() + "\n\n" + f.read()
        sec = Section(sec.verdict, text.splitlines(), sec.headline)
    return sec


def seeds_per_cell(summary):
    """The largest number of seeds that ran one cell (same kind and settings)."""
    cells = Counter((c["kind"], json.dumps({k: v for k, v in c["meta"].items() if k != "of"}, sort_keys=True))
                    for c in summary["cells"])
    return max(cells.values(), default=0)


# --------------------------------------------------------------------------- plots

def _err(T, key, metric):
    v = T.values(key, metric)
    if not v:
        return None, None
    return 100 * statistics.fmean(v), 100 * (max(v) - min(v)) / 2


def plot_width(summary, path):
    T, widths = paper.table(summary), summary["spec"]["widths"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for training, metric, style, label in (("adversarial", "pgd", "o-", "adversarial training: PGD"),
                                           ("adversarial", "natural", "o--", "adversarial training: natural"),
                                           ("natural", "natural", "s--", "natural training: natural"),
                                           ("natural", "pgd", "s-", "natural training: PGD")):
        pts = [(w, *_err(T, paper.dense(T, training, w), metric)) for w in widths]
        pts = [p for p in pts if p[1] is not None]
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt=style,
                        capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.set_xlabel("LeNet width w")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Finding {capacity.FINDING.number}: accuracy vs width")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_compression(summary, path):
    T, spec = paper.table(summary), summary["spec"]
    L = spec["large_width"]
    total = total_weights(L)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for ax, metric in zip(axes, ("natural", "pgd")):
        dense = _err(T, paper.dense(T, "adversarial", L), metric)
        for sch, mk in zip(spec["schemes"], "o^s"):
            pts = [(1.0, *dense)] if dense[0] is not None else []
            for m in spec["prune_to_widths"]:
                k = paper.pruned(T, spec, sch, m)
                c, (y, e) = schemes.compression(T, spec, k), _err(T, k, metric)
                if c is not None:
                    pts.append((c, y, e))
            pts.sort()
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt=mk + "-",
                            capsize=3, label=f"w={L} pruned: {sch}")
        ws = [w for w in spec["widths"] if w <= L]
        pts = [(total / total_weights(w), *_err(T, paper.dense(T, "adversarial", w), metric), w) for w in ws]
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
    fig.suptitle(f"Findings {min(PAPER) + 1}-{schemes.FINDING.number}: accuracy vs compression, per scheme (adversarial ADMM)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- the document

def setup_section(summary, summary_path):
    s, e = summary["spec"], summary["spec"]["eval"]
    st = s["set"]
    cells = summary["cells"]
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


def cost_section(summary, spec_path):
    cells = summary["cells"]
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
    s = summary
    spec_now = today_spec(summary, spec_path)
    today = [c["id"] for c in plan(spec_now)] if spec_now is not summary["spec"] else s["planned"]
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


def today_spec(summary, spec_path):
    """The spec at ``spec_path`` as it is now, if it is the summary's sweep; else the summary's own
    (as recorded: JSON, so not to be planned again)."""
    path = os.path.join(ROOT, spec_path)
    if os.path.isfile(path):
        with open(path) as f:
            spec = yaml.safe_load(f)
        if spec.get("name") == summary["spec"]["name"]:
            return spec
    return summary["spec"]


def example_commands(summary, spec_path):
    """The commands of one cell (finding 2's pruned model, seed 0) as ``sweep.py --dry-run`` prints
    them for the spec today: with its config defaults as they are now, which the recorded commands
    of an older sweep do not pin (a default that changed since would run another experiment)."""
    spec = today_spec(summary, spec_path)
    if spec is summary["spec"]:  # no spec file of this sweep: the commands the cell recorded
        S, m = spec["small_width"], lambda c: c["meta"]  # noqa: E731
        ex = next((c for c in summary["cells"] if c["kind"] == "admm" and m(c).get("scheme") == "irregular"
                   and m(c).get("matched_width") == S and m(c).get("training") == "adversarial"), None)
        return [readable(c) for c in ex["commands"]] if ex else ["(cell not finished)"]
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
        if c["kind"] != "admm" or not PAPER & set(c["finding"]):  # a finding with its own sweep reports its own
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
    p.add_argument("--methods", default=os.path.join(ROOT, "docs", "results", "arena_fair_cells.json"),
                   help="the fair arena's summary.json or its committed record (Finding 5), if it exists")
    p.add_argument("--quantization", default=os.path.join(ROOT, "runs", "experiments", "quantization", "summary.json"),
                   help="summary.json of the quantization sweep (Finding 6), if it exists")
    a = p.parse_args(argv)
    return run_cli(write, a)


def write(a):
    """RESULTS.md, its plots and the compact rows under ``a.out``, from the summaries ``a`` names."""
    summary = read_summary(a.summary, f"python experiments/sweep.py --spec {a.spec_path}")
    spec = summary["spec"]
    os.makedirs(os.path.join(a.out, "results"), exist_ok=True)
    plot_width(summary, os.path.join(a.out, "robust_vs_width.png"))
    plot_compression(summary, os.path.join(a.out, "accuracy_vs_compression.png"))
    with open(os.path.join(a.out, "results", f"{spec['name']}.json"), "w") as f:
        json.dump(compact(summary), f, indent=1)
    sweeps = {"arena_fair": a.methods, "quantization": a.quantization}
    sections = [(f, finding_section(f, summary, sweeps, a.out)) for f in FINDINGS]
    n_seeds = seeds_per_cell(summary)
    head = [f"# Results: the paper's findings at small scale ({spec['name']})", "",
            "Ye et al., *Adversarial Robustness vs. Model Compression, or Both?* (ICCV 2019), tested on "
            "Fashion-MNIST with LeNet on a 2-core CPU. All numbers below were produced by the commands in "
            "*Regenerate*; accuracies are % on the evaluation subset, shown as mean ± half-range over "
            f"{'seeds' if n_seeds > 1 else '1 seed (no spread)'} (the seeds column says how many).", "",
            "## Summary", ""]
    head += [f"{f.number}. {f.title}: {sec.verdict}." + (f" {sec.headline}." if sec.headline else "")
             for f, sec in sections] + [""]
    body = [line for _, sec in sections for line in sec.lines]
    figs = ["## Plots", "", "![robust accuracy vs width](robust_vs_width.png)", "",
            "![accuracy vs compression](accuracy_vs_compression.png)", ""]  # Finding 5's plot is in its section
    notes = ["## Caveats", ""] + [f"- {c}" for c in caveats(spec, summary)] + [""]
    # Findings measured outside this sweep (e.g. experiments/demo_methods.py) keep their section.
    extra = os.path.join(a.out, "results", "demo_methods.md")
    more = [open(extra).read()] if os.path.isfile(extra) else []
    text = "\n".join(head + setup_section(summary, a.summary) + body + figs + notes + cost_section(summary, a.spec_path)
                     + regenerate(summary, a) + more)
    with open(os.path.join(a.out, "RESULTS.md"), "w") as f:
        f.write(text)
    print(f"wrote {os.path.join(a.out, 'RESULTS.md')} and its plots ({len(summary['cells'])} cells)")
    return 0


def regenerate(summary, a):
    """The Regenerate section: the commands, and those of one cell (Finding 2's pruned model) as the
    dry run prints them today."""
    lines = ["## Regenerate", "", "```",
             "# Fashion-MNIST from Debian (dataset-fashion-mnist) is unpacked by the driver; otherwise torchvision downloads it",
             f"python experiments/sweep.py --spec {a.spec_path}          # resumable: rerun to continue; needs: internet",
             f"python experiments/report.py --summary {os.path.relpath(a.summary, ROOT)} --out docs",
             "python experiments/sweep.py --spec " + a.spec_path + " --dry-run   # every command of every cell",
             "```", "", "Example: the commands of one cell (finding 2, pruned model, seed 0), as the dry run prints "
             "them for the spec today:", "", "```"]
    lines += example_commands(summary, a.spec_path) + ["```", ""]
    return lines + ["Finding 5 comes from its own spec, the arena fair to every method; its record of finished cells",
                    "is committed, so its section regenerates without the sweep, and the sweep goes on from it:", "",
                    "```", "python experiments/sweep.py --spec experiments/arena_fair.yaml      # resumable, also across "
                    "sessions; needs: internet",
                    "python experiments/fair_arena.py --summary docs/results/arena_fair_cells.json --out docs", "```", "",
                    "The first arena, which it replaced (one protocol for all, a 10-epoch start), is kept in "
                    "`docs/results/pruning_methods.md`:", "", "```",
                    "python experiments/sweep.py --spec experiments/arena.yaml          # resumable: rerun to continue; "
                    "needs: internet",
                    "python experiments/methods_report.py --summary runs/experiments/arena/summary.json --out docs",
                    "```", ""]


if __name__ == "__main__":
    sys.exit(main())
