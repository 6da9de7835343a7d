"""Run the sweep that tests the paper's five findings, one cell at a time, with the real scripts.

    python experiments/sweep.py                                   # experiments/paper_findings.yaml
    python experiments/sweep.py --quick --out /tmp/quick          # tiny end-to-end version (~2 min)
    python experiments/sweep.py --dry-run                         # print the cells and commands

A spec (YAML, see ``paper_findings.yaml``) names a base config, seeds and the sizes of each
finding; ``plan`` expands it into cells. A cell is a short list of commands (``adv_main.py`` /
``main.py`` stages, the inherited-init builder) followed by ``eval.py --json``; it depends on
the cells whose checkpoints it starts from. Every command runs as a subprocess with
``OMP_NUM_THREADS=1``; ``parallel`` cells run at once.

Resumable: a cell whose ``cells/<id>.json`` exists is skipped; inside a cell a stage whose
checkpoint exists is skipped and a stage that was cut off continues with ``--resume``. After
every cell ``summary.json`` is rewritten (all finished cells, the plan, what failed), so the
report can be made from a sweep that is still running.

Output folder (default ``runs/experiments/<spec name>``): ``cells/<id>.json``, ``summary.json``,
``sweep.log``, and one run folder per cell under ``runs/<id>/`` (checkpoints, logs).
"""
import argparse
import fnmatch
import json
import os
import shlex
import subprocess
import sys
import time

import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON = sys.executable
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)  # launch.py, also when this module is imported (tests)
import admm  # noqa: E402
import data  # noqa: E402
from models import build_model  # noqa: E402
from common import run_cli  # noqa: E402
from training.rundir import RunFolder  # noqa: E402
from config import load_config  # noqa: E402
from pruning.plan import stage_names# noqa: E402
from launch import make_launcher  # noqa: E402


# --------------------------------------------------------------------------- pruning targets

def weight_counts(arch, width, dataset="mnist"):
    """{prunable weight name: number of weights} of ``arch`` at ``width`` on ``dataset``'s images
    and classes (the default's 1 x 28 x 28 and 10 classes are what both specs' datasets have)."""
    info = data.INFO[dataset]
    with torch.device("meta"):  # shapes only: no memory, no random initialization
        model = build_model(arch, width, info.num_classes, info.in_channels, info.image_size)
    return {name: w.numel() for name, w in admm.prunable_weights(model).items()}


def matched_ratios(large, small, dense=("fc2.weight",), fill="fc1.weight"):
    """Prune ratios that take LeNet(large) to exactly LeNet(small)'s total number of weights.

    Each layer is cut to the small model's size of that layer, except the ``dense`` layers (kept
    whole: filter pruning must not prune the output layer, and the comparison of schemes uses the
    same ratios for all) and ``fill``, which absorbs the difference so the totals match.
    """
    L, S = weight_counts("lenet", large), weight_counts("lenet", small)
    ratios = {n: 1 - S[n] / L[n] for n in L if n not in dense and n != fill}
    ratios.update({n: 0.0 for n in dense})
    kept_elsewhere = sum(L[n] * (1 - r) for n, r in ratios.items())
    ratios[fill] = 1 - (sum(S.values()) - kept_elsewhere) / L[fill]
    return {n: round(r, 6) for n, r in ratios.items()}


def ratio_sets(ratios):
    return [f"prune.prune_ratios.{n}={r}" for n, r in ratios.items()]


# --------------------------------------------------------------------------- the plan

def plan(spec):
    """The cells of ``spec``, in its priority order: findings 1-4 of the paper (``widths`` and
    the keys after it) and the comparison of pruning methods (``methods``), whichever it has.

    A cell: {id, finding, kind, seed, meta, steps, ckpt, deps}. A step is either a training
    stage {script, stage, init (None = the run folder's previous stage), sets} or
    {inherit: source ckpt, width}."""
    cells = []

    def add(cid, finding, kind, seed, meta, steps, ckpt, deps=()):
        same = next((c for c in cells if c["id"] == cid), None)
        if same:  # a cell that several findings share (a pretrained model) runs once
            same["finding"] += [f for f in finding if f not in same["finding"]]
        else:
            cells.append({"id": cid, "finding": list(finding), "kind": kind, "seed": seed, "meta": meta,
                          "steps": steps, "ckpt": ckpt, "deps": list(deps)})

    if "widths" in spec:
        paper_cells(spec, add)
    if "arena" in spec:
        arena_cells(spec, add)
    if "quantization" in spec:
        quant_cells(spec, add)
    return _finish_plan(spec, cells)


def pre(mode, w, seed):
    """The id of the dense (pretrained) cell: ``mode`` adv or nat, LeNet width ``w``."""
    return f"pre-{mode}-w{w}-s{seed}"


def paper_cells(spec, add):
    """Findings 1-4: dense widths, pruning vs the small model, schemes, adversarial pruning."""
    L, S = spec["large_width"], spec["small_width"]
    widths, tune = spec["widths"], spec["admm_epochs"] + spec["retrain_epochs"]

    def pruned(cid, finding, seed, script, scheme, ratios, meta):
        base = [f"model.width={L}", f"prune.sparsity_type={scheme}", *ratio_sets(ratios)]
        steps = [{"script": script, "stage": "admm", "init": ("cell", pre("adv", L, seed), "pretrain.pt"),
                  "sets": base},
                 {"script": script, "stage": "retrain", "init": None, "sets": base}]
        add(cid, finding, "admm", seed, {"width": L, "scheme": scheme, "ratios": ratios,
                                         "training": "adversarial" if script == "adv_main.py" else "natural", **meta},
            steps, "retrain.pt", [pre("adv", L, seed)])

    for seed in spec["seeds"]:
        # Finding 1 (and the start of 2-5): dense models, adversarial and natural, all widths.
        # The large adversarial model first: every pruning cell starts from it.
        order = [L] + [w for w in widths if w != L]
        for mode in ("adv", "nat"):
            for w in order:
                script = "adv_main.py" if mode == "adv" else "main.py"
                add(pre(mode, w, seed), [1], "pretrain", seed,
                    {"width": w, "training": "adversarial" if mode == "adv" else "natural"},
                    [{"script": script, "stage": "pretrain", "init": None, "sets": [f"model.width={w}"]}],
                    "pretrain.pt")
            if mode == "adv":
                # Finding 2: prune w=L to w=S's weight count (adversarial ADMM) vs w=S from scratch
                # (pre-adv-wS) vs w=S inherited from w=L and then trained adversarially.
                ratios = matched_ratios(L, S)
                pruned(f"admm-irregular-w{S}count-s{seed}", [2, 3, 4], seed, "adv_main.py", "irregular", ratios,
                       {"matched_width": S})
                add(f"inherit-w{S}-from-w{L}-s{seed}", [2], "inherited", seed,
                    {"width": S, "source_width": L, "training": "adversarial"},
                    [{"inherit": ("cell", pre("adv", L, seed), "pretrain.pt"), "width": S},
                     {"script": "adv_main.py", "stage": "pretrain", "init": ("self", "inherited.pt"),
                      "sets": [f"model.width={S}", f"pretrain.epochs={tune}"]}],
                    "pretrain.pt", [pre("adv", L, seed)])
                # Finding 4: the same model and ratios, natural ADMM + natural retraining.
                pruned(f"natadmm-irregular-w{S}count-s{seed}", [4], seed, "main.py", "irregular", ratios,
                       {"matched_width": S})
        # Finding 3: the three schemes at the weight counts of the smaller dense widths.
        for m in spec["prune_to_widths"]:
            for scheme in spec["schemes"]:
                pruned(f"admm-{scheme}-w{m}count-s{seed}", [3], seed, "adv_main.py", scheme, matched_ratios(L, m),
                       {"matched_width": m})


def method_sets(method, budget, rounds):
    """--set overrides that give pruning ``method`` (admm, progressive, gradual, oneshot)
    ``budget`` epochs after pretraining. One-shot spends them all on masked retraining; the others
    spend a fifth of each round (at least one epoch) on masked retraining and the rest on the
    pruning stage. Progressive ADMM splits the budget evenly over its ``rounds``."""
    if method == "oneshot":
        return ["prune.method=oneshot", f"retrain.epochs={budget}"]
    n = len(rounds) if method == "progressive" else 1
    if budget % n or budget // n < 2:
        raise ValueError(f"a budget of {budget} epochs does not split into {n} rounds of at least 2 epochs")
    per_round = budget // n
    tail = max(1, per_round // 5)
    sets = [f"prune.method={'gradual' if method == 'gradual' else 'admm'}", f"admm.epochs={per_round - tail}",
            f"retrain.epochs={tail}"]
    return sets + ([f"prune.rounds={list(rounds)}"] if method == "progressive" else [])


# The arena's methods (issue 20): the --set overrides that pick each, and the allocation it prunes
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


def arena_cells(spec, add):
    """Finding 5, the robust-pruning arena (issue 20): every method of ``arena.methods`` at each
    overall target, from its seed's pretrained model, with the same epochs and lr at every epoch
    after it (``lr_span: run`` in the spec's ``set``); the fixed allocation for all but HARP (which
    learns its own) and, for ``arena.uniform``'s methods, uniform rows too. ``arena.variants``
    repeat some methods' rows (``methods``, ``uniform``; the main ones by default) at some targets
    and seeds with another schedule or split."""
    A, cfg = spec["arena"], os.path.join(ROOT, spec["config"])
    w, budget = A["width"], A["budget"]
    starts = {None: {"sets": []}, **(A.get("starts") or {})}
    runs = [{"name": "main", "seeds": spec["seeds"], "targets": A["targets"], "split": A["split"], "sets": [],
             "methods": A["methods"], "uniform": A.get("uniform", []), "budget": budget, "target_sets": {},
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
    for run in runs:  # the pretrained models the rows start from, one per seed and start
        for seed in run["seeds"] if run["start"] else spec["seeds"]:
            st = starts[run["start"]]
            add(pre_id(w, seed, run["start"], st), [5], "pretrain", seed,
                {"width": st.get("width", w), "training": "adversarial", "start": run["start"] or "spec",
                 "arch": st.get("arch", "config")},
                [{"script": "adv_main.py", "stage": "pretrain", "init": None, "sets": start_sets(w, st)}], "pretrain.pt")
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
                    add(f"{method}-{alloc}-{tag}", [5], method, seed, meta, steps, "retrain.pt", deps)


# The keys a variant of the fair arena (issue 28) may add to an arena variant's: its own budget,
# --set overrides per target ({target: [...]}, after all others), the pretrained model it starts
# from (a name in arena.starts: {name: {sets, arch, width}}; default the spec's pretraining), and
# the variant whose HARP cells its admm_harp rows read (default its own).
VARIANT_KEYS = ("budget", "target_sets", "start", "harp_from")


def pre_id(w, seed, start=None, st=None):
    """The id of an arena row's pretrained cell: the spec's own (``pre``), or start ``start``'s."""
    st = st or {}
    return pre("adv", st.get("width", w), seed) + (f"-{start}" if start else "")


def start_sets(w, st):
    """--set overrides of a pretrained start ``st`` ({sets, arch, width}) and of the rows from it."""
    return ([f"model.arch={st['arch']}"] if "arch" in st else []) + [f"model.width={st.get('width', w)}", *st["sets"]]


QUANT_METHODS = ("admm", "rtn")  # ADMM quantization; round-to-nearest (the quantize stage with 0 epochs)


def quant_cells(spec, add):
    """Finding 6: one pruned model per seed (the config's ratios, ADMM + masked retraining after
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
        add(dense, [6], "pretrain", seed, {"width": w, "training": training},
            [{"script": script, "stage": "pretrain", "init": None, "sets": [f"model.width={w}"]}], "pretrain.pt")
        add(pruned, [6], "pruned", seed, {"width": w, "training": training},
            [{"script": script, "stage": "admm", "init": ("cell", dense, "pretrain.pt"), "sets": [f"model.width={w}"]},
             {"script": script, "stage": "retrain", "init": None, "sets": [f"model.width={w}"]}], "retrain.pt", [dense])
        for bits in q["bits"]:
            for method in q["methods"]:
                epochs = q["epochs"] if method == "admm" else 0
                sets = [f"model.width={w}", f"quant.bits.*={bits}", f"quantize.epochs={epochs}"]
                add(f"quant-{method}-{mode}-b{bits}-s{seed}", [6], "quantize", seed,
                    {"width": w, "training": training, "bits": bits, "method": method, "epochs": epochs},
                    [{"script": script, "stage": "quantize", "init": ("cell", pruned, "retrain.pt"), "sets": sets}],
                    "quantize.pt", [pruned])


def _finish_plan(spec, cells):
    """Every training step gets the seed and the spec's common settings; AutoAttack cells are
    added for the cells the spec names; the cells are put in the spec's priority order."""
    stages = {f"{k}.epochs": spec[f"{k}_epochs"] for k in ("admm", "retrain") if f"{k}_epochs" in spec}
    for c in cells:
        for st in c["steps"]:
            if "script" in st:
                st["sets"] = [f"seed={c['seed']}", *(f"{k}={v}" for k, v in {**spec["set"], **stages}.items()),
                              *st["sets"]]
    # AutoAttack on a smaller subset, for the cells the spec names, after everything else.
    aa = spec.get("autoattack") or {}
    for c in list(cells):
        if c["seed"] in aa.get("seeds", []) and any(c["id"].startswith(p) or fnmatch.fnmatchcase(c["id"], p)
                                                   for p in aa.get("cells", [])):
            cells.append({"id": f"{c['id']}-aa", "finding": c["finding"], "kind": "autoattack", "seed": c["seed"],
                          "meta": {**c["meta"], "of": c["id"]}, "steps": [], "ckpt": ("cell", c["id"], c["ckpt"]),
                          "deps": [c["id"]], "eval": "autoattack"})
    # Optional priority: cells matching an earlier pattern go first (stable otherwise), so that
    # what matters most is finished first when the time runs out.
    order = spec.get("priority") or []
    rank = lambda c: next((i for i, pat in enumerate(order) if fnmatch.fnmatchcase(c["id"], pat)), len(order))  # noqa: E731
    return sorted(cells, key=rank)


# --------------------------------------------------------------------------- running one cell

class Sweep:
    def __init__(self, spec, out):
        self.spec, self.out = spec, os.path.abspath(out)
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.config = os.path.join(ROOT, spec["config"])

    def run_dir(self, cid):
        return os.path.join(self.out, "runs", cid)

    def result(self, cid):
        return os.path.join(self.out, "cells", f"{cid}.json")

    def resolve(self, cell, ref):
        if ref[0] == "cell":
            return os.path.join(self.run_dir(ref[1]), ref[2])
        return os.path.join(self.run_dir(cell["id"]), ref[1])

    def commands(self, cell):
        """The command lines of ``cell`` as they run on a fresh folder (for the record and --dry-run)."""
        rd, cmds = self.run_dir(cell["id"]), []
        for st in cell["steps"]:
            if "inherit" in st:
                cmds.append([PYTHON, os.path.join(HERE, "inherit.py"), "--ckpt", self.resolve(cell, st["inherit"]),
                             "--width", str(st["width"]), "--out", os.path.join(rd, "inherited.pt")])
                continue
            cmd = [PYTHON, st["script"], "--config", self.config, "--stage", st["stage"], "--out", rd]
            if st["init"]:
                cmd += ["--init", self.resolve(cell, st["init"])]
            # "{out}" in a value: the sweep's folder (ADMM at HARP's rates reads a HARP cell's checkpoint)
            cmds.append(cmd + [a for s in st["sets"] for a in ("--set", s.replace("{out}", self.out))])
        cmds.append(self.eval_command(cell))
        return cmds

    def eval_command(self, cell):
        e = self.spec["eval"]
        ckpt = self.resolve(cell, cell["ckpt"]) if isinstance(cell["ckpt"], tuple) else \
            os.path.join(self.run_dir(cell["id"]), cell["ckpt"])
        if cell.get("eval") == "autoattack":
            a = self.spec["autoattack"]
            return [PYTHON, "eval.py", "--ckpt", ckpt, "--attacks", a["attacks"], "--steps", str(e["steps"]),
                    "--restarts", str(e["restarts"]), "--limit", str(a["limit"]), "--no-checks",
                    "--seed", str(e.get("seed", 0)), "--json", os.path.join(self.run_dir(cell["id"]), "eval.json")]
        return [PYTHON, "eval.py", "--ckpt", ckpt, "--attacks", e["attacks"], "--steps", str(e["steps"]),
                "--restarts", str(e["restarts"]), "--limit", str(e["limit"]), "--no-checks",
                "--seed", str(e.get("seed", 0)), "--json", os.path.join(self.run_dir(cell["id"]), "eval.json")]

    def _call(self, cmd, log):
        with open(log, "a") as f:
            f.write(f"$ {shlex.join(cmd)}\n")
            f.flush()
            rc = subprocess.run(cmd, cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise RuntimeError(f"exit {rc}: {shlex.join(cmd)} (log: {log})")

    def run_cell(self, cell):
        rd = self.run_dir(cell["id"])
        os.makedirs(rd, exist_ok=True)
        log, t0, ran = os.path.join(rd, "cell.log"), time.time(), []
        for st, cmd in zip(cell["steps"], self.commands(cell)):
            if "inherit" in st:
                if not os.path.isfile(os.path.join(rd, "inherited.pt")):
                    self._call(cmd, log)
                ran.append(cmd)
                continue
            status = RunFolder(rd).status(st["stage"])
            if status == "done":
                ran.append(cmd)
                continue  # stage finished by an earlier, interrupted sweep
            if status == "partial":
                i = cmd.index("--init") if "--init" in cmd else None
                cmd = (cmd[:i] + cmd[i + 2:] if i is not None else cmd) + ["--resume"]
            else:
                cmd = cmd + ["--overwrite"]
            self._call(cmd, log)
            ran.append(cmd)
        ev = self.eval_command(cell)
        self._call(ev, log)
        with open(os.path.join(rd, "eval.json")) as f:
            rep = json.load(f)
        res = {k: cell[k] for k in ("id", "finding", "kind", "seed", "meta", "deps")}
        res.update({"commands": [shlex.join(c) for c in ran + [ev]], "wall_s": round(time.time() - t0, 1),
                    "train_wall_s": _train_time(rd), "eval": rep})
        val = _validation(rd)
        if val:  # runs with a validation split (data.val_size): what choices between cells read
            res["val"] = val
        os.makedirs(os.path.dirname(self.result(cell["id"])), exist_ok=True)
        tmp = self.result(cell["id"]) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=1)
        os.replace(tmp, self.result(cell["id"]))
        return res


def _validation(rd):
    """The run folder's validation figures (data.val_size): {natural, pgd, stage, epoch} of the last
    epoch row that has them (the final model's, measured at the last stage's end), and the
    pretraining curve [[epoch, val_pgd], ...] when it stopped on them; {} without a split."""
    path, rows = os.path.join(rd, "metrics.jsonl"), []
    if os.path.isfile(path):
        with open(path) as f:
            rows = [r for r in map(json.loads, f) if r.get("kind") == "epoch" and "val_pgd" in r]
    if not rows:
        return {}
    last = rows[-1]
    out = {"natural": last["val_natural"], "pgd": last["val_pgd"], "stage": last["stage"], "epoch": last["epoch"]}
    curve = [[r["epoch"], r["val_pgd"]] for r in rows if r["stage"] == "pretrain"]
    return {**out, "pretrain_curve": curve} if len(curve) > 1 else out


def _train_time(rd):
    """Seconds spent in training epochs, summed over the run folder's stage checkpoints' logs."""
    total, path = 0.0, os.path.join(rd, "log.txt")
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) > 3 and parts[2].split(".")[0] in ("pretrain", "admm", "gradual", "retrain", "quantize") and parts[-1].endswith("s"):
                    try:
                        total += float(parts[-1][:-1])
                    except ValueError:
                        pass
    return round(total, 1)


# --------------------------------------------------------------------------- the driver

def prepare_data(spec):
    """Fashion-MNIST from Debian's dataset-fashion-mnist package, unpacked where torchvision looks
    for it; without the package torchvision downloads it (data.download in the config)."""
    raw, src = os.path.join(ROOT, "data", "FashionMNIST", "raw"), "/usr/share/datasets/fashion-mnist"
    if "fashion" not in spec["config"] and spec["set"].get("data.dataset") != "fashion_mnist":
        return
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    if all(os.path.isfile(os.path.join(raw, n)) for n in names) or not os.path.isdir(src):
        return
    import gzip
    import shutil
    os.makedirs(raw, exist_ok=True)
    for n in names:
        if os.path.isfile(os.path.join(src, n + ".gz")):
            with gzip.open(os.path.join(src, n + ".gz")) as fi, open(os.path.join(raw, n), "wb") as fo:
                shutil.copyfileobj(fi, fo)


def autoattack_available():
    out = subprocess.run([PYTHON, "eval.py", "--help"], cwd=ROOT, capture_output=True, text=True).stdout
    if "autoattack" not in out:
        return False
    try:
        import pyautoattack  # noqa: F401 - the AutoAttack authors' package, what eval.py's autoattack runs
    except ImportError:
        return False
    return True


def write_summary(sweep, cells, failed, t_start, done_now):
    results = []
    for c in cells:
        p = sweep.result(c["id"])
        if os.path.isfile(p):
            with open(p) as f:
                r = json.load(f)
            # what the plan says the cell serves now (a spec can gain a finding that shares a
            # cell finished before), not what it said when the cell ran
            results.append({**r, "finding": c["finding"]})
    summary = {"spec": sweep.spec, "out": sweep.out, "planned": [c["id"] for c in cells],
               "done": [r["id"] for r in results], "failed": failed,
               "missing": [c["id"] for c in cells if not os.path.isfile(sweep.result(c["id"])) and c["id"] not in failed],
               "wall_s_this_invocation": round(time.time() - t_start, 1), "finished": done_now,
               "cells": results}
    tmp = os.path.join(sweep.out, "summary.json.tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, os.path.join(sweep.out, "summary.json"))


def select(cells, only):
    """The cells whose ids start with one of the comma-separated prefixes ``only`` (all if None),
    and every cell they need."""
    if not only:
        return cells
    want = {c["id"] for c in cells if any(c["id"].startswith(p) for p in only.split(","))}
    grow = True
    while grow:
        need = {d for c in cells if c["id"] in want for d in c["deps"]} - want
        want |= need
        grow = bool(need)
    return [c for c in cells if c["id"] in want]


def run_cells(sweep, cells, launcher, spec_path, out, t_start, log):
    """Run the cells not done yet through ``launcher`` (``launch.py``: ``parallel`` at once), each
    once its inputs are done; a failed cell fails the cells that need it. Returns (done ids,
    {failed id: reason}, cells not run)."""
    done = {c["id"] for c in cells if os.path.isfile(sweep.result(c["id"]))}
    pending = [c for c in cells if c["id"] not in done]
    failed = {}
    log(f"spec {spec_path}: {len(cells)} cells, {len(done)} already done, {launcher.parallel} at once "
        f"({launcher.name}) -> {out}")
    running = {}
    for c in list(pending):  # jobs an earlier driver submitted that are still running: wait for them
        job = launcher.attach(c)
        if job is not None:
            pending.remove(c)
            log(f"wait  {c['id']} (job {job.job_id}, submitted before)")
            running[job] = c
    while pending or running:
        for c in list(pending):  # cells whose inputs failed cannot run
            bad = [d for d in c["deps"] if d in failed]
            if bad:
                failed[c["id"]] = f"needs {', '.join(bad)}, which failed"
                pending.remove(c)
        for c in list(pending):
            if len(running) >= launcher.parallel:
                break
            if all(d in done for d in c["deps"]):
                pending.remove(c)
                log(f"start {c['id']}")
                running[launcher.submit(sweep.run_cell, c)] = c
        if not running:
            break
        for fut in launcher.wait(running):
            c = running.pop(fut)
            try:
                res = fut.result()
                done.add(c["id"])
                acc = res["eval"]["accuracy"]
                log(f"done  {c['id']} in {res['wall_s']:.0f}s: "
                    + " ".join(f"{k}={v:.4f}" for k, v in acc.items()))
            except Exception as e:  # noqa: BLE001 - one failed cell must not stop the sweep
                failed[c["id"]] = str(e)
                log(f"FAIL  {c['id']}: {e}")
        write_summary(sweep, cells, failed, t_start, False)
    launcher.close()
    return done, failed, pending


def main(argv=None):
    p = argparse.ArgumentParser(description="Run the sweep of a spec (resumable); see docs/reproduction.md.")
    p.add_argument("--spec", default=os.path.join(HERE, "paper_findings.yaml"), help="sweep spec YAML")
    p.add_argument("--quick", action="store_true", help="use experiments/quick.yaml: a tiny end-to-end run")
    p.add_argument("--out", help="output folder (default runs/experiments/<spec name>)")
    p.add_argument("--parallel", type=int, help="cells at once (default: the spec's)")
    p.add_argument("--only", help="comma-separated id prefixes: run only these cells (and what they need)")
    p.add_argument("--dry-run", action="store_true", help="print the cells and their commands, run nothing")
    p.add_argument("--launcher", default="local", choices=("local", "submitit-local", "slurm"),
                   help="where cells run: threads here (default), or submitit jobs (launch.py)")
    p.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                   help="a submitit parameter for the jobs, e.g. slurm_partition=gpu, timeout_min=240; repeatable")
    args = p.parse_args(argv)
    spec_path = os.path.join(HERE, "quick.yaml") if args.quick else args.spec
    with open(spec_path) as f:
        spec = yaml.safe_load(f)
    out = args.out or os.path.join(ROOT, "runs", "experiments", spec["name"])
    cells = select(plan(spec), args.only)
    sweep = Sweep(spec, out)
    if args.dry_run:
        for c in cells:
            print(f"# {c['id']}  finding {c['finding']}  deps {c['deps']}")
            for cmd in sweep.commands(c):
                print("  " + shlex.join(cmd))
        print(f"{len(cells)} cells")
        return 0
    os.makedirs(os.path.join(out, "cells"), exist_ok=True)
    prepare_data(spec)
    if any(c["kind"] == "autoattack" for c in cells) and not autoattack_available():
        print("autoattack is not available (eval.py or pyautoattack): skipping the AutoAttack cells", flush=True)
        spec["autoattack_skipped"] = True
        cells = [c for c in cells if c["kind"] != "autoattack"]
    parallel = args.parallel or spec.get("parallel", 1)
    t_start = time.time()
    with RunFolder(out).locked(), open(os.path.join(out, "sweep.log"), "a") as logf:  # one sweep per folder;
        # each cell's run folder is owned in turn by the script running in it

        def log(msg):
            line = f"{time.strftime('%H:%M:%S')} [{time.time() - t_start:7.1f}s] {msg}"
            print(line, flush=True)
            logf.write(line + "\n")
            logf.flush()

        launcher = make_launcher(args.launcher, parallel, out, dict(_param(kv) for kv in args.slurm))
        done, failed, pending = run_cells(sweep, cells, launcher, spec_path, out, t_start, log)
        write_summary(sweep, cells, failed, t_start, not pending and not failed)
        log(f"finished: {len(done)} done, {len(failed)} failed, {len(pending)} not run; summary {out}/summary.json")
    return 1 if failed else 0


def _param(kv):
    """``KEY=VALUE`` -> (KEY, the value read as YAML: numbers stay numbers)."""
    key, sep, value = kv.partition("=")
    if not sep:
        raise SystemExit(f"--slurm {kv!r}: expected KEY=VALUE")
    return key, yaml.safe_load(value)


if __name__ == "__main__":
    sys.exit(run_cli(main))
