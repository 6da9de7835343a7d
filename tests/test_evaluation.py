"""Can the robustness numbers be trusted? Our PGD against the reference APGD-CE, the gradient-masking
sanity checks on a planted masked model, the L2 threat model, the worst case, the reference
AutoAttack and its own checks, and eval.py end to end."""
import json
import sys

import pytest
import torch
from torch import nn

import config
import data
from attacks import PGD, AutoAttack
from evaluation.accuracy import check_attacks, correct_per_example, standard_attacks
from evaluation.checks import noise, sanity_warnings
from evaluation.report import report
import forkserver
from helpers import ROOT, script_env, train_lenet

# Subprocesses run on one thread, like the in-process tests (conftest.py): on a busy 2-core machine
# torch's OpenMP threads spin-wait for a core, and an AutoAttack run took 3x longer with 2 threads.
ENV = script_env()
EPS = 0.1  # where the small natural model below is neither robust nor broken (PGD-10 accuracy ~0.4)


@pytest.fixture(scope="module")
def cfg():
    """Default config with an evaluation PGD-10 at EPS, no pruning."""
    c = config.load_config(None)
    c["adv"]["eps"], c["eval"]["steps"], c["eval"]["step_size"] = EPS, 10, EPS / 4
    return c


@pytest.fixture(scope="module")
def small():
    """LeNet w=2 after 2 epochs of natural training on the 4,000 demo digits (~2 s, ~92 % test
    accuracy), and 300 random test digits as a Split and as floats [300, 1, 28, 28] in [0, 1]."""
    train, test, _ = data.load_data(config.load_config(None))
    torch.manual_seed(0)
    model = train_lenet(train, epochs=2, batch_size=32)
    idx = torch.randperm(len(test.labels), generator=torch.Generator().manual_seed(0))[:300]
    split = data.Split(test.images[idx], test.labels[idx])
    return model, split, split.images.float() / 255, split.labels


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


# --------------------------------------------------------------------------- against the reference APGD-CE
# APGD-CE (Croce & Hein 2020, from their pyautoattack) is PGD on the same loss with an adaptive step
# and 100 iterations: an independent implementation that our PGD-20 should about match, not beat.

def test_pgd_matches_reference_apgd_ce(small):
    pytest.importorskip("pyautoattack")
    model, _, x, y = small
    x, y = x[:150], y[:150]
    ours = accuracy(model, PGD(EPS, EPS / 4, 20)(model, x, y), y)
    theirs = accuracy(model, AutoAttack(EPS, attacks=("apgd-ce",))(model, x, y), y)
    assert theirs - noise(theirs, len(y)) <= ours <= theirs + 0.05, (ours, theirs)
    assert 0.15 < ours < accuracy(model, x, y) - 0.2, ours  # informative: the attack bites but does not saturate


def test_l2_pgd_stays_in_ball_and_matches_reference_apgd_ce(small):
    model, _, x, y = small
    eps = 1.0
    x_adv = PGD(eps, 0.25, 10, restarts=2, norm="l2")(model, x, y)
    dist = (x_adv - x).flatten(1).norm(dim=1)
    assert dist.max() <= eps + 1e-5, dist.max()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (dist > 0.95 * eps).float().mean() > 0.5  # the projection is active, not a trivially small step
    x, y = x[:150], y[:150]
    ours = accuracy(model, PGD(eps, 2.5 * eps / 20, 20, norm="l2")(model, x, y), y)
    assert ours < accuracy(model, x, y) - 0.2
    pytest.importorskip("pyautoattack")
    theirs = accuracy(model, AutoAttack(eps, "l2", attacks=("apgd-ce",))(model, x, y), y)
    assert theirs - noise(theirs, len(y)) <= ours <= theirs + 0.05, (ours, theirs)


def test_cw_margin_pgd_is_an_attack(small):
    model, _, x, y = small
    acc = accuracy(model, PGD(EPS, EPS / 4, 10, loss="cw")(model, x, y), y)
    assert acc < accuracy(model, x, y) - 0.2
    with pytest.raises(ValueError, match="loss"):
        PGD(EPS, EPS / 4, 10, loss="hinge")


# --------------------------------------------------------------------------- sanity checks

class QuantizedInput(nn.Module):
    """Planted gradient masking: the input is rounded to 5 grey levels before the network, so
    every input gradient is exactly zero while clean accuracy is almost unchanged."""

    def __init__(self, net, levels=4):
        super().__init__()
        self.net, self.levels = net, levels

    def forward(self, x):
        return self.net(torch.round(x * self.levels) / self.levels)


def test_sanity_checks_flag_planted_gradient_masking(small, cfg):
    model, split, _, _ = small
    attacks = standard_attacks(cfg, ["natural", "fgsm", "pgd"])
    checks = check_attacks(attacks["pgd"])
    masked = report(QuantizedInput(model), cfg, split, "cpu", attacks, seed=0, checks=checks)
    healthy = report(model, cfg, split, "cpu", attacks, seed=0, checks=checks)
    # The masked model looks robust to the gradient attacks ...
    assert masked["accuracy"]["pgd"] > healthy["accuracy"]["pgd"] + 0.3, (masked["accuracy"], healthy["accuracy"])
    # ... and the checks say why it should not be believed; the honest model raises no warning.
    assert any("eps=1" in w for w in masked["warnings"]), masked["warnings"]
    assert healthy["warnings"] == [], healthy["warnings"]
    assert healthy["checks"]["pgd_large_eps"]["accuracy"] < 0.05


@pytest.mark.parametrize("acc,checks,sweep,needle", [
    ({"natural": 0.9, "pgd": 0.5}, {"pgd": 0.5, "pgd_half_eps": 0.2}, {}, "rises with eps"),
    ({"natural": 0.9, "pgd": 0.5}, {}, {"pgd": [(0.0, 0.9), (0.1, 0.3), (0.2, 0.6)]}, "rises with eps"),
    ({"natural": 0.5, "pgd": 0.8}, {}, {}, "above natural"),
    ({"natural": 0.9, "pgd": 0.5}, {"pgd_large_eps": 0.6}, {}, "above chance"),
    ({"natural": 0.9, "pgd": 0.5}, {"pgd": 0.5, "pgd_stronger": 0.7}, {}, "2x steps"),
    ({"natural": 0.9, "fgsm": 0.3, "pgd": 0.5}, {}, {}, "FGSM accuracy"),
    ({"natural": 0.9, "pgd": 0.5, "worst": 0.6}, {}, {}, "worst case"),
    ({"natural": 0.9, "pgd": 0.5, "autoattack": 0.7}, {}, {}, "autoattack accuracy 0.7000 is above pgd"),
    ({"natural": 0.9, "pgd": 0.5, "apgd": 0.4, "autoattack": 0.45}, {}, {}, "autoattack accuracy 0.4500 is above apgd"),
])
def test_each_sanity_check_fires(acc, checks, sweep, needle):
    """Each of the six checks fires on numbers that show its sign of masking, and only then."""
    worst = acc.pop("worst", min(acc.values()))
    warnings = sanity_warnings(acc, 1000, worst, checks, sweep)
    assert len(warnings) == 1 and needle in warnings[0], warnings


def test_sanity_checks_tolerate_sampling_noise():
    # 1000 examples at accuracy 0.5 give a 95 % interval of +-0.031: differences within it are not flagged.
    assert sanity_warnings({"natural": 0.9, "fgsm": 0.49, "pgd": 0.51}, 1000, 0.45,
                           {"pgd": 0.51, "pgd_half_eps": 0.49, "pgd_stronger": 0.53, "pgd_large_eps": 0.11}) == []


# --------------------------------------------------------------------------- AutoAttack sees the whole set

class _WholeSet:
    """An attack that asks for the whole evaluation set at once (as AutoAttack does) and records
    the sizes it was called with; it returns the examples unchanged."""
    whole_set = True

    def __init__(self):
        self.calls = []

    def __call__(self, model, x, y):
        self.calls.append(len(x))
        return x


def test_a_whole_set_attack_is_called_once_on_every_example(small):
    """AutoAttack's own checks are statistics of what it is given (Square's: more than 0.2 % of
    it), so it must get the evaluated set in one call, not batch by batch."""
    model, split, x, y = small
    whole = _WholeSet()
    correct, _ = correct_per_example(model, split, {"natural": None, "whole": whole}, 64, "cpu", limit=200, seed=0)
    assert whole.calls == [200]  # one call with all 200 examples, not 4 batches of at most 64
    assert torch.equal(correct["whole"], correct["natural"])  # and its output was scored per example
    assert AutoAttack.whole_set and not PGD.whole_set
    # an empty share (a rank with no examples under torchrun) calls nothing and scores nothing
    empty = data.Split(split.images[:0], split.labels[:0])
    none, _ = correct_per_example(model, empty, {"whole": whole}, 64, "cpu", seed=0)
    assert whole.calls == [200] and none["whole"].numel() == 0


def test_autoattack_log_lines_move_the_bar_and_warnings_are_kept():
    """The library's per-attack lines advance the bar; only its warnings reach the report."""
    import logging
    from attacks import _Collect

    class Bar:
        n, postfix = 0, ""

        def update(self, k):
            self.n += k

        def set_postfix_str(self, s):
            self.postfix = s

    collect = _Collect(Bar())
    log = logging.getLogger("test-autoattack-collect")
    log.setLevel(logging.DEBUG)
    log.addHandler(collect)
    try:
        log.debug("running apgd-ce")
        log.debug("robust accuracy after APGD-CE: 61.70% (total time 12.0 s)")
        log.warning("Square Attack has decreased the robust accuracy of 0.40%.")
    finally:
        log.removeHandler(collect)
    assert collect.bar.n == 1 and collect.bar.postfix.startswith("APGD-CE: 61.70%")
    assert collect.messages == ["Square Attack has decreased the robust accuracy of 0.40%."]


# --------------------------------------------------------------------------- worst case

class PixelReader(nn.Module):
    """Predicts the class written in an image's first pixel (value c / 255 -> class c)."""

    def forward(self, x):
        c = (x[:, 0, 0, 0] * 255).round()
        return -(c[:, None] - torch.arange(10.0)).abs()


class Planted:
    """An attack that fools exactly the examples whose id (second pixel, i / 255) is in ``ids``:
    it writes the next class into their first pixel."""
    eps = 0.0  # reported with the settings; no ball here

    def __init__(self, ids):
        self.ids = ids

    def __call__(self, model, x, y):
        x = x.clone()
        hit = torch.isin((x[:, 0, 0, 1] * 255).round().long(), torch.tensor(sorted(self.ids)))
        x[hit, 0, 0, 0] = ((y[hit] + 1) % 10).float() / 255
        return x


def test_worst_case_counts_the_examples_some_attack_fools():
    """10 examples, read correctly; one attack fools 0, 1, 2, another 2, 5 and 9: by hand, 7 and 7
    of 10 survive each, and only 5 (3, 4, 6, 7, 8) survive both. Batches of 3 cross the ids."""
    images = torch.zeros(10, 1, 28, 28, dtype=torch.uint8)
    labels = torch.arange(10) * 7 % 10
    images[:, 0, 0, 0], images[:, 0, 0, 1] = labels.to(torch.uint8), torch.arange(10, dtype=torch.uint8)
    cfg = config.load_config(None, ["data.test_batch_size=3"])
    attacks = {"natural": None, "a": Planted({0, 1, 2}), "b": Planted({2, 5, 9})}
    rep = report(PixelReader(), cfg, data.Split(images, labels), "cpu", attacks, seed=3)
    assert rep["accuracy"] == {"natural": 1.0, "a": 0.7, "b": 0.7}
    assert rep["worst_case"] == 0.5 and rep["n_examples"] == 10
    assert set(rep["seconds"]) == set(attacks) and "autoattack" not in rep


def test_worst_case_is_at_most_each_real_attack(small, cfg):
    model, split, _, _ = small
    attacks = standard_attacks(cfg, ["natural", "fgsm", "pgd", "pgd_cw", "pgd_l2"], eps_l2=1.0)
    rep = report(model, cfg, split, "cpu", attacks, seed=3)
    for name, a in rep["accuracy"].items():
        assert rep["worst_case"] <= a, (name, rep)
    # The attacks fool different examples, so the worst case is below the best single attack.
    assert rep["worst_case"] < min(rep["accuracy"].values())


# --------------------------------------------------------------------------- AutoAttack

@pytest.fixture(scope="module")
def standard_aa(small):
    """The reference AutoAttack's four attacks, with the standard settings except Square's queries
    (1,000 for 5,000, to keep the test short), and its APGD part alone, seeded alike, plus our PGD-20,
    on 16 test digits (~15 s, mostly FAB-T and Square on the few digits APGD leaves)."""
    pytest.importorskip("pyautoattack")
    model, _, x, y = small
    x, y = x[:16], y[:16]
    model.train()  # the attack must put it back
    for p in model.parameters():
        p.grad = None
    aa = AutoAttack(EPS, n_queries=1000)
    runs = {}
    for name, attack in (("pgd", PGD(EPS, EPS / 4, 20)), ("apgd", AutoAttack(EPS, attacks=("apgd-ce", "apgd-t"))),
                         ("autoattack", aa)):
        torch.manual_seed(0)
        runs[name] = attack(model, x, y)
    mode_kept = model.training and all(p.grad is None and p.requires_grad for p in model.parameters())
    model.eval()
    return model, x, y, runs, aa, mode_kept


def test_autoattack_is_at_most_pgd_and_apgd(standard_aa):
    model, x, y, runs, aa, mode_kept = standard_aa
    assert aa.info() == {"library": "pyautoattack 0.2.0", "version": "custom", "norm": "linf", "eps": EPS,
                         "attacks": ["apgd-ce", "apgd-t", "fab-t", "square"], "n_queries": 1000}
    assert mode_kept  # back in train mode, no parameter .grad written (FAB calls backward), still trainable
    x_adv = runs["autoattack"]
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        correct = {k: model(v).argmax(1) == y for k, v in runs.items()}
    acc = {k: c.float().mean().item() for k, c in correct.items()}
    assert acc["autoattack"] <= acc["pgd"] + noise(acc["pgd"], len(y)), acc
    assert acc["autoattack"] < accuracy(model, x, y), acc
    # Seeded alike, AutoAttack's first two attacks are the APGD run: it fools every digit APGD fools.
    assert not (correct["autoattack"] & ~correct["apgd"]).any(), acc


def test_autoattack_name_always_means_the_standard_version(cfg):
    pytest.importorskip("pyautoattack")
    a = standard_attacks(cfg, ["autoattack", "apgd", "autoattack_l2", "apgd_l2"], eps_l2=1.5)
    assert a["autoattack"].info() == {**a["autoattack_l2"].info(), "norm": "linf", "eps": EPS} == {
        "library": "pyautoattack 0.2.0", "version": "standard", "norm": "linf", "eps": EPS,
        "attacks": ["apgd-ce", "apgd-t", "fab-t", "square"]}
    assert a["apgd"].info()["attacks"] == ["apgd-ce", "apgd-t"] and a["apgd"].info()["version"] == "custom"
    assert a["apgd_l2"].info()["norm"] == "l2" and a["apgd_l2"].info()["eps"] == 1.5
    assert AutoAttack(EPS, n_queries=100).version == "custom"  # a cheaper Square is not the standard version
    # What the library is asked to run: its standard version, untouched.
    ref = a["autoattack"]._adversary(nn.Linear(1, 1), "cpu", seed=0)
    assert (ref.version, ref.attacks_to_run, ref.norm, ref.epsilon) == ("standard", list(AutoAttack.STANDARD), "Linf", EPS)
    assert (ref.apgd.n_iter, ref.apgd.n_restarts, ref.apgd_targeted.n_iter, ref.apgd_targeted.n_target_classes,
            ref.fab.n_target_classes, ref.square.n_queries) == (100, 1, 100, 9, 9, 5000)
    apgd = a["apgd"]._adversary(nn.Linear(1, 1), "cpu", seed=0)
    assert apgd.attacks_to_run == ["apgd-ce", "apgd-t"] and (apgd.apgd.n_iter, apgd.apgd.n_restarts) == (100, 1)
    assert "_flags" not in repr(a["autoattack"]) and "version=standard" in repr(a["autoattack"])
    with pytest.raises(ValueError, match="subset"):
        AutoAttack(EPS, attacks=("apgd-dlr",))


class SoftmaxOutput(nn.Module):
    """Returns probabilities instead of logits: AutoAttack's losses then see a flattened landscape."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).softmax(1)


class NoisyOutput(nn.Module):
    """A randomized model: fresh noise on the logits at every call."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        out = self.net(x)
        return out + 0.1 * torch.randn_like(out)


@pytest.mark.parametrize("wrap,needle", [(SoftmaxOutput, "probability distribution"), (NoisyOutput, "randomized")])
def test_autoattack_own_checks_are_reported(small, wrap, needle):
    pytest.importorskip("pyautoattack")
    model, _, x, y = small
    attack = AutoAttack(EPS, attacks=("apgd-ce",))
    attack(wrap(model), x[:8], y[:8])
    attack(wrap(model), x[8:16], y[8:16])
    flags = attack.pop_flags()
    assert len(flags) == 1 and needle in flags[0] and "(raised 2 times" in flags[0], flags  # one line per kind
    assert AutoAttack.FLAGS_DOC in flags[0]
    assert attack.pop_flags() == []
    attack(model, x[:8], y[:8])
    assert attack.pop_flags() == []  # the healthy model raises none


def test_planted_gradient_masking_raises_autoattack_flag(small, cfg):
    """The planted masked model under the cheaper apgd: the report carries the reference's own
    zero-gradient flag beside our eps=1 check (32 digits; APGD-T's 9 x 100 steps all run, since no
    gradient step fools anything). That a healthy model raises no flag is tested above."""
    pytest.importorskip("pyautoattack")
    model, split, _, _ = small
    split = data.Split(split.images[:32], split.labels[:32])
    attacks = standard_attacks(cfg, ["natural", "pgd", "apgd"])
    masked = report(QuantizedInput(model), cfg, split, "cpu", attacks, seed=0, checks=check_attacks(attacks["pgd"]))
    assert masked["autoattack"]["apgd"]["attacks"] == ["apgd-ce", "apgd-t"]
    assert masked["accuracy"]["apgd"] > 0.8  # the masked model fools the gradient attacks ...
    assert any(w.startswith("apgd: AutoAttack's own check") and "zero gradient" in w for w in masked["warnings"]), \
        masked["warnings"]  # ... but not the checks
    assert any("eps=1" in w for w in masked["warnings"]), masked["warnings"]


# --------------------------------------------------------------------------- eval.py end to end

def run_eval(*args, pre=""):
    """eval.py as a user runs it; ``pre`` is Python run first in the same process (to hide a package)."""
    code = (f"{pre or 'pass'}; import sys, runpy; sys.argv = ['eval.py', *sys.argv[1:]]; "
            "runpy.run_path('eval.py', run_name='__main__')")
    return forkserver.run([sys.executable, "-c", code, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A real (tiny, ~15 s) adv_main.py run; its retrain.pt."""
    out = tmp_path_factory.mktemp("run")
    sets = ["data.train_limit=500", "pretrain.epochs=1", "admm.epochs=1", "retrain.epochs=1", "adv.steps=2",
            "eval.steps=2", "eval.limit=100"]
    proc = forkserver.run([sys.executable, "adv_main.py", "--config", "configs/demo.yaml", "--out", str(out),
                           *[a for s in sets for a in ("--set", s)]], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out / "retrain.pt"


def test_eval_cli_all_attacks_sweep_and_checks(ckpt, tmp_path):
    pytest.importorskip("matplotlib")
    js = tmp_path / "e.json"
    proc = run_eval("--ckpt", str(ckpt), "--attacks", "natural,fgsm,pgd,pgd_cw,pgd_l2", "--limit", "100",
                    "--steps", "3", "--eps-sweep", "0,0.1,0.3", "--json", str(js))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rep = json.loads(js.read_text())
    assert rep["n_examples"] == 100 and rep["partial"] is True
    assert set(rep["accuracy"]) == {"natural", "fgsm", "pgd", "pgd_cw", "pgd_l2"}
    assert all(rep["worst_case"] <= a for a in rep["accuracy"].values())
    assert isinstance(rep["warnings"], list) and set(rep["checks"]) == {"pgd", "pgd_half_eps", "pgd_large_eps",
                                                                       "pgd_stronger"}
    assert all(L["params"] >= L["nonzero"] > 0 for L in rep["sparsity"]["layers"])
    sw = rep["eps_sweep"]
    assert sw["eps"] == [0.0, 0.1, 0.3] and set(sw["accuracy"]) == {"fgsm", "pgd", "pgd_cw"}
    assert sw["accuracy"]["pgd"][0] == rep["accuracy"]["natural"]  # eps 0 is the clean input
    assert sw["plot"] == str(tmp_path / "e.png") and (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"
    assert "worst_case=" in proc.stdout and ("WARNING" in proc.stdout) == bool(rep["warnings"])

    # Deterministic for a seed, and an attack's result does not depend on the others run with it.
    alone = run_eval("--ckpt", str(ckpt), "--attacks", "pgd", "--limit", "100", "--steps", "3", "--no-checks",
                     "--json", str(tmp_path / "pgd.json"))
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert json.loads((tmp_path / "pgd.json").read_text())["accuracy"]["pgd"] == rep["accuracy"]["pgd"]


def test_eval_cli_autoattack_report(ckpt, tmp_path):
    """The reference AutoAttack from the command line: what ran, and how long each attack took."""
    pytest.importorskip("pyautoattack")
    js = tmp_path / "aa.json"
    proc = run_eval("--ckpt", str(ckpt), "--attacks", "natural,pgd,autoattack", "--limit", "10", "--no-checks",
                    "--json", str(js))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rep = json.loads(js.read_text())
    assert rep["autoattack"]["autoattack"]["version"] == "standard"
    assert rep["autoattack"]["autoattack"]["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert rep["autoattack"]["autoattack"]["library"].startswith("pyautoattack ")
    assert set(rep["seconds"]) == {"natural", "pgd", "autoattack"} and rep["seconds"]["autoattack"] > 0
    assert rep["accuracy"]["autoattack"] <= rep["accuracy"]["pgd"]
    assert "autoattack: pyautoattack" in proc.stdout and "standard version" in proc.stdout
    assert proc.stderr == ""  # the library's log lines do not leak to the console


def test_eval_cli_names_the_missing_package(ckpt):
    proc = run_eval("--ckpt", str(ckpt), "--attacks", "natural,autoattack", "--limit", "10",
                    pre="import sys; sys.modules['pyautoattack'] = None")  # makes `import pyautoattack` fail
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: autoattack and apgd need the AutoAttack authors' package: pip install pyautoattack==0.2.0"]
