"""The fast adversarial training methods: each runs all three stages and keeps exact sparsity;
their training steps do what the papers say."""
import json
import sys

import pytest
import torch

from attacks import PGD
import data as data_lib
from config import load_config
from training.methods import AttackTraining, Free, Natural, free_step, make_method, train_step
from models import build_model
import forkserver
from helpers import ROOT, script_env


@pytest.mark.parametrize("method", ["pgd", "fgsm_rs", "free"])
def test_method_runs_all_stages_with_exact_sparsity(tmp_path, method):
    sets = ["data.train_limit=512", "pretrain.epochs=2", "admm.epochs=2", "retrain.epochs=2", "adv.steps=2",
            "eval.steps=2", "eval.limit=100", f"adv.method={method}", "adv.free_replays=2"]
    proc = forkserver.run([sys.executable, "adv_main.py", "--config", "configs/demo.yaml", "--out", str(tmp_path),
                           *[a for o in sets for a in ("--set", o)]], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=script_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{method} training" in proc.stdout
    if method == "free":  # 2 passes over the data = 1 loop of 2 replays per minibatch
        assert "== pretrain: 2 epochs, free training (2 replays per minibatch)" in proc.stdout
    rep = json.loads((tmp_path / "eval.json").read_text())
    for layer in rep["sparsity"]["layers"]:
        if layer["ratio"] > 0:
            assert layer["nonzero"] == layer["params"] - round(layer["ratio"] * layer["params"]), layer["name"]
    ckpt = torch.load(tmp_path / "retrain.pt", weights_only=True)
    assert ckpt["method"] == method


def test_fgsm_rs_is_one_step_of_1_25_eps_from_random_start():
    cfg = load_config(None, ["adv.method=fgsm_rs", "adv.eps=0.1"])
    info, cpu = data_lib.INFO["demo"], torch.device("cpu")
    method = make_method(cfg, True, info, cpu)
    attack = method.attack
    assert isinstance(method, AttackTraining) and method.name == "fgsm_rs"
    assert isinstance(attack, PGD) and attack.steps == 1 and attack.random_start
    assert attack.step_size == pytest.approx(0.125)
    assert isinstance(make_method(cfg, False, info, cpu), Natural) and make_method(cfg, False, info, cpu).attack is None
    free = make_method(load_config(None, ["adv.method=free", "adv.free_replays=3"]), True, info, cpu)
    assert isinstance(free, Free) and free.attack is None and free.replays == 3
    assert free.delta.shape == (cfg["data"]["batch_size"], 1, 28, 28)


def test_free_step_replays_and_keeps_delta_in_the_ball():
    torch.manual_seed(0)
    model = build_model("lenet", 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    delta = torch.zeros(16, 1, 28, 28)
    calls = []
    opt.register_step_post_hook(lambda *_: calls.append(1))
    before = [p.detach().clone() for p in model.parameters()]
    free_step(model, x, y, opt, delta, eps=0.1, replays=3)
    assert len(calls) == 3  # one optimizer step per replay
    assert delta[:8].abs().max() <= 0.1 + 1e-7 and delta[:8].abs().max() > 0  # FGSM steps, clipped to the ball
    assert torch.equal(delta[8:], torch.zeros(8, 1, 28, 28))  # rows beyond the batch untouched
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_train_step_with_penalty_adds_its_gradient():
    torch.manual_seed(0)
    model = build_model("lenet", 1)
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    w = model.fc2.weight
    for scale in (0.0, 1.0):
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: look at the gradients only
        train_step(model, model, x, y, opt, penalty=lambda: scale * w.square().sum())
        if scale == 0:
            g0 = w.grad.clone()
    assert torch.allclose(w.grad - g0, 2 * w.detach(), atol=1e-6)
