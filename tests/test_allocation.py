"""Layer-wise allocation from one overall target: each rule against a hand computation, the
overall count exact, table entries winning, progressive rounds by compression rate."""
import re

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import admm as admm_lib
from pruning import allocation as al
from common import UserError
from config import DEFAULTS, load_config
from pruning.plan import RateStep, TargetFraction, pipeline


def tiny():
    """Three prunable layers: 0.weight [2, 1, 3, 3] (18), 2.weight [4, 18] (72), 3.weight [2, 4] (8)."""
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(18, 4), nn.Linear(4, 2))


def pcfg(**kw):
    return {**DEFAULTS["prune"], **kw}


def test_lamp_scores_by_hand():
    # squares 1, 9, 4, 0.25; ascending 0.25 | 1 | 4 | 9, tail sums 14.25 | 14 | 13 | 9 (Lee et al. Eq. 2)
    got = al.lamp_scores(torch.tensor([1.0, -3.0, 2.0, 0.5]))
    assert got.tolist() == pytest.approx([1 / 14, 1.0, 4 / 13, 0.25 / 14.25])


def test_global_and_lamp_differ_as_computed_by_hand():
    small, large = torch.tensor([0.01, 0.02, 0.03, 0.04]), torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    # one magnitude threshold: the three smallest are all in the small layer (its largest is kept)
    assert al.prune_lowest({"a": small.abs(), "b": large.abs()}, 3) == {"a": 3, "b": 0}
    # LAMP: a = 1/30, 4/29, 9/25, 1; b = 1/55, 4/54, 9/50, 16/41, 1 -> lowest three: b, a, b
    assert al.prune_lowest({"a": al.lamp_scores(small), "b": al.lamp_scores(large)}, 3) == {"a": 1, "b": 2}


def test_prune_lowest_keeps_one_weight_per_layer():
    with pytest.raises(ValueError):
        al.prune_lowest({"a": torch.ones(3), "b": torch.ones(2)}, 4)  # only 2 + 1 may go
    assert al.prune_lowest({"a": torch.ones(3), "b": torch.ones(2)}, 3) == {"a": 2, "b": 1}


def test_erk_by_hand():
    shapes = {"c": (2, 1, 3, 3), "l1": (4, 18), "l2": (2, 4)}
    # n_l * raw_l is the sum of the dimensions: 9, 22, 6; eps = 20 / 37
    assert al.erk_keep(shapes, 20) == pytest.approx({"c": 9 * 20 / 37, "l1": 22 * 20 / 37, "l2": 6 * 20 / 37})
    # 60 kept: l2 would be 6 * 60 / 37 > 8, so it is dense and eps = 52 / 31 for the others
    assert al.erk_keep(shapes, 60) == pytest.approx({"c": 9 * 52 / 31, "l1": 22 * 52 / 31, "l2": 8})


def test_apportion_largest_remainder_by_hand():
    # 20 kept of 18, 72, 8 in proportion to size: 3.673, 14.694, 1.633 -> floors 3, 14, 1, the two
    # largest remainders (.694, .673) get one more
    assert al.apportion({"a": 18, "b": 72, "c": 8}, {"a": 18, "b": 72, "c": 8}, 20) == {"a": 4, "b": 15, "c": 1}


def test_apportion_holds_the_bounds_when_a_capped_layer_leaves_too_little():
    # the share of c (3 > its 2 weights) is capped; a and b (quota 0) still keep one each
    assert al.apportion({"a": 0.0, "b": 0.0, "c": 1.0}, {"a": 1, "b": 1, "c": 2}, 3) == {"a": 1, "b": 1, "c": 1}
    # 10 of (8, 4, 4) by (6, 1, 1): lam = 1.25, shares 7.5, 1.25, 1.25, floors 7, 1, 1, the .5 remainder -> 8, 1, 1
    assert al.apportion({"a": 6.0, "b": 1.0, "c": 1.0}, {"a": 8, "b": 4, "c": 4}, 10) == {"a": 8, "b": 1, "c": 1}


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 50), st.floats(0, 10)), min_size=1, max_size=6), st.data())
def test_apportion_is_exact_and_within_bounds(layers, data):
    sizes = {f"l{i}": n for i, (n, _) in enumerate(layers)}
    quota = {f"l{i}": q for i, (_, q) in enumerate(layers)}
    total = data.draw(st.integers(len(sizes), sum(sizes.values())))
    got = al.apportion(quota, sizes, total)
    assert sum(got.values()) == total
    assert all(1 <= got[n] <= sizes[n] for n in sizes)


def fill(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for w in admm_lib.prunable_weights(model).values():
            w.copy_(torch.randn_like(w))
    return model


@pytest.mark.parametrize("rule", ["uniform", "global", "lamp", "erk"])
def test_each_rule_meets_the_overall_target_exactly(rule):
    model = fill(tiny())
    a = al.allocate(model, pcfg(target=0.8, allocation=rule))
    sizes = {n: w.numel() for n, w in admm_lib.prunable_weights(model).items()}
    counts = a.counts(sizes)
    assert sum(counts.values()) == round(0.8 * 98) == 78
    w = admm_lib.prunable_weights(model)
    if rule == "uniform":
        assert counts == {"0.weight": 14, "2.weight": 57, "3.weight": 7}  # kept 4, 15, 1 (by hand above)
    elif rule == "erk":
        assert counts == {"0.weight": 13, "2.weight": 60, "3.weight": 5}  # kept 9e, 22e, 6e, e = 20/37: 5, 12, 3
    else:  # brute force: rank every weight but each layer's largest score, prune the 78 lowest
        score = (lambda t: t.abs()) if rule == "global" else al.lamp_scores
        pool = []
        for n, t in w.items():
            s = score(t).flatten().tolist()
            top = max(range(len(s)), key=lambda i: (s[i], -i))
            pool += [(v, n) for i, v in enumerate(s) if i != top]
        pool.sort(key=lambda p: p[0])
        assert counts == {n: sum(1 for _, m in pool[:78] if m == n) for n in w}
    for n, r in a.ratios.items():  # the ratio gives back the count through the projection's rounding
        assert admm_lib.n_pruned(sizes[n], r) == counts[n]
        assert int((~admm_lib.prune_mask(w[n], r, "irregular")).sum()) == counts[n]


def test_table_entries_win_and_the_rest_share_the_remaining_budget():
    model = fill(tiny())
    a = al.allocate(model, pcfg(target=0.8, allocation="uniform", prune_ratios={"3.weight": 0.5}))
    # 3.weight keeps 4; the others keep 20 - 4 = 16 in proportion to 18 and 72: 3.2, 12.8 -> 3, 13
    assert a.counts({"0.weight": 18, "2.weight": 72, "3.weight": 8}) == {"0.weight": 15, "2.weight": 59, "3.weight": 4}
    assert a.fixed == ["3.weight"]
    dense = al.allocate(model, pcfg(target=0.5, prune_ratios={"3.weight": 0.0}))  # a layer kept dense
    assert dense.ratios["3.weight"] == 0.0 and sum(dense.counts({"0.weight": 18, "2.weight": 72, "3.weight": 8}).values()) == 49


def test_a_table_naming_every_layer_is_replaced_by_the_target(caplog):
    model = fill(tiny())
    table = {"0.weight": 0.5, "2.weight": 0.5, "3.weight": 0.5}
    a = al.allocate(model, pcfg(target=0.8, prune_ratios=table))
    assert a.fixed == [] and sum(a.counts({"0.weight": 18, "2.weight": 72, "3.weight": 8}).values()) == 78
    assert "replaces prune.prune_ratios" in caplog.text


def test_infeasible_target_is_one_line():
    with pytest.raises(UserError, match="prune.target=0.99: the layers prune.prune_ratios fixes leave"):
        al.allocate(fill(tiny()), pcfg(target=0.99, prune_ratios={"2.weight": 0.1}))


def test_without_a_target_the_table_is_the_allocation():
    a = al.allocate(fill(tiny()), pcfg(prune_ratios={"2.weight": 0.9, "3.weight": 0.0}))
    assert a.ratios == {"2.weight": 0.9} and a.rule == "table"


def test_learned_rates_are_rescaled_to_the_target():
    model = fill(tiny())
    learned = {"0.weight": 0.5, "2.weight": 0.9, "3.weight": 0.0}  # keeps 9, 7.2, 8 -> shares of 24.2
    a = al.allocate(model, pcfg(target=0.8, allocation="from_checkpoint", rates_from="x.pt"),
                    load=lambda p: {"allocation": {"ratios": learned}})
    # 20 kept in proportion to 9, 7.2, 8: 7.438, 5.950, 6.612 -> 7, 5, 6 and the remainders .950, .612 -> 7, 6, 7
    assert a.counts({"0.weight": 18, "2.weight": 72, "3.weight": 8}) == {"0.weight": 11, "2.weight": 66, "3.weight": 1}


def test_saved_allocation_is_reused_only_for_the_same_settings():
    model = fill(tiny())
    cfg = {"prune": pcfg(target=0.8, allocation="lamp")}
    first = al.resolve(model, cfg)
    with torch.no_grad():
        for w in admm_lib.prunable_weights(model).values():
            w.mul_(torch.rand_like(w))  # training moved the weights
    again = al.resolve(model, cfg, {"allocation": first.state_dict()})
    assert again.ratios == first.ratios  # computed once, carried on
    other = al.resolve(model, {"prune": pcfg(target=0.7, allocation="lamp")}, {"allocation": first.state_dict()})
    assert sum(other.counts({"0.weight": 18, "2.weight": 72, "3.weight": 8}).values()) == round(0.7 * 98)


def test_rate_rounds_step_the_overall_compression_rate():
    ratios = {"a": 0.99, "b": 0.98}  # kept 1 % and 2 %
    assert RateStep(10, 100).ratios(ratios) == pytest.approx({"a": 0.9, "b": 0.8})
    assert RateStep(100, 100).ratios(ratios) == ratios
    assert RateStep(2, 100).ratios(ratios) == pytest.approx({"a": 0.5, "b": 0.0})  # at most dense
    assert TargetFraction(0.5).ratios(ratios) == pytest.approx({"a": 0.495, "b": 0.49})
    names = [s[0] for s in pipeline(method="admm", rate_rounds=[10, 30, 100])]
    assert names == ["pretrain", "admm.r1", "retrain.r1", "admm.r2", "retrain.r2", "admm", "retrain"]


@pytest.mark.parametrize("sets,needle", [
    (["prune.target=1.0"], "prune.target: must be in [0, 1)"),
    (["prune.allocation=lamp"], "prune.allocation=lamp splits an overall target"),
    (["prune.target=0.9", "prune.allocation=from_checkpoint"], "prune.rates_from"),
    (["prune.target=0.9", "prune.sparsity_type=filter"], "exact for irregular pruning only"),
    (["prune.method=hydra", "prune.sparsity_type=column"], "irregular pruning only"),
    (["prune.method=harp", "prune.rounds=[0.5, 1.0]"], "progressive rounds are for"),
    (["prune.rate_rounds=[10, 100]"], "need an overall target"),
    (["prune.target=0.99", "prune.rate_rounds=[10, 30]"], "must be the target's compression rate"),
    (["prune.target=0.99", "prune.rate_rounds=[30, 10, 100]"], "must rise strictly"),
    (["prune.target=0.99", "prune.rate_rounds=[10, 100]", "prune.rounds=[0.5, 1.0]"], "set one of them"),
])
def test_bad_allocation_settings_are_one_line_errors(sets, needle):
    with pytest.raises(UserError, match=re.escape(needle)):
        load_config("configs/demo.yaml", sets)


def test_rate_rounds_prune_each_round_to_its_overall_rate():
    from models import build_model
    from pruning.plan import make_stage
    cfg = load_config("configs/demo.yaml", ["prune.target=0.99", "prune.allocation=lamp", "prune.rate_rounds=[10, 100]",
                                            "model.width=1"])
    model = fill(build_model("lenet", 1))
    _, first = make_stage("admm.r1", model, cfg)
    _, last = make_stage("admm", model, cfg, {"allocation": first.allocation.state_dict()})
    sizes = {n: w.numel() for n, w in admm_lib.prunable_weights(model).items()}
    assert last.ratios == first.allocation.ratios  # the last round is the allocation, carried on
    assert sum(last.allocation.counts(sizes).values()) == round(0.99 * sum(sizes.values()))
    for n, r in last.ratios.items():  # round 1 keeps 10x each layer's final share (at most all of it)
        assert first.ratios[n] == pytest.approx(1 - min(1.0, (1 - r) * 10))
    kept = sum(sizes[n] - admm_lib.n_pruned(sizes[n], r) for n, r in first.ratios.items())
    final = {n: sizes[n] - c for n, c in last.allocation.counts(sizes).items()}
    assert kept == pytest.approx(sum(min(sizes[n], 10 * k) for n, k in final.items()), abs=len(sizes))
    assert any(10 * k > sizes[n] for n, k in final.items())  # LAMP kept a layer above 10 %: dense in round 1
