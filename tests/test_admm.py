"""Unit tests for admm.py: exact projections, the ADMM state update, ratios by name, masks, reports."""
import math

import numpy as np
import pytest
import torch

import admm
from common import UserError
from config import load_config
from models import build_model

SHAPES = [(7, 5, 3, 3), (13, 11)]  # conv [out, in, kh, kw] and linear [out, in]
RATIOS = [0.0, 0.1, 0.33, 0.5, 0.77, 0.9, 0.999]


def ref_scores(w, scheme):
    """Group scores computed independently of admm.group_scores."""
    w2 = w.reshape(w.shape[0], -1).double()
    if scheme == "irregular":
        return w2.abs().flatten()
    if scheme == "filter":
        return w2.pow(2).sum(1).sqrt()
    return w2.pow(2).sum(0).sqrt()  # column: input position (in, kh, kw) across all filters


def kept_groups(mask, scheme):
    """Per-group keep flags from an element mask, asserting the mask is constant within each group."""
    m2 = mask.reshape(mask.shape[0], -1)
    if scheme == "irregular":
        return m2.flatten()
    if scheme == "filter":
        assert (m2 == m2[:, :1]).all(), "filter mask not constant within an output channel"
        return m2[:, 0]
    assert (m2 == m2[:1, :]).all(), "column mask not constant across filters"
    return m2[0, :]


def n_groups(shape, scheme):
    out, rest = shape[0], math.prod(shape[1:])
    return {"irregular": out * rest, "filter": out, "column": rest}[scheme]


# --------------------------------------------------------------------------- projections

# Groups pruned of n at each of RATIOS, worked out by hand: ratio * n rounded half to even
# (e.g. 0.1 * 45 = 4.5 -> 4, 0.5 * 315 = 157.5 -> 158, 0.33 * 11 = 3.63 -> 4).
PRUNED_BY_HAND = {315: [0, 32, 104, 158, 243, 284, 315], 7: [0, 1, 2, 4, 5, 6, 7], 45: [0, 4, 15, 22, 35, 40, 45],
                  143: [0, 14, 47, 72, 110, 129, 143], 13: [0, 1, 4, 6, 10, 12, 13], 11: [0, 1, 4, 6, 8, 10, 11]}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("scheme", admm.SCHEMES)
@pytest.mark.parametrize("ratio", RATIOS)
def test_projection_prunes_exact_count_of_lowest_scores(shape, scheme, ratio):
    w = torch.randn(shape)
    mask = admm.prune_mask(w, ratio, scheme)
    assert mask.dtype == torch.bool and mask.shape == w.shape

    n = n_groups(shape, scheme)
    kept = kept_groups(mask, scheme)
    assert kept.numel() == n
    expected = PRUNED_BY_HAND[n][RATIOS.index(ratio)]
    assert admm.n_pruned(n, ratio) == expected
    assert int((~kept).sum()) == expected

    score = ref_scores(w, scheme)
    if kept.any() and (~kept).any():
        assert score[kept].min() >= score[~kept].max()

    p = admm.project(w, ratio, scheme)
    assert torch.equal(p, w * mask)
    assert (p[~mask] == 0).all() and torch.equal(p[mask], w[mask])
    # Projection is idempotent: the projected tensor is already in the sparsity set.
    assert torch.equal(admm.project(p, ratio, scheme), p)


def test_ratio_0999_prunes_everything_on_small_tensors():
    # round(0.999 * 13) == 13: all groups go; a good check that nothing is silently kept.
    assert admm.prune_mask(torch.randn(13, 11), 0.999, "filter").sum() == 0
    assert admm.prune_mask(torch.randn(13, 11), 0.999, "irregular").sum() == 143 - round(0.999 * 143)


def test_n_pruned_rounds_half_to_even():
    assert admm.n_pruned(13, 0.5) == 6  # round(6.5) == 6
    assert admm.n_pruned(15, 0.5) == 8  # round(7.5) == 8
    assert admm.n_pruned(10, 0.0) == 0


def _tied(shape, scheme, g):
    """A tensor whose groups take only two distinct scores (many exact ties), with random signs."""
    sign = torch.randint(0, 2, shape, generator=g).float() * 2 - 1
    out, rest = shape[0], math.prod(shape[1:])
    if scheme == "irregular":
        level = torch.tensor([0.25, 0.5])[torch.randint(0, 2, (out * rest,), generator=g)].view(shape)
    elif scheme == "filter":
        level = torch.tensor([0.25, 0.5])[torch.randint(0, 2, (out,), generator=g)]
        level = level.view(-1, *([1] * (len(shape) - 1))).expand(shape)
    else:
        level = torch.tensor([0.25, 0.5])[torch.randint(0, 2, (rest,), generator=g)]
        level = level.view(1, -1).expand(out, rest).reshape(shape)
    return sign * level


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("scheme", admm.SCHEMES)
@pytest.mark.parametrize("ratio", [0.1, 0.33, 0.5, 0.77])
def test_ties_prune_exact_count_keeping_lower_index(shape, scheme, ratio):
    g = torch.Generator().manual_seed(1)
    for w in (_tied(shape, scheme, g), torch.full(shape, 0.3)):
        mask = admm.prune_mask(w, ratio, scheme)
        assert torch.equal(mask, admm.prune_mask(w, ratio, scheme))  # deterministic
        kept = kept_groups(mask, scheme)
        n = kept.numel()
        k = n - round(ratio * n)
        # Reference: sort by (score descending, index ascending), keep the first k.
        score = ref_scores(w, scheme).tolist()
        expect = torch.zeros(n, dtype=torch.bool)
        expect[sorted(range(n), key=lambda i: (-score[i], i))[:k]] = True
        assert torch.equal(kept, expect)


def test_all_equal_keeps_leading_indices():
    mask = admm.prune_mask(torch.ones(13, 11), 0.33, "irregular").flatten()
    k = 143 - round(0.33 * 143)
    assert torch.equal(mask, torch.arange(143) < k)


@pytest.mark.parametrize("scheme", admm.SCHEMES)
def test_degenerate_layers_project_exactly(scheme):
    """All weights equal, all zero, a single weight: the count is exact, the lowest-index groups
    are kept (every score ties), and the projection is finite and keeps the values it keeps."""
    # 6 x 4 of 0.5: 24 elements, 6 filters, 4 columns; ratio 0.5 prunes 12, 3, 2 of them.
    for value in (0.5, 0.0):
        w = torch.full((6, 4), value)
        p = admm.project(w, 0.5, scheme)
        kept = {"irregular": torch.arange(24).view(6, 4) < 12, "filter": (torch.arange(6) < 3)[:, None].expand(6, 4),
                "column": (torch.arange(4) < 2)[None, :].expand(6, 4)}[scheme]
        assert torch.equal(admm.prune_mask(w, 0.5, scheme), kept)
        assert torch.isfinite(p).all() and torch.equal(p, w * kept)
    one = torch.tensor([[-2.0]])  # round(0.3 * 1) = 0 pruned, round(0.6 * 1) = 1
    assert torch.equal(admm.project(one, 0.3, scheme), one)
    assert torch.equal(admm.project(one, 0.6, scheme), torch.zeros(1, 1))


def test_percentile_threshold_misses_count_with_ties_ours_does_not():
    w = torch.tensor([1.0, -1.0, 1.0, 1.0, 2.0, -2.0, 2.0, 2.0, 3.0, 3.0])
    ratio = 0.5  # target: exactly 5 of 10 pruned
    # The original code's way: a percentile threshold, then zero what is strictly below.
    w_np = w.numpy().copy()
    thr = np.percentile(np.abs(w_np), ratio * 100)
    w_np[np.abs(w_np) < thr] = 0
    assert int((w_np == 0).sum()) != 5  # it prunes 4: the four 2's tie with the threshold
    ours = admm.project(w, ratio, "irregular")
    assert int((ours == 0).sum()) == 5
    # All 1's go, and of the four tied 2's the highest index (7) is pruned: lower index kept.
    assert torch.equal(ours, torch.tensor([0.0, 0, 0, 0, 2.0, -2.0, 2.0, 0.0, 3.0, 3.0]))


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan")])
def test_ratio_outside_unit_interval_raises(ratio):
    with pytest.raises(ValueError):
        admm.prune_mask(torch.randn(4, 4), ratio, "irregular")


def test_unknown_scheme_raises():
    with pytest.raises(ValueError, match="irregular"):
        admm.prune_mask(torch.randn(4, 4), 0.5, "channel")


def test_low_precision_projection_keeps_dtype_and_count():
    w = torch.randn(13, 11).to(torch.bfloat16)
    p = admm.project(w, 0.5, "irregular")
    assert p.dtype == torch.bfloat16
    assert int((p == 0).sum()) == round(0.5 * 143)


# --------------------------------------------------------------------------- ADMM state

def test_admm_update_matches_hand_computation():
    w = torch.tensor([[0.5, -0.1], [0.3, 0.05]])
    weights = {"fc.weight": w}
    state = admm.ADMM(weights, admm.Sparsity("irregular", {"fc.weight": 0.5}), rho=0.1)

    # Z = Pi_S(W): keep the 2 of 4 largest |w|; U = 0.
    assert torch.equal(state.Z["fc.weight"], torch.tensor([[0.5, 0.0], [0.3, 0.0]]))
    assert torch.equal(state.U["fc.weight"], torch.zeros(2, 2))
    assert state.rho["fc.weight"] == pytest.approx(0.1)

    # Step 1. W+U = W = [[.4, .2], [-.1, .6]] -> Z keeps .4 and .6; U = W - Z = [[0, .2], [-.1, 0]],
    # then rho 0.1 -> 0.2 and U /= 2 -> [[0, .1], [-.05, 0]].
    w.copy_(torch.tensor([[0.4, 0.2], [-0.1, 0.6]]))
    state.update(weights, rho_growth=2.0)
    torch.testing.assert_close(state.Z["fc.weight"], torch.tensor([[0.4, 0.0], [0.0, 0.6]]))
    torch.testing.assert_close(state.U["fc.weight"], torch.tensor([[0.0, 0.1], [-0.05, 0.0]]))
    assert state.rho["fc.weight"] == pytest.approx(0.2)

    # Step 2. W = [[.3, .1], [-.2, .05]]; W+U = [[.3, .2], [-.25, .05]] -> Z keeps .3 and -.25
    # (taken from W+U, not W); U = U + W - Z = [[0, .2], [0, .05]]; rho -> 0.4, U /= 2.
    w.copy_(torch.tensor([[0.3, 0.1], [-0.2, 0.05]]))
    res = state.update(weights, rho_growth=2.0)
    torch.testing.assert_close(state.Z["fc.weight"], torch.tensor([[0.3, 0.0], [-0.25, 0.0]]))
    torch.testing.assert_close(state.U["fc.weight"], torch.tensor([[0.0, 0.1], [0.0, 0.025]]))
    assert state.rho["fc.weight"] == pytest.approx(0.4)
    # Residual ||W - Z|| / ||W|| = ||[[0, .1], [.05, .05]]|| / ||W||.
    assert res["fc.weight"] == pytest.approx(math.sqrt(0.015) / math.sqrt(0.1425), rel=1e-5)
    # Dual residual with the rho of the W-steps before this update (0.2): Z moved from
    # [[.4, 0], [0, .6]] to [[.3, 0], [-.25, 0]], ||dZ||^2 = .01 + .0625 + .36.
    assert state.dual["fc.weight"] == pytest.approx(0.2 * math.sqrt(0.4325) / math.sqrt(0.1425), rel=1e-5)

    # Penalty rho/2 ||W - Z + U||^2 with W - Z + U = [[0, .2], [.05, .075]]: 0.2 * 0.048125.
    wp = w.clone().requires_grad_(True)
    pen = state.penalty({"fc.weight": wp})
    assert pen.item() == pytest.approx(0.2 * 0.048125, rel=1e-5)
    (grad,) = torch.autograd.grad(pen, wp)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.08], [0.02, 0.03]]))  # rho * (W - Z + U)


def test_admm_rho_growth_keeps_unscaled_multiplier():
    w = torch.randn(6, 4)
    weights = {"w": w}
    a, b = (admm.ADMM(weights, admm.Sparsity("irregular", {"w": 0.5}), rho=0.3) for _ in range(2))
    w.add_(torch.randn(6, 4))
    a.update(weights, rho_growth=1.0)
    b.update(weights, rho_growth=3.0)
    torch.testing.assert_close(a.Z["w"], b.Z["w"])
    torch.testing.assert_close(a.rho["w"] * a.U["w"], b.rho["w"] * b.U["w"])  # lambda = rho * U
    assert b.U["w"].abs().sum() > 0


def test_admm_penalty_gradient_matches_formula_on_model():
    model = build_model("lenet", 1)
    weights = admm.prunable_weights(model)
    ratios = {"conv2.weight": 0.5, "fc1.weight": 0.8}
    state = admm.ADMM(weights, admm.Sparsity("column", ratios), rho=0.05)
    with torch.no_grad():
        for p in weights.values():
            p.add_(0.01 * torch.randn_like(p))
    state.update(weights, rho_growth=1.5)
    model.zero_grad(set_to_none=True)
    state.penalty(weights).backward()
    for n, p in weights.items():
        if n in ratios:
            expect = state.rho[n] * (p.detach() - state.Z[n] + state.U[n])
            torch.testing.assert_close(p.grad, expect)
            assert p.grad.abs().sum() > 0
        else:
            assert p.grad is None


def test_admm_state_dict_roundtrip():
    weights = {"a": torch.randn(5, 3), "b": torch.randn(4, 2, 3, 3)}
    s = admm.ADMM(weights, admm.Sparsity("filter", {"a": 0.4, "b": 0.5}), rho=0.2)
    s.update(weights, rho_growth=1.3)
    t = admm.ADMM.from_state_dict(s.state_dict())
    # The keys every ADMM state has had since before quantization: old checkpoints load.
    assert set(s.state_dict()) == {"Z", "U", "rho", "ratios", "scheme"}
    assert t.projection.scheme == "filter" and t.projection.ratios == s.projection.ratios and t.rho == s.rho
    for n in weights:
        assert torch.equal(t.Z[n], s.Z[n]) and torch.equal(t.U[n], s.U[n])


# --------------------------------------------------------------------------- ratios by name

LENET_NAMES = ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]


def test_resolve_ratios_patterns_and_override_order():
    model = build_model("lenet", 2)
    assert list(admm.prunable_weights(model)) == LENET_NAMES
    out = admm.resolve_ratios(model, {"conv*.weight": 0.5, "fc?.weight": 0.9, "fc2.weight": 0.3,
                                      "conv2.weight": 0})
    assert out == {"conv1.weight": 0.5, "fc1.weight": 0.9, "fc2.weight": 0.3}  # conv2 dropped (0)
    # Order matters: the later, broader entry wins.
    assert admm.resolve_ratios(model, {"fc2.weight": 0.3, "*": 0.6}) == dict.fromkeys(LENET_NAMES, 0.6)


@pytest.mark.parametrize("key", ["conv3.weight", "conv1.bias", "features.0.weight", "conv1"])
def test_resolve_ratios_unknown_name_lists_valid(key):
    with pytest.raises(ValueError) as e:
        admm.resolve_ratios(build_model("lenet", 2), {"conv1.weight": 0.5, key: 0.5})
    msg = str(e.value)
    assert repr(key) in msg
    assert all(n in msg for n in LENET_NAMES)


def test_a_bad_ratio_is_refused_by_config_once():
    with pytest.raises(UserError, match=r"prune.prune_ratios.fc1.weight: must be in \[0, 1\), got 1.0"):
        load_config("configs/demo.yaml", ["prune.prune_ratios.fc1.weight=1.0"])


# --------------------------------------------------------------------------- masks

def _train_pruned(hook, steps=50):
    """hard_prune a LeNet, then SGD(momentum, weight decay) on random data, optionally with masks held."""
    model = build_model("lenet", 1)
    weights = admm.prunable_weights(model)
    ratios = {"conv1.weight": 0.5, "conv2.weight": 0.5, "fc1.weight": 0.8, "fc2.weight": 0.5}
    masks = admm.hard_prune(weights, ratios, "irregular")
    before = {n: w.detach().clone() for n, w in weights.items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    handle = admm.attach_masks(opt, weights, masks) if hook else None
    x, y = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return weights, masks, before, handle


def test_masks_hold_through_momentum_and_weight_decay():
    weights, masks, before, handle = _train_pruned(hook=True)
    for n, w in weights.items():
        m = masks[n]
        assert (w[~m] == 0).all(), n
        assert (w[m] != before[n][m]).all(), n  # every kept weight trained (weight decay alone moves it)
    handle.remove()


def test_without_mask_hook_pruned_weights_revive():
    weights, masks, _, _ = _train_pruned(hook=False)
    # Gradients (and then momentum) reach pruned weights in every layer; dead ReLU units keep
    # some at zero, so ask for a clear fraction, not all.
    for n, w in weights.items():
        revived, pruned = int((w[~masks[n]] != 0).sum()), int((~masks[n]).sum())
        assert revived > pruned // 5, (n, revived, pruned)


def test_removed_hook_stops_masking():
    model = torch.nn.Linear(4, 3)
    weights = {"weight": model.weight}
    masks = admm.hard_prune(weights, {"weight": 0.5}, "irregular")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    admm.attach_masks(opt, weights, masks).remove()
    model(torch.randn(8, 4)).pow(2).sum().backward()
    opt.step()
    assert (model.weight[~masks["weight"]] != 0).any()


# --------------------------------------------------------------------------- hard prune and reports

@pytest.mark.parametrize("scheme", admm.SCHEMES)
def test_hard_prune_in_place_exact_counts(scheme):
    model = build_model("lenet", 2)
    weights = admm.prunable_weights(model)
    ratios = {"conv1.weight": 0.5, "conv2.weight": 0.33, "fc1.weight": 0.9}
    ptrs = {n: w.data_ptr() for n, w in weights.items()}
    fc2 = weights["fc2.weight"].detach().clone()
    masks = admm.hard_prune(weights, ratios, scheme)
    assert set(masks) == set(ratios)
    for n, r in ratios.items():
        w = dict(model.named_parameters())[n]
        assert w.data_ptr() == ptrs[n]  # in place, same storage as the model's parameter
        assert torch.equal(w != 0, masks[n])
        groups = kept_groups(masks[n], scheme)
        assert int((~groups).sum()) == round(r * groups.numel())
    assert torch.equal(weights["fc2.weight"], fc2)  # not listed: untouched


def test_layer_sparsity_hand_built():
    w = torch.arange(1, 25, dtype=torch.float32).view(4, 2, 1, 3)  # 4 filters, 6 columns
    w[0] = 0                 # filter 0
    w[:, 1, 0, 2] = 0        # column 5 (in=1, kw=2) in every filter
    w[1, 0, 0, 0] = 0        # two scattered zeros
    w[2, 1, 0, 1] = 0
    s = admm.layer_sparsity(w)
    assert s["element"] == pytest.approx(11 / 24)  # 6 + 3 + 2
    assert s["column"] == pytest.approx(1 / 6)
    assert s["filter"] == pytest.approx(1 / 4)

    lin = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]])
    assert admm.layer_sparsity(lin) == pytest.approx({"element": 4 / 6, "column": 1 / 3, "filter": 1 / 2})


def test_sparsity_report_counts():
    model = build_model("lenet", 1)
    weights = admm.prunable_weights(model)
    ratios = {"conv1.weight": 0.5, "fc1.weight": 0.9}
    admm.hard_prune(weights, ratios, "irregular")
    rep = admm.sparsity_report(model, ratios, "irregular")
    assert rep["type"] == "irregular"
    assert [l["name"] for l in rep["layers"]] == LENET_NAMES
    by = {l["name"]: l for l in rep["layers"]}
    n1, n2 = weights["conv1.weight"].numel(), weights["fc1.weight"].numel()
    z1, z2 = round(0.5 * n1), round(0.9 * n2)
    assert by["conv1.weight"]["nonzero"] == n1 - z1 and by["fc1.weight"]["nonzero"] == n2 - z2
    assert by["fc1.weight"]["element"] == pytest.approx(z2 / n2)
    assert by["fc2.weight"]["ratio"] == 0.0 and by["fc2.weight"]["element"] == 0.0
    assert by["conv2.weight"]["shape"] == list(weights["conv2.weight"].shape)
    assert rep["overall"] == pytest.approx((z1 + z2) / (n1 + n2))
    assert rep["compression_rate"] == pytest.approx((n1 + n2) / (n1 + n2 - z1 - z2))
    # Nothing pruned: overall 0, compression 1.
    empty = admm.sparsity_report(model, {}, "irregular")
    assert empty["overall"] == 0.0 and empty["compression_rate"] == 1.0


def test_pruned_energy_is_the_fraction_of_squared_norm_removed():
    w = torch.tensor([[3.0, 0.5], [-4.0, 0.0]])  # ||W||^2 = 25.25
    weights = {"fc.weight": w}
    masks, energy = admm.hard_prune_measured(weights, {"fc.weight": 0.5}, "irregular")  # keeps 3 and -4
    assert energy["fc.weight"] == pytest.approx(0.25 / 25.25)
    assert masks["fc.weight"].tolist() == [[True, False], [True, False]]
    _, again = admm.hard_prune_measured(weights, {"fc.weight": 0.5}, "irregular")
    assert again["fc.weight"] == pytest.approx(0.0, abs=1e-7)  # already sparse: nothing removed


def test_update_without_rescaling_the_dual_keeps_u_as_the_original_code():
    w = torch.tensor([[0.4, 0.2], [-0.1, 0.6]])
    a = admm.ADMM({"fc.weight": w}, admm.Sparsity("irregular", {"fc.weight": 0.5}), rho=0.1)
    b = admm.ADMM({"fc.weight": w}, admm.Sparsity("irregular", {"fc.weight": 0.5}), rho=0.1)
    w2 = {"fc.weight": torch.tensor([[0.3, 0.1], [-0.2, 0.05]])}
    a.update(w2, rho_growth=2.0)
    b.update(w2, rho_growth=2.0, rescale_dual=False)
    assert a.rho == b.rho
    torch.testing.assert_close(b.U["fc.weight"], 2 * a.U["fc.weight"])  # U not divided by the growth
