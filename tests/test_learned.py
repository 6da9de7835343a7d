"""HYDRA and HARP: the straight-through top-k, the stages' masks and counts, HARP's rates and
gamma, resume mid-stage, and a score stage's checkpoint read by eval.py and export.py."""
import json
import math
import os
import sys

import pytest
import torch

import admm as admm_lib
import data as data_lib
from pruning import learned as scores_lib
from common import load_checkpoint
from config import load_config
from data import INFO
from training.loop import RunContext, train_stage
from models import model_from_config
from training.methods import make_method
from models import build_model
from training.rundir import RunFolder
from pruning.plan import make_stage
from training.stops import Interrupted
from training.state import TrainState
import forkserver
from helpers import ROOT, StopAt, script_env

CPU = torch.device("cpu")


# --------------------------------------------------------------------------- the straight-through top-k

def test_top_k_mask_keeps_exactly_the_k_largest_magnitudes():
    s = torch.randn(7, 9)
    for k in (0, 1, 20, 63):
        m = scores_lib.top_k_mask(s, k)
        assert int(m.sum()) == k
        brute = sorted(range(63), key=lambda i: -abs(s.flatten()[i].item()))[:k]
        assert sorted(m.flatten().nonzero().flatten().tolist()) == sorted(brute)
    allowed = torch.ones(7, 9, dtype=torch.bool)
    allowed.view(-1)[s.abs().flatten().argmax()] = False  # the largest may not be chosen
    m = scores_lib.top_k_mask(s, 5, allowed)
    assert int(m.sum()) == 5 and not m[~allowed].any()


def test_straight_through_gradients_by_hand():
    w, s, g = torch.randn(4, 5), torch.randn(4, 5, requires_grad=True), torch.randn(4, 5)
    rate = torch.tensor(0.3, requires_grad=True)
    mask = scores_lib.top_k_mask(s, 8)
    out = scores_lib.ScoredWeight.apply(w, s, rate, mask)
    assert torch.equal(out, w * mask)
    (out * g).sum().backward()
    # dL/dm = g * w passed straight through |s| (HYDRA), and summed for the rate (HARP)
    assert torch.allclose(s.grad, g * w * s.detach().sign())
    assert torch.allclose(rate.grad, (g * w).sum())
    assert (s.grad[mask == 0] != 0).any()  # pruned weights' scores learn too


def test_scaled_score_init():
    w = torch.tensor([[1.0, -4.0, 2.0], [0.5, 0.0, 3.0]])  # fan_in 3
    assert torch.allclose(scores_lib.scaled_scores(w), math.sqrt(6 / 3) * w / 4)


# --------------------------------------------------------------------------- the stages

def state_of(kind, *sets):
    cfg = load_config("configs/demo.yaml", [f"prune.method={kind}", "prune.target=0.9", "model.width=1", *sets])
    model = build_model("lenet", 1)
    _, stage = make_stage(kind, model, cfg)
    return TrainState(stage, model, make_method(cfg, True, INFO["demo"], CPU), cfg, CPU)


@pytest.mark.parametrize("kind", ["hydra", "harp"])
def test_score_stage_trains_scores_not_weights_and_ends_with_exact_masks(kind):
    s = state_of(kind)
    s.begin(None)
    stage, model = s.stage, s.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores0 = {n: t.detach().clone() for n, t in stage.scores.items()}
    net = stage.network(model)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    # the view is the model with W * m in each pruned layer
    masked = build_model("lenet", 1)
    masked.load_state_dict({k: v * stage.mask(k) if k in stage.scores else v for k, v in before.items()})
    assert torch.allclose(net(x), masked(x), atol=1e-6)
    s.method.step(net, net, x, y, s.optimizer, stage.penalty, s.precision)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # weights frozen
    assert all(not torch.equal(stage.scores[n].detach(), scores0[n]) for n in scores0)  # every layer's scores moved
    for n, t in stage.scores.items():
        assert int(stage.mask(n).sum()) == stage.keep(n)
    stage.finish(s.masks)
    sizes = {n: w.numel() for n, w in admm_lib.prunable_weights(model).items()}
    zeros = {n: int((w == 0).sum()) for n, w in admm_lib.prunable_weights(model).items()}
    assert sum(zeros.values()) == round(0.9 * sum(sizes.values()))  # the overall target, exactly
    assert zeros == stage.allocation.counts(sizes)
    assert all(int((~s.masks[n]).sum()) == zeros[n] for n in sizes)
    assert set(model.state_dict()) == set(build_model("lenet", 1).state_dict())  # a plain model
    assert all(p.requires_grad for p in model.parameters())  # the weights train again in retrain


def test_harp_rates_reach_the_target_and_its_final_masks_are_exact():
    s = state_of("harp", "prune.rate_start=3", "prune.rate_gamma=0.5")
    s.begin(None)
    stage = s.stage
    assert float(stage.keep_rate().detach()) == pytest.approx(3 * stage.target_keep, rel=0.02)  # started denser
    opt = torch.optim.SGD(list(stage.a.values()), lr=0.5)
    for epoch in range(30):  # the rate loss alone: gamma grows each pass until the target is met
        for _ in range(5):
            opt.zero_grad()
            stage.penalty().backward()
            opt.step()
        fig = stage.update(epoch + 1, s.masks)
        if fig["gamma_frozen"]:
            break
    assert fig["gamma_frozen"] and fig["keep_rate"] <= stage.target_keep * 1.0001
    assert fig["gamma"] == (epoch + 1) * 0.5 or epoch == 0
    stage.finish(s.masks)
    w = admm_lib.prunable_weights(s.model)
    total = sum(t.numel() for t in w.values())
    assert sum(int((t == 0).sum()) for t in w.values()) == round(0.9 * total)


def test_harp_final_counts_follow_the_learned_rates():
    s = state_of("harp")
    s.begin(None)
    stage = s.stage
    with torch.no_grad():  # a learned, non-uniform state that keeps too much overall
        for v, a in zip((2.0, -1.0, -3.0, 1.0), stage.a.values()):
            a.fill_(v)
    counts = stage.final_counts()
    k = {n: stage.k(n).item() for n in stage.a}
    want = sum(stage.sizes.values()) - round(0.9 * sum(stage.sizes.values()))
    assert sum(counts.values()) == want
    # proportional to n_l k_l: each count within one of its exact share (largest remainder)
    mass = sum(stage.sizes[n] * k[n] for n in k)
    for n, c in counts.items():
        share = want * stage.sizes[n] * k[n] / mass
        assert share - 1 < c < share + 1 or c == stage.sizes[n]


# --------------------------------------------------------------------------- resume mid-stage

RESUME = ["data.train_limit=256", "pretrain.epochs=1", "admm.epochs=2", "adv.steps=1", "eval.steps=1",
          "eval.limit=50", "prune.target=0.9", "prune.rate_start=2", "prune.score_lr=0.01", "prune.rate_lr=0.05"]


def context(cfg, folder, stop):
    train, test, info = data_lib.load_data(cfg)
    os.makedirs(folder, exist_ok=True)
    return RunContext(cfg, train, test, info, make_method(cfg, True, info, CPU), CPU, RunFolder(str(folder)),
                      stop, "resume")


@pytest.mark.parametrize("kind", ["hydra", "harp"])
def test_resume_mid_stage_is_bit_identical(kind, tmp_path):
    cfg = load_config("configs/demo.yaml", [*RESUME, f"prune.method={kind}"])
    torch.manual_seed(0)
    model = model_from_config(cfg, INFO["demo"], CPU)
    pre = train_stage("pretrain", model, context(cfg, tmp_path / "a", StopAt(0)))

    def fresh():
        m = model_from_config(cfg, INFO["demo"], CPU)
        m.load_state_dict(pre["model"])
        return m

    whole = train_stage(kind, fresh(), context(cfg, tmp_path / "a", StopAt(0)), init=pre)
    with pytest.raises(Interrupted):  # 4 steps per epoch: stopped after step 2 of epoch 2
        train_stage(kind, fresh(), context(cfg, tmp_path / "b", StopAt(6)), init=pre)
    last = load_checkpoint(str(tmp_path / "b" / f"{kind}.last.pt"))
    assert (last["epoch"], last["step"]) == (1, 2) and last["stage_state"]["scores"]
    model = fresh()
    model.load_state_dict(last["model"])
    resumed = train_stage(kind, model, context(cfg, tmp_path / "b", StopAt(0)), resume=last)
    for key in ("model", "masks"):
        assert all(torch.equal(whole[key][k], resumed[key][k]) for k in whole[key]), key
    for n, t in whole["stage_state"]["scores"].items():
        assert torch.equal(t, resumed["stage_state"]["scores"][n])
    if kind == "harp":
        assert all(torch.equal(t, resumed["stage_state"]["a"][n]) for n, t in whole["stage_state"]["a"].items())
        assert whole["stage_state"]["gamma"] == resumed["stage_state"]["gamma"]
    assert whole["allocation"] == resumed["allocation"]
    assert whole["optimizer"]["state"][0]["exp_avg"].equal(resumed["optimizer"]["state"][0]["exp_avg"])


# --------------------------------------------------------------------------- a score stage's checkpoint

def test_hydra_checkpoint_is_a_plain_model_that_eval_and_export_read(tmp_path):
    sets = ["data.train_limit=256", "pretrain.epochs=1", "admm.epochs=1", "retrain.epochs=1", "adv.steps=1",
            "eval.steps=1", "eval.limit=50", "prune.method=hydra", "prune.target=0.95", "prune.allocation=lamp"]
    run = lambda *a: forkserver.run([sys.executable, *a], cwd=ROOT, capture_output=True, text=True, timeout=600,  # noqa: E731
                                    env=script_env())
    proc = run("adv_main.py", "--config", "configs/demo.yaml", "--out", str(tmp_path),
               *[x for s in sets for x in ("--set", s)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "allocation lamp, target 0.9500" in proc.stderr + proc.stdout
    ckpt = torch.load(tmp_path / "hydra.pt", weights_only=True)
    assert set(ckpt["model"]) == set(build_model("lenet", 4).state_dict())
    total = sum(ckpt["model"][n].numel() for n in ckpt["masks"])
    assert sum(int((ckpt["model"][n] == 0).sum()) for n in ckpt["masks"]) == round(0.95 * total)
    js = tmp_path / "eval.hydra.json"
    proc = run("eval.py", "--ckpt", str(tmp_path / "hydra.pt"), "--attacks", "natural,pgd", "--no-checks",
               "--limit", "50", "--json", str(js))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rep = json.loads(js.read_text())
    ratios = ckpt["allocation"]["ratios"]
    for layer in rep["sparsity"]["layers"]:  # the report's target column is the allocation
        assert layer["ratio"] == pytest.approx(ratios[layer["name"]])
        assert layer["params"] - layer["nonzero"] == round(ratios[layer["name"]] * layer["params"])
    assert rep["sparsity"]["prunable"]["zeros"] == round(0.95 * total)
    assert "all prunable layers:" in proc.stdout
    out = tmp_path / "hydra.export.pt"
    proc = run("export.py", "--ckpt", str(tmp_path / "hydra.pt"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    exp = torch.load(out, weights_only=True)
    assert exp["sparsity"]["prunable"]["zeros"] == round(0.95 * total)
