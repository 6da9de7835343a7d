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
import logging
import re

import torch
import torch.nn.functional as F

from common import progress


class _Attack:
    # True for an attack that must see every evaluated example in one call (its checks are
    # statistics of the whole set); the evaluation then passes it the set, not one batch at a time.
    whole_set = False

    def __call__(self, model, x, y):
        was_training = model.training
        model.eval()
        try:
            with torch.enable_grad():
                return self.perturb(model, x.detach(), y)
        finally:
            model.train(was_training)

    def __repr__(self):
        args = ", ".join(f"{k}={v}" for k, v in vars(self).items() if not k.startswith("_"))
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


def kl_loss(logits, p):
    """KL(p || softmax(logits)) per example, [N], against a distribution ``p`` [N, K] (not labels):
    TRADES' inner objective, with p the model's output on the clean input (Zhang et al., ICML
    2019, Eq. 5)."""
    return F.kl_div(F.log_softmax(logits, 1), p, reduction="none").sum(1)


LOSSES = {"ce": ce_loss, "cw": cw_margin_loss, "kl": kl_loss}


def _fooled(logits, y):
    """[N] bool: misclassified, for labels ``y``; never, for a target distribution (KL)."""
    if y.dim() > 1:
        return torch.zeros(len(y), dtype=torch.bool, device=y.device)
    return logits.argmax(1) != y


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
    ``loss``: ``ce`` (cross-entropy), ``cw`` (the Carlini & Wagner 2017 margin loss) or ``kl``
    (TRADES' inner objective; ``y`` is then a target distribution [N, K], not labels).
    ``steps`` iterations of size ``step_size`` (alpha) from a random start in the ball
    (``random_start``), else from x + ``start_noise`` * N(0, I) projected (TRADES' start, Zhang
    et al. 2019, Alg. 1: the KL's gradient is zero at x), else from x. Clipping to [0, 1] after the
    projection never leaves the ball, since x itself is in [0, 1]. With ``restarts`` > 1 the attack
    is repeated and, per example, the worst case is kept: an example fooled by any restart stays
    fooled, otherwise the restart with the highest ``loss`` wins.
    """

    def __init__(self, eps, step_size, steps, restarts=1, random_start=True, loss="ce", norm="linf", start_noise=0.0):
        if loss not in LOSSES or norm not in BALLS:
            raise ValueError(f"PGD: loss must be one of {', '.join(LOSSES)} and norm one of {', '.join(BALLS)}; "
                             f"got loss={loss!r}, norm={norm!r}")
        self.eps, self.step_size = float(eps), float(step_size)
        self.steps, self.restarts, self.random_start = int(steps), int(restarts), bool(random_start)
        self.loss, self.norm, self.start_noise = loss, norm, float(start_noise)

    def _run(self, model, x, y):
        ball, loss = BALLS[self.norm], LOSSES[self.loss]
        project = ball.projector(x, self.eps)
        x_adv = x
        if self.random_start:
            x_adv = ball.random_start(x, self.eps).clamp(0, 1)
        elif self.start_noise:
            x_adv = project(x + self.start_noise * torch.randn_like(x))
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
            best_loss, fooled = loss_fn(logits, y), _fooled(logits, y)
        for _ in range(self.restarts - 1):
            cand = self._run(model, x, y)
            with torch.no_grad():
                logits = model(cand)
                loss, cand_fooled = loss_fn(logits, y), _fooled(logits, y)
            take = ~fooled & (cand_fooled | (loss > best_loss))
            best = torch.where(take.view(-1, *([1] * (x.dim() - 1))), cand, best)
            best_loss = torch.where(take, loss, best_loss)
            fooled |= cand_fooled
        return best


class AutoAttack(_Attack):
    """AutoAttack (Croce & Hein, ICML 2020) from the authors' own package, ``pyautoattack``.

    ``attacks=None`` runs the standard version, the one RobustBench and the pruning papers report:
    APGD-CE (100 iterations), APGD-T (100 iterations on the targeted DLR loss, 9 target classes),
    FAB-T (9 target classes) and Square (5,000 queries), each on the examples the ones before it
    left correctly classified. A subset of ``STANDARD`` runs only those attacks, with the standard
    version's settings (``version`` is then "custom"): ``("apgd-ce", "apgd-t")`` is the cheaper
    ``apgd`` of ``eval.py``. ``n_queries`` lowers Square's queries (tests only; also "custom").

    ``norm``: ``linf`` or ``l2``; ``eps`` in [0, 1] pixel units. The library is seeded from the
    torch RNG, so the result is reproducible under ``torch.manual_seed`` like ``PGD``; it reseeds the
    global RNG, so it runs inside ``fork_rng``. FAB calls ``backward()``, which would write parameter
    ``.grad``: the parameters are frozen (``requires_grad=False``) for the call. The library's own
    checks (a randomized model, a softmax output, zero gradients, Square beating the gradient
    attacks, ...) are logged to its ``auto-attack`` logger: they are collected instead, and
    ``pop_flags()`` returns those seen since the last call to it, one line per kind.

    The checks are statistics of the set the library is given (Square's is "it lowered robust
    accuracy by more than 0.2 %"), so, as the reference is meant to be run, it is given the whole
    evaluation set in one call (``whole_set``) and batches it itself, ``batch_size`` at a time. Run
    one batch of 500 at a time, 2 digits that only Square breaks in one batch fire that check
    (0.4 %); on the whole 1,000 it takes 3.
    A bar (on terminals) advances as each of its attacks finishes, with the robust accuracy so far.
    Needs ``pip install pyautoattack==0.2.0`` (checked when the attack is built).
    """

    STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")
    FLAGS_DOC = "https://github.com/fra31/auto-attack/blob/master/flags_doc.md"
    whole_set = True

    def __init__(self, eps, norm="linf", attacks=None, n_queries=None, batch_size=500):
        try:
            import pyautoattack
        except ImportError:
            raise ImportError("autoattack and apgd need the AutoAttack authors' package: "
                              "pip install pyautoattack==0.2.0") from None
        attacks = tuple(self.STANDARD if attacks is None else attacks)
        if norm not in ("linf", "l2") or not attacks or set(attacks) - set(self.STANDARD):
            raise ValueError(f"AutoAttack: norm must be linf or l2 and attacks a subset of {', '.join(self.STANDARD)}; "
                             f"got norm={norm!r}, attacks={attacks!r}")
        self.eps, self.norm, self.attacks = float(eps), norm, attacks
        self.n_queries = None if n_queries is None else int(n_queries)
        self.batch_size = int(batch_size)
        self.version = "standard" if attacks == self.STANDARD and n_queries is None else "custom"
        self.library = f"pyautoattack {pyautoattack.__version__}"
        self._flags = {}

    def info(self):
        """What ran, for the JSON report: library and version, attacks in order, threat model."""
        return {"library": self.library, "version": self.version, "attacks": list(self.attacks),
                "norm": self.norm, "eps": self.eps, **({"n_queries": self.n_queries} if self.n_queries else {})}

    def pop_flags(self):
        """The library's check messages since the last call, one per kind, with how often it fired."""
        out = [msg.replace("See flags_doc.md", f"See {self.FLAGS_DOC}")
               + (f" (raised {n} times; the figures are the first's)" if n > 1 else "")
               for msg, n in self._flags.values()]
        self._flags = {}
        return out

    def _adversary(self, model, device, seed):
        from pyautoattack import AutoAttack as Reference
        aa = Reference(model, norm={"linf": "Linf", "l2": "L2"}[self.norm], eps=self.eps, seed=seed,
                       device=device, version="standard")
        # A subset keeps the standard version's settings (restarts, target classes), set just above.
        if self.attacks != self.STANDARD:
            aa.version, aa.attacks_to_run = "custom", list(self.attacks)
        if self.n_queries is not None:
            aa.square.n_queries = self.n_queries
        return aa

    def perturb(self, model, x, y):
        if self.eps == 0:
            return x
        seed = int(torch.randint(2 ** 31 - 1, ()))
        params = [p for p in model.parameters() if p.requires_grad]
        log, flags = logging.getLogger("auto-attack"), _Collect(progress(None, len(self.attacks), "autoattack"))
        # Its checks go to the report and its per-attack lines to the bar, not the console.
        level, propagate = log.level, log.propagate
        log.setLevel(logging.DEBUG)
        log.propagate = False
        log.addHandler(flags)
        try:
            for p in params:
                p.requires_grad_(False)
            with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
                x_adv, _ = self._adversary(model, x.device, seed).run_standard_evaluation(x, y, batch_size=self.batch_size)
            return x_adv.detach()
        finally:
            for p in params:
                p.requires_grad_(True)
            log.removeHandler(flags)
            flags.bar.close()
            log.setLevel(level)
            log.propagate = propagate
            for msg in flags.messages:  # one entry per kind: a check can fire on several of the library's batches, with other figures
                kind = re.sub(r"[\d.]+", "#", msg)
                first, n = self._flags.get(kind, (msg, 0))
                self._flags[kind] = (first, n + 1)


class _Collect(logging.Handler):
    """Keeps the messages of the warnings logged while it is attached, and moves ``bar`` on at
    each of the library's "robust accuracy after <attack>" lines."""

    def __init__(self, bar):
        super().__init__(logging.DEBUG)
        self.messages, self.bar = [], bar

    def emit(self, record):
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            self.messages.append(msg)
        elif msg.startswith("robust accuracy after"):
            self.bar.update(1)
            self.bar.set_postfix_str(msg[len("robust accuracy after "):])
