"""ADMM, progressive ADMM, one-shot and gradual magnitude pruning on the bundled digits, at the
same number of epochs after one shared pretrained model (the new-user comparison).

Natural training (``main.py``), LeNet w=4, every layer pruned: conv1 / conv2 / fc1 / fc2 at
0.8 / 0.97 / 0.99 / 0.9 (98.8 % of the weights). Each cell starts from the same ``pretrain.pt``
(copied into its run folder and continued with ``--resume``, so a killed sweep picks up where it
stopped) and prints one table row: natural accuracy on the 1,000 test digits and the largest
per-layer pruned energy at the hard prune (and, for ADMM, the largest primal residual at its last
Z/U update).

    python experiments/demo_methods.py --out runs/demo_methods [--budgets 10 20] [--seeds 0]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))
from common import UserError, run_cli  # noqa: E402
from training.rundir import RunFolder  # noqa: E402
from sweep import method_sets  # noqa: E402

RATIOS = {"conv1.weight": 0.8, "conv2.weight": 0.97, "fc1.weight": 0.99, "fc2.weight": 0.9}
PRETRAIN_EPOCHS = 10
ROUNDS = [0.5, 1.0]  # progressive ADMM: half of each layer's target, then all of it


TABLE_HEAD = ("| epochs after pretraining | method | seed | natural accuracy | largest pruned energy | "
              "largest ADMM residual | sparsity |\n|---|---|---|---|---|---|---|\n")


def cells(budget, admm):
    """{cell name: --set overrides} at ``budget`` epochs after pretraining (split as in the
    Fashion-MNIST sweep, ``sweep.method_sets``); ``admm``: the rho schedule of the ADMM cells."""
    return {m: method_sets(m, budget, ROUNDS) + (admm if m in ("admm", "progressive") else [])
            for m in ("oneshot", "gradual", "admm", "progressive")}


def run(cmd, log):
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode
    if rc:
        raise SystemExit(f"exit {rc}: {' '.join(cmd)} (log: {log})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/demo_methods")
    p.add_argument("--budgets", type=int, nargs="+", default=[10, 20])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--rho", default="0.01")
    p.add_argument("--rho-growth", default="1.5")
    p.add_argument("--markdown", help="also write the table to this file")
    a = p.parse_args(argv)
    return run_cli(run_all, a)


def run_all(a):
    """Every cell of ``a.budgets`` x ``a.seeds``; a budget that does not split is refused first."""
    admm = [f"prune.rho={a.rho}", f"prune.rho_growth={a.rho_growth}"]
    for budget in a.budgets:
        try:
            cells(budget, admm)
        except ValueError as e:
            raise UserError(f"--budgets {budget}: {e}")
    base = ["--config", "configs/demo.yaml", *[x for n, r in RATIOS.items() for x in ("--set", f"prune.prune_ratios.{n}={r}")]]
    rows = []
    os.makedirs(a.out, exist_ok=True)
    for seed in a.seeds:
        pre = os.path.join(a.out, f"pretrain-s{seed}")
        sets = [f"seed={seed}", f"pretrain.epochs={PRETRAIN_EPOCHS}"]
        if RunFolder(pre).status("pretrain") != "done":
            run([sys.executable, "main.py", *base, "--out", pre, "--stage", "pretrain", "--overwrite",
                 *[x for s in sets for x in ("--set", s)]], os.path.join(a.out, "log.txt"))
        for budget in a.budgets:
            for name, extra in cells(budget, admm).items():
                out = os.path.join(a.out, f"{name}-e{budget}-s{seed}")
                if not os.path.isfile(os.path.join(out, "eval.json")):
                    os.makedirs(out, exist_ok=True)
                    if not os.path.isfile(os.path.join(out, "pretrain.pt")):
                        shutil.copy(os.path.join(pre, "pretrain.pt"), os.path.join(out, "pretrain.pt"))
                    run([sys.executable, "main.py", *base, "--out", out, "--resume",
                         *[x for s in sets + extra for x in ("--set", s)]], os.path.join(out, "cell.log"))
                with open(os.path.join(out, "eval.json")) as f:
                    rep = json.load(f)
                conv = rep.get("convergence", {})
                energy = max(conv.get("retrain", {}).get("pruned_energy", {}).values(), default=float("nan"))
                resid = max(conv.get("admm", {}).get("residual", {}).values(), default=float("nan"))
                rows.append((budget, name, seed, rep["accuracy"]["natural"], energy, resid,
                             rep["sparsity"]["overall"]))
                print(f"| {budget} | {name} | {seed} | {rows[-1][3]:.3f} | {energy:.4f} | {resid:.3f} | "
                      f"{rows[-1][6]:.4f} |", flush=True)
    keys = ("budget", "method", "seed", "natural", "pruned_energy", "admm_residual", "sparsity")
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump([dict(zip(keys, r)) for r in rows], f, indent=1)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(TABLE_HEAD + "".join(f"| {b} | {m} | {s} | {nat:.3f} | {e:.4f} | {r:.3f} | {sp:.4f} |\n"
                                         for b, m, s, nat, e, r, sp in rows))


if __name__ == "__main__":
    sys.exit(main())
