"""Finding 6, the quantization sweep (``quantization.yaml``): its cells, table, verdict and plot.

    python experiments/quant_report.py --summary runs/experiments/quantization/summary.json --out docs

Writes ``<out>/results/quantization.md`` (the Finding 6 section that ``report.py`` puts into
RESULTS.md), ``<out>/results/quantization.json`` (one row per cell) and ``<out>/quantization.png``.
Every number comes from the cells' ``eval.py`` reports: accuracy on the evaluation subset, the
model's storage in bits (``storage_bits``: what ``export.py`` writes, without file overhead) and
the energy each layer's hard quantization moved (``convergence.quantize.quantized_energy``). A cell
is ``mean ± half-range`` over its seeds.

Rules, fixed before the numbers were seen:
- The claim tested (Ye, Feng et al., arXiv:1903.09769): ADMM quantization keeps the pruned
  model's accuracy at low bit widths better than quantizing it directly. Under adversarial
  training the accuracy that decides is PGD accuracy.
- At each bit width ADMM wins when its mean PGD accuracy is at least round-to-nearest's.
- An ADMM cell whose hard quantization moved more than 5 % of some layer's squared norm, in any
  seed, has **not converged**: shown, and left out of the verdict.
"""
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

from cells import pre  # noqa: E402
from frame import NOISY, Finding, Section, Table, cli, tally, verdict_in, within_noise, write_section  # noqa: E402

METHODS = {"admm": "ADMM quantization", "rtn": "round-to-nearest"}
REFERENCES = {"dense": "dense float32", "pruned": "pruned, float32 (sparse)"}
COLORS = {"admm": "C0", "rtn": "C3", "dense": "k", "pruned": "C7"}
NOT_CONVERGED = 0.05  # largest per-layer energy moved by the hard quantization above which ADMM did not converge


QUANT_METHODS = ("admm", "rtn")  # ADMM quantization; round-to-nearest (the quantize stage with 0 epochs)


def plan(spec, cells):
    """The cells: one pruned model per seed (the config's ratios, ADMM + masked retraining after
    pretraining), then its weights quantized to each of ``bits`` by ADMM quantization (the quantize
    stage, ``epochs`` epochs) and by round-to-nearest (the same stage with 0 epochs: no training).
    The dense (pretrain) and pruned float models are the cells the references come from."""
    q = spec["quantization"]
    w, mode = q["width"], q["training"]
    unknown = [m for m in q["methods"] if m not in QUANT_METHODS]
    if mode not in ("adv", "nat") or unknown:
        raise ValueError(f"quantization: training must be adv or nat and methods among {', '.join(QUANT_METHODS)}; "
                         f"got {mode!r}, {q['methods']!r}")
    script, training = ("adv_main.py", "adversarial") if mode == "adv" else ("main.py", "natural")
    for seed in spec["seeds"]:
        dense, pruned = pre(mode, w, seed), f"pruned-{mode}-w{w}-s{seed}"
        cells.add(dense, [FINDING.number], "pretrain", seed, {"width": w, "training": training},
                  [{"script": script, "stage": "pretrain", "init": None, "sets": [f"model.width={w}"]}], "pretrain.pt")
        cells.add(pruned, [FINDING.number], "pruned", seed, {"width": w, "training": training},
                  [{"script": script, "stage": "admm", "init": ("cell", dense, "pretrain.pt"),
                    "sets": [f"model.width={w}"]},
                   {"script": script, "stage": "retrain", "init": None, "sets": [f"model.width={w}"]}],
                  "retrain.pt", [dense])
        for bits in q["bits"]:
            for method in q["methods"]:
                epochs = q["epochs"] if method == "admm" else 0
                sets = [f"model.width={w}", f"quant.bits.*={bits}", f"quantize.epochs={epochs}"]
                cells.add(f"quant-{method}-{mode}-b{bits}-s{seed}", [FINDING.number], "quantize", seed,
                          {"width": w, "training": training, "bits": bits, "method": method, "epochs": epochs},
                          [{"script": script, "stage": "quantize", "init": ("cell", pruned, "retrain.pt"),
                            "sets": sets}],
                          "quantize.pt", [pruned])


def moved_energy(ev):
    """The largest per-layer share of the squared norm that the hard quantization moved."""
    e = (ev.get("convergence") or {}).get("quantize", {}).get("quantized_energy", {})
    return max(e.values(), default=float("nan"))


def rows(summary):
    """One row per finished Finding 6 cell: what it is (method: admm, rtn, or the references dense
    and pruned), bits, seed, accuracies, size in bits and the largest moved energy."""
    out = []
    for c in summary["cells"]:
        if FINDING.number not in c["finding"] or c["kind"] not in ("pretrain", "pruned", "quantize"):
            continue
        ev, m = c["eval"], c["meta"]
        sb = ev.get("storage_bits") or {}
        method = m["method"] if c["kind"] == "quantize" else {"pretrain": "dense"}.get(c["kind"], c["kind"])
        bits = m.get("bits", 32)
        out.append({"id": c["id"], "method": method, "bits": bits, "seed": c["seed"],
                    "natural": ev["accuracy"]["natural"], "pgd": ev["accuracy"].get("pgd"),
                    "storage_bits": sb.get("dense_float32") if method == "dense" else sb.get("export"),
                    "energy": moved_energy(ev), "wall_s": c["wall_s"], "train_s": c.get("train_wall_s")})
    return out


def converged(T, key):
    return key[0] != "admm" or all(e <= NOT_CONVERGED for e in T.values(key, "energy"))


def kbits(T, key):
    v = T.values(key, "storage_bits")
    return f"{statistics.fmean(v) / 1000:,.0f}" if v else "-"


def section(summary, plot_name="quantization.png"):
    spec, rs = summary["spec"], rows(summary)
    q, T = spec["quantization"], Table(rs, ("method", "bits"))
    cfg = lambda key: spec["set"].get(key, "the config's")  # noqa: E731
    bits, limit = q["bits"], spec["eval"]["limit"]
    lines = [f"## Finding {FINDING.number}: ADMM quantization vs round-to-nearest, on a pruned robust model", "",
             f"{spec.get('dataset', 'fashion_mnist')} (the first {cfg('data.train_limit')} training images and "
             f"{limit:,} test images), LeNet w={q['width']}, {q['training']} training (PGD-{cfg('adv.steps')}) at "
             f"every stage. Per seed: pretraining ({cfg('pretrain.epochs')} epochs), ADMM pruning "
             f"({cfg('admm.epochs')} epochs) and masked retraining ({cfg('retrain.epochs')} epochs) at "
             f"`{spec['config']}`'s ratios; then every pruned layer quantized to b bits "
             "(levels {-(2^(b-1)-1), ..., 0, ..., 2^(b-1)-1} x q per layer, pruned weights kept at zero) by:",
             f"- **ADMM quantization**: {q['epochs']} epochs of the `quantize` stage (ADMM onto the levels while "
             "training adversarially, a Z/U update every epoch), then hard quantization;",
             "- **round-to-nearest**: the same projection applied once to the pruned model (the `quantize` stage "
             "with 0 epochs): no training.", "",
             f"Evaluation: natural / PGD-{spec['eval']['steps']} accuracy in %. *Size*: the export's payload in "
             "kbit (packed codes, sparse indices, scales and the float tensors; `storage_bits` of eval.json). "
             "*Moved*: the largest per-layer share of the squared weight norm that the hard quantization moved, "
             f"in % (round-to-nearest: its rounding error); an ADMM cell above {100 * NOT_CONVERGED:g} % is "
             "**not converged** and kept out of the verdict.", "",
             "| bits | ADMM quantization | round-to-nearest | size, kbit (ADMM / RTN) | seeds |", "|---|---|---|---|---|"]
    for name, label in REFERENCES.items():
        k = (name, 32)
        lines.append(f"| {label} | {T.cell(k, 'natural')} / {T.cell(k, 'pgd')} | | {kbits(T, k)} | "
                     f"{len(T.values(k, 'natural'))} |")
    decided = []
    for b in bits:
        cells = []
        for method in METHODS:
            k = (method, b)
            e = max(T.values(k, "energy"), default=float("nan"))
            flag = "" if converged(T, k) else " **not converged**"
            cells.append(f"{T.cell(k, 'natural')} / {T.cell(k, 'pgd')} (moved {'-' if e != e else f'{100 * e:.2f}'})"
                         + flag)
        seeds = min(len(T.values((m, b), "natural")) for m in METHODS)
        lines.append(f"| {b} | " + " | ".join(cells) + f" | {kbits(T, ('admm', b))} / {kbits(T, ('rtn', b))} | {seeds} |")
        a, r = T.mean(("admm", b), "pgd"), T.mean(("rtn", b), "pgd")
        if a is not None and r is not None and converged(T, ("admm", b)):
            decided.append((b, a, r, within_noise(T, ("admm", b), ("rtn", b), "pgd", limit), paired(T, b)))
    lines += [""] + verdict_lines(decided, T) + [f"![accuracy vs size]({plot_name})", ""] + cost_lines(rs)
    return "\n".join(lines), rs


def paired(T, b):
    """(seeds where ADMM's PGD accuracy is at least round-to-nearest's, seeds with both) at ``b``
    bits: both quantize the same pruned model of a seed, so the seeds pair up."""
    admm, rtn = ({r["seed"]: r["pgd"] for r in T.groups.get((m, b), [])} for m in ("admm", "rtn"))
    both = sorted(set(admm) & set(rtn))
    return sum(admm[s] >= rtn[s] for s in both), len(both)


def verdict_lines(decided, T):
    n, wins = len(decided), sum(a >= r for _, a, r, _, _ in decided)
    verdict = "not decided (no bit width where ADMM converged)" if not n else tally(wins, n)
    noisy = [f"{b} bits" for b, _, _, w, _ in decided if w]
    if noisy:
        verdict += NOISY
    pruned = T.mean(("pruned", 32), "pgd")
    lines = [f"Rule: at each bit width ADMM quantization wins when its mean PGD accuracy is at least "
             f"round-to-nearest's. It won {wins} of the {n} bit widths where it converged. Verdict: {verdict}."]
    if noisy:
        lines.append(f"Within noise (difference below the seed spread or the binomial standard error): {', '.join(noisy)}.")
    lines += [f"- {b} bits: PGD {100 * a:.1f} (ADMM) vs {100 * r:.1f} (round-to-nearest), ADMM at least as high in "
              f"{k} of {m} seeds" + (f"; the pruned float model: {100 * pruned:.1f}" if pruned is not None else "")
              for b, a, r, _, (k, m) in decided]
    return lines + [""]


def cost_lines(rs):
    """Seconds per cell: the training epochs' (from the run's log, so a cell whose evaluation was
    rerun alone still counts them) and the cell's wall time in its last sweep invocation."""
    by = {}
    for r in rs:
        by.setdefault(r["method"], []).append(r)
    names = {**REFERENCES, **METHODS}
    lines = ["Seconds per cell, two cells at once on the 2 cores: the training epochs (from each run's log) and "
             "the cell's wall time in the sweep invocation that finished it (training, when it ran then, and "
             "evaluation):", "", "| cell | cells | mean training s | mean wall s |", "|---|---|---|---|"]
    lines += [f"| {names[k]} | {len(v)} | {statistics.fmean(r['train_s'] or 0 for r in v):.0f} | "
              f"{statistics.fmean(r['wall_s'] for r in v):.0f} |" for k, v in by.items()]
    return lines + ["", f"Sum of training times: {sum(r['train_s'] or 0 for r in rs) / 60:.1f} min.", ""]


def plot(summary, path):
    """Natural and PGD accuracy against the size in bits (log scale): one line per method through
    its bit widths, the dense and pruned float models as single points. Hollow: not converged."""
    spec, rs = summary["spec"], rows(summary)
    T, bits = Table(rs, ("method", "bits")), spec["quantization"]["bits"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, metric in zip(axes, ("natural", "pgd")):
        for method in METHODS:
            pts = [(T.mean((method, b), "storage_bits"), T.mean((method, b), metric), T.spread((method, b), metric), b,
                    converged(T, (method, b))) for b in bits if T.mean((method, b), metric) is not None]
            if not pts:
                continue
            ax.errorbar([p[0] / 1000 for p in pts], [100 * p[1] for p in pts], yerr=[100 * p[2] for p in pts],
                        fmt="o-", capsize=3, markersize=5, color=COLORS[method], label=METHODS[method])
            for x, y, _, b, ok in pts:
                ax.annotate(f"{b} bits", (x / 1000, 100 * y), textcoords="offset points", fontsize=7,
                            xytext=(5, 4) if method == "admm" else (5, -10), color=COLORS[method])
                if not ok:
                    ax.plot(x / 1000, 100 * y, "o", markersize=9, mfc="white", mec=COLORS[method])
        for name, label in REFERENCES.items():
            x, y = T.mean((name, 32), "storage_bits"), T.mean((name, 32), metric)
            if x is not None and y is not None:
                ax.errorbar([x / 1000], [100 * y], yerr=[100 * T.spread((name, 32), metric)], fmt="*", markersize=10,
                            capsize=3, color=COLORS[name], label=label)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("size of the export, kbit (log)")
        ax.set_ylabel(f"{'PGD' if metric == 'pgd' else 'natural'} accuracy (%)")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Finding {FINDING.number}: accuracy vs size of a pruned robust LeNet, by quantization method", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(summary, out):
    """Write Finding 6's plot, section and rows under ``out``; return the section's text."""
    return write_section(summary, out, "quantization", plot, section)


def report_section(summary, out):
    text = write(summary, out)
    return Section(verdict_in(text), text.splitlines())


FINDING = Finding(6, "ADMM quantization keeps a pruned robust model's accuracy better than round-to-nearest",
                  "quantization", plan, report_section, stem="quantization", sweep="quantization")


if __name__ == "__main__":
    raise SystemExit(cli(write, "quantization", __doc__.splitlines()[0]))
