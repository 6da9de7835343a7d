"""Run a sweep that tests the findings of ``findings.py``, one cell at a time, with the real scripts.

    python experiments/sweep.py                                   # experiments/paper_findings.yaml
    python experiments/sweep.py --quick --out /tmp/quick          # tiny end-to-end version (~2 min)
    python experiments/sweep.py --dry-run                         # print the cells and commands

A spec (YAML, see ``paper_findings.yaml``; checked by ``spec.py``) names a base config, seeds
and the sizes of each finding; ``plan`` asks each finding whose section the spec has for its
cells. A cell is a short list of commands (``adv_main.py`` / ``main.py`` stages, the
inherited-init builder) followed by ``eval.py --json``; it depends on the cells whose checkpoints
it starts from. Every command runs as a subprocess with ``OMP_NUM_THREADS=1``; ``parallel``
cells run at once.

Resumable: a cell whose ``cells/<id>.json`` holds its record is skipped (an empty or damaged one
runs again); inside a cell a stage whose checkpoint exists is skipped and a stage that was cut
off continues with ``--resume``. After every cell ``summary.json`` is rewritten (all finished
cells, the plan, what failed), so the report can be made from a sweep that is still running.

Across sessions, where the run folders do not last: a spec's ``record`` names a file in the
repository that keeps every finished cell's record (commit it). A sweep restores the cells it
holds as done. The checkpoints that cells still to run need are kept beside the record (commit
them too) and put back; one that is not there runs again, just before the first cell that needs
it, and should give the figures of its record (the scripts are deterministic on one machine at
one thread; another CPU's float sums can differ, and the cells that start from such a rebuilt
checkpoint say so in their records).

Output folder (default ``runs/experiments/<spec name>``): ``cells/<id>.json``, ``summary.json``,
``sweep.log``, and one run folder per cell under ``runs/<id>/`` (checkpoints, logs).
"""
import argparse
import difflib
import fnmatch
import gzip
import json
import os
import shlex
import subprocess
import sys
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON = sys.executable
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)  # launch.py, also when this module is imported (tests)
from common import UserError, atomic_write, load_checkpoint, run_cli  # noqa: E402
from training.rundir import RunFolder  # noqa: E402
from launch import make_launcher  # noqa: E402
from cells import matched_ratios, weight_counts  # noqa: E402,F401 - the plan's helpers, also used from here
from findings import FINDINGS  # noqa: E402
from frame import Cells  # noqa: E402
from spec import load_spec  # noqa: E402


# --------------------------------------------------------------------------- the plan

def plan(spec):
    """The cells of ``spec``, in its priority order: those of every finding (``findings.py``)
    whose section the spec has (findings 1-4: ``widths`` and the keys after it; 5: ``arena``; 6:
    ``quantization``).

    A cell: {id, finding, kind, seed, meta, steps, ckpt, deps}. A step is either a training
    stage {script, stage, init (None = the run folder's previous stage), sets} or
    {inherit: source ckpt, width}."""
    cells = Cells()
    for finding in FINDINGS:
        if finding.key in spec:
            finding.plan(spec, cells)
    return _finish_plan(spec, cells.cells)


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
        self.record = os.path.join(ROOT, spec["record"]) if spec.get("record") else None
        self.keep = os.path.splitext(self.record)[0] + "_checkpoints" if self.record else None

    def run_dir(self, cid):
        return os.path.join(self.out, "runs", cid)

    def result(self, cid):
        return os.path.join(self.out, "cells", f"{cid}.json")

    def kept(self, cid):
        """Where the checkpoint of ``cid`` is kept beside the record (``keep_inputs``)."""
        return os.path.join(self.keep, f"{cid}.pt.gz")

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

    def output(self, cell):
        """The checkpoint ``cell`` evaluates: its own run's final one (or, for an AutoAttack cell,
        the cell's it attacks). The cells that depend on ``cell`` start from it."""
        return self.resolve(cell, cell["ckpt"]) if isinstance(cell["ckpt"], tuple) else \
            os.path.join(self.run_dir(cell["id"]), cell["ckpt"])

    def eval_command(self, cell):
        e, ckpt = self.spec["eval"], self.output(cell)
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
        res.update(_from_metrics(rd))
        write_json(self.result(cell["id"]), res)
        return res


def write_json(path, obj):
    """Write ``obj`` to ``path`` whole or not at all (a temporary file, then a rename)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def _from_metrics(rd):
    """What a cell's record keeps of its run's ``metrics.jsonl``: "val", the validation figures
    (data.val_size) {natural, pgd, stage, epoch} of the last epoch row that has them (the final
    model's, measured at the last stage's end) and the pretraining curve [[epoch, val_pgd], ...]
    when it stopped on them, which choices between cells read; "lrs", the lr of every epoch after
    pretraining, the proof that schedules are equal. A key is left out when the run has none."""
    path, rows = os.path.join(rd, "metrics.jsonl"), []
    if os.path.isfile(path):
        with open(path) as f:
            rows = [r for r in map(json.loads, f) if r.get("kind") == "epoch"]
    out = {}
    lrs = [r["lr"] for r in rows if not r["stage"].startswith("pretrain")]
    val = [r for r in rows if "val_pgd" in r]
    if val:
        last = val[-1]
        out["val"] = {"natural": last["val_natural"], "pgd": last["val_pgd"], "stage": last["stage"],
                      "epoch": last["epoch"]}
        curve = [[r["epoch"], r["val_pgd"]] for r in val if r["stage"] == "pretrain"]
        if len(curve) > 1:
            out["val"]["pretrain_curve"] = curve
    if lrs:
        out["lrs"] = lrs
    return out


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


def read_cell(path):
    """The record ``cells/<id>.json`` of a finished cell, or None when it is missing, empty or
    damaged (such a cell is not done: it runs again)."""
    try:
        with open(path, encoding="utf-8") as f:
            r = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return r if isinstance(r, dict) and isinstance(r.get("eval"), dict) and "id" in r else None


def write_summary(sweep, cells, failed, t_start, done_now):
    results = []
    for c in cells:
        r = read_cell(sweep.result(c["id"]))
        if r is not None:
            # what the plan says the cell serves now (a spec can gain a finding that shares a
            # cell finished before), not what it said when the cell ran
            results.append({**r, "finding": c["finding"]})
    done = {r["id"] for r in results}
    summary = {"spec": sweep.spec, "out": sweep.out, "planned": [c["id"] for c in cells],
               "done": [r["id"] for r in results], "failed": failed,
               "missing": [c["id"] for c in cells if c["id"] not in done and c["id"] not in failed],
               "wall_s_this_invocation": round(time.time() - t_start, 1), "finished": done_now,
               "cells": results}
    write_json(os.path.join(sweep.out, "summary.json"), summary)
    if sweep.record:
        write_record(sweep, results)


# --------------------------------------------------------------------------- the record

def stored(sweep):
    """{id: record} of the spec's ``record`` file (none yet: {})."""
    if not sweep.record or not os.path.isfile(sweep.record):
        return {}
    with open(sweep.record, encoding="utf-8") as f:
        return {c["id"]: c for c in json.load(f)["cells"]}


def write_record(sweep, results):
    """The spec's ``record``: a file in the repository that keeps every finished cell's record
    (the ones stored before, updated by ``results``; only cells the spec still plans), sorted by
    id, with the spec and the planned ids: the summary the report reads, and what a later session
    starts from where the run folders are gone. Its commands name the sweep's folder ``{out}``,
    the repository ``.`` and the interpreter ``python``, so it holds no machine's paths."""
    planned = [c["id"] for c in plan(sweep.spec)]
    cells = {**stored(sweep), **{r["id"]: r for r in results}}
    cells = {k: {**cells[k], "commands": [portable(sweep, cmd) for cmd in cells[k].get("commands", [])]}
             for k in sorted(cells) if k in planned}
    write_json(sweep.record, {"spec": sweep.spec, "planned": planned, "cells": list(cells.values())})


def portable(sweep, cmd):
    """A recorded command line without this machine's paths (``write_record``)."""
    return cmd.replace(sweep.out, "{out}").replace(PYTHON + " ", "python ").replace(ROOT + os.sep, "")


def restore(sweep, cells, log):
    """Put the records of ``cells`` that the spec's ``record`` holds and ``cells/`` does not back
    into ``cells/``: those cells are done. Their checkpoints are rebuilt only where a cell still
    to run needs one (``run_cells``)."""
    kept = stored(sweep)
    back = [c["id"] for c in cells if c["id"] in kept and read_cell(sweep.result(c["id"])) is None]
    for cid in back:
        write_json(sweep.result(cid), kept[cid])
    if back:
        log(f"{len(back)} finished cells restored from {os.path.relpath(sweep.record, ROOT)}")


def select(cells, only):
    """The cells whose ids start with one of the comma-separated prefixes ``only`` (all if None),
    and every cell they need."""
    if not only:
        return cells
    prefixes = [p for p in only.split(",") if p]
    want = {c["id"] for c in cells if any(c["id"].startswith(p) for p in prefixes)}
    if not want:
        ids = [c["id"] for c in cells]
        close = sorted({i for p in prefixes for i in difflib.get_close_matches(p, ids, n=5, cutoff=0.4)})
        raise UserError(f"--only {only}: no cell id starts with it; "
                        + (f"close ids: {', '.join(close[:8])}" if close else f"ids look like {', '.join(ids[:3])}")
                        + " (--dry-run lists them all)")
    grow = True
    while grow:
        need = {d for c in cells if c["id"] in want for d in c["deps"]} - want
        want |= need
        grow = bool(need)
    return [c for c in cells if c["id"] in want]


def run_cells(sweep, cells, launcher, spec_path, out, t_start, log):
    """Run the cells not done yet through ``launcher`` (``launch.py``: ``parallel`` at once), each
    once its inputs are done; a failed cell fails the cells that need it. A done cell whose
    checkpoint a cell still to run needs is kept beside the record (``keep_inputs``); one that is
    neither here nor kept (a record restored from an earlier session) runs again just before the
    first cell that needs it (``requeue_lost``, ``check_again``). Returns (done ids, {failed id:
    reason}, cells not run)."""
    by_id = {c["id"]: c for c in cells}
    done = {c["id"] for c in cells if read_cell(sweep.result(c["id"])) is not None}
    pending = [c for c in cells if c["id"] not in done]
    failed, again = {}, {}  # again: {id: its record} of the done cells that run again for their checkpoint
    for c in pending:
        if os.path.exists(sweep.result(c["id"])):
            log(f"warning: {sweep.result(c['id'])} is empty or damaged: the cell runs again")
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
        keep_inputs(sweep, by_id, done, pending, log)
        requeue_lost(sweep, by_id, done, pending, again, log)
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
                if c["id"] in again:  # its first record stays: the rebuilt figures join it
                    check_again(sweep, again.pop(c["id"]), res, log)
                else:
                    name_rebuilt_inputs(sweep, c, res)
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


def requeue_lost(sweep, by_id, done, pending, again, log):
    """A done cell whose checkpoint a pending cell needs and is not here (a record restored from an
    earlier session) goes back into ``pending`` just before the first cell that needs it, so it
    runs in that cell's turn of the spec's priority order; its record is kept in ``again``.
    Repeated until none is left, so a lost input's own lost inputs run before it."""
    while True:
        lost = next(((c, d) for c in pending for d in c["deps"]
                     if d in done and not os.path.isfile(sweep.output(by_id[d]))), None)
        if lost is None:
            return
        c, d = lost
        done.discard(d)
        again[d] = read_cell(sweep.result(d))
        pending.insert(pending.index(c), by_id[d])
        log(f"again {d}: {c['id']} needs its checkpoint, which is not here; it runs again "
            "and should give its recorded figures")


def check_again(sweep, record, res, log):
    """A cell that ran again to rebuild its checkpoint keeps its first record (the cells that
    finished before started from that model). Its new figures should equal it: the scripts are
    deterministic on one machine at one thread. Another CPU's float sums can give other ones; then
    the cells still to run start from the rebuilt checkpoint: its record keeps the rebuilt figures
    (``rebuilt``), and theirs name it (``name_rebuilt_inputs``), so the report can say which did."""
    new, old = res["eval"]["accuracy"], record["eval"]["accuracy"]
    record = {k: v for k, v in record.items() if k != "rebuilt"}  # an earlier rebuild's figures: replaced
    if new != old:
        record["rebuilt"] = new
    write_json(sweep.result(record["id"]), record)
    if new != old:
        log(f"note  {record['id']} ran again for its checkpoint and gave {new} against its record {old} "
            "(another CPU?): the cells still to run start from the rebuilt checkpoint, and their records say so")


def name_rebuilt_inputs(sweep, cell, res):
    """``cell``'s record names the inputs it started from that were rebuilt with other figures
    than their records (``check_again``): ``rebuilt_inputs``, {id: {"record", "rebuilt"}}."""
    inputs = {d: read_cell(sweep.result(d)) for d in cell["deps"]}
    rebuilt = {d: {"record": r["eval"]["accuracy"], "rebuilt": r["rebuilt"]}
               for d, r in inputs.items() if r and "rebuilt" in r}
    if rebuilt:
        write_json(sweep.result(cell["id"]), {**res, "rebuilt_inputs": rebuilt})


def keep_inputs(sweep, by_id, done, pending, log):
    """With a ``record``: the checkpoint of each done cell that a cell still to run needs is kept
    beside the record (``Sweep.kept``; gzip, without the optimizer's state, which no later cell
    reads: ~0.8 MB for a dense LeNet w4, ~0.1 MB pruned), and put back into its run folder where
    that is gone. A later session, on whatever machine, then starts those cells from the very model
    the finished ones started from. Commit the folder with the record."""
    if sweep.keep is None:
        return
    for d in sorted({d for c in pending for d in c["deps"] if d in done}):
        path, kept = sweep.output(by_id[d]), sweep.kept(d)
        if os.path.isfile(path) and not os.path.isfile(kept):
            keep_checkpoint(path, kept)
        elif not os.path.isfile(path) and os.path.isfile(kept):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with gzip.open(kept, "rb") as f:
                data = f.read()
            atomic_write(path, lambda f: f.write(data))
            log(f"put back {d}'s checkpoint from {os.path.relpath(kept, ROOT)}")


def keep_checkpoint(path, kept):
    """``path`` without its optimizer state, gzipped to ``kept`` (written whole or not at all)."""
    import io

    import torch
    ckpt = load_checkpoint(path)
    ckpt.pop("optimizer", None)
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    os.makedirs(os.path.dirname(kept), exist_ok=True)
    atomic_write(kept, lambda f: f.write(gzip.compress(buf.getvalue(), mtime=0)))


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
    if args.parallel is not None and args.parallel < 1:
        raise UserError(f"--parallel must be >= 1, got {args.parallel}")
    spec_path = os.path.join(HERE, "quick.yaml") if args.quick else args.spec
    spec = load_spec(spec_path)
    out = args.out or os.path.join(ROOT, "runs", "experiments", spec["name"])
    try:
        planned = plan(spec)
    except ValueError as e:
        raise UserError(f"{spec_path}: {e}")
    cells = select(planned, args.only)
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

        restore(sweep, cells, log)
        launcher = make_launcher(args.launcher, parallel, out, dict(_param(kv) for kv in args.slurm))
        done, failed, pending = run_cells(sweep, cells, launcher, spec_path, out, t_start, log)
        write_summary(sweep, cells, failed, t_start, not pending and not failed)
        log(f"finished: {len(done)} done, {len(failed)} failed, {len(pending)} not run; summary {out}/summary.json")
    return 1 if failed else 0


def _param(kv):
    """``KEY=VALUE`` -> (KEY, the value read as YAML: numbers stay numbers)."""
    key, sep, value = kv.partition("=")
    if not sep:
        raise UserError(f"--slurm {kv!r}: expected KEY=VALUE")
    return key, yaml.safe_load(value)


if __name__ == "__main__":
    sys.exit(run_cli(main))
