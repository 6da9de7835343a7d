"""The adversarial training losses (``adv.loss``): what one minibatch and its adversarial
examples are trained on, and which examples the training attack looks for.

    ce      CE(f(x'), y), x' from PGD on cross-entropy (Madry et al., ICLR 2018): the ICCV'19
            paper's training and the default
    trades  CE(f(x), y) + beta KL(f(x) || f(x')), x' from PGD on that KL (Zhang et al., ICML 2019)
    mart    BCE(f(x'), y) + beta KL(f(x) || f(x')) (1 - f_y(x)), x' from PGD on cross-entropy
            (Wang et al., ICLR 2020)

Each is an object with the same hooks, so a training method never asks which loss it has:
``attack_settings`` adjust the training PGD (its objective and start), ``adversary`` wraps it, and
calling the loss on (x, x') gives the batch's loss. f is the softmax of the model's logits.
"""
import torch
import torch.nn.functional as F

from attacks import _Attack


class CrossEntropy:
    """CE(f(x'), y) on the adversarial examples alone (Madry et al. 2018, Eq. 2.1); x' = x in
    natural training."""
    name = "ce"
    beta = None
    attack_settings = {}  # PGD keyword arguments this loss overrides in the training attack

    def adversary(self, attack):
        """The attack that makes x' from (x, y), given the training PGD."""
        return attack

    def __call__(self, net, x, x_adv, y):
        """(mean loss, logits on x'), the loss with its graph."""
        logits = net(x_adv)
        return F.cross_entropy(logits, y), logits

    def info(self):
        return {"loss": self.name, "beta": self.beta}

    def __repr__(self):
        return "cross-entropy loss"


class TRADES(CrossEntropy):
    """TRADES (Zhang et al., ICML 2019, Eq. 5 and Alg. 1):

        CE(f(x), y) + beta * KL(f(x) || f(x')),   x' = argmax_{x' in B(x, eps)} KL(f(x) || f(x'))

    with the KL summed over classes and averaged over the batch, as in the authors' code. The inner
    maximisation is the training PGD on the KL objective (``attacks.kl_loss``) from x + 0.001 N(0, I)
    (the KL's gradient is zero at x' = x), the clean distribution f(x) computed once, in the mode
    the attack runs in (eval by default, like the reference). The outer loss runs two forwards, on
    x and on x', both in train mode, as the reference does (BatchNorm sees each batch alone).
    Gradients flow through f(x) in both terms. beta = 0 is natural training's loss on x.
    """
    name = "trades"
    attack_settings = {"loss": "kl", "random_start": False, "start_noise": 0.001}

    def __init__(self, beta):
        self.beta = float(beta)

    def adversary(self, attack):
        return CleanTarget(attack)

    def __call__(self, net, x, x_adv, y):
        logits, logits_adv = net(x), net(x_adv)
        kl = F.kl_div(F.log_softmax(logits_adv, 1), F.log_softmax(logits, 1), reduction="none", log_target=True)
        return F.cross_entropy(logits, y) + self.beta * kl.sum(1).mean(), logits_adv

    def __repr__(self):
        return f"TRADES loss (beta {self.beta:g})"


class MART(CrossEntropy):
    """MART (Wang et al., ICLR 2020, Eq. 9), x' from the training PGD on cross-entropy:

        BCE(f(x'), y) + beta * KL(f(x) || f(x')) * (1 - f_y(x)),
        BCE(p, y) = -log p_y - log(1 - max_{k != y} p_k)

    averaged over the batch. The weight (1 - f_y(x)) puts the KL on the examples the model gets
    wrong on clean inputs; like the authors' code, it is not detached. log(1 - p_k) is computed as
    logsumexp of the other logits minus logsumexp of all (exact where p_k rounds to 1), where the
    authors' code uses log(1.0001 - p_k + 1e-12).
    """
    name = "mart"

    def __init__(self, beta):
        self.beta = float(beta)

    @staticmethod
    def weight(logits, y):
        """[N]: 1 - f_y(x), MART's per-example weight of the KL term."""
        return 1 - F.softmax(logits, 1).gather(1, y[:, None]).squeeze(1)

    def __call__(self, net, x, x_adv, y):
        logits, logits_adv = net(x), net(x_adv)
        true = F.one_hot(y, logits_adv.shape[1]).bool()
        runner_up = logits_adv.masked_fill(true, float("-inf")).argmax(1)  # the most likely wrong class
        not_runner_up = logits_adv.masked_fill(F.one_hot(runner_up, logits_adv.shape[1]).bool(), float("-inf"))
        log_1m_runner_up = torch.logsumexp(not_runner_up, 1) - torch.logsumexp(logits_adv, 1)
        bce = F.cross_entropy(logits_adv, y, reduction="none") - log_1m_runner_up
        kl = F.kl_div(F.log_softmax(logits_adv, 1), F.log_softmax(logits, 1), reduction="none", log_target=True).sum(1)
        return (bce + self.beta * kl * self.weight(logits, y)).mean(), logits_adv

    def __repr__(self):
        return f"MART loss (beta {self.beta:g})"


class CleanTarget(_Attack):
    """TRADES' adversary: ``attack`` (a PGD on the KL objective) aimed away from the model's own
    distribution on the clean input, f(x) [N, K], instead of the labels. Runs in eval mode and
    restores the model's mode, like every attack (``_Attack``); ``perturb`` alone runs in the mode
    it finds (``adv.attack_mode=train``)."""

    def __init__(self, attack):
        self.attack = attack

    def perturb(self, model, x, y):
        with torch.no_grad():
            target = F.softmax(model(x), 1)
        return self.attack.perturb(model, x, target)

    def __repr__(self):
        return f"{self.attack!r} away from f(x)"


LOSSES = {"ce": lambda beta: CrossEntropy(), "trades": TRADES, "mart": MART}  # adv.loss -> builder(beta)

# The losses each training method can use. fgsm_rs + trades: TRADES' inner maximisation is a
# multi-step KL attack from a 0.001 start, which one FGSM step does not approximate. free: its
# perturbation is the training loss's own input gradient, which for TRADES and MART is not the
# attack those losses prescribe.
LOSSES_OF_METHOD = {"pgd": ("ce", "trades", "mart"), "fgsm_rs": ("ce", "mart"), "free": ("ce",)}


def make_loss(adv):
    """The loss of config section ``adv`` (``loss``, ``beta``)."""
    return LOSSES[adv["loss"]](adv["beta"])
