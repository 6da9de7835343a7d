"""The experiments driver: inherited initialization, matched pruning ratios, and a --quick sweep
end to end (cells, summary, report tables and plots). These test the driver, not the paper's numbers."""
import gzip
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import forkserver
from helpers import ROOT, SCRIPT_ENV, script_env

sys.path.insert(0, os.path.join(ROOT, "experiments"))
from inherit import inherit, inherited_checkpoint  # noqa: E402
from sweep import matched_ratios, plan, weight_counts  # noqa: E402

from common import load_checkpoint, save_checkpoint  # noqa: E402
from config import load_config  # noqa: E402
from data import INFO  # noqa: E402
from models import load_weights, model_from_config  # noqa: E402
from models import build_model  # noqa: E402
from models.lenet import LeNet  # noqa: E402


def scrambled(model, shape=(1, 28, 28)):
    """``model`` in eval mode with every parameter scaled by a random factor in [0.5, 1.5) (distinct
    norms, so no kept set is decided by ties), BN statistics measured on random images of
    ``shape`` ([C, H, W]) and random BN shifts, so that a channel's BN output is not zero."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(torch.rand_like(p) + 0.5)
        for m in bns:
            m.momentum = None  # cumulative average over the calibration batch
        model.train()(torch.rand(32, *shape))
        for m in bns:
            m.momentum = 0.1
            m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def _top(rows, k):  # the inherited initialization before it was generic (frozen copy, LeNet only)
    return torch.topk(rows.flatten(1).norm(dim=1), k).indices.sort().values


def _old_inherit_lenet(state, width_small):
    w1, b1, w2, b2 = state["conv1.weight"], state["conv1.bias"], state["conv2.weight"], state["conv2.bias"]
    f1, c1, f2 = state["fc1.weight"], state["fc1.bias"], state["fc2.weight"]
    spatial = f1.shape[1] // w2.shape[0]
    k1 = _top(w1, 2 * width_small)
    w2k = w2[:, k1]
    k2 = _top(w2k, 4 * width_small)
    f1k = f1[:, (k2[:, None] * spatial + torch.arange(spatial)).flatten()]
    k3 = _top(f1k, 64 * width_small)
    out = {k: v.clone() for k, v in state.items()}
    out.update({"conv1.weight": w1[k1], "conv1.bias": b1[k1], "conv2.weight": w2k[k2], "conv2.bias": b2[k2],
                "fc1.weight": f1k[k3], "fc1.bias": c1[k3], "fc2.weight": f2[:, k3]})
    return out, {"conv1": k1.tolist(), "conv2": k2.tolist(), "fc1": k3.tolist()}


def test_inherited_lenet_is_bit_identical_to_the_original_formula():
    state = scrambled(LeNet(width=8)).state_dict()
    new, kept = inherit(state, LeNet(width=2))
    old, old_kept = _old_inherit_lenet(state, 2)
    assert kept == old_kept and new.keys() == old.keys()
    for k in old:  # same dtype, shape and bits (equal as integers, so -0.0 != 0.0 and NaNs compare)
        assert new[k].dtype == old[k].dtype and torch.equal(new[k].view(torch.int32), old[k].view(torch.int32)), k


@pytest.mark.parametrize("arch,image", [("vgg16", 32), ("resnet18", 32), ("lenet", 28)])
def test_inherited_narrow_model_is_the_wide_one_with_dropped_channels_zeroed(arch, image):
    c = 1 if arch == "lenet" else 3
    wide = scrambled(build_model(arch, 2, in_channels=c, image_size=image), (c, image, image))
    state, kept = inherit(wide.state_dict(), build_model(arch, 1, in_channels=c, image_size=image))
    narrow = build_model(arch, 1, in_channels=c, image_size=image)
    narrow.load_state_dict(state, strict=True)
    mods = dict(wide.named_modules())
    with torch.no_grad():  # a dropped channel with zero filter, bias, BN scale and shift is 0 after ReLU
        for g in wide.channel_groups():
            n = mods[g.producers[0][0]].weight.shape[0]
            assert len(kept[g.name]) == n // 2, g.name  # every layer's width is proportional to w
            drop = torch.ones(n, dtype=torch.bool)
            drop[kept[g.name]] = False
            for layer, bn in g.producers:
                for p in (mods[layer].weight, mods[layer].bias, *((mods[bn].weight, mods[bn].bias) if bn else ())):
                    if p is not None:
                        p[drop] = 0
    x = torch.rand(4, c, image, image)
    with torch.no_grad():
        ref, out = wide(x), narrow.eval()(x)
    assert ref.std(0).max() > 1e-3 * ref.abs().max()  # depends on the input: a real comparison
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-5


def test_resnet_stream_channel_is_scored_by_all_its_writers():
    # layer1's stream (8 channels at w=2, 4 kept at w=1), written by the stem and both blocks' conv2.
    # Channel 0's filters are 0.9 everywhere in two writers (squares summed: 1.62 per weight), channels
    # 1-4's are 1.0-1.15 in one writer: summing keeps 0, 2, 3, 4; the largest single norm would keep 1-4.
    wide = build_model("resnet18", 2, in_channels=3, image_size=32)
    convs = (wide.conv1.weight, wide.layer1[0].conv2.weight, wide.layer1[1].conv2.weight)
    with torch.no_grad():
        for w in convs:
            w.zero_()
        for w in convs[1:]:  # constant filters: the same norm whatever inputs the inner groups keep
            w[0] = 0.9
        for c, norm in zip(range(1, 5), (1.0, 1.05, 1.1, 1.15)):
            convs[1][c] = norm
    kept = inherit(wide.state_dict(), build_model("resnet18", 1, in_channels=3, image_size=32))[1]
    assert kept["conv1 + layer1 stream"] == [0, 2, 3, 4]


@pytest.mark.parametrize("arch,dataset", [("lenet", "demo"), ("resnet18", "cifar10")])
def test_inherited_checkpoint_loads_into_the_project(arch, dataset, tmp_path):
    cfg = load_config(os.path.join(ROOT, "configs", "demo.yaml"),
                      [f"model.arch={arch}", "model.width=4", f"data.dataset={dataset}"])
    src = {"arch": arch, "width": 4, "config": cfg, "model": model_from_config(cfg, INFO[dataset], "cpu").state_dict(),
           "adversarial": True}
    path = str(tmp_path / "inherited.pt")
    save_checkpoint(inherited_checkpoint(src, 1), path)
    ckpt = load_checkpoint(path)
    assert ckpt["arch"] == arch and ckpt["width"] == 1 and ckpt["config"]["model"]["width"] == 1
    assert ckpt["masks"] is None and ckpt["inherited_from"]["width"] == 4
    narrow = model_from_config(ckpt["config"], INFO[dataset], "cpu")
    load_weights(narrow, ckpt, path, ckpt["config"])  # raises if arch/width/shapes disagree


def test_inherit_refuses_a_wider_target():
    with pytest.raises(ValueError, match="narrow model has 8 channels, the source only 4"):
        inherit(LeNet(width=2).state_dict(), LeNet(width=4))


def test_weight_counts_are_the_built_models():
    w = 3  # LeNet: conv 5x5 1 -> 2w -> 4w, fc 4w * 7 * 7 -> 64w -> 10
    assert weight_counts("lenet", w) == {"conv1.weight": 2 * w * 25, "conv2.weight": 4 * w * 2 * w * 25,
                                         "fc1.weight": 64 * w * 4 * w * 49, "fc2.weight": 10 * 64 * w}
    vgg = build_model("vgg16", 2, in_channels=3, image_size=32)
    assert sum(weight_counts("vgg16", 2, "cifar10").values()) == sum(
        m.weight.numel() for m in vgg.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def test_matched_ratios_hit_the_small_models_weight_count():
    for large, small in ((8, 2), (8, 4), (16, 1)):
        ratios = matched_ratios(large, small)
        counts = weight_counts("lenet", large)
        kept = sum(n * (1 - ratios[k]) for k, n in counts.items())
        assert abs(kept - sum(weight_counts("lenet", small).values())) < 2
        assert ratios["fc2.weight"] == 0.0  # the output layer stays dense (filter pruning)


def test_plan_shares_the_large_pretrained_model():
    import yaml
    with open(os.path.join(ROOT, "experiments", "paper_findings.yaml")) as f:
        spec = yaml.safe_load(f)
    cells = {c["id"]: c for c in plan(spec)}
    pruning = [c for c in cells.values() if c["kind"] in ("admm", "oneshot", "inherited")]
    assert pruning and all(c["deps"] == [f"pre-adv-w{spec['large_width']}-s{c['seed']}"] for c in pruning)
    assert all(d in cells for c in cells.values() for d in c["deps"])


def test_quick_sweep_end_to_end(tmp_path, monkeypatch, capsys):
    """The quick sweep and its report. The driver runs in this process; the scripts of its 58
    commands run as processes of their own, forked from one that has imported torch
    (``forkserver``), which saves about two minutes of imports."""
    import sweep
    out, docs = tmp_path / "sweep", tmp_path / "docs"
    for key, value in SCRIPT_ENV.items():  # the cells' environment (sweep.Sweep copies this one)
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(subprocess, "run", forkserver.run)

    def run(*args):
        code = sweep.main(list(args))
        return subprocess.CompletedProcess(args, code, *capsys.readouterr())
    proc = run("--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and not summary["failed"]
    assert sorted(summary["done"]) == sorted(summary["planned"])
    for cid in summary["planned"]:
        cell = json.loads((out / "cells" / f"{cid}.json").read_text())
        assert 0.0 <= cell["eval"]["accuracy"]["pgd"] <= cell["eval"]["accuracy"]["natural"] + 1e-9
    assert {f for c in summary["cells"] for f in c["finding"]} == {1, 2, 3, 4, 5, 6}
    # Finding 6: each quantized model is on its levels, smaller than the pruned float model
    cells = {c["id"]: c for c in summary["cells"]}
    float_bits = cells["pruned-adv-w1-s0"]["eval"]["storage_bits"]["export"]
    for method in ("admm", "rtn"):
        for bits in (2,):
            ev = cells[f"quant-{method}-adv-b{bits}-s0"]["eval"]
            assert all(q["bits"] == bits and q["distinct_nonzero"] <= 2 ** bits - 2 for q in ev["quantization"].values())
            assert ev["storage_bits"]["export"] < float_bits
    assert 6 in cells["pre-adv-w1-s0"]["finding"]  # the dense reference, shared with findings 1 and 5

    # Resumable: a second run finds every cell done and runs nothing.
    again = run("--quick", "--out", str(out))
    assert again.returncode == 0 and f"{len(summary['planned'])} already done" in again.stdout
    # An empty cell record is not "done": the cell runs again (its stages are done: only its evaluation).
    (out / "cells" / "pre-nat-w1-s0.json").write_text("")
    again = run("--quick", "--out", str(out))
    assert again.returncode == 0 and f"{len(summary['planned']) - 1} already done" in again.stdout
    assert "pre-nat-w1-s0.json is empty or damaged: the cell runs again" in again.stdout
    assert json.loads((out / "cells" / "pre-nat-w1-s0.json").read_text())["id"] == "pre-nat-w1-s0"

    proc = forkserver.run([sys.executable, "experiments/report.py", "--summary", str(out / "summary.json"), "--out",
                           str(docs)], cwd=ROOT, capture_output=True, text=True, timeout=600, env=script_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (docs / "RESULTS.md").read_text()
    for n in range(1, 7):
        assert f"## Finding {n}" in text
    assert "±" in text or "1 seed" in text
    section5 = (docs / "results" / "arena_fair.md").read_text()
    assert "Verdict: " in section5 and "| 4 | 90 % | one-shot | 0: " in section5  # a setting of record, chosen
    assert "| es | 0 | 2 | 1 |" in section5  # the start that stopped early: 2 epochs run, the first kept
    assert summary["spec"]["arena"]["sets"][-1] == "data.val_size=64" and cells["hydra-lamp-t90-b4-h1-s0"]["val"]
    section6 = (docs / "results" / "quantization.md").read_text()
    assert "Verdict: " in section6 and "| dense float32 |" in section6 and "| 2 |" in section6
    for png in ("robust_vs_width.png", "accuracy_vs_compression.png", "arena_fair.png", "quantization.png"):
        assert (docs / png).stat().st_size > 1000


def test_submitit_local_launcher_runs_cells_as_jobs_and_never_twice(tmp_path):
    """The cluster path, on submitit's local executor: a dense cell and the pruning cell that needs
    it run as two jobs, one after the other; each job's id is recorded; a second driver finds them
    done and submits nothing."""
    pytest.importorskip("submitit")
    out = tmp_path / "sweep"
    args = ["experiments/sweep.py", "--quick", "--out", str(out), "--launcher", "submitit-local",
            "--only", "oneshot-lamp-t90-main"]
    run = lambda: forkserver.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,  # noqa: E731
                                 timeout=600, env=script_env())
    proc = run()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "(submitit-local)" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["done"]) == ["oneshot-lamp-t90-main-s0", "pre-adv-w1-s0"] and summary["finished"]
    jobs = {p.stem: json.loads(p.read_text()) for p in (out / "jobs").glob("*.json")}
    assert set(jobs) == set(summary["done"]) and all(j["launcher"] == "submitit-local" for j in jobs.values())
    assert len({j["job_id"] for j in jobs.values()}) == 2  # two jobs, one per cell
    again = run()
    assert again.returncode == 0 and "2 already done" in again.stdout and "start" not in again.stdout
    assert {p.stem for p in (out / "jobs").glob("*.json")} == set(jobs)  # nothing submitted again


def test_arena_plan_gives_every_method_the_same_epochs_split_as_the_spec_says():
    """experiments/arena.yaml, planned: 12 epochs after pretraining for every method, 8 + 4 for a
    pruning phase, two rounds of 4 + 2 for progressive ADMM, 10 + 2 in the split variant; one
    lr_span=run schedule for all; ADMM at HARP's rates waits for its seed's HARP cell."""
    import yaml
    with open(os.path.join(ROOT, "experiments", "arena.yaml")) as f:
        spec = yaml.safe_load(f)
    cells = {c["id"]: c for c in plan(spec)}

    def value(cell, key):  # the last --set of ``key`` in the cell's first stage wins
        return [s.split("=", 1)[1] for s in cells[cell]["steps"][0]["sets"] if s.startswith(key + "=")][-1]

    main = [c for c in cells.values() if c["meta"].get("variant") == "main" and c["kind"] != "autoattack"]
    assert len(main) == 3 * 3 * 9  # seeds x targets x (7 methods + 2 uniform rows)
    assert all(value(c["id"], "lr_span") == "run" for c in main)
    assert (value("oneshot-lamp-t95-main-s0", "retrain.epochs"), value("hydra-lamp-t95-main-s0", "admm.epochs"),
            value("hydra-lamp-t95-main-s0", "retrain.epochs")) == ("12", "8", "4")
    assert (value("progressive-lamp-t99-main-s1", "admm.epochs"), value("progressive-lamp-t99-main-s1", "retrain.epochs"),
            value("progressive-lamp-t99-main-s1", "prune.rate_rounds")) == ("4", "2", "[10, 100]")
    assert [s["stage"] for s in cells["progressive-lamp-t99-main-s1"]["steps"]] == ["admm.r1", "retrain.r1", "admm", "retrain"]
    assert (value("admm-lamp-t99-split-s0", "admm.epochs"), value("admm-lamp-t99-split-s0", "retrain.epochs")) == ("10", "2")
    assert value("oneshot-uniform-t98-main-s2", "prune.allocation") == "uniform"
    assert "harp-learned-t98-main-s2" in cells["admm_harp-harp-t98-main-s2"]["deps"]
    assert value("admm_harp-harp-t98-main-s2", "prune.rates_from").endswith("harp-learned-t98-main-s2/retrain.pt")
    assert {c["id"] for c in cells.values() if c["kind"] == "autoattack"} == {f"{c['id']}-aa" for c in main if c["seed"] == 0}
    # the checks: seed 0 at 95 and 99 %, no uniform rows; the split check without one-shot
    checks = sorted(c["id"] for c in cells.values() if c["meta"].get("variant") in ("const", "split"))
    expect = sorted(f"{m}-{a}-t{t}-const-s0" for t in (95, 99) for m, a in
                    [("oneshot", "lamp"), ("gradual", "lamp"), ("admm", "lamp"), ("progressive", "lamp"),
                     ("hydra", "lamp"), ("harp", "learned"), ("admm_harp", "harp")])
    expect += [i.replace("-const-", "-split-") for i in expect if not i.startswith("oneshot")]
    assert checks == sorted(expect)
    assert value("admm-lamp-t95-const-s0", "retrain.schedule") == "constant"


@pytest.mark.parametrize("variant, message", [
    ({"uniform": ["harp"]}, "uniform rows of harp, which prune at their own allocation"),
    ({"methods": ["admm", "admm_harp"]}, "admm_harp reads its rates from harp's cells"),
    ({"methods": ["lottery"]}, "unknown methods lottery; choose from oneshot, gradual"),
    ({"method": ["admm"]}, "a variant takes seeds and targets, and may take split, sets, methods, uniform"),
])
def test_arena_plan_refuses_rows_it_cannot_build(variant, message):
    import yaml
    with open(os.path.join(ROOT, "experiments", "arena.yaml")) as f:
        spec = yaml.safe_load(f)
    spec["arena"]["variants"]["bad"] = {"seeds": [0], "targets": [0.95], **variant}
    with pytest.raises(ValueError, match=message):
        plan(spec)


def test_arena_ranking_check_lists_each_variant_by_pgd_mean_over_its_seeds():
    """Hand-made rows: the split check ranks one-shot by its main cell (it has no split), marked;
    the const check does not borrow it; the main rows are averaged over the variant's seeds only."""
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    from frame import Table
    from methods_report import FIELDS, variant_lines
    row = lambda variant, method, seed, pgd, alloc="lamp": {  # noqa: E731
        "variant": variant, "target": 0.95, "method": method, "allocation": alloc, "seed": seed, "pgd": pgd}
    rs = [row("main", "oneshot", 0, 0.60), row("main", "oneshot", 1, 0.40), row("main", "admm", 0, 0.55),
          row("main", "harp", 0, 0.62, "learned"), row("split", "admm", 0, 0.61), row("split", "harp", 0, 0.58, "learned"),
          row("const", "admm", 0, 0.50)]
    A = {"allocation": "lamp", "variants": {"split": {"seeds": [0], "targets": [0.95], "split": [10, 2]},
                                            "const": {"seeds": [0], "targets": [0.95], "sets": ["x=1"]}}}
    lines = variant_lines(Table(rs, FIELDS), A)
    assert "- 95 %, main (seeds [0]): HARP 62.0 > one-shot (lamp) 60.0 > ADMM (lamp) 55.0" in lines
    assert "- 95 %, split (seeds [0]): ADMM (lamp) 61.0 > one-shot (lamp) (main) 60.0 > HARP 58.0" in lines
    assert "- 95 %, const (seeds [0]): ADMM (lamp) 50.0" in lines
    assert sum(line.startswith("- 95 %, main") for line in lines) == 1  # once per target and seeds


def test_a_record_restores_finished_cells_keeps_the_checkpoints_still_needed_and_rebuilds_a_lost_one(
        tmp_path, monkeypatch):
    """A spec's ``record`` keeps finished cells across sessions. In a fresh folder (the run
    folders gone) they are done; the checkpoint of a done cell that a new cell needs is kept beside
    the record and put back. Where it was not kept, the cell runs again, keeps its first record,
    and a cell that starts from a rebuilt checkpoint whose figures differ (another CPU) says so."""
    import shutil

    import sweep
    from launch import make_launcher
    spec = sweep.load_spec(os.path.join(ROOT, "experiments", "quick.yaml"))
    spec["record"] = str(tmp_path / "record.json")  # absolute: os.path.join(ROOT, it) is itself
    kept = tmp_path / "record_checkpoints"
    both = sweep.select(sweep.plan(spec), "oneshot-lamp-t90-main,admm-lamp-t90-main")
    pre, one, admm = "pre-adv-w1-s0", "oneshot-lamp-t90-main-s0", "admm-lamp-t90-main-s0"
    assert sorted(c["id"] for c in both) == sorted([pre, one, admm])
    figures, calls = {pre: 0.5, one: 0.25, admm: 0.125}, []

    def fake_run_cell(self, cell):  # writes what a real cell writes, with the figure the test sets
        calls.append(cell["id"])
        os.makedirs(self.run_dir(cell["id"]), exist_ok=True)
        torch.save({"model": {"w": torch.full((2,), figures[cell["id"]])}, "config": {}, "optimizer": {"m": 1}},
                   self.output(cell))
        res = {"id": cell["id"], "eval": {"accuracy": {"natural": figures[cell["id"]]}}, "wall_s": len(calls)}
        sweep.write_json(self.result(cell["id"]), res)
        return res
    monkeypatch.setattr(sweep.Sweep, "run_cell", fake_run_cell)

    def session(name, cells, forget=(), keep=True):  # forget: cells dropped from the record first
        record = json.loads((tmp_path / "record.json").read_text()) if forget else None
        if forget:
            record["cells"] = [c for c in record["cells"] if c["id"] not in forget]
            (tmp_path / "record.json").write_text(json.dumps(record))
        if not keep:
            shutil.rmtree(kept, ignore_errors=True)
        calls.clear()
        s, log = sweep.Sweep(spec, str(tmp_path / name)), []
        sweep.restore(s, cells, log.append)
        done, failed, _ = sweep.run_cells(s, cells, make_launcher("local", 1, s.out, {}), "quick", s.out, 0, log.append)
        return done, failed, log

    session("first", [c for c in both if c["id"] != admm])
    assert calls == [pre, one]
    record = json.loads((tmp_path / "record.json").read_text())
    assert [c["id"] for c in record["cells"]] == sorted([pre, one]) and record["spec"]["name"] == "quick"
    # pre's checkpoint was kept while one still needed it (one's was not: nothing needs it), without the optimizer
    assert sorted(os.listdir(kept)) == [f"{pre}.pt.gz"]
    with gzip.open(kept / f"{pre}.pt.gz") as f:
        small = torch.load(f, weights_only=True)
    assert set(small) == {"model", "config"} and torch.equal(small["model"]["w"], torch.full((2,), 0.5))
    # A new session: both restored; the new cell needs pre's checkpoint, which is put back.
    done, failed, log = session("second", both)
    assert calls == [admm] and not failed and done == {pre, one, admm}
    assert "2 finished cells restored from" in log[0] and f"put back {pre}'s checkpoint from" in log[2]
    # Not kept: it runs again first, and the record keeps its first record.
    done, failed, log = session("third", both, forget=[admm], keep=False)
    assert calls == [pre, admm] and not failed and done == {pre, one, admm}
    assert any(line.startswith(f"again {pre}: {admm} needs its checkpoint") for line in log)
    kept_records = {c["id"]: c for c in json.loads((tmp_path / "record.json").read_text())["cells"]}
    assert kept_records[pre]["wall_s"] == 1 and set(kept_records) == {pre, one, admm}  # the first record
    assert "rebuilt_inputs" not in kept_records[admm]
    # The rerun gives another figure (another CPU): the new cell starts from it and its record says so.
    figures[pre] = 0.75
    done, failed, log = session("fourth", both, forget=[admm], keep=False)
    assert calls == [pre, admm] and not failed
    assert any(line.startswith(f"note  {pre} ran again for its checkpoint and gave {{'natural': 0.75}} against its "
                               "record {'natural': 0.5}") for line in log)
    kept_records = {c["id"]: c for c in json.loads((tmp_path / "record.json").read_text())["cells"]}
    assert kept_records[admm]["rebuilt_inputs"] == {pre: {"record": {"natural": 0.5}, "rebuilt": {"natural": 0.75}}}
    assert kept_records[pre]["eval"]["accuracy"] == {"natural": 0.5} and kept_records[pre]["rebuilt"] == {"natural": 0.75}
    # A later driver, the rebuilt checkpoint still there: a new cell that starts from it says so too.
    figures["late"] = 0.25
    s = sweep.Sweep(spec, str(tmp_path / "fourth"))
    late = {**both[-1], "id": "late", "deps": [pre]}
    calls.clear()
    done, failed, _ = sweep.run_cells(s, [*both, late], make_launcher("local", 1, s.out, {}), "quick", s.out, 0, print)
    assert calls == ["late"] and json.loads((tmp_path / "fourth" / "cells" / "late.json").read_text())[
        "rebuilt_inputs"] == {pre: {"record": {"natural": 0.5}, "rebuilt": {"natural": 0.75}}}
    # Two deep: the new cell needs HARP's checkpoint only, and HARP needs the pretrained one; both
    # are gone, so both run again, the pretrained first.
    figures[pre] = 0.5
    harp, on_harp = "harp-learned-t90-main-s0", "admm_harp-harp-t90-main-s0"
    chain = {c["id"]: c for c in sweep.select(sweep.plan(spec), on_harp)}
    figures.update({harp: 0.375, on_harp: 0.0625})
    session("fifth", [chain[pre], chain[harp]])
    done, failed, log = session("sixth", [chain[pre], chain[harp], {**chain[on_harp], "deps": [harp]}], keep=False)
    assert calls == [pre, harp, on_harp] and not failed
    # Both rebuilt with other figures: each keeps its first record, the rebuilt figures beside it.
    figures.update({pre: 0.625, harp: 0.25})
    done, failed, log = session("seventh", [chain[pre], chain[harp], {**chain[on_harp], "deps": [harp]}],
                                forget=[on_harp], keep=False)
    assert calls == [pre, harp, on_harp] and not failed
    kept_records = {c["id"]: c for c in json.loads((tmp_path / "record.json").read_text())["cells"]}
    assert [kept_records[i]["eval"]["accuracy"]["natural"] for i in (pre, harp)] == [0.5, 0.375]
    assert [kept_records[i]["rebuilt"]["natural"] for i in (pre, harp)] == [0.625, 0.25]
    assert kept_records[on_harp]["rebuilt_inputs"] == {harp: {"record": {"natural": 0.375}, "rebuilt": {"natural": 0.25}}}
    # harp's first run (fifth session) started from pre as rebuilt in the fourth: its record still says so
    assert kept_records[harp]["rebuilt_inputs"] == {pre: {"record": {"natural": 0.5}, "rebuilt": {"natural": 0.75}}}
    figures.update({pre: 0.5, harp: 0.375})
    # A lost input runs in the turn of the first cell that needs it, after the cells ahead of that
    # cell in the spec's order (not first of all).
    figures.update({"free": 0.5, "late": 0.25})
    done, failed, log = session("eighth", [chain[pre], {**chain[harp], "id": "free", "deps": []},
                                            {**chain[on_harp], "id": "late", "deps": [pre]}], keep=False)
    assert calls == ["free", pre, "late"] and not failed
