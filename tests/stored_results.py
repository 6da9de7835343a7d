"""Sweep summaries rebuilt from the rows stored under docs/results/*.json, so that the reports can
be regenerated without the sweeps' folders.

The rows hold every figure the sections print, except these, taken from the committed docs:
- Finding 5's lr per epoch (the runs' metrics.jsonl), read back from the lr table of
  docs/results/pruning_methods.md and written as one metrics.jsonl per row it names;
- the four AutoAttack cells of Finding 2, re-run with the reference AutoAttack after the rows were
  stored (``REFERENCE_AA``), with the library's name, and the evaluation attack's eps and step.
Cells the rows do not include (Finding 5's pretraining and AutoAttack cells) get fixed wall times
that give the section's cost line; the paper sweep's training times and invocation time, which
only its Cost section (not compared) prints, are placeholders.
"""
import json
import os
import re

import yaml


def _spec(root, name):
    with open(os.path.join(root, "experiments", f"{name}.yaml")) as f:
        return yaml.safe_load(f)


def _kind(cid):
    base = cid[:-3] if cid.endswith("-aa") else cid
    if base != cid:
        return "autoattack"
    for prefix, kind in (("pre-", "pretrain"), ("natadmm-", "admm"), ("admm-", "admm"), ("inherit-", "inherited"),
                         ("oneshot-", "oneshot")):
        if cid.startswith(prefix):
            return kind
    raise ValueError(cid)


# The four AutoAttack cells of Finding 2 were re-run with the reference AutoAttack after the compact
# rows were stored (the rows hold torchattacks' 57 / 46 / 46 / 42); RESULTS.md shows the re-run.
REFERENCE_AA = {"pre-adv-w8-s0-aa": 0.54, "admm-irregular-w2count-s0-aa": 0.45, "pre-adv-w2-s0-aa": 0.45,
                "inherit-w2-from-w8-s0-aa": 0.40}


def paper(root, out, rerun_aa=True):
    rows = json.load(open(os.path.join(root, "docs", "results", "paper_findings.json")))
    lib = {"library": "pyautoattack 0.2.0", "version": "standard", "attacks": ["apgd-ce", "apgd-t", "fab-t", "square"]}
    cells = []
    for r in rows:
        kind = _kind(r["id"])
        ev = {"accuracy": r["accuracy"], "worst_case": r["worst_case"], "n_examples": r["n_examples"],
              "sparsity": {"layers": [{"nonzero": r["nonzero_weights"]}]}, "attack": {"eps": 0.1, "step_size": 0.01}}
        if kind == "autoattack":
            ev["autoattack"] = {"autoattack": lib}
            if rerun_aa:
                ev["accuracy"] = {**r["accuracy"], "autoattack": REFERENCE_AA[r["id"]]}
        cells.append({"id": r["id"], "finding": r["finding"], "kind": kind, "seed": r["seed"], "meta": r["meta"],
                      "deps": [], "commands": r["commands"], "wall_s": r["wall_s"], "train_wall_s": 0.0, "eval": ev})
    ids = [c["id"] for c in cells]
    return {"spec": _spec(root, "paper_findings"), "out": out, "planned": ids, "done": ids, "failed": {},
            "missing": [], "wall_s_this_invocation": 3390.0, "finished": True, "cells": cells}


def _lr_table(root):
    """{(variant, row label): [lr per epoch]} from the committed Finding 5 section."""
    out = {}
    for line in open(os.path.join(root, "docs", "results", "pruning_methods.md")):
        m = re.match(r"\| (main|const|split|restarts) \| (.+?) \| (\d.*) \|$", line.rstrip("\n"))
        if m:
            lrs = [float(x) for x in m.group(3).split(" | ")]
            for name in re.split(r", (?![^(]*\))", m.group(2)):
                out[(m.group(1), name)] = lrs
    return out


def arena(root, out):
    import sys
    sys.path.insert(0, os.path.join(root, "experiments"))
    from methods_report import label  # the row names the lr table uses
    spec = _spec(root, "arena")
    rows = json.load(open(os.path.join(root, "docs", "results", "pruning_methods.json")))
    lrs, cells = _lr_table(root), []
    for seed in spec["seeds"]:
        cells.append({"id": f"pre-adv-w4-s{seed}", "finding": [5], "kind": "pretrain", "seed": seed,
                      "meta": {"width": 4, "training": "adversarial"}, "wall_s": 80.0, "eval": {}})
    for r in rows:
        conv = {} if r["energy"] != r["energy"] else {"retrain": {"pruned_energy": {"fc1.weight": r["energy"]}}}
        meta = {k: r[k] for k in ("method", "allocation", "variant", "target")}
        acc = {"natural": r["natural"]} if r["pgd"] is None else {"natural": r["natural"], "pgd": r["pgd"]}
        cells.append({"id": r["id"], "finding": [5], "kind": r["method"], "seed": r["seed"], "meta": meta,
                      "wall_s": r["wall_s"], "eval": {"accuracy": acc, "convergence": conv,
                                                       "sparsity": {"overall": r["sparsity"]}}})
        if r["autoattack"] is not None:
            cells.append({"id": r["id"] + "-aa", "finding": [5], "kind": "autoattack", "seed": r["seed"], "meta": meta,
                          "wall_s": 251.0, "eval": {"accuracy": {"natural": r["natural"], "pgd": r["aa_pgd"],
                                                                 "autoattack": r["autoattack"]}}})
        if (r["variant"], label(r)) in lrs and r["seed"] == 0:
            rd = os.path.join(out, "runs", r["id"])
            os.makedirs(rd, exist_ok=True)
            with open(os.path.join(rd, "metrics.jsonl"), "w") as f:
                for lr in lrs[(r["variant"], label(r))]:
                    f.write(json.dumps({"kind": "epoch", "stage": "retrain", "lr": lr}) + "\n")
    ids = [c["id"] for c in cells]
    return {"spec": spec, "out": out, "planned": ids, "done": ids, "failed": {}, "missing": [],
            "wall_s_this_invocation": 1.0, "finished": True, "cells": cells}


def quantization(root, out):
    spec = _spec(root, "quantization")
    rows = json.load(open(os.path.join(root, "docs", "results", "quantization.json")))
    cells = []
    for r in rows:
        kind = {"dense": "pretrain", "pruned": "pruned"}.get(r["method"], "quantize")
        sb = {"dense_float32": r["storage_bits"]} if kind == "pretrain" else {"export": r["storage_bits"]}
        conv = {} if r["energy"] != r["energy"] else {"quantize": {"quantized_energy": {"fc1.weight": r["energy"]}}}
        meta = {"method": r["method"], "bits": r["bits"]} if kind == "quantize" else {}
        cells.append({"id": r["id"], "finding": [6], "kind": kind, "seed": r["seed"], "meta": meta,
                      "wall_s": r["wall_s"], "train_wall_s": r["train_s"],
                      "eval": {"accuracy": {"natural": r["natural"], "pgd": r["pgd"]}, "storage_bits": sb,
                               "convergence": conv}})
    ids = [c["id"] for c in cells]
    return {"spec": spec, "out": out, "planned": ids, "done": ids, "failed": {}, "missing": [],
            "wall_s_this_invocation": 1.0, "finished": True, "cells": cells}


def write_all(root, dest):
    """The three summaries under ``dest``/<name>/summary.json; returns their paths."""
    paths = {}
    for name, fn in (("paper_findings", paper), ("arena", arena), ("quantization", quantization)):
        d = os.path.join(dest, name)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "summary.json"), "w") as f:
            json.dump(fn(root, d), f, indent=1)
        paths[name] = os.path.join(d, "summary.json")
    d = os.path.join(dest, "paper_findings_as_stored")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "summary.json"), "w") as f:
        json.dump(paper(root, d, rerun_aa=False), f, indent=1)
    paths["paper_findings_as_stored"] = os.path.join(d, "summary.json")
    return paths
