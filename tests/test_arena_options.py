"""The options the fair arena needs: the scores' own optimizer, HARP's start-rate
inverse as its authors clip it, the validation split held out of the training set, and the
pretraining that stops when PGD accuracy on that split stops improving."""
import math
import os

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


# --------------------------------------------------------------------------- data.val_size

def _rows(split):
    return {bytes(x.numpy().tobytes()) for x in split.images}


def test_validation_split_is_held_out_of_train_and_disjoint_from_test():
    import data as data_lib
    full, _, test0, _ = data_lib.load_splits(load_config("configs/demo.yaml"))
    train, val, test, _ = data_lib.load_splits(load_config("configs/demo.yaml", ["data.val_size=500"]))
    assert (len(full.labels), len(train.labels), len(val.labels)) == (4000, 3500, 500)
    assert torch.equal(test.images, test0.images)  # the test set is untouched
    assert torch.equal(val.images, full.images[3500:]) and torch.equal(train.images, full.images[:3500])
    assert not _rows(val) & _rows(test) and not _rows(val) & _rows(train)
    limited, val2, _, _ = data_lib.load_splits(load_config("configs/demo.yaml", ["data.val_size=500",
                                                                               "data.train_limit=3900"]))
    assert len(limited.labels) == 3500 and torch.equal(val2.images, val.images)  # the limit never reaches val
    assert data_lib.load_data(load_config("configs/demo.yaml"))[0].images.equal(full.images)  # default: as before
    with pytest.raises(UserError, match="data.val_size"):
        data_lib.load_splits(load_config("configs/demo.yaml", ["data.val_size=4000"]))
    with pytest.raises(UserError, match="data.val_size"):
        load_config("configs/demo.yaml", ["pretrain.patience=3"])


# --------------------------------------------------------------------------- pretrain.patience

def test_early_stop_rule_by_hand():
    from training.state import EarlyStop
    model = torch.nn.Linear(1, 1, bias=False)
    stop = EarlyStop(patience=2, min_delta=0.01)
    # epoch: 1     2     3      4     5     6
    vals = [0.30, 0.40, 0.405, 0.41, 0.39, 0.50]
    # best: 1 (0.30), 2 (0.40), 3 no (+0.005 <= 0.01), 4 no (+0.01 is not > 0.01): 2 epochs past 2 -> stop at 4
    decisions = []
    for e, v in enumerate(vals, 1):
        with torch.no_grad():
            model.weight.fill_(float(e))
        decisions.append(stop.observe(e, v, model))
        if decisions[-1]:
            break
    assert decisions == [False, False, False, True]
    assert (stop.best_epoch, stop.best) == (2, 0.40)
    stop.restore(model)
    assert model.weight.item() == 2.0  # the best epoch's weights
    again = EarlyStop(2, 0.01)
    again.load_state_dict(stop.state_dict())
    assert again.stopped and again.best_epoch == 2


def _pretrain(tmp_path, test_split=None, extra=(), stop=None, resume=None):
    import data as data_lib
    from training.loop import RunContext, train_stage
    from training.rundir import RunFolder
    from models import model_from_config
    cfg = load_config("configs/demo.yaml", ["data.train_limit=256", "data.val_size=200", "adv.steps=1", "adv.eps=0.05", "adv.step_size=0.05", "data.batch_size=16",
                                            "eval.steps=2", "eval.limit=50", "pretrain.epochs=10", "pretrain.lr=0.003",
                                            "pretrain.patience=1", "pretrain.schedule=constant", "adv.eps_ramp=0", *extra])
    train, val, test, info = data_lib.load_splits(cfg)
    torch.manual_seed(0)
    model = model_from_config(cfg, info, CPU)

    class Never:
        signum = None

        def requested(self, step=None):
            return False

    ctx = RunContext(cfg, train, test_split or test, info, make_method(cfg, True, info, CPU), CPU,
                     RunFolder(str(tmp_path)), stop or Never(), "resume", val=val)
    os.makedirs(tmp_path, exist_ok=True)
    if resume is not None:
        model.load_state_dict(resume["model"])
    ckpt = train_stage("pretrain", model, ctx, resume=resume)
    import json
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if '"epoch"' in line]
    return ckpt, [r for r in rows if r.get("kind") == "epoch"]


def test_pretraining_stops_on_the_validation_split_never_the_test_set(tmp_path):
    import data as data_lib
    ckpt, rows = _pretrain(tmp_path / "a")
    assert all("val_pgd" in r for r in rows)
    best, best_epoch, stop_at = -1.0, 0, None  # the rule, replayed on the logged validation column
    for r in rows:
        if r["val_pgd"] > best:
            best, best_epoch = r["val_pgd"], r["epoch"]
        if r["epoch"] - best_epoch >= 1:
            stop_at = r["epoch"]
            break
    assert stop_at is not None and len(rows) == stop_at < 10  # stopped before its 10 epochs
    summary = ckpt["metrics"]["early_stop"]
    assert (summary["best_epoch"], summary["best_val_pgd"]) == (best_epoch, best)
    # The same run with the test set replaced by other images (the labels rolled): the test
    # figures change, every decision (when to stop, which epoch's weights) stays the same.
    _, _, test, _ = data_lib.load_splits(load_config("configs/demo.yaml"))
    other = data_lib.Split(test.images.flip(0), test.labels.roll(1))
    ckpt2, rows2 = _pretrain(tmp_path / "b", other)
    assert [r["test_pgd"] for r in rows2] != [r["test_pgd"] for r in rows]
    assert [r["val_pgd"] for r in rows2] == [r["val_pgd"] for r in rows]
    assert ckpt2["metrics"]["early_stop"] == summary
    assert all(torch.equal(ckpt["model"][k], ckpt2["model"][k]) for k in ckpt["model"])


# --------------------------------------------------------------------------- the fair arena's plan

def test_fair_arena_plan_budgets_starts_and_per_target_sets():
    import sys
    import yaml
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
    from sweep import plan
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments",
                           "arena_fair.yaml")) as f:
        spec = yaml.safe_load(f)
    cells = {c["id"]: c for c in plan(spec)}

    def value(cell, key, step=0):  # the last --set of ``key`` wins
        return [s.split("=", 1)[1] for s in cells[cell]["steps"][step]["sets"] if s.startswith(key + "=")][-1]

    # starts: the spec's converged one per seed, today's 10 epochs for the check row, ResNet's own
    assert {i for i, c in cells.items() if c["kind"] == "pretrain"} == {
        "pre-adv-w4-s0", "pre-adv-w4-s1", "pre-adv-w4-s2", "pre-adv-w4-s0-e10", "pre-adv-w2-s0-r18", "pre-adv-w2-s1-r18"}
    assert (value("pre-adv-w4-s1", "pretrain.patience"), value("pre-adv-w4-s1", "data.val_size")) == ("5", "1000")
    assert (value("pre-adv-w4-s0-e10", "pretrain.epochs"), value("pre-adv-w4-s0-e10", "pretrain.patience")) == ("10", "0")
    assert (value("pre-adv-w2-s0-r18", "model.arch"), value("pre-adv-w2-s0-r18", "model.width")) == ("resnet18", "2")
    assert cells["oneshot-lamp-t95-check10-s0"]["deps"] == ["pre-adv-w4-s0-e10"]
    # budgets and splits: (a) 8 + 4 and 24 + 12; HYDRA (b) 2 + 10 and 6 + 30; progressive 2 x (12 + 6)
    assert (value("hydra-lamp-t99-main-s2", "admm.epochs"), value("hydra-lamp-t99-main-s2", "retrain.epochs")) == ("8", "4")
    assert (value("hydra-lamp-t95-a36-s1", "admm.epochs"), value("hydra-lamp-t95-a36-s1", "retrain.epochs")) == ("24", "12")
    assert (value("hydra-lamp-t99-b12-h1-s0", "admm.epochs"), value("hydra-lamp-t99-b12-h1-s0", "retrain.epochs")) == ("2", "10")
    assert (value("hydra-lamp-t99-b36-h1-s1", "admm.epochs"), value("hydra-lamp-t99-b36-h1-s1", "retrain.epochs")) == ("6", "30")
    assert value("progressive-lamp-t99-a36-s0", "admm.epochs") == "12"
    assert value("hydra-lamp-t99-b12-h1-s0", "prune.score_optimizer") == "sgd"
    assert value("hydra-lamp-t99-b12-h1-s0", "lr_span") == "stage" and value("hydra-lamp-t99-main-s0", "lr_span") == "run"
    # HARP's authors' start: 10 % kept per layer, uniform x 2 at 95 %, x 10 at 99 %, after its LAMP default
    assert (value("harp-learned-t95-b12-r1-s1", "prune.allocation"), value("harp-learned-t95-b12-r1-s1", "prune.rate_start"),
            value("harp-learned-t99-b12-r1-s1", "prune.rate_start")) == ("uniform", "2", "10")
    assert value("harp-learned-t99-b12-r2-s1", "prune.allocation") == "lamp"
    # ADMM at HARP's rates under (b) reads the (a) HARP cell of its budget
    assert "harp-learned-t99-main-s1" in cells["admm_harp-harp-t99-b12-x1-s1"]["deps"]
    assert "harp-learned-t95-a36-s0" in cells["admm_harp-harp-t95-b36-x2-s0"]["deps"]
    # every (b) method has 2 settings per budget; seeds 3 at 12 epochs, 2 at 36
    trained = [c for c in cells.values() if c["kind"] != "autoattack"]
    b12 = [c for c in trained if c["meta"].get("variant", "").startswith("b12-")]
    b36 = [c for c in trained if c["meta"].get("variant", "").startswith("b36-")]
    assert len(b12) == 7 * 2 * 2 * 3 and len(b36) == 7 * 2 * 2 * 2
    # written in after the b12 cells: 5 ResNet rows x 2 seeds from their own start; AutoAttack on
    # seed 0's 14 (a) and 14 (b) cells of record at 12 epochs and on the two LeNet starts of seed 0
    r18 = [c for c in trained if c["meta"].get("variant", "").startswith("r18-")]
    assert len(r18) == 10 and all(c["deps"] == [f"pre-adv-w2-s{c['seed']}-r18"] for c in r18)
    assert value("hydra-lamp-t99-r18-hydra-s1", "prune.score_optimizer") == "sgd"
    aa = sorted(c["id"] for c in cells.values() if c["kind"] == "autoattack")
    assert len(aa) == 30 and "pre-adv-w4-s0-aa" in aa and "pre-adv-w4-s0-e10-aa" in aa
    assert "hydra-lamp-t99-b12-h2-s0-aa" in aa and "hydra-lamp-t99-main-s0-aa" in aa
    assert {c["meta"]["budget"] for c in b36} == {36}
    # the config each cell's stages load is valid (every key known, every value in range)
    for c in list(cells.values())[::7]:
        for st in c["steps"]:
            if "script" in st:
                load_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), spec["config"]),
                            [s.replace("{out}", "/tmp") for s in st["sets"]])


def test_early_stopping_resumes_to_the_same_decision_and_weights(tmp_path):
    # 16 steps per epoch. The uninterrupted run stops after epoch E (which E depends on the CPU's
    # float sums); the second is stopped at step 4 of that last epoch, after the best was kept.
    from common import load_checkpoint
    from training.stops import Interrupted

    from helpers import StopAt

    whole, rows = _pretrain(tmp_path / "a")
    stop = whole["metrics"]["early_stop"]
    assert stop["stopped_early"] and stop["best_epoch"] < len(rows)
    with pytest.raises(Interrupted):
        _pretrain(tmp_path / "b", stop=StopAt((len(rows) - 1) * 16 + 4))
    last = load_checkpoint(str(tmp_path / "b" / "pretrain.last.pt"))
    assert last["epoch"] == len(rows) - 1 and last["early_stop"]["best_epoch"] == stop["best_epoch"]
    resumed, rows = _pretrain(tmp_path / "b", resume=last)
    assert resumed["metrics"]["early_stop"] == whole["metrics"]["early_stop"]
    assert all(torch.equal(whole["model"][k], resumed["model"][k]) for k in whole["model"])


def test_a_config_saved_before_the_new_keys_still_loads_its_data_and_stages():
    # eval.py and export.py read the config inside a checkpoint: one written before data.val_size,
    # prune.score_optimizer and prune.rate_init_clip lacks them and means none / the old behaviour
    import data as data_lib
    cfg = load_config("configs/demo.yaml")
    del cfg["data"]["val_size"], cfg["prune"]["score_optimizer"], cfg["prune"]["rate_init_clip"]
    train, val, _, _ = data_lib.load_splits(cfg)
    assert len(train.labels) == 4000 and len(val.labels) == 0
    from training.state import score_optimizer
    assert score_optimizer(cfg["prune"]) is None
