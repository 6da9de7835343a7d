"""L-inf attacks in [0, 1] pixel space, called as ``attack(model, x, y) -> x_adv``.

Conventions (as torchattacks and MadryLab ``robustness``):
- ``x`` is [N, C, H, W] in [0, 1]; ``y`` is [N] int64 labels; ``x_adv`` has the shape of ``x``,
  satisfies ||x_adv - x||_inf <= eps and stays in [0, 1].
- Gradients are taken with ``torch.autograd.grad`` w.r.t. the input only, so no parameter
  ``.grad`` is ever written, and the model is run in eval mode (BatchNorm uses its running
  statistics) and put back in the mode it was found in.
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


def _input_grad(model, x, y):
    """d CE(model(x), y) / dx, summed over the batch so the scale does not depend on N."""
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    return torch.autograd.grad(loss, x)[0]


class FGSM(_Attack):
    """Fast Gradient Sign Method (Goodfellow et al., ICLR 2015): x + eps * sign(grad)."""

    def __init__(self, eps):
        self.eps = float(eps)

    def perturb(self, model, x, y):
        return (x + self.eps * _input_grad(model, x, y).sign()).clamp(0, 1)


class PGD(_Attack):
    """L-inf projected gradient descent (Madry et al., ICLR 2018, Eq. 2):

        x_{t+1} = Pi_{B(x, eps) and [0,1]}(x_t + alpha * sign(grad_x CE(f(x_t), y)))

    ``steps`` iterations of size ``step_size`` (alpha) from a uniform random start in the ball
    (``random_start``). With ``restarts`` > 1 the attack is repeated and, per example, the worst
    case is kept: an example fooled by any restart stays fooled, otherwise the restart with the
    highest loss wins.
    """

    def __init__(self, eps, step_size, steps, restarts=1, random_start=True):
        self.eps, self.step_size = float(eps), float(step_size)
        self.steps, self.restarts, self.random_start = int(steps), int(restarts), bool(random_start)

    def _run(self, model, x, y):
        x_adv = x
        if self.random_start:
            x_adv = (x + torch.empty_like(x).uniform_(-self.eps, self.eps)).clamp(0, 1)
        for _ in range(self.steps):
            x_adv = x_adv + self.step_size * _input_grad(model, x_adv, y).sign()
            x_adv = torch.min(torch.max(x_adv, x - self.eps), x + self.eps).clamp(0, 1)
        return x_adv.detach()

    def perturb(self, model, x, y):
        best = self._run(model, x, y)
        if self.restarts == 1:
            return best
        with torch.no_grad():
            logits = model(best)
            best_loss, fooled = F.cross_entropy(logits, y, reduction="none"), logits.argmax(1) != y
        for _ in range(self.restarts - 1):
            cand = self._run(model, x, y)
            with torch.no_grad():
                logits = model(cand)
                loss, cand_fooled = F.cross_entropy(logits, y, reduction="none"), logits.argmax(1) != y
            take = ~fooled & (cand_fooled | (loss > best_loss))
            best = torch.where(take.view(-1, *([1] * (x.dim() - 1))), cand, best)
            best_loss = torch.where(take, loss, best_loss)
            fooled |= cand_fooled
        return best
