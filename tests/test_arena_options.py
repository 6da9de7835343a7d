"""The options the fair arena needs (issue 28): the scores' own optimizer, HARP's start-rate
inverse as its authors clip it, the validation split held out of the training set, and the
pretraining that stops when PGD accuracy on that split stops improving."""
import math

import pytest
import torch

from common import UserError
from config import load_config
from data import INFO
from models import build_model
from pruning import learned
from pruning.plan import make_stage
from training.methods import make_method
from training.state import Optimizers, TrainState

CPU = torch.device("cpu")


def state_of(kind, *sets, arch="lenet"):
    cfg = load_config("configs/demo.yaml", [f"prune.method={kind}", "prune.target=0.9", "model.width=1",
                                            f"model.arch={arch}", *sets]
                      + (["prune.prune_ratios={}"] if arch != "lenet" else []))
    torch.manual_seed(0)
    model = build_model(arch, 1)
    _, stage = make_stage(kind, model, cfg)
    return TrainState(stage, model, make_method(cfg, True, INFO["demo"], CPU), cfg, CPU)


def one_step(s, lr):
    """One training step of ``s``'s score stage at peak lr ``lr`` (set as the loop sets it);
    returns the scores before, the scores after and their gradients."""
    s.begin(None)
    for g in s.optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    before = {n: t.detach().clone() for n, t in s.stage.scores.items()}
    net = s.stage.network(s.model)
    torch.manual_seed(1)
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    s.method.step(net, net, x, y, s.optimizer, s.stage.penalty, s.precision)
    return before, {n: t.detach() for n, t in s.stage.scores.items()}, {n: t.grad for n, t in s.stage.scores.items()}


# --------------------------------------------------------------------------- prune.score_optimizer

def test_scores_take_the_sections_optimizer_by_default():
    s = state_of("hydra")  # the demo: admm.optimizer=adam
    assert isinstance(s.optimizer, torch.optim.Adam) and len(s.optimizer.param_groups) == 1


def test_sgd_on_the_scores_is_the_sgd_rule_by_hand():
    # SGD's first step with momentum 0.9 and weight decay wd: the buffer is g + wd s, so
    # s1 = s0 - lr (g + wd s0), lr = admm.lr x (score_lr / admm.lr) = score_lr.
    s = state_of("hydra", "prune.score_optimizer=sgd", "prune.score_lr=0.1", "prune.score_weight_decay=1e-4")
    assert isinstance(s.optimizer, torch.optim.SGD)
    assert s.optimizer.param_groups[0]["momentum"] == 0.9 and s.optimizer.param_groups[0]["weight_decay"] == 1e-4
    before, after, grad = one_step(s, s.cfg["admm"]["lr"])
    for n in before:
        assert torch.allclose(after[n], before[n] - 0.1 * (grad[n] + 1e-4 * before[n]), atol=1e-9), n


def test_adam_moves_every_score_by_about_its_lr_sgd_by_the_gradient():
    # Adam's first step is lr g / (|g| + eps): every score with a gradient moves by lr, whatever
    # its size (the "Adam overwrites the magnitude start"); SGD's step scales with g.
    _, adam, grad = one_step(state_of("hydra", "prune.score_lr=0.01"), 0.001)
    b, _, _ = one_step(state_of("hydra", "prune.score_lr=0.01"), 0.001)
    for n in b:
        moved = (adam[n] - b[n]).abs()[grad[n].abs() > 1e-6]
        assert torch.allclose(moved, torch.full_like(moved, 0.01), rtol=1e-2), n


def test_harp_rates_go_with_the_scores_optimizer():
    s = state_of("harp", "prune.score_optimizer=sgd", "prune.score_momentum=0.5")
    assert isinstance(s.optimizer, torch.optim.SGD)
    params = {id(p) for g in s.optimizer.param_groups for p in g["params"]}
    assert all(id(a) in params for a in s.stage.a.values())
    assert all(g["momentum"] == 0.5 for g in s.optimizer.param_groups)


def test_batchnorm_keeps_the_sections_optimizer_next_to_sgd_scores():
    s = state_of("hydra", "prune.score_optimizer=sgd", "prune.score_lr=0.1", arch="resnet18")
    assert isinstance(s.optimizer, Optimizers)
    adam, sgd = s.optimizer.optimizers
    assert isinstance(adam, torch.optim.Adam) and isinstance(sgd, torch.optim.SGD)
    bn = {id(p) for m in s.model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    assert {id(p) for g in adam.param_groups for p in g["params"]} == bn
    assert {id(p) for g in sgd.param_groups for p in g["params"]} == {id(t) for t in s.stage.scores.values()}
    assert len(s.optimizer.param_groups) == 2  # the loop sets the lr of both
    calls = []
    handle = s.optimizer.register_step_post_hook(lambda *_: calls.append(1))
    one_step(s, s.cfg["admm"]["lr"])
    handle.remove()
    assert calls == [1]
    state = s.optimizer.state_dict()
    assert set(state) == {"optimizers"} and len(state["optimizers"]) == 2
    assert state["optimizers"][1]["state"]  # SGD's momentum buffers
    fresh = state_of("hydra", "prune.score_optimizer=sgd", "prune.score_lr=0.1", arch="resnet18")
    fresh.optimizer.load_state_dict(state)
    assert torch.equal(fresh.optimizer.optimizers[1].state_dict()["state"][0]["momentum_buffer"],
                       state["optimizers"][1]["state"][0]["momentum_buffer"])


def test_score_optimizer_choices_are_checked():
    with pytest.raises(UserError, match="prune.score_optimizer"):
        load_config("configs/demo.yaml", ["prune.score_optimizer=rmsprop"])
    with pytest.raises(UserError, match="prune.score_weight_decay"):
        load_config("configs/demo.yaml", ["prune.score_weight_decay=-1"])


# --------------------------------------------------------------------------- prune.rate_init_clip

def test_start_logit_by_hand():
    # k = 0.5, k_min = 0.1: u = 0.4 / 0.9 = 4/9, logit = log((4/9) / (5/9)) = log(0.8)
    assert learned.start_logit(0.5, 0.1) == pytest.approx(math.log(0.8))
    assert learned.start_logit(0.5, 0.1, "authors") == pytest.approx(math.log(0.8))
    # a dense start: u = 1, clipped to 0.99 by both: log(99)
    assert learned.start_logit(1.0, 0.1) == pytest.approx(math.log(99))
    assert learned.start_logit(1.0, 0.1, "authors") == pytest.approx(math.log(99))
    # k = 0.105: u = 0.005 / 0.9 = 1/180. The floor raises it to 0.01; the authors' keep it
    assert learned.start_logit(0.105, 0.1) == pytest.approx(math.log(0.01 / 0.99))
    assert learned.start_logit(0.105, 0.1, "authors") == pytest.approx(math.log((1 / 180) / (179 / 180)))
    with pytest.raises(UserError, match="k_min"):  # u <= 0: the authors' inverse is -inf or NaN
        learned.start_logit(0.1, 0.1, "authors")


def test_harp_starts_below_the_floor_only_with_the_authors_clip():
    # target 0.99 on LeNet w=1, uniform: every layer keeps ~1 %, k_min = 0.1 % of it; the floor
    # lifts every start to k_min + 0.01 (1 - k_min), the authors' inverse keeps the 1 %.
    sets = ["prune.target=0.99"]
    floor, authors = state_of("harp", *sets), state_of("harp", *sets, "prune.rate_init_clip=authors")
    floor.begin(None)
    authors.begin(None)
    for n in authors.stage.a:
        k_min, start = authors.stage.k_min, authors.stage.start[n]
        assert float(authors.stage.k(n).detach()) == pytest.approx(start, rel=1e-4)
        assert float(floor.stage.k(n).detach()) == pytest.approx(max(start, k_min + 0.01 * (1 - k_min)), rel=1e-4)
    assert float(floor.stage.keep_rate().detach()) > 1.05 * float(authors.stage.keep_rate().detach())
