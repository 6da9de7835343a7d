"""ADMM quantization: the projection onto a layer's levels (exact semantics), the ADMM state with
the quantization projection, and the quantize stage."""
import json
import math
import shutil
import sys
import signal

import pytest
import torch

import admm
from pruning import quant
from common import UserError
from config import load_config
from models import build_model
from pruning.plan import make_stage, stage_names
import forkserver
from helpers import ROOT, script_env


def weights_of(kind, n):
    """A synthetic weight vector of ``n`` entries: shapes seen in trained layers, plus an outlier."""
    if kind == "normal":
        return torch.randn(n)
    if kind == "uniform":
        return torch.rand(n) * 2 - 1
    if kind == "laplace":
        return torch.distributions.Laplace(0.0, 0.05).sample((n,))
    w = 0.1 * torch.randn(n)
    w[n // 3] = 4.0  # one outlier far outside the rest
    return w


KINDS = ["normal", "uniform", "laplace", "outlier"]
BITS = [1, 2, 3, 4, 8]


def rtn_error(w, bits, mask):
    """||W - Z|| of plain round-to-nearest at the projection's starting scale max|w| / L."""
    x = w * mask
    q = x.abs().max() / quant.top_code(bits)
    return (quant.nearest_codes(x, q, bits) * mask * q - x).norm()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("kind", KINDS)
def test_projection_is_on_the_levels_keeps_pruned_zeros_and_beats_round_to_nearest(kind, bits):
    for n in (7, 300, 2000):
        w, mask = weights_of(kind, n), torch.rand(n) > 0.4
        codes, q = quant.quantize(w, bits, mask)
        z = quant.project(w, bits, mask)
        L = quant.top_code(bits)
        assert q > 0
        assert torch.equal(codes, codes.round()) and codes.abs().max() <= L  # integer codes in [-L, L]
        assert torch.equal(z, codes * q)  # every output on a level
        assert torch.equal(z[~mask], torch.zeros(int((~mask).sum())))  # pruned: exactly zero
        if bits == 1:  # binary: no zero level, every kept weight is -q or q
            assert set(z[mask].unique().tolist()) <= {-q, q} and (z[mask] != 0).all()
        values = z[z != 0].unique()
        assert len(values) <= (2 if bits == 1 else 2 ** bits - 2)
        assert (values > 0).sum() <= L and (values < 0).sum() <= L
        assert (z - w * mask).norm() <= rtn_error(w, bits, mask) * (1 + 1e-6)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("kind", KINDS)
def test_projecting_a_projected_tensor_changes_nothing(kind, bits):
    for n in (7, 300, 2000):
        w, mask = weights_of(kind, n), torch.rand(n) > 0.4
        z = quant.project(w, bits, mask)
        assert torch.equal(quant.project(z, bits, mask), z)


def test_scale_and_codes_are_a_fixed_point_of_both_minimisations():
    """At the returned q the codes are the nearest levels, and q is their least-squares scale
    (to float32 rounding): a local minimum of ||W - Z||."""
    for bits in (2, 3, 4):
        w = torch.randn(500)
        codes, q = quant.quantize(w, bits)
        torch.testing.assert_close(codes, quant.nearest_codes(w, q, bits), rtol=0, atol=0)
        assert q == pytest.approx(float((w.double() * codes).sum() / codes.double().square().sum()), rel=1e-6)


def test_an_outlier_does_not_leave_the_other_weights_on_zero():
    """Round-to-nearest over the full range puts every weight but the outlier on 0 at 2 bits;
    the start from the bulk's mean |w| keeps them."""
    w = weights_of("outlier", 20000)
    z = quant.project(w, 2)
    assert (z != 0).sum() > 5000
    assert (z - w).norm() < 0.6 * rtn_error(w, 2, torch.ones_like(w, dtype=torch.bool))


def test_ternary_and_binary_by_hand():
    w = torch.tensor([0.9, -1.1, 0.2, -0.05, 1.0, 0.0])
    mask = torch.tensor([True, True, True, True, True, False])
    # b = 2, start q = 1.1: codes [1, -1, 0, 0, 1]; q = (0.9 + 1.1 + 1.0) / 3 = 1.0, same codes.
    codes, q = quant.quantize(w, 2, mask)
    assert codes.tolist() == [1, -1, 0, 0, 1, 0] and q == pytest.approx(1.0)
    # b = 1: codes sign(w) on the kept weights, q = mean |w| over them = 3.25 / 5.
    codes, q = quant.quantize(w, 1, mask)
    assert codes.tolist() == [1, -1, 1, -1, 1, 0] and q == pytest.approx(0.65)


def test_all_zero_and_low_precision_inputs():
    codes, q = quant.quantize(torch.zeros(4, 3), 4)
    assert q == 0.0 and not codes.any()
    w = torch.randn(6, 5).bfloat16()
    z = quant.project(w, 3)
    assert z.dtype == torch.bfloat16 and quant.distinct_nonzero(z) <= 6


# --------------------------------------------------------------------------- the exact optimum on small layers

def brute_force_error(v, bits):
    """The least ||v - c q||^2 over every code vector c (each |c_i| in 0..L, with the sign of v_i:
    a code of the other sign is never better) and its least-squares q: an exhaustive search,
    independent of quant.py's breakpoints. float64."""
    L, a = quant.top_code(bits), v.double().abs()
    grid = torch.cartesian_prod(*[torch.arange(L + 1, dtype=torch.float64)] * len(a)).view(-1, len(a))
    grid = grid[grid.square().sum(1) > 0]
    q = (grid @ a) / grid.square().sum(1)
    return float(((a - grid * q[:, None]) ** 2).sum(1).min())


def error(v, bits):
    codes, q = quant.quantize(v, bits)
    return float(((codes.double() * q - v.double()) ** 2).sum())


def small_vectors(seed=0):
    """(v, bits): normal, Laplace, repeated and zero-holding vectors of 1-6 weights at 2-4 bits."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(60):
        bits = (2, 3, 4)[i % 3]
        n = 1 + i % (5 if bits == 4 else 6)
        v = torch.randn(n, generator=g)
        if i % 4 == 1:
            v = torch.distributions.Laplace(0.0, 1.0).sample((n,))
        if i % 4 == 2 and n > 2:
            v[1] = -v[0]        # a repeated magnitude
            v[2] = 0.0          # a kept zero
        out.append((v, bits))
    return out


def test_small_layers_get_the_exact_optimum_found_by_brute_force():
    for v, bits in small_vectors():
        best = brute_force_error(v, bits)
        assert error(v, bits) == pytest.approx(best, rel=1e-6, abs=1e-12), (v, bits)


def test_the_alternating_method_alone_misses_optima_that_the_exact_one_finds(monkeypatch):
    """What the exact search is for: from its two starts, alternating codes and least squares
    stops at a worse local minimum on some of the same vectors (the exact error is checked above)."""
    monkeypatch.setattr(quant, "EXACT_BREAKPOINTS", 0)
    worse = [error(v, b) / brute_force_error(v, b) for v, b in small_vectors(1) if brute_force_error(v, b) > 0]
    assert max(worse) > 1.2 and sum(r > 1 + 1e-6 for r in worse) >= 3


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "alternating"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_degenerate_layers_project_exactly(bits, exact, monkeypatch):
    """All kept weights equal (|w| = 0.3, signs mixed), a single kept weight, all zero: every
    projection is finite and gives the kept weights back exactly (the zeros stay zero)."""
    if not exact:  # the large-layer method; its second start once gave q = NaN here at b = 2
        monkeypatch.setattr(quant, "EXACT_BREAKPOINTS", 0)
    w = torch.tensor([0.3, -0.3, 0.3, 0.3, -0.3, 0.7])
    equal = torch.tensor([True, True, True, True, True, False])
    single = torch.tensor([False, False, False, False, False, True])
    for mask, top in ((equal, 0.3), (single, 0.7)):
        codes, q = quant.quantize(w, bits, mask)
        assert math.isfinite(q) and torch.equal(codes * q, w * mask), (mask, q)
        if exact or bits <= 2:  # the smallest codes (1); alternating from max|w| / L ends on codes L
            assert q == torch.tensor(top).item()
    codes, q = quant.quantize(torch.zeros(6), bits, equal)
    assert q == 0.0 and not codes.any()


def test_a_start_that_puts_every_code_on_zero_ends_finite():
    """All |w| equal at 2 bits: the start q = 2 mean|w| rounds every w / q = +-0.5 to code 0 (ties
    to even); the least squares 0 / 0 once made q NaN, hidden only by the other start winning."""
    v = torch.tensor([0.3, -0.3, 0.3])
    codes, q, err = quant._alternate(v, 2, 2 * v.abs().mean(), 100)
    assert not codes.any() and math.isfinite(float(q)) and float(err) == pytest.approx(0.27)


def test_bits_out_of_range_raise():
    for bits in (0, 17):
        with pytest.raises(ValueError, match="bits"):
            quant.quantize(torch.randn(4), bits)


# --------------------------------------------------------------------------- ADMM with the quantization projection

def tiny_task(pretrain=0):
    """A two-layer net, trained for ``pretrain`` epochs, and a learnable synthetic task (labels
    from a random linear teacher; 256 examples, 8 batches)."""
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    y = (x @ torch.randn(16, 4)).argmax(1)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(pretrain):
        run_epoch(net, x, y, opt)
    return net, x, y


def run_epoch(net, x, y, opt, penalty=None):
    for i in range(0, len(x), 32):
        loss = torch.nn.functional.cross_entropy(net(x[i:i + 32]), y[i:i + 32])
        opt.zero_grad()
        (loss + (penalty() if penalty else 0)).backward()
        opt.step()


def accuracy(net, x, y):
    with torch.no_grad():
        return float((net(x).argmax(1) == y).float().mean())


def test_admm_quantization_drives_w_to_its_levels_and_keeps_pruned_zeros():
    net, x, y = tiny_task(pretrain=20)
    weights = admm.prunable_weights(net)
    masks = admm.hard_prune(weights, {"0.weight": 0.5}, "irregular")  # a pruned layer and a dense one
    bits = {"0.weight": 2, "2.weight": 3}
    state = admm.ADMM(weights, quant.Quantization(bits, masks), rho=0.5)
    # Adam moves a weight by about lr per step whatever rho is: lr 1e-3 left W where it was.
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    admm.attach_masks(opt, weights, masks)
    first = state.residuals(weights)
    for epoch in range(8):
        run_epoch(net, x, y, opt, lambda: state.penalty(weights))
        res = state.update(weights, rho_growth=1.5)
        for n, b in bits.items():  # Z on the levels, pruned zeros kept
            assert quant.distinct_nonzero(state.Z[n]) <= 2 ** b - 2
        assert not state.Z["0.weight"][~masks["0.weight"]].any()
    # ||W - Z|| / ||W||: 0.33 -> 0.05 (ternary, pruned) and 0.17 -> 0.04 (3 bits, dense) here.
    assert all(res[n] < 0.3 * first[n] for n in bits), (first, res)
    assert not weights["0.weight"][~masks["0.weight"]].any()
    assert accuracy(net, x, y) > 0.85  # trained to 1.0; ADMM keeps the task while it quantizes


def test_admm_quantization_state_round_trip():
    net, _, _ = tiny_task()
    weights = admm.prunable_weights(net)
    masks = admm.hard_prune(weights, {"0.weight": 0.5}, "irregular")
    s = admm.ADMM(weights, quant.Quantization({"0.weight": 2, "2.weight": 4}, masks), rho=0.1)
    with torch.no_grad():
        weights["2.weight"].add_(0.1)
    s.update(weights, rho_growth=2.0)
    saved = s.state_dict()
    t = admm.ADMM.from_state_dict(saved, projection=quant.Quantization)
    assert t.projection.bits == {"0.weight": 2, "2.weight": 4} and list(t.projection.masks) == ["0.weight"]
    assert torch.equal(t.projection.masks["0.weight"], masks["0.weight"]) and t.rho == s.rho
    for n in s.Z:
        assert torch.equal(t.Z[n], s.Z[n]) and torch.equal(t.U[n], s.U[n])
        assert torch.equal(t.projection.project(n, weights[n]), s.projection.project(n, weights[n]))


# --------------------------------------------------------------------------- config and stages

LENET_NAMES = ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]


def test_bits_resolve_by_name_or_pattern_like_prune_ratios():
    cfg = load_config("configs/demo.yaml", ["quant.bits.*=4", "quant.bits.fc2.weight=8", "quant.bits.conv1.weight=0"])
    assert cfg["quant"]["bits"] == {"*": 4, "fc2.weight": 8, "conv1.weight": 0}
    bits = quant.resolve_bits(build_model("lenet", 1), cfg["quant"]["bits"])
    assert bits == {"conv2.weight": 4, "fc1.weight": 4, "fc2.weight": 8}  # 0 bits: left in float
    tables = "quant.bits={lenet: {fc1.weight: 2}, vgg16: {features.0.weight: 4}}"
    assert load_config(None, [tables])["quant"]["bits"] == {"fc1.weight": 2}


def test_unknown_layer_or_bad_bits_is_an_error_naming_the_fix():
    with pytest.raises(ValueError) as e:
        quant.resolve_bits(build_model("lenet", 1), {"conv3.weight": 4})
    assert "quant.bits: 'conv3.weight' matches no prunable weight" in str(e.value)
    assert all(n in str(e.value) for n in LENET_NAMES)
    for bad in ("17", "2.5", "true"):
        with pytest.raises(UserError, match=r"quant.bits.fc1.weight: .*in \[0, 16\]"):
            load_config("configs/demo.yaml", [f"quant.bits.fc1.weight={bad}"])


def test_quantize_runs_after_the_last_retrain_only_when_bits_are_set():
    assert stage_names(load_config("configs/demo.yaml")) == ["pretrain", "admm", "retrain"]
    cfg = load_config("configs/demo.yaml", ["quant.bits.*=4", "prune.rounds=[0.5, 1]"])
    assert stage_names(cfg) == ["pretrain", "admm.r1", "retrain.r1", "admm", "retrain", "quantize"]
    _, stage = make_stage("quantize", build_model("lenet", 1), cfg)
    assert stage.bits == dict.fromkeys(LENET_NAMES, 4) and stage.section == "quantize"


def test_quantize_stage_hard_quantizes_on_finish_and_keeps_masks():
    cfg = load_config("configs/demo.yaml", ["quant.bits.*=2", "quant.bits.fc1.weight=3"])
    model = build_model("lenet", 1)
    weights = admm.prunable_weights(model)
    masks = admm.hard_prune(weights, admm.resolve_ratios(model, cfg["prune"]["prune_ratios"]), "irregular")
    _, stage = make_stage("quantize", model, cfg)
    assert stage.begin(masks) is masks
    with torch.no_grad():
        for n, w in weights.items():
            w.add_(0.01 * torch.randn_like(w) * masks[n])
    stage.update(1, masks)
    stage.finish()
    for n, w in weights.items():
        b, q = stage.bits[n], stage.figures["scale"][n]
        assert quant.distinct_nonzero(w) <= 2 ** b - 2
        assert not w[~masks[n]].any()
        codes = w / q
        torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)  # on the levels of the scale saved
        assert 0 <= stage.figures["quantized_energy"][n] < 1
    assert set(stage.figures) == {"rho", "residual", "dual_residual", "scale", "quantized_energy"}


# --------------------------------------------------------------------------- end to end, as a user runs it

TINY = ["data.train_limit=192", "pretrain.epochs=1", "admm.epochs=1", "retrain.epochs=1", "quantize.epochs=2",
        "adv.steps=1", "eval.steps=1", "eval.limit=50", "checkpoint.every_steps=1", "quant.bits.*=3",
        "quant.bits.fc2.weight=4", "quant.rho=0.5", "quant.rho_growth=1.5", "quantize.optimizer=adam",
        "quantize.lr=0.01"]


def run_script(out, *sets, extra=(), signal_at=None):
    """adv_main.py; ``signal_at`` ("<stage>:<step>:<SIGNAME>"): the run sends itself that signal
    after that step (``training.SelfSignal``), a stop at a known point instead of a race."""
    args = [sys.executable, "adv_main.py", "--config", "configs/demo.yaml", "--out", str(out),
            *[a for o in sets for a in ("--set", o)], *extra]
    env = script_env(**({"ADMM_AT_TEST_SIGNAL": signal_at} if signal_at else {}))
    return forkserver.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def quantized_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quant")
    proc = run_script(out, *TINY)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, proc


def test_all_stages_end_on_the_levels_with_the_sparsity_kept(quantized_run):
    out, proc = quantized_run
    pruned = torch.load(out / "retrain.pt", weights_only=True)
    final = torch.load(out / "quantize.pt", weights_only=True)
    bits = {"conv1.weight": 3, "conv2.weight": 3, "fc1.weight": 3, "fc2.weight": 4}
    assert final["stage_state"]["bits"] == bits
    for n, b in bits.items():
        w, mask = final["model"][n], pruned["masks"][n]
        assert quant.distinct_nonzero(w) <= 2 ** b - 2, n
        assert torch.equal(final["masks"][n], mask)  # the masks are kept
        assert not w[~mask].any() and int((w == 0).sum()) >= int((pruned["model"][n] == 0).sum())
        codes = w / final["convergence"]["quantize"]["scale"][n]
        torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)
    assert "hard quantization:" in proc.stdout and "final model (" + str(out / "quantize.pt") in proc.stdout
    rep = json.loads((out / "eval.json").read_text())
    assert set(rep["convergence"]["quantize"]["quantized_energy"]) == set(bits)
    # the final report lists each quantized layer on its levels, as eval.py does
    assert "quantized layer" in proc.stdout
    for n, b in bits.items():
        q = rep["quantization"][n]
        assert q["bits"] == b and q["distinct_nonzero"] <= 2 ** b - 2 and q["scale"] is not None


def test_unknown_layer_in_bits_stops_before_training(tmp_path):
    proc = run_script(tmp_path, "quant.bits.conv9.weight=4")
    assert proc.returncode == 2
    line, = proc.stderr.strip().splitlines()
    assert "quant.bits: 'conv9.weight' matches no prunable weight; valid names: conv1.weight" in line
    assert not list(tmp_path.glob("*.pt"))


def test_quantize_resumes_mid_stage_bit_identically(tmp_path, quantized_run):
    out, _ = quantized_run
    shutil.copy(out / "retrain.pt", tmp_path / "retrain.pt")
    # killed in its second epoch (3 steps each), after the Z/U update of the first and 3 saves
    proc = run_script(tmp_path, *TINY, extra=["--stage", "quantize"], signal_at="quantize:5:SIGKILL")
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "quantize.pt").exists()
    assert torch.load(tmp_path / "quantize.last.pt", weights_only=True)["step"] == 1  # epoch 2, step 1
    resumed = run_script(tmp_path, *TINY, extra=["--stage", "quantize", "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming quantize" in resumed.stdout
    a, b = (torch.load(p / "quantize.pt", weights_only=True) for p in (out, tmp_path))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # as the uninterrupted run
    assert a["stage_state"]["rho"] == b["stage_state"]["rho"]
