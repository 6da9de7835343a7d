"""Training methods: how one minibatch is turned into optimizer steps.

Each method is a small object with the same hooks, so the training loop never asks which one it
runs (``training.loop.run_epoch`` calls ``method.step``):

    natural   one step on the clean batch
    pgd       one step on PGD examples (Madry et al. 2018), the ICCV'19 paper's training
    fgsm_rs   one step on FGSM examples from a random start (Wong et al. 2020)
    free      m replays of the batch, each step also an FGSM step on a perturbation carried
              from batch to batch (Shafahi et al. 2019); its perturbation is the method's state

The attack-based methods train on the loss ``adv.loss`` names (``losses.py``: cross-entropy,
TRADES or MART). ``Precision`` (mixed precision) and the two step functions are shared by all.
"""
import contextlib

import torch
import torch.nn.functional as F

from attacks import PGD
from training.losses import LOSSES_OF_METHOD, CrossEntropy, make_loss


class Precision:
    """Mixed precision from ``perf.amp`` (off | bf16 | fp16); a no-op unless the device is CUDA.

    Training runs under autocast in the chosen dtype, with a gradient scaler for fp16. The attack
    never runs in fp16: its input gradient can underflow to 0, and sign(0) = 0 silently weakens
    the attack. It uses bf16 (fp32's exponent range) where the GPU supports it, else fp32.
    """

    def __init__(self, mode, device):
        self.on = device.type == "cuda" and mode != "off"
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)
        self.scaler = torch.amp.GradScaler("cuda") if self.on and mode == "fp16" else None
        self.attack_bf16 = self.on and torch.cuda.is_bf16_supported()

    def train(self):
        return torch.autocast("cuda", self.dtype) if self.on else contextlib.nullcontext()

    def attack(self):
        return torch.autocast("cuda", torch.bfloat16) if self.attack_bf16 else contextlib.nullcontext()

    def step(self, loss, optimizer):
        """backward + optimizer step (through the scaler for fp16)."""
        if self.scaler:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            loss.backward()
            optimizer.step()


FP32 = Precision("off", torch.device("cpu"))
CE = CrossEntropy()


def train_step(net, model, x, y, optimizer, attack=None, penalty=None, precision=FP32, loss=CE):
    """One step of min-max training (Madry et al. 2018, Eq. 2.1; ICCV'19 Eq. 4 with the ADMM term):
    x_adv = attack(model, x, y), then one optimizer step on loss(net, x, x_adv, y) + penalty();
    with the default ``loss``, CE(net(x_adv), y).

    ``net`` is the model as trained (possibly DDP-wrapped or compiled), ``model`` the plain module
    the attack runs on. Returns (loss, penalty, logits on x_adv), detached, on the device.
    """
    x_adv = x
    if attack is not None:
        with precision.attack():
            x_adv = attack(model, x, y)
    with precision.train():
        value, logits = loss(net, x, x_adv, y)
    pen = penalty() if penalty else torch.zeros((), device=x.device)
    optimizer.zero_grad(set_to_none=True)
    precision.step(value + pen, optimizer)
    return value.detach(), pen.detach(), logits.detach()


def free_step(net, x, y, optimizer, delta, eps, replays, penalty=None, precision=FP32):
    """Adversarial training for free (Shafahi et al. 2019, Alg. 1): ``replays`` optimizer steps on
    the same minibatch; each backward gives both the weights' gradient and the input gradient,
    used for an FGSM step of size eps on the perturbation ``delta`` ([B, C, H, W], updated in
    place and carried over to the next minibatch). Returns the last replay's (loss, penalty, logits)."""
    d = delta[: len(x)]
    for _ in range(replays):
        d = d.detach().requires_grad_(True)
        with precision.train():
            logits = net((x + d).clamp(0, 1))
            loss = F.cross_entropy(logits, y)
        pen = penalty() if penalty else torch.zeros((), device=x.device)
        optimizer.zero_grad(set_to_none=True)
        precision.step(loss + pen, optimizer)
        # A scaled (fp16) gradient has the same sign; one the scaler found non-finite (its step was
        # skipped) must not turn delta into NaN for good.
        d = (d + eps * torch.nan_to_num(d.grad, nan=0.0, posinf=0.0, neginf=0.0).sign()).clamp(-eps, eps)
    delta[: len(x)] = d.detach()
    return loss.detach(), pen.detach(), logits.detach()


# --------------------------------------------------------------------------- the methods

class Method:
    """The hooks every training method has (``start``, ``progress``, ``step``, ``state_dict`` /
    ``load_state_dict``) and their defaults: one step on ``attack(x)``, or on x without an attack."""
    name = None
    adversarial = True   # trains on adversarial examples (adv_main.py's methods)
    replays = 1          # optimizer steps per minibatch; the schedules count passes over the data
    clean_logits = False  # the step's logits are on clean inputs: no extra forward for natural accuracy
    attack = None        # the attack that makes the training batch, if the method uses one
    loss = CE            # the training loss (losses.py)

    def start(self):
        """Called when a stage starts fresh (not on resume)."""

    def progress(self, stage, passes):
        """Called before each step with the stage's kind (pretrain, admm, retrain) and its passes
        over the data so far (a ``Fraction``)."""

    def step(self, net, model, x, y, optimizer, penalty, precision):
        """Train on one minibatch; returns (loss, penalty, logits), detached."""
        return train_step(net, model, x, y, optimizer, self.attack, penalty, precision, self.loss)

    def state_dict(self):
        return None

    def load_state_dict(self, state):
        pass

    def __repr__(self):
        return f"{self.name} training" + ("" if self.loss.name == "ce" else f", {self.loss!r}")


class Natural(Method):
    """Training on clean inputs (``main.py``)."""
    name = "natural"
    adversarial = False
    clean_logits = True


class AttackTraining(Method):
    """Training on the examples a training ``attack`` makes from each batch (PGD, FGSM-RS), with
    ``loss`` (``losses.py``), whose ``adversary`` wraps the attack (TRADES: aimed away from f(x)).

    ``eps_ramp`` > 0: during pretraining the attack's eps (and step size) grow linearly over the
    first ``eps_ramp`` passes, k / eps_ramp of the target in pass k; training at full eps from
    the start can collapse a small model to chance (the demo's LeNet at MNIST's eps 0.3)."""
    def __init__(self, name, pgd, eps_ramp=0, train_mode=False, loss=CE):
        """``pgd``: the training ``PGD`` (with the loss's ``attack_settings``); ``train_mode``: run it
        with the model in train mode."""
        self.name, self.pgd, self.eps_ramp, self.loss = name, pgd, eps_ramp, loss
        adversary = loss.adversary(pgd)
        self.attack = InTrainMode(adversary) if train_mode else adversary
        self.target = (pgd.eps, pgd.step_size)

    def progress(self, stage, passes):
        f = ramp(self.eps_ramp, stage, passes)
        self.pgd.eps, self.pgd.step_size = self.target[0] * f, self.target[1] * f


def ramp(eps_ramp, stage, passes):
    """The fraction of the training eps used in pass ``int(passes)`` of ``stage``."""
    if not eps_ramp or stage != "pretrain":
        return 1.0
    return min(1.0, (int(passes) + 1) / eps_ramp)


class InTrainMode:
    """A training attack run with the model left in train mode, so BatchNorm normalizes with (and
    updates) the batch statistics while the attack runs, as the original authors' code does.
    The default (``adv.attack_mode=eval``) attacks the model the test attacks: eval mode."""

    def __init__(self, attack):
        self.attack = attack

    def __call__(self, model, x, y):
        with torch.enable_grad():
            return self.attack.perturb(model, x.detach(), y)

    def __repr__(self):
        return f"{self.attack!r} in train mode"


class Free(Method):
    """Adversarial training for free (Shafahi et al. 2019): see ``free_step``. Its perturbation
    ``delta`` ([batch, C, H, W]) is carried from minibatch to minibatch, restarts at zero with each
    stage, and is saved with the training state so a resumed run continues it exactly."""
    name = "free"

    def __init__(self, eps, replays, shape, device, eps_ramp=0):
        self.eps, self.replays, self.target, self.eps_ramp = eps, replays, eps, eps_ramp
        self.delta = torch.zeros(shape, device=device)

    def start(self):
        self.delta.zero_()

    def progress(self, stage, passes):
        self.eps = self.target * ramp(self.eps_ramp, stage, passes)

    def step(self, net, model, x, y, optimizer, penalty, precision):
        return free_step(net, x, y, optimizer, self.delta, self.eps, self.replays, penalty, precision)

    def state_dict(self):
        return self.delta.cpu()

    def load_state_dict(self, state):
        if state is not None:
            self.delta.copy_(state)

    def __repr__(self):
        return f"free training ({self.replays} replays per minibatch)"


def _pgd(a, loss, shape, device):
    settings = {"eps": a["eps"], "step_size": a["step_size"], "steps": a["steps"], "restarts": a["restarts"],
                "random_start": a["random_start"], **loss.attack_settings}
    return AttackTraining("pgd", PGD(**settings), a["eps_ramp"], a["attack_mode"] == "train", loss)


def _fgsm_rs(a, loss, shape, device):
    # FGSM-RS (Wong et al. 2020): one step of 1.25 eps from a uniform random start = PGD with steps=1.
    return AttackTraining("fgsm_rs", PGD(a["eps"], 1.25 * a["eps"], 1, 1, True), a["eps_ramp"],
                          a["attack_mode"] == "train", loss)


def _free(a, loss, shape, device):
    # free's perturbation is made by the training step itself, in the mode the model trains in.
    return Free(a["eps"], a["free_replays"], shape, device, a["eps_ramp"])


ADVERSARIAL = {"pgd": _pgd, "fgsm_rs": _fgsm_rs, "free": _free}  # adv.method -> builder


def training_info(cfg, adversarial):
    """What a model was trained with, for reports: {method, loss, beta} (beta None for ce);
    checkpoints from before ``adv.loss`` trained with cross-entropy."""
    if not adversarial:
        return {"method": "natural", "loss": "ce", "beta": None}
    a = cfg["adv"]
    loss = a.get("loss", "ce")
    return {"method": a["method"], "loss": loss, "beta": None if loss == "ce" else a.get("beta")}


def make_method(cfg, adversarial, info, device):
    """The training method of a run: ``Natural()`` for ``main.py``, else ``cfg['adv']['method']``
    built from ``cfg['adv']`` with its ``loss`` (``info``: the dataset's image shape, for free's
    perturbation)."""
    if not adversarial:
        return Natural()
    a = cfg["adv"]
    assert a["loss"] in LOSSES_OF_METHOD[a["method"]], "config.validate refuses this combination"
    shape = (cfg["data"]["batch_size"], info.in_channels, info.image_size, info.image_size)
    return ADVERSARIAL[a["method"]](a, make_loss(a), shape, device)
