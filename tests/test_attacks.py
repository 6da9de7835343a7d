"""Unit tests for attacks.py: threat model, effect on a trained LeNet, no side effects on the model."""
import pytest
import torch
import torch.nn.functional as F

import config
import data
from attacks import FGSM, PGD, AutoAttack
from helpers import train_lenet
from models import build_model

EPS = 0.2


def attacks_to_check(eps=EPS):
    return {
        "fgsm": FGSM(eps),
        "pgd": PGD(eps, step_size=eps / 4, steps=10),
        "pgd_no_random_start": PGD(eps, step_size=eps / 4, steps=10, random_start=False),
        "pgd_restarts3": PGD(eps, step_size=eps / 4, steps=5, restarts=3),
    }


@pytest.fixture(scope="module")
def demo():
    train, test, info = data.load_data(config.load_config(None))
    return train, test


@pytest.fixture(scope="module")
def trained(demo):
    """LeNet w=2 after 3 epochs of Adam on 2,000 demo digits (~1 s; ~93% test accuracy over seeds),
    plus 300 random test digits as floats. Both subsets are drawn at random, so they do not depend
    on the order the demo splits are stored in."""
    train, test = demo
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(train.labels), generator=g)[:2000]
    sub = data.Split(train.images[idx], train.labels[idx])
    model = train_lenet(sub, epochs=3, batch_size=16)
    tidx = torch.randperm(len(test.labels), generator=g)[:300]
    x = test.images[tidx].float() / 255
    return model, x, test.labels[tidx]


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


# --------------------------------------------------------------------------- threat model

@pytest.mark.parametrize("name", list(attacks_to_check()))
def test_linf_ball_and_pixel_range(name, trained):
    model, x, y = trained
    x, y = x[:64], y[:64]
    x_adv = attacks_to_check()[name](model, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert (x_adv - x).abs().max().item() <= EPS + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    assert not x_adv.requires_grad
    assert (x_adv != x).float().mean() > 0.1  # it actually moved


def test_ball_respected_on_untrained_rgb_model():
    model = build_model("resnet18", 1, in_channels=3, image_size=32)
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for attack in (FGSM(8 / 255), PGD(8 / 255, 2 / 255, 3, restarts=2)):
        x_adv = attack(model, x, y)
        assert (x_adv - x).abs().max().item() <= 8 / 255 + 1e-6
        assert 0.0 <= x_adv.min().item() and x_adv.max().item() <= 1.0


def test_fgsm_is_one_signed_gradient_step(trained):
    model, x, y = trained
    x, y = x[:32], y[:32]
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)
    expect = (x + EPS * g.sign()).clamp(0, 1)
    assert torch.equal(FGSM(EPS)(model, x, y), expect)
    # PGD with one full-size step from the clean input is FGSM.
    assert torch.equal(PGD(EPS, EPS, 1, random_start=False)(model, x, y), expect)


def test_repr_names_settings():
    r = repr(PGD(0.3, 0.01, 40, restarts=2, random_start=False))
    assert r.startswith("PGD(") and "eps=0.3" in r and "steps=40" in r and "restarts=2" in r


# --------------------------------------------------------------------------- strength on a trained model

def test_attack_strength_order(trained):
    model, x, y = trained
    nat = accuracy(model, x, y)
    fgsm = accuracy(model, FGSM(EPS)(model, x, y), y)
    pgd = accuracy(model, PGD(EPS, EPS / 4, 10)(model, x, y), y)
    assert nat > 0.8, nat
    assert pgd <= fgsm <= nat, (pgd, fgsm, nat)
    assert pgd < nat - 0.3, (pgd, nat)  # eps=0.2 bites on a naturally trained LeNet


def test_restarts_keep_per_example_worst_case(trained):
    """PGD(restarts=3) with seed s equals three single runs drawn from the same RNG stream,
    combined per example: the first restart that fools the model, else the one of highest loss."""
    model, x, y = trained
    eps, kw = 0.08, dict(step_size=0.02, steps=4)
    torch.manual_seed(123)
    runs = [PGD(eps, **kw)(model, x, y) for _ in range(3)]
    torch.manual_seed(123)
    best = PGD(eps, restarts=3, **kw)(model, x, y)

    with torch.no_grad():
        logits = torch.stack([model(r) for r in runs])                      # [3, N, 10]
        fooled = logits.argmax(2) != y                                      # [3, N]
        loss = torch.stack([F.cross_entropy(l, y, reduction="none") for l in logits])
    any_fooled = fooled.any(0)
    first_fooled = fooled.float().argmax(0)                                 # first True
    expect_idx = torch.where(any_fooled, first_fooled, loss.argmax(0))
    expect = torch.stack(runs)[expect_idx, torch.arange(len(y))]
    assert torch.equal(best, expect)
    # The combined attack fools exactly the examples that some restart fools.
    assert torch.equal(model(best).argmax(1) != y, any_fooled)
    # The case is informative: restarts disagree on some examples.
    assert (fooled.any(0) & ~fooled.all(0)).any()


def test_more_restarts_not_weaker(trained):
    model, x, y = trained
    torch.manual_seed(1)
    acc1 = accuracy(model, PGD(0.1, 0.025, 5, restarts=1)(model, x, y), y)
    torch.manual_seed(1)
    acc5 = accuracy(model, PGD(0.1, 0.025, 5, restarts=5)(model, x, y), y)
    assert acc5 <= acc1  # seeded alike, the first restart of the 5 is the single run


# --------------------------------------------------------------------------- no side effects

@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", ["fgsm", "pgd_restarts3"])
def test_no_parameter_grads_and_mode_restored(mode, name):
    model = build_model("lenet", 1)
    model.train(mode == "train")
    seen = []
    model.conv1.register_forward_hook(lambda m, i, o: seen.append(m.training))
    for p in model.parameters():
        p.grad = None
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    attacks_to_check()[name](model, x, y)
    assert all(p.grad is None for p in model.parameters())
    assert all(m.training == (mode == "train") for m in model.modules())
    assert seen and not any(seen)  # every forward pass inside the attack ran in eval mode


def test_existing_parameter_grads_untouched():
    model = build_model("lenet", 1)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    F.cross_entropy(model(x), y).backward()
    before = [p.grad.clone() for p in model.parameters()]
    PGD(0.1, 0.02, 3)(model, x, y)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), before))


def test_mode_restored_when_attack_raises():
    model = build_model("lenet", 1).train()
    with pytest.raises(Exception):
        PGD(0.1, 0.02, 2)(model, torch.rand(2, 1, 28, 28), torch.tensor([0, 99]))  # bad label
    assert model.training


@pytest.mark.parametrize("norm,eps", [("linf", EPS), ("l2", 2.0)])
def test_reference_apgd_stays_in_ball(norm, eps, trained):
    """The reference APGD-CE (pyautoattack) through our wrapper: same ball, same pixel range."""
    pytest.importorskip("pyautoattack")
    model, x, y = trained
    x, y = x[:32], y[:32]
    x_adv = AutoAttack(eps, norm, attacks=("apgd-ce",))(model, x, y)
    dist = (x_adv - x).abs().flatten(1).amax(1) if norm == "linf" else (x_adv - x).flatten(1).norm(dim=1)
    assert x_adv.shape == x.shape and dist.max() <= eps + 1e-5 and 0 <= x_adv.min() and x_adv.max() <= 1
    assert accuracy(model, x_adv, y) < accuracy(model, x, y) - 0.3


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_reference_fab_leaves_no_parameter_grads(mode):
    """FAB inside pyautoattack calls backward(); the wrapper freezes the parameters for the call, so
    no .grad is written, and puts the model back in its mode. The labels are the model's own
    predictions, so FAB has every example to attack."""
    pytest.importorskip("pyautoattack")
    model = build_model("lenet", 1)
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        y = model(x).argmax(1)
    model.train(mode == "train")
    rng = torch.get_rng_state()
    x_adv = AutoAttack(0.05, attacks=("fab-t",))(model, x, y)
    after = torch.get_rng_state()
    assert (x_adv != x).any()  # FAB ran and moved some input
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert all(m.training == (mode == "train") for m in model.modules())
    # The library reseeds torch's global RNG: the wrapper's caller sees only the one draw of its seed.
    torch.set_rng_state(rng)
    torch.randint(2 ** 31 - 1, ())
    assert torch.equal(after, torch.get_rng_state())


def test_batchnorm_running_stats_unchanged_by_attack():
    model = build_model("vgg16", 1, in_channels=3, image_size=32).train()
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    bufs = {n: b.clone() for n, b in model.named_buffers()}
    for attack in (FGSM(8 / 255), PGD(8 / 255, 2 / 255, 2, restarts=2)):
        attack(model, x, y)
    assert model.training
    assert all(torch.equal(b, bufs[n]) for n, b in model.named_buffers())
    # Control: a forward pass in train mode does move the running statistics.
    model(x)
    assert not torch.equal(model.features[1].running_mean, bufs["features.1.running_mean"])
