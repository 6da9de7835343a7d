"""Attacks in [0, 1] pixel space, called as ``attack(model, x, y) -> x_adv``.

Conventions (as torchattacks and MadryLab ``robustness``):
- ``x`` is [N, C, H, W] in [0, 1]; ``y`` is [N] int64 labels; ``x_adv`` has the shape of ``x``,
  lies in the attack's ball around ``x`` (||x_adv - x||_p <= eps) and stays in [0, 1].
- Gradients are taken with ``torch.autograd.grad`` w.r.t. the input only, so no parameter
  ``.grad`` is ever written, and the model is run in eval mode (BatchNorm uses its running
  statistics) and put back in the mode it was found in.
- The threat model (random start, steepest-ascent step, projection) lives in one small class per
  norm (``LinfBall``, ``L2Ball``), the objective in ``LOSSES``; ``PGD`` combines them.
"""
import torch
import torch.nn.functional as F


class _Attack:
    def __call__(self, model, x, y):
        was_training = model.training
        model.eval()
        try:
            with torch.enable_grad():
                return self.perturb(model, x.detach(), y)
        finally:
            model.train(was_training)

    def __repr__(self):
        args = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


# --------------------------------------------------------------------------- losses (per example, [N])

def ce_loss(logits, y):
    """Cross-entropy per example, [N]."""
    return F.cross_entropy(logits, y, reduction="none")


def cw_margin_loss(logits, y):
    """max_{j != y} z_j - z_y per example, [N], on logits z: the margin loss of Carlini & Wagner
    (S&P 2017; their f_6, untargeted, negated, without the kappa clamp). Positive only when the
    example is misclassified. Unlike
    cross-entropy it does not saturate when the softmax does, which defeats one kind of gradient
    masking (Carlini et al. 2019, "On Evaluating Adversarial Robustness")."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return other - true


LOSSES = {"ce": ce_loss, "cw": cw_margin_loss}


def _input_grad(model, x, y, loss=ce_loss):
    """d loss(model(x), y) / dx, summed over the batch so each example's gradient does not
    depend on the batch size N."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    # Cross-entropy summed in one fused op; other losses are per example, then summed.
    total = F.cross_entropy(logits, y, reduction="sum") if loss is ce_loss else loss(logits, y).sum()
    return torch.autograd.grad(total, x)[0]


# --------------------------------------------------------------------------- threat models

def _norm(t):
    """Per-example L2 norm of t [N, ...], shaped [N, 1, ..., 1] to broadcast against t."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


class LinfBall:
    """{x' : ||x' - x||_inf <= eps}: uniform random start in the cube, signed-gradient step (the
    steepest ascent direction for L-inf), projection by clipping each pixel."""

    @staticmethod
    def random_start(x, eps):
        return x + torch.empty_like(x).uniform_(-eps, eps)

    @staticmethod
    def step(grad, step_size):
        return step_size * grad.sign()

    @staticmethod
    def projector(x, eps):
        """Projection onto the ball and [0, 1] at once, with the per-pixel bounds computed once per
        attack rather than at every step."""
        lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
        return lambda x_adv: torch.min(torch.max(x_adv, lo), hi)


class L2Ball:
    """{x' : ||x' - x||_2 <= eps}, per example: random start in a uniformly random direction at a
    uniformly random radius in [0, eps] (as torchattacks ``PGDL2``), step along the normalised
    gradient, projection by rescaling the perturbation onto the ball."""

    @staticmethod
    def random_start(x, eps):
        d = torch.randn_like(x)
        r = torch.rand(len(x), *([1] * (x.dim() - 1)), device=x.device, dtype=x.dtype)
        return x + eps * r * d / _norm(d).clamp_min(1e-12)

    @staticmethod
    def step(grad, step_size):
        return step_size * grad / _norm(grad).clamp_min(1e-12)

    @staticmethod
    def project(x_adv, x, eps):
        delta = x_adv - x
        return x + delta * (eps / _norm(delta).clamp_min(1e-12)).clamp(max=1.0)

    @staticmethod
    def projector(x, eps):
        """Projection onto the ball, then onto [0, 1]."""
        return lambda x_adv: L2Ball.project(x_adv, x, eps).clamp(0, 1)


BALLS = {"linf": LinfBall, "l2": L2Ball}


# --------------------------------------------------------------------------- attacks

class FGSM(_Attack):
    """Fast Gradient Sign Method (Goodfellow et al., ICLR 2015): x + eps * sign(grad_x CE), L-inf."""

    def __init__(self, eps):
        self.eps = float(eps)

    def perturb(self, model, x, y):
        return (x + self.eps * _input_grad(model, x, y).sign()).clamp(0, 1)


class PGD(_Attack):
    """Projected gradient ascent on ``loss`` in the ``norm`` ball (Madry et al., ICLR 2018, Eq. 2):

        x_{t+1} = Pi_{B(x, eps) and [0,1]}(x_t + step(grad_x loss(f(x_t), y)))

    ``norm``: ``linf`` (step = alpha * sign(grad)) or ``l2`` (step = alpha * grad / ||grad||_2).
    ``loss``: ``ce`` (cross-entropy) or ``cw`` (the Carlini & Wagner 2017 margin loss).
    ``steps`` iterations of size ``step_size`` (alpha) from a random start in the ball
    (``random_start``; else from x). Clipping to [0, 1] after the projection never leaves the ball,
    since x itself is in [0, 1]. With ``restarts`` > 1 the attack is repeated and, per example, the
    worst case is kept: an example fooled by any restart stays fooled, otherwise the restart with the
    highest ``loss`` wins.
    """

    def __init__(self, eps, step_size, steps, restarts=1, random_start=True, loss="ce", norm="linf"):
        if loss not in LOSSES or norm not in BALLS:
            raise ValueError(f"PGD: loss must be one of {', '.join(LOSSES)} and norm one of {', '.join(BALLS)}; "
                             f"got loss={loss!r}, norm={norm!r}")
        self.eps, self.step_size = float(eps), float(step_size)
        self.steps, self.restarts, self.random_start = int(steps), int(restarts), bool(random_start)
        self.loss, self.norm = loss, norm

    def _run(self, model, x, y):
        ball, loss = BALLS[self.norm], LOSSES[self.loss]
        x_adv = x
        if self.random_start:
            x_adv = ball.random_start(x, self.eps).clamp(0, 1)
        project = ball.projector(x, self.eps)
        for _ in range(self.steps):
            x_adv = project(x_adv + ball.step(_input_grad(model, x_adv, y, loss), self.step_size))
        return x_adv.detach()

    def perturb(self, model, x, y):
        best = self._run(model, x, y)
        if self.restarts == 1:
            return best
        loss_fn = LOSSES[self.loss]
        with torch.no_grad():
            logits = model(best)
            best_loss, fooled = loss_fn(logits, y), logits.argmax(1) != y
        for _ in range(self.restarts - 1):
            cand = self._run(model, x, y)
            with torch.no_grad():
                logits = model(cand)
                loss, cand_fooled = loss_fn(logits, y), logits.argmax(1) != y
            take = ~fooled & (cand_fooled | (loss > best_loss))
            best = torch.where(take.view(-1, *([1] * (x.dim() - 1))), cand, best)
            best_loss = torch.where(take, loss, best_loss)
            fooled |= cand_fooled
        return best


class AutoAttack(_Attack):
    """AutoAttack (Croce & Hein, ICML 2020), ``standard`` version, through the torchattacks
    re-implementation (``torchattacks.AutoAttack``): APGD-CE, APGD-T, FAB-T and Square run one
    after another, each on the examples the previous ones did not fool.

    ``norm``: ``Linf`` or ``L2``; ``eps`` in [0, 1] pixel units. The library's own seed is drawn
    from the torch RNG, so the result is reproducible under ``torch.manual_seed`` like ``PGD``;
    the library reseeds the global RNG, so it runs inside ``fork_rng`` to leave the caller's
    stream as it was. FAB calls ``backward()``, which would write parameter ``.grad``: the
    parameters are frozen (``requires_grad=False``) for the call and restored after.
    Needs ``pip install torchattacks`` (checked when the attack is built).
    """

    def __init__(self, eps, norm="Linf"):
        try:
            import torchattacks  # noqa: F401 - optional dependency, fail when built, not mid-evaluation
        except ImportError:
            raise ImportError("autoattack needs the torchattacks package: pip install torchattacks") from None
        self.eps, self.norm, self.version = float(eps), norm, "standard"

    def perturb(self, model, x, y):
        import torchattacks
        if self.eps == 0:
            return x
        seed = int(torch.randint(2 ** 31 - 1, ()))
        params = [p for p in model.parameters() if p.requires_grad]
        devices = [x.device] if x.device.type == "cuda" else []
        try:
            for p in params:
                p.requires_grad_(False)
            with torch.random.fork_rng(devices=devices):
                with torch.no_grad():
                    n_classes = model(x[:1]).shape[1]
                attack = torchattacks.AutoAttack(model, norm=self.norm, eps=self.eps, version=self.version,
                                                 n_classes=n_classes, seed=seed)
                return attack(x, y).detach()
        finally:
            for p in params:
                p.requires_grad_(True)
