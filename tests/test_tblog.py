"""TensorBoard curves (tblog.py): the rows of metrics.jsonl become scalars, live during training
(--tensorboard) and from a run folder afterwards, read back with TensorBoard's own reader; without
the tensorboard package, --tensorboard stops in one line."""
import json
import math
import os
import sys

import pytest

import tblog
from training import tensorboard
from common import UserError
import forkserver
from helpers import ROOT, script_env


def test_scalars_of_rows_by_hand():
    epoch = {"kind": "epoch", "stage": "retrain", "epoch": 2, "passes": 2.0, "lr": 0.001, "loss": 0.5, "penalty": 0.0,
             "test_pgd": None, "convergence": {"admm": {"rho": 0.5}, "retrain": {"pruned_energy": {"fc1.weight": 0.01}}}}
    assert sorted(tensorboard.scalars(epoch)) == [("retrain/loss", 0.5, 2), ("retrain/lr", 0.001, 2),
                                            ("retrain/penalty", 0.0, 2), ("retrain/pruned_energy/fc1.weight", 0.01, 2)]
    update = {"kind": "update", "stage": "admm", "passes": 2.5, "lr": 0.001, "rho": 0.08,
              "residual": {"conv1.weight": 0.2}, "dual_residual": {"conv1.weight": 0.003}}
    assert sorted(tensorboard.scalars(update)) == [("admm/dual_residual/conv1.weight", 0.003, 3),
                                             ("admm/residual/conv1.weight", 0.2, 3), ("admm/rho", 0.08, 3)]


def _events(logdir):
    """{tag: [(step, value)]} read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_training_with_tensorboard_writes_every_metrics_row(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    small = ["data.train_limit=256", "pretrain.epochs=2", "admm.epochs=2", "retrain.epochs=1", "adv.steps=1",
             "eval.steps=1", "eval.limit=64"]
    proc = forkserver.run([sys.executable, os.path.join(ROOT, "adv_main.py"), "--config", "configs/demo.yaml",
                           "--out", str(out), *[a for o in small for a in ("--set", o)], "--tensorboard"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=script_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = _events(out / "tensorboard")
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    # Expected from metrics.jsonl itself, read here without tblog: every finite top-level figure
    # of an epoch row, and every per-layer residual of an update row.
    expected = {}
    for r in rows:
        step = math.ceil(r["passes"])
        if r["kind"] == "epoch":
            for k in ("loss", "penalty", "train_adv", "test_natural", "test_pgd", "lr"):
                expected[f"{r['stage']}/{k}"] = expected.get(f"{r['stage']}/{k}", []) + [(step, r[k])]
        else:
            expected.setdefault("admm/rho", []).append((step, r["rho"]))
            for layer, v in r["residual"].items():
                expected.setdefault(f"admm/residual/{layer}", []).append((step, v))
    assert {"pretrain/loss", "admm/rho", "admm/residual/fc1.weight", "admm/dual_residual/conv2.weight",
            "retrain/pruned_energy/conv2.weight", "retrain/test_pgd"} <= set(events)
    for tag, points in expected.items():
        assert [s for s, _ in events[tag]] == [s for s, _ in points], tag
        assert [v for _, v in events[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag  # float32 events
    # The converter writes the same scalars from the run folder afterwards.
    tblog.main([str(out), "--logdir", str(tmp_path / "converted")])
    assert _events(tmp_path / "converted") == events


def test_tensorboard_log_without_the_package_stops_with_one_line(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m.startswith("torch.utils.tensorboard")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError, as when not installed
    with pytest.raises(UserError) as e:
        tensorboard.TensorBoardLog(str(tmp_path / "tb"))
    assert str(e.value) == "--tensorboard needs tensorboard: pip install tensorboard"
    assert not os.path.exists(tmp_path / "tb")


def test_training_without_tensorboard_stops_before_training_in_one_line(tmp_path):
    code = ("import sys; sys.modules['torch.utils.tensorboard'] = None; sys.argv = sys.argv[1:]; "
            "import runpy; runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = forkserver.run([sys.executable, "-c", code, "adv_main.py", "--config", "configs/demo.yaml",
                           "--out", str(tmp_path / "r"), "--tensorboard"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=script_env())
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --tensorboard needs tensorboard: pip install tensorboard"]
    assert not os.path.exists(tmp_path / "r" / "pretrain.last.pt")
