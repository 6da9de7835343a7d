"""The adversarial training losses (losses.py): TRADES and MART against hand computations and the
papers' definitions, their inner attacks, and which training methods they combine with."""
import copy
import math
import sys

import pytest
import torch

import data as data_lib
from attacks import PGD
from common import UserError
from config import load_config
from training.losses import MART, TRADES, CleanTarget
from training.methods import AttackTraining, make_method, train_step
from models import build_model
import forkserver
from helpers import ROOT, script_env


def tiny_batch(n=6, seed=0):
    torch.manual_seed(seed)
    return torch.rand(n, 1, 28, 28), torch.randint(0, 10, (n,))


def test_trades_with_beta_0_is_natural_training_to_the_bit():
    """beta = 0 leaves CE(f(x), y): the loss and the step equal natural training's exactly, whatever
    the adversarial examples (the KL term's gradient is multiplied by 0)."""
    x, y = tiny_batch()
    natural = build_model("lenet", 1)
    trades = copy.deepcopy(natural)
    pgd = PGD(0.3, 0.1, 3, **TRADES(0).attack_settings)
    loss_nat, _, _ = train_step(natural, natural, x, y, torch.optim.SGD(natural.parameters(), lr=0.1))
    torch.manual_seed(1)
    loss_trades, _, _ = train_step(trades, trades, x, y, torch.optim.SGD(trades.parameters(), lr=0.1),
                                   CleanTarget(pgd), loss=TRADES(0.0))
    assert torch.equal(loss_nat, loss_trades)
    for (name, a), b in zip(natural.named_parameters(), trades.parameters()):
        assert torch.equal(a, b), name


def kl_by_hand(p_logits, q_logits):
    """KL(softmax(p) || softmax(q)) per example, written out: sum_k p_k (log p_k - log q_k)."""
    p, q = p_logits.softmax(1).double(), q_logits.softmax(1).double()
    return (p * (p.log() - q.log())).sum(1)


def test_trades_inner_attack_increases_the_kl():
    torch.manual_seed(0)
    model = build_model("lenet", 2).eval()
    x, y = tiny_batch(32)
    start = x + 0.001 * torch.randn_like(x)
    adversary = CleanTarget(PGD(0.3, 0.05, 10, **TRADES(6).attack_settings))
    x_adv = adversary(model, x, y)
    assert (x_adv - x).abs().max() <= 0.3 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        clean, before, after = model(x), model(start.clamp(0, 1)), model(x_adv)
    kl_before, kl_after = kl_by_hand(clean, before), kl_by_hand(clean, after)
    assert kl_after.mean() > 100 * kl_before.mean()  # from ~0 at the 0.001 start
    assert (kl_after > kl_before).float().mean() >= 0.9


def test_trades_loss_is_ce_on_clean_plus_beta_kl():
    torch.manual_seed(0)
    logits, logits_adv = torch.randn(5, 4), torch.randn(5, 4)
    y = torch.tensor([0, 1, 2, 3, 0])
    net = lambda x: x  # noqa: E731 - the "inputs" are the logits
    loss, out = TRADES(2.5)(net, logits, logits_adv, y)
    p = logits.double().softmax(1)
    ce = -p[torch.arange(5), y].log().mean()
    assert loss.item() == pytest.approx((ce + 2.5 * kl_by_hand(logits, logits_adv).mean()).item(), rel=1e-6)
    assert out is logits_adv


def test_mart_weight_and_loss_by_hand():
    """Three classes with probabilities 1/8, 2/8, 5/8 on x and 1/2, 1/4, 1/4 on x'; label 0."""
    clean = torch.log(torch.tensor([[1.0, 2.0, 5.0]]))
    adv = torch.log(torch.tensor([[2.0, 1.0, 1.0]]))
    y = torch.tensor([0])
    assert MART.weight(clean, y).item() == pytest.approx(7 / 8)  # 1 - p_y(x)
    # BCE(f(x'), y) = -log p_y(x') - log(1 - max_{k != y} p_k(x')) = -log(1/2) - log(3/4)
    bce = -math.log(1 / 2) - math.log(3 / 4)
    kl = 1 / 8 * math.log((1 / 8) / (1 / 2)) + 2 / 8 * math.log((2 / 8) / (1 / 4)) + 5 / 8 * math.log((5 / 8) / (1 / 4))
    loss, _ = MART(6.0)(lambda x: x, clean, adv, y)
    assert loss.item() == pytest.approx(bce + 6.0 * kl * 7 / 8, rel=1e-6)
    # a second example that the model gets right with certainty adds no KL term: weight 1 - 1 = 0
    sure = torch.tensor([[30.0, 0.0, 0.0]])
    w = MART.weight(torch.cat([clean, sure]), torch.tensor([0, 0]))
    assert w[1].item() == pytest.approx(0.0, abs=1e-12)


def test_mart_bce_is_finite_where_the_runner_up_has_all_the_probability():
    """log(1 - p_k) for p_k rounding to 1 in float32: the authors' 1.0001 guard bounds it at
    log(1e-4); here it is exact, -(logit gap) for a gap of 200."""
    adv = torch.tensor([[0.0, 200.0]], requires_grad=True)
    loss, _ = MART(0.0)(lambda x: x, adv.detach(), adv, torch.tensor([0]))
    # -log p_0(x') = 200 (to float precision) and -log(1 - p_1(x')) = -log p_0(x') = 200
    assert loss.item() == pytest.approx(400.0, rel=1e-5)
    loss.backward()
    assert torch.isfinite(adv.grad).all()


def test_kl_pgd_with_restarts_keeps_the_larger_kl():
    """With a target distribution there is no "fooled": per example, the restart with the larger KL
    wins, so 3 restarts end at least as far (in KL) as their first, which is a 1-restart run."""
    model = build_model("lenet", 1).eval()
    x, y = tiny_batch(8)
    with torch.no_grad():
        clean = model(x)
    settings = dict(eps=0.2, step_size=0.05, steps=3, **TRADES(6).attack_settings)
    torch.manual_seed(5)
    one = PGD(restarts=1, **settings)(model, x, clean.softmax(1))
    torch.manual_seed(5)
    three = PGD(restarts=3, **settings)(model, x, clean.softmax(1))
    assert (three - x).abs().max() <= 0.2 + 1e-6
    with torch.no_grad():
        kl_one, kl_three = kl_by_hand(clean, model(one)), kl_by_hand(clean, model(three))
    assert (kl_three >= kl_one - 1e-9).all() and (kl_three > kl_one).any()


def build(*sets):
    cfg = load_config("configs/demo.yaml", list(sets))
    return make_method(cfg, True, data_lib.INFO["demo"], torch.device("cpu"))


def test_method_takes_the_loss_and_names_it():
    m = build("adv.loss=trades", "adv.beta=3")
    assert isinstance(m, AttackTraining) and isinstance(m.loss, TRADES) and m.loss.beta == 3.0
    assert isinstance(m.attack, CleanTarget) and m.attack.attack is m.pgd and m.pgd.loss == "kl"
    assert repr(m) == "pgd training, TRADES loss (beta 3)"
    mart = build("adv.loss=mart", "adv.method=fgsm_rs")
    assert isinstance(mart.loss, MART) and mart.attack.loss == "ce" and mart.attack.steps == 1
    assert repr(build()) == "pgd training"  # cross-entropy: the log reads as before


def test_eps_ramp_reaches_the_trades_attack():
    m = build("adv.loss=trades", "adv.eps_ramp=4")
    m.progress("pretrain", 0)
    assert m.attack.attack.eps == pytest.approx(0.3 / 4)


@pytest.mark.parametrize("sets, needle", [
    (["adv.loss=trades", "adv.method=free"], "adv.loss=trades does not combine with adv.method=free"),
    (["adv.loss=mart", "adv.method=free"], "adv.loss=mart does not combine with adv.method=free"),
    (["adv.loss=trades", "adv.method=fgsm_rs"], "adv.loss=trades does not combine with adv.method=fgsm_rs"),
    (["adv.loss=huber"], "adv.loss: 'huber' is not one of ce, trades, mart"),
    (["adv.beta=-1"], "adv.beta: must be >= 0"),
])
def test_bad_loss_settings_are_one_line_errors(sets, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_config("configs/demo.yaml", sets)


@pytest.mark.parametrize("loss", ["trades", "mart"])
def test_resume_mid_stage_is_bit_identical(tmp_path, loss):
    """A run killed after step 7 of 8 (its last save after step 6: epoch 2, step 2) and resumed ends with the
    uninterrupted run's weights, to the bit: the losses keep no state of their own."""
    sets = ["data.train_limit=256", "pretrain.epochs=2", "adv.steps=2", "eval.limit=50", "eval.steps=2",
            "checkpoint.every_steps=2", f"adv.loss={loss}"]

    def run(out, *extra, signal_at=None):
        env = script_env(**({"ADMM_AT_TEST_SIGNAL": signal_at} if signal_at else {}))
        return forkserver.run([sys.executable, "adv_main.py", "--config", "configs/demo.yaml", "--out", str(out),
                               "--stage", "pretrain", *[a for s in sets for a in ("--set", s)], *extra],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    assert run(tmp_path / "ref").returncode == 0
    killed = run(tmp_path / "cut", signal_at="pretrain:7:SIGKILL")
    assert killed.returncode == -9 and not (tmp_path / "cut" / "pretrain.pt").exists()
    resumed = run(tmp_path / "cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming pretrain at epoch 2, step 2" in resumed.stdout
    a = torch.load(tmp_path / "ref" / "pretrain.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "pretrain.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
