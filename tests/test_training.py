"""The training loop's parts: schedules counted in passes over the data (whatever the method),
the training state's single save / load path, and metrics.jsonl."""
import json
import math
import os
import signal
import sys

import pytest
import torch

from config import load_config
from data import INFO
from training.methods import make_method
from models import build_model
from training.rundir import RunFolder
from pruning.plan import make_stage
from training.state import EpochMeter, Schedule, TrainState, lr_at
import forkserver
from helpers import ROOT, script_env


# --------------------------------------------------------------------------- schedules

def test_schedule_of_one_step_per_batch_is_whole_epochs():
    s = Schedule(epochs=5, batches=7)
    assert (s.total_steps, s.loops) == (35, 5)
    assert [s.steps_in(e) for e in range(5)] == [7] * 5
    updates = [(e, k) for e in range(5) for k in range(1, 8) if s.reaches(2, e, k)]
    assert updates == [(1, 7), (3, 7)]  # after epochs 2 and 4, at their last step
    assert [s.loop_reaches(2, e) for e in range(5)] == [False, True, False, True, False]
    assert not any(s.reaches(0, e, k) for e in range(5) for k in range(1, 8))


@pytest.mark.parametrize("epochs,replays,every", [(100, 8, 2), (50, 8, 2), (12, 5, 1), (3, 2, 1)])
def test_free_schedule_makes_the_configured_passes_and_updates(epochs, replays, every):
    """free replays each minibatch m times: the stage makes `epochs` passes over the data in
    epochs / m loops, with the configured number of Z/U updates (the old loop made epochs / m loops
    but counted each as one pass: 3 updates instead of 25 for cifar10's ADMM stage)."""
    s = Schedule(epochs, batches=10, replays=replays)
    assert s.loops == math.ceil(epochs / replays)
    assert epochs <= s.passes(s.loops - 1, s.steps_in(s.loops - 1)) < epochs + replays / 10
    steps = [(e, k) for e in range(s.loops) for k in range(1, s.steps_in(e) + 1)]
    assert len(steps) == s.total_steps
    assert sum(s.reaches(every, e, k) for e, k in steps) == epochs // every


def test_step_milestones_are_reached_in_passes_under_free():
    scfg = {"lr": 0.1, "schedule": "step", "milestones": [50, 75], "gamma": 0.1}
    s = Schedule(100, batches=10, replays=8)
    lrs = [lr_at(scfg, int(s.passes(e, k)), 100) for e in range(s.loops) for k in range(s.steps_in(e))]
    assert lrs[0] == 0.1 and lrs[-1] == pytest.approx(0.001)
    first_drop = next(i for i, lr in enumerate(lrs) if lr < 0.1)
    assert s.passes(0, first_drop) >= 50 > s.passes(0, first_drop - 1)


def run_script(out, *sets, extra=(), script="adv_main.py", signal_at=None):
    """The script; ``signal_at`` ("<stage>:<step>:<SIGNAME>"): the run sends itself that signal
    after that step (``training.SelfSignal``), a stop at a known point instead of a race."""
    args = [sys.executable, script, "--config", "configs/demo.yaml", "--out", str(out),
            *[a for o in sets for a in ("--set", o)], *extra]
    env = script_env(**({"ADMM_AT_TEST_SIGNAL": signal_at} if signal_at else {}))
    return forkserver.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_free_with_8_replays_reaches_milestones_and_updates(tmp_path):
    """8 passes of ADMM with Z/U every 2 passes: 4 updates (in one loop of 4 minibatches), and the
    lr milestone at pass 4 takes effect from the step that starts at pass 4."""
    proc = run_script(tmp_path, "data.train_limit=256", "adv.method=free", "adv.free_replays=8",
                      "pretrain.epochs=8", "admm.epochs=8", "prune.update_every=2", "admm.schedule=step",
                      "admm.milestones=[4]", "admm.gamma=0.1", "eval.limit=50", "eval.steps=1", "eval.every=4",
                      "prune.restart_lr=false", extra=["--stage", "pretrain"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_script(tmp_path, "data.train_limit=256", "adv.method=free", "adv.free_replays=8",
                      "pretrain.epochs=8", "admm.epochs=8", "prune.update_every=2", "admm.schedule=step",
                      "admm.milestones=[4]", "admm.gamma=0.1", "eval.limit=50", "eval.steps=1", "eval.every=4",
                      "prune.restart_lr=false", extra=["--stage", "admm"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    updates = [r for r in rows(tmp_path) if r["kind"] == "update"]
    assert [r["passes"] for r in updates] == [2, 4, 6, 8]
    lr = load_config("configs/demo.yaml")["admm"]["lr"]
    assert [r["lr"] for r in updates] == pytest.approx([lr, lr, lr / 10, lr / 10])
    epochs = [r for r in rows(tmp_path) if r["kind"] == "epoch"]
    assert [(r["stage"], r["passes"]) for r in epochs] == [("pretrain", 8), ("admm", 8)]
    assert all(r["test_pgd"] is not None for r in epochs)  # evaluated: 4 | 8 passes
    rho = load_config("configs/demo.yaml")["prune"]["rho"] * load_config("configs/demo.yaml")["prune"]["rho_growth"] ** 4
    assert torch.load(tmp_path / "admm.pt", weights_only=True)["stage_state"]["rho"]["fc1.weight"] == pytest.approx(rho)


# --------------------------------------------------------------------------- metrics.jsonl

def test_metrics_jsonl_has_each_epoch_and_update_once_across_a_resume(tmp_path):
    sets = ["data.train_limit=640", "pretrain.epochs=3", "admm.epochs=2", "retrain.epochs=1", "adv.steps=1",
            "eval.steps=1", "eval.limit=50", "checkpoint.every_steps=2"]
    proc = run_script(tmp_path, *sets, signal_at="admm:3:SIGTERM")  # stops in admm's first epoch, after step 3
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert "stopped by SIGTERM in admm epoch 1 after step 3" in proc.stderr
    assert torch.load(tmp_path / "admm.last.pt", weights_only=True)["step"] == 3
    resumed = run_script(tmp_path, *sets, extra=["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = rows(tmp_path)
    epochs = [(r["stage"], r["epoch"]) for r in got if r["kind"] == "epoch"]
    assert epochs == [("pretrain", 1), ("pretrain", 2), ("pretrain", 3), ("admm", 1), ("admm", 2), ("retrain", 1)]
    updates = [r for r in got if r["kind"] == "update"]
    assert [r["passes"] for r in updates] == [1, 2]
    assert set(updates[0]["residual"]) == {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"}
    last = [r for r in got if r["kind"] == "epoch"][-1]
    for key in ("loss", "penalty", "train_natural", "train_adv", "test_natural", "test_pgd", "lr", "time"):
        assert isinstance(last[key], float), key
    ckpt = torch.load(tmp_path / "retrain.pt", weights_only=True)
    assert ckpt["metrics"]["test_pgd"] == last["test_pgd"]
    # The convergence figures travel from admm.pt to retrain.pt and into eval.json.
    conv = ckpt["metrics"]["convergence"]
    assert conv["admm"]["residual"] == updates[-1]["residual"]
    assert conv["admm"]["dual_residual"] == updates[-1]["dual_residual"]
    energy = conv["retrain"]["pruned_energy"]
    assert set(energy) == set(updates[-1]["residual"]) and all(0 < e < 1 for e in energy.values())
    rep = json.loads((tmp_path / "eval.json").read_text())
    assert rep["convergence"]["retrain"]["pruned_energy"] == energy
    assert "pruned energy at the hard prune" in resumed.stdout


def test_drop_metrics_removes_the_rows_of_stages_that_start_again(tmp_path):
    folder = RunFolder(str(tmp_path))
    for stage in ("pretrain", "admm", "retrain"):
        folder.append_metrics({"kind": "epoch", "stage": stage})
    folder.drop_metrics(["admm", "retrain"])
    assert rows(tmp_path) == [{"kind": "epoch", "stage": "pretrain"}]


def test_truncate_metrics_drops_rows_after_the_saved_size(tmp_path):
    folder = RunFolder(str(tmp_path))
    folder.append_metrics({"kind": "epoch", "epoch": 1, "x": float("nan")})
    size = folder.metrics_bytes()
    folder.append_metrics({"kind": "epoch", "epoch": 2})
    folder.truncate_metrics(size)
    assert rows(tmp_path) == [{"kind": "epoch", "epoch": 1, "x": None}]
    folder.truncate_metrics(None)  # a checkpoint from before metrics.jsonl: nothing dropped
    assert len(rows(tmp_path)) == 1


# --------------------------------------------------------------------------- the training state

def make_state(stage_name, method="free"):
    pruning = "gradual" if stage_name == "gradual" else "admm"
    cfg = load_config("configs/demo.yaml", [f"adv.method={method}", "adv.free_replays=2", f"prune.method={pruning}"])
    model = build_model("lenet", 1)
    _, stage = make_stage(stage_name, model, cfg)
    return TrainState(stage, model, make_method(cfg, True, INFO["demo"], torch.device("cpu")), cfg, torch.device("cpu"))


def test_train_state_saves_and_loads_everything_it_holds():
    torch.manual_seed(0)
    a = make_state("admm")
    a.begin(None)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    loss, pen, logits = a.method.step(a.model, a.model, x, y, a.optimizer, a.stage.penalty, a.precision)
    a.meter.add(0, loss, pen, (logits.argmax(1) == y).sum(), 8, None)
    a.stage.update(1, a.masks)
    a.epoch, a.step = 3, 1
    saved = a.state_dict()
    b = make_state("admm")
    b.load_state_dict(saved)
    again = b.state_dict()
    assert (b.epoch, b.step) == (3, 1)
    assert torch.equal(again["method_state"], saved["method_state"]) and saved["method_state"].abs().sum() > 0
    for n in saved["stage_state"]["Z"]:
        assert torch.equal(again["stage_state"]["Z"][n], saved["stage_state"]["Z"][n])
        assert torch.equal(again["stage_state"]["U"][n], saved["stage_state"]["U"][n])
    assert again["stage_state"]["rho"] == saved["stage_state"]["rho"]
    assert again["optimizer"]["state"][0]["exp_avg"].equal(saved["optimizer"]["state"][0]["exp_avg"])
    assert {k: float(v) for k, v in again["sums"].items()} == {k: float(v) for k, v in saved["sums"].items()}
    assert saved["sums"]["n"] == 8


def test_meter_reads_the_old_positional_sums():
    """Checkpoints written before the named sums held a tensor of 6: they still resume."""
    m = EpochMeter(torch.device("cpu"))
    m.load_state_dict(torch.tensor([4.0, 1.0, 3.0, 2.0, 4.0, 4.0]))
    assert m.averages() == {"loss": 1.0, "penalty": 0.25, "train_natural": 0.75, "train_adv": 0.5}
    assert (m.n, m.n_natural) == (4, 4)


def test_retrain_begin_hard_prunes_and_keeps_earlier_masks():
    s = make_state("retrain", method="pgd")
    w = s.model.conv2.weight
    earlier = torch.ones_like(w, dtype=torch.bool)
    earlier.view(-1)[:5] = False
    s.begin({"masks": {"conv2.weight": earlier}})
    ratio = s.stage.ratios["conv2.weight"]
    assert not s.masks["conv2.weight"].view(-1)[:5].any()
    assert int((w != 0).sum()) == w.numel() - round(ratio * w.numel())


def test_masked_progressive_with_an_unpruned_layer():
    """prune.masked_progressive holds the already-zero weights of the pruned layers during ADMM;
    a layer left unpruned (ratio 0) gets no mask, and retraining's hard prune keeps both."""
    cfg = load_config("configs/demo.yaml", ["prune.masked_progressive=true", "prune.prune_ratios.fc2.weight=0"])
    model = build_model("lenet", 1)
    with torch.no_grad():
        model.conv1.weight.view(-1)[:3] = 0   # zeros from an earlier round
        model.fc2.weight.view(-1)[:3] = 0     # zeros of a layer this run does not prune
    _, admm_stage = make_stage("admm", model, cfg)
    masks = admm_stage.begin({})
    assert set(masks) == {"conv1.weight", "conv2.weight", "fc1.weight"}
    assert not masks["conv1.weight"].view(-1)[:3].any() and masks["conv1.weight"].view(-1)[3:].all()
    _, retrain = make_stage("retrain", model, cfg)
    held = retrain.begin(masks)  # once a KeyError on fc2.weight
    assert set(held) == {"conv1.weight", "conv2.weight", "fc1.weight"}
    assert not held["conv1.weight"].view(-1)[:3].any()
    assert int((~held["conv1.weight"]).sum()) == 25  # round(0.5 * 50), the zeros among them
    assert int((model.fc2.weight == 0).sum()) == 3   # untouched


def test_masked_progressive_with_an_unpruned_layer_runs_to_the_end(tmp_path):
    proc = run_script(tmp_path, "prune.masked_progressive=true", "prune.prune_ratios.fc2.weight=0",
                      *ROUNDS[:7], "prune.rounds=[0.5, 1.0]")
    assert proc.returncode == 0, proc.stderr[-2000:]
    final = torch.load(tmp_path / "retrain.pt", weights_only=True)
    assert int((final["model"]["fc2.weight"] == 0).sum()) == 0 and "fc2.weight" not in final["masks"]
    assert int((final["model"]["fc1.weight"] == 0).sum()) == round(0.9 * final["model"]["fc1.weight"].numel())


# --------------------------------------------------------------------------- progressive ADMM

ROUNDS = ["data.train_limit=320", "pretrain.epochs=1", "admm.epochs=1", "retrain.epochs=1", "adv.steps=1",
          "eval.steps=1", "eval.limit=50", "checkpoint.every_steps=1", "prune.rounds=[0.5, 1.0]"]


@pytest.fixture(scope="module")
def progressive(tmp_path_factory):
    out = tmp_path_factory.mktemp("rounds")
    proc = run_script(out, *ROUNDS)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_progressive_rounds_reach_the_target_and_keep_earlier_zeros(progressive):
    names = ["pretrain", "admm.r1", "retrain.r1", "admm", "retrain"]
    assert all((progressive / f"{n}.pt").exists() for n in names)
    cfg = load_config("configs/demo.yaml", ROUNDS)
    first = torch.load(progressive / "retrain.r1.pt", weights_only=True)
    final = torch.load(progressive / "retrain.pt", weights_only=True)
    for name, ratio in cfg["prune"]["prune_ratios"].items():
        w1, w2 = first["model"][name], final["model"][name]
        assert int((w1 == 0).sum()) == round(0.5 * ratio * w1.numel()), name  # round 1: half the target
        assert int((w2 == 0).sum()) == round(ratio * w2.numel()), name        # round 2: the target
        assert not (w2[w1 == 0] != 0).any(), name  # a weight pruned in round 1 stays zero
    assert [r["stage"] for r in rows(progressive) if r["kind"] == "epoch"] == names
    conv = final["convergence"]
    assert {"admm.r1", "retrain.r1", "admm", "retrain"} <= set(conv)


def test_progressive_rounds_resume_after_a_kill(tmp_path, progressive):
    proc = run_script(tmp_path, *ROUNDS, signal_at="retrain.r1:3:SIGKILL")  # round 1's retraining, step 3
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "retrain.r1.pt").exists() and (tmp_path / "admm.r1.pt").exists()
    assert torch.load(tmp_path / "retrain.r1.last.pt", weights_only=True)["step"] == 2
    resumed = run_script(tmp_path, *ROUNDS, extra=["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = (torch.load(p / "retrain.pt", weights_only=True)["model"] for p in (progressive, tmp_path))
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical to the uninterrupted run


def test_stage_names_follow_the_rounds(tmp_path):
    proc = run_script(tmp_path, *ROUNDS, extra=["--stage", "admm.r2"])
    assert proc.returncode == 2
    assert "choose all or one of pretrain, admm.r1, retrain.r1, admm, retrain" in proc.stderr


# --------------------------------------------------------------------------- the original code's switches

def test_restart_lr_restarts_the_admm_schedule_at_every_update():
    cfg = load_config("configs/demo.yaml", ["prune.restart_lr=true", "prune.update_every=3"])
    stage = make_state("admm").stage
    stage.settings = cfg["prune"]
    stage.update_every = 3
    assert [stage.lr_clock(p, 12) for p in (0, 2, 3, 7)] == [(0, 3), (2, 3), (0, 3), (1, 3)]
    stage.settings = {**cfg["prune"], "restart_lr": False}
    assert stage.lr_clock(7, 12) == (7, 12)


def test_train_mode_attack_and_eps_ramp():
    cfg = load_config("configs/demo.yaml", ["adv.attack_mode=train", "adv.eps_ramp=4", "adv.eps=0.3"])
    method = make_method(cfg, True, INFO["demo"], torch.device("cpu"))
    model = build_model("lenet", 1).train()
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    seen = []
    model.register_forward_pre_hook(lambda m, inp: seen.append(m.training))
    method.progress("pretrain", 0)
    x_adv = method.attack(model, x, y)
    assert seen and all(seen) and model.training  # the attack ran in train mode, and left it so
    assert (x_adv - x).abs().max() <= 0.3 / 4 + 1e-6  # pass 0 of a 4-pass ramp: eps / 4
    method.progress("pretrain", 3.5)
    assert method.pgd.eps == pytest.approx(0.3)
    method.progress("admm", 0)  # the ramp is for pretraining only
    assert method.pgd.eps == pytest.approx(0.3)


def test_epoch_row_counts_passes_of_a_partial_last_loop():
    s = Schedule(10, batches=100, replays=4)
    assert s.loops == 3 and s.steps_in(2) == 50 and s.passes(2, s.steps_in(2)) == 10


# --------------------------------------------------------------------------- the baselines

def test_gradual_magnitude_pruning_follows_the_cubic_schedule_and_masks_only_grow():
    s = make_state("gradual", method="pgd")
    s.begin(None)
    stage, w = s.stage, s.model.fc1.weight
    ratio, prev = stage.ratios["fc1.weight"], torch.ones_like(w, dtype=torch.bool)
    for t in range(1, stage.epochs + 1):
        with torch.no_grad():
            w.add_(0.01 * torch.randn_like(w) * s.masks["fc1.weight"])  # training moves the kept weights
        fig = stage.update(t, s.masks)
        f = 1 - (1 - t / stage.epochs) ** 3  # Zhu & Gupta 2017, Eq. 1
        assert fig["fraction"] == pytest.approx(f)
        assert int((~s.masks["fc1.weight"]).sum()) == round(ratio * f * w.numel())
        assert not (s.masks["fc1.weight"] & ~prev).any()  # a pruned weight never comes back
        prev = s.masks["fc1.weight"].clone()
    assert int((w == 0).sum()) == round(ratio * w.numel())


@pytest.mark.parametrize("method,names", [("admm", ["pretrain", "admm", "retrain"]),
                                          ("gradual", ["pretrain", "gradual", "retrain"]),
                                          ("oneshot", ["pretrain", "retrain"])])
def test_pruning_method_picks_the_stages(method, names):
    from pruning.plan import stage_names
    assert stage_names(load_config("configs/demo.yaml", [f"prune.method={method}"])) == names
    rounds = stage_names(load_config("configs/demo.yaml", [f"prune.method={method}", "prune.rounds=[0.5, 1]"]))
    assert rounds[-len(names) + 1:] == names[1:] and len(rounds) == 1 + 2 * (len(names) - 1)


def test_lr_span_run_is_one_schedule_across_the_stages():
    """lr_span=run: ADMM (8 epochs) then retraining (4) follow one cosine from 2e-3 over 12 epochs,
    lr(e) = 1e-3 (1 + cos(pi e / 12)), the retraining continuing where ADMM stopped; per stage it
    restarts at 2e-3."""
    import math as m
    from common import UserError
    from models import build_model
    from pruning.plan import make_stage
    from training.state import lr_at
    sets = ["prune.restart_lr=false", "admm.epochs=8", "retrain.epochs=4", "admm.lr=0.002", "retrain.lr=0.002",
            "admm.schedule=cosine", "retrain.schedule=cosine", "prune.prune_ratios={fc1.weight: 0.5}"]
    model = build_model("lenet", 1)
    for span, expected in (("run", [1e-3 * (1 + m.cos(m.pi * e / 12)) for e in range(12)]),
                           ("stage", [1e-3 * (1 + m.cos(m.pi * e / 8)) for e in range(8)]
                            + [1e-3 * (1 + m.cos(m.pi * e / 4)) for e in range(4)])):
        cfg = load_config("configs/demo.yaml", [*sets, f"lr_span={span}"])
        lrs = []
        for name in ("admm", "retrain"):
            _, stage = make_stage(name, model, cfg)
            scfg = cfg[stage.section]
            lrs += [lr_at(scfg, *stage.lr_clock(e, scfg["epochs"])) for e in range(scfg["epochs"])]
        assert lrs == pytest.approx(expected, rel=1e-12), span
    with pytest.raises(UserError, match="set prune.restart_lr=false"):
        load_config("configs/demo.yaml", ["lr_span=run"])
