"""End-to-end: the real scripts, run as a user runs them, on a slice of the bundled real digits
and on synthetic CIFAR-shaped data."""
import json
import os
import sys

import pytest
import forkserver
from helpers import ROOT, run_script, script_env


# A small but real run: 500 training digits, short stages, a small eps and weak PGD for speed.
FAST = ["data.train_limit=500", "pretrain.epochs=5", "pretrain.lr=0.005", "admm.epochs=2", "retrain.epochs=2",
        "adv.eps=0.1", "adv.steps=3", "adv.step_size=0.05", "eval.steps=5", "eval.step_size=0.025",
        "eval.limit=300"]


def run(script, *args):
    proc = forkserver.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=script_env())
    return proc


def train(script, out, *overrides, config="configs/demo.yaml"):
    sets = [a for o in (*FAST, *overrides) for a in ("--set", o)]
    proc = run(script, "--config", config, "--out", str(out), *sets)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def evaluate(ckpt, tmp_path, *args):
    js = tmp_path / "eval.json"
    proc = run("eval.py", "--ckpt", str(ckpt), "--json", str(js), *args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(js.read_text()), proc.stdout


def expected_zero_groups(layer, scheme):
    out, rest = layer["shape"][0], layer["params"] // layer["shape"][0]
    n = {"irregular": layer["params"], "filter": out, "column": rest}[scheme]
    return round(layer["ratio"] * n), n


@pytest.mark.parametrize("script,scheme", [("adv_main.py", "irregular"), ("main.py", "filter"), ("main.py", "column")])
def test_all_stages_hit_target_sparsity(tmp_path, script, scheme):
    out = tmp_path / "run"
    # Filter pruning of the output layer would delete classes, so prune only hidden filters there.
    ratios = ["prune.prune_ratios={conv1.weight: 0.5, conv2.weight: 0.8, fc1.weight: 0.9, fc2.weight: 0.0}"] \
        if scheme == "filter" else []
    proc = train(script, out, f"prune.sparsity_type={scheme}", *ratios)
    for stage in ("pretrain", "admm", "retrain"):
        assert (out / f"{stage}.pt").is_file()
    assert "final model" in proc.stdout and "natural=" in proc.stdout  # the closing eval table
    log = (out / "log.txt").read_text()
    assert "admm update after epoch 2" in log and "||W-Z||/||W||" in log

    rep, text = evaluate(out / "retrain.pt", tmp_path, "--attacks", "natural,fgsm,pgd", "--limit", "300",
                         "--steps", "5", "--step-size", "0.05")
    assert rep["n_examples"] == 300 and rep["partial"] is True
    assert rep["sparsity"]["type"] == scheme
    pruned = [L for L in rep["sparsity"]["layers"] if L["ratio"] > 0]
    assert {L["name"] for L in pruned} >= {"conv1.weight", "conv2.weight", "fc1.weight"}
    for L in pruned:
        k, n = expected_zero_groups(L, scheme)
        measured = L[{"irregular": "element", "filter": "filter", "column": "column"}[scheme]]
        assert abs(measured * n - k) <= 1, (L["name"], measured * n, k)
    acc = rep["accuracy"]
    assert acc["natural"] > 0.3  # chance is 0.1; 0.54-0.78 seen on 500 digits (column, filter, irregular)
    assert acc["pgd"] <= acc["natural"]
    assert set(acc) == {"natural", "fgsm", "pgd"}
    assert 0 < rep["sparsity"]["overall"] < 1 and rep["sparsity"]["compression_rate"] > 1
    # eval.py at its defaults repeats the run's own final report: the same examples, attacks and random starts
    run_rep = json.loads((out / "eval.json").read_text())
    assert evaluate(out / "retrain.pt", tmp_path, "--no-checks")[0]["accuracy"] == run_rep["accuracy"]


@pytest.mark.parametrize("arch", ["vgg16", "resnet18"])
def test_cifar_config_runs_on_synthetic_data(tmp_path, arch):
    out = tmp_path / arch
    proc = run("adv_main.py", "--config", "configs/cifar10.yaml", "--out", str(out),
               *[a for o in ("data.synthetic=true", "data.train_limit=64", "data.batch_size=32",
                             f"model.arch={arch}", "model.width=1", "pretrain.epochs=1", "admm.epochs=1",
                             "retrain.epochs=1", "adv.steps=1", "eval.steps=1", "eval.limit=32",
                             "prune.update_every=1") for a in ("--set", o)])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rep, _ = evaluate(out / "retrain.pt", tmp_path, "--limit", "32", "--steps", "1")
    for L in rep["sparsity"]["layers"]:
        if L["ratio"] > 0:
            assert abs(L["element"] * L["params"] - round(L["ratio"] * L["params"])) <= 1


def test_single_stage_needs_its_input(tmp_path):
    proc = run("adv_main.py", "--config", "configs/demo.yaml", "--stage", "admm", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2
    assert "pretrain.pt" in proc.stderr and "--init" in proc.stderr and "Traceback" not in proc.stderr


def test_stage_by_stage_with_init(tmp_path):
    out = tmp_path / "a"
    train("main.py", out)
    # Re-run only the retrain stage of another folder, starting from the first run's ADMM result.
    other = tmp_path / "b"
    sets = [a for o in FAST for a in ("--set", o)]
    proc = run("main.py", "--config", "configs/demo.yaml", "--stage", "retrain", "--out", str(other),
               "--init", str(out / "admm.pt"), *sets)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (other / "retrain.pt").is_file() and not (other / "pretrain.pt").exists()


def test_eval_rejects_bad_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    proc = run_script("eval.py", "--ckpt", str(bad))
    assert proc.returncode == 2 and "cannot load checkpoint" in proc.stderr and "Traceback" not in proc.stderr

