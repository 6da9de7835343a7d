"""What the training loop (``training.loop.train_stage``) works with: the state a checkpoint holds
(``TrainState``), one epoch's running figures (``EpochMeter``), schedules counted in passes over
the data (``Schedule``, ``lr_at``), the optimizers, early stopping on the validation split, and
the DDP / compile wrapping. Stopping on a signal is ``training.stops``."""
import collections
import math
from fractions import Fraction

import torch

from training import distributed as dist
from common import LOG, git_hash, rng_state, set_rng_state
from training.methods import Precision


# --------------------------------------------------------------------------- schedules

class Schedule:
    """A stage's progress counted in passes over the training data (epoch-equivalents), whatever
    the method: ``free`` replays each minibatch m times, so one loop over the data is m passes
    (Shafahi et al. 2019 run epochs / m loops). The learning-rate milestones, the Z/U update
    interval and the evaluation interval are all in passes, so they mean the same for every method.

    ``epochs``: passes the stage makes; ``batches``: minibatches in one loop over the data (per
    rank); ``replays``: optimizer steps per minibatch. The stage runs ``total_steps`` minibatches,
    so the last loop may be partial (free with epochs not a multiple of m).
    """

    def __init__(self, epochs, batches, replays=1):
        self.epochs, self.batches, self.replays = epochs, batches, replays
        self.total_steps = math.ceil(epochs * batches / replays)
        self.loops = math.ceil(self.total_steps / batches)

    def steps_in(self, loop):
        """Minibatches in loop ``loop`` (0-based)."""
        return min(self.batches, self.total_steps - loop * self.batches)

    def passes(self, loop, step):
        """Passes over the data made after ``step`` minibatches of loop ``loop`` (exact fraction)."""
        return Fraction((loop * self.batches + step) * self.replays, self.batches)

    def reaches(self, every, loop, step):
        """Whether minibatch ``step`` (1-based) of loop ``loop`` completes a multiple of ``every``
        passes (never when ``every`` is 0)."""
        return bool(every) and self.passes(loop, step) // every > self.passes(loop, step - 1) // every

    def loop_reaches(self, every, loop):
        """Whether loop ``loop`` completes a multiple of ``every`` passes anywhere in it."""
        return bool(every) and self.passes(loop, self.steps_in(loop)) // every > self.passes(loop, 0) // every


def lr_at(scfg, passes, epochs):
    """Learning rate after ``passes`` whole passes over the data of a stage of ``epochs`` (its
    ``scfg``: ``lr``, ``schedule`` constant | step | cosine, ``milestones``, ``gamma``). Derived from
    the progress, so resuming needs no scheduler state."""
    if scfg["schedule"] == "cosine":
        return scfg["lr"] * 0.5 * (1 + math.cos(math.pi * passes / max(epochs, 1)))
    if scfg["schedule"] == "step":
        return scfg["lr"] * scfg["gamma"] ** sum(passes >= m for m in scfg["milestones"])
    return scfg["lr"]


def make_optimizer(params, scfg, own=None):
    """The section ``scfg``'s optimizer over ``params`` (parameters, or param groups). ``own``
    ({optimizer, momentum, weight_decay}, or None): the settings of the groups marked ``"own":
    True`` (a score stage's scores and rates under ``prune.score_optimizer``), which then get an
    optimizer of their own, stepped with the section's as one (``Optimizers``). Without ``own``,
    or with no group marked, every parameter takes ``scfg``'s optimizer, as before the option."""
    params = list(params)
    mine = [g for g in params if isinstance(g, dict) and g.get("own")] if own else []
    if not mine:
        return _optimizer(params, scfg)
    rest = [g for g in params if not (isinstance(g, dict) and g.get("own"))]
    scores = _optimizer(mine, {**scfg, **own})
    return Optimizers([_optimizer(rest, scfg), scores]) if rest else scores


def _optimizer(params, s):
    if s["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=s["lr"], momentum=s["momentum"], weight_decay=s["weight_decay"])
    return torch.optim.Adam(params, lr=s["lr"], weight_decay=s["weight_decay"])


def score_optimizer(pcfg):
    """``make_optimizer``'s ``own`` settings from the ``prune`` section, or None when the scores
    take the stage section's optimizer (``prune.score_optimizer`` empty, the default)."""
    if not pcfg.get("score_optimizer"):  # also a config saved before the key
        return None
    return {"optimizer": pcfg["score_optimizer"], "momentum": pcfg["score_momentum"],
            "weight_decay": pcfg["score_weight_decay"]}


class Optimizers:
    """Several optimizers stepped as one: ``param_groups`` lists all their groups (the loop sets
    each group's lr from it), ``step`` steps each and then runs the post-step hooks (the masks'
    hook, ``admm.attach_masks``), ``state_dict`` holds each one's. It stands in for one
    ``torch.optim.Optimizer`` wherever the loop, the training methods and the fp16 grad scaler
    (which reads ``param_groups`` and calls ``step``) use one."""

    def __init__(self, optimizers):
        self.optimizers = optimizers
        self._post_hooks = collections.OrderedDict()

    @property
    def param_groups(self):
        return [g for o in self.optimizers for g in o.param_groups]

    def zero_grad(self, set_to_none=True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        assert closure is None, "Optimizers.step takes no closure"
        for o in self.optimizers:
            o.step()
        for hook in list(self._post_hooks.values()):
            hook(self, (), {})

    def register_step_post_hook(self, hook):
        handle = torch.utils.hooks.RemovableHandle(self._post_hooks)
        self._post_hooks[handle.id] = hook
        return handle

    def state_dict(self):
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state):
        for o, s in zip(self.optimizers, state["optimizers"], strict=True):
            o.load_state_dict(s)

    def __repr__(self):
        return " + ".join(type(o).__name__ for o in self.optimizers)


# --------------------------------------------------------------------------- one epoch's figures

class EpochMeter:
    """One epoch's running sums, kept on the device so that no step waits for the host: loss and
    penalty (times the batch size) and the natural and adversarial correct counts; the example
    counts are known on the host. ``averages`` sums over torchrun ranks."""
    SUMS = ("loss", "penalty", "natural_correct", "adv_correct")

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        self.sums = {k: torch.zeros((), device=self.device) for k in self.SUMS}
        self.n = self.n_natural = 0  # examples seen; examples the natural accuracy was measured on
        self.bad_step = torch.full((), -1, dtype=torch.long, device=self.device)  # first non-finite loss

    @torch.no_grad()
    def add(self, step, loss, penalty, adv_correct, n, natural_correct=None):
        """One minibatch of ``n`` examples; ``natural_correct`` None when not measured this step."""
        self.bad_step = torch.where((self.bad_step < 0) & ~torch.isfinite(loss + penalty), step, self.bad_step)
        self.sums["loss"] += loss * n
        self.sums["penalty"] += penalty * n
        self.sums["adv_correct"] += adv_correct.float()
        self.n += n
        if natural_correct is not None:
            self.sums["natural_correct"] += natural_correct.float()
            self.n_natural += n

    def totals(self):
        """{name: sum over ranks} of the sums and the counts ``n``, ``n_natural`` (one all-reduce)."""
        t = dist.all_sum(torch.stack([*self.sums.values(), torch.tensor(float(self.n), device=self.device),
                                      torch.tensor(float(self.n_natural), device=self.device)]))
        return dict(zip((*self.SUMS, "n", "n_natural"), t))

    def averages(self):
        """{loss, penalty, train_natural, train_adv}: per-example means over the epoch."""
        t = self.totals()
        n, n_nat = t["n"].clamp_min(1), t["n_natural"].clamp_min(1)
        return {"loss": (t["loss"] / n).item(), "penalty": (t["penalty"] / n).item(),
                "train_natural": (t["natural_correct"] / n_nat).item(), "train_adv": (t["adv_correct"] / n).item()}

    def state_dict(self):
        """The totals over all ranks, as plain tensors (rank 0 carries them on after a resume)."""
        return {k: v.cpu() for k, v in self.totals().items()}

    def load_state_dict(self, state):
        if isinstance(state, torch.Tensor):  # checkpoints before the named sums: a tensor of 6
            state = dict(zip((*self.SUMS, "n", "n_natural"), state))
        keep = 1.0 if dist.is_main() else 0.0
        self.sums = {k: state[k].to(self.device, torch.float32) * keep for k in self.SUMS}
        self.n, self.n_natural = int(state["n"] * keep), int(state["n_natural"] * keep)


# --------------------------------------------------------------------------- early stopping

class EarlyStop:
    """Stop a stage once PGD accuracy on the validation split stops improving, and keep the best
    epoch's weights (early stopping on held-out robust accuracy, as Rice, Wong & Kolter, ICML 2020,
    "Overfitting in adversarially robust deep learning", do against robust overfitting).

    The rule, after each epoch's validation PGD accuracy v: the epoch is the new best when
    v > best + ``min_delta`` (the first epoch always is); the stage stops once ``patience`` epochs
    in a row are not (epoch - best epoch >= patience), or at its ``epochs``, whichever comes
    first. Its final model is the best epoch's weights, never the test set's choice. Everything
    is in ``state_dict``, so a resumed run decides as an uninterrupted one. ``patience`` 0: off."""

    def __init__(self, patience=0, min_delta=0.0):
        self.patience, self.min_delta = patience, min_delta
        self.best, self.best_epoch, self.weights, self.stopped = -math.inf, 0, None, False

    def observe(self, epoch, value, model):
        """Epoch ``epoch`` (1-based) ended with validation accuracy ``value``; returns whether to
        stop now."""
        if value > self.best + self.min_delta:
            self.best, self.best_epoch = value, epoch
            self.weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        self.stopped = epoch - self.best_epoch >= self.patience
        return self.stopped

    def restore(self, model):
        """Put the best epoch's weights into ``model``."""
        if self.weights is not None:
            model.load_state_dict(self.weights)

    def summary(self):
        return {"best_epoch": self.best_epoch, "best_val_pgd": self.best, "patience": self.patience,
                "min_delta": self.min_delta, "stopped_early": self.stopped}

    def state_dict(self):
        return {"best": self.best, "best_epoch": self.best_epoch, "weights": self.weights, "stopped": self.stopped}

    def load_state_dict(self, state):
        self.best, self.best_epoch, self.stopped = state["best"], state["best_epoch"], state["stopped"]
        self.weights = state["weights"]


# --------------------------------------------------------------------------- the training state

# Checkpoint keys renamed since the format began, (new, old): read under either name, written
# under the new one. "admm" held any stage's state; "free_delta" any training method's.
RENAMED = (("stage_state", "admm"), ("method_state", "free_delta"))


class TrainState:
    """Everything a running stage's checkpoint holds, with one save path (``state_dict``) and one
    load path (``load_state_dict``): the model, optimizer, gradient scaler, masks, the run's
    per-layer ratios (``allocation``, read by ``pruning.plan.make_stage`` before this object is built),
    the stage's own state (ADMM's Z, U, rho; HYDRA's scores; HARP's scores, rates and gamma),
    the method's state (free's perturbation), the loop position
    (``epoch``: loops done, ``step``: minibatches done in the next), the partial epoch's sums,
    the last epoch's metrics, RNG states, and how much of ``metrics.jsonl`` belongs to this state.
    """

    def __init__(self, stage, model, method, cfg, device):
        self.stage, self.model, self.method, self.cfg, self.device = stage, model, method, cfg, device
        self.optimizer = make_optimizer(stage.parameters(model), cfg[stage.section],  # weights, or a stage's scores
                                        score_optimizer(cfg["prune"]))
        self.precision = Precision(cfg["perf"]["amp"], device)
        self.masks, self.metrics = {}, {}
        self.epoch = self.step = 0
        self.meter = EpochMeter(device)
        self.log_bytes = None  # size of metrics.jsonl when this state was saved
        self.earlier = {}  # convergence figures of the stages before this one
        scfg = cfg[stage.section]  # early stopping on the validation split (pretrain.patience), or None
        self.early = EarlyStop(scfg["patience"], scfg["min_delta"]) if scfg.get("patience") else None

    def begin(self, init):
        """A fresh start from checkpoint ``init`` (its weights already in the model), or from
        scratch (None). Its masks are kept, so a pruned weight never comes back."""
        masks = {n: m.to(self.device) for n, m in ((init or {}).get("masks") or {}).items()}
        self.masks = self.stage.begin(masks)
        self.method.start()
        self.earlier = dict((init or {}).get("convergence") or {})

    def convergence(self):
        """{stage: its convergence figures} of this stage and the stages before it (ADMM's last
        residuals, the hard prune's pruned energy), carried from checkpoint to checkpoint."""
        return {**self.earlier, **({self.stage.name: self.stage.figures} if self.stage.figures else {})}

    def state_dict(self):
        """The checkpoint dict (plain tensors and data, loadable with ``weights_only=True``)."""
        m = self.cfg["model"]
        return {"stage": self.stage.name, "epoch": self.epoch, "step": self.step, "arch": m["arch"],
                "width": m["width"], "dataset": self.cfg["data"]["dataset"],
                "adversarial": self.method.adversarial, "method": self.method.name, "config": self.cfg,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.precision.scaler.state_dict() if self.precision.scaler else None,
                "stage_state": self.stage.state_dict(), "masks": {n: k.cpu() for n, k in self.masks.items()} or None,
                "allocation": self.stage.allocation.state_dict() if self.stage.allocation else None,
                "metrics": self.metrics, "rng": rng_state(), "sums": self.meter.state_dict(),
                "method_state": self.method.state_dict(), "metrics_log_bytes": self.log_bytes,
                "convergence": self.convergence(),
                **({"early_stop": self.early.state_dict()} if self.early else {}),
                "world": dist.world(), "git": git_hash()}

    def load_state_dict(self, ckpt):
        """Continue exactly where ``ckpt`` (a ``<stage>.last.pt``) stopped."""
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.precision.scaler and ckpt.get("scaler"):
            self.precision.scaler.load_state_dict(ckpt["scaler"])
        self.masks = {n: k.to(self.device) for n, k in (ckpt["masks"] or {}).items()}
        stage_state, method_state = (ckpt.get(new, ckpt.get(old)) for new, old in RENAMED)
        if stage_state:
            self.stage.load_state_dict(stage_state, self.device)
        self.method.load_state_dict(method_state)  # free's perturbation, else None
        self.epoch, self.step, self.metrics = ckpt["epoch"], ckpt["step"], ckpt["metrics"]
        figures = dict(ckpt.get("convergence") or {})
        self.stage.figures = figures.pop(self.stage.name, {})
        self.earlier = figures
        self.meter.load_state_dict(ckpt["sums"])
        if self.early:
            self.early.load_state_dict(ckpt["early_stop"])
        self.log_bytes = ckpt.get("metrics_log_bytes")
        set_rng_state(ckpt["rng"])
        if ckpt.get("world", 1) != dist.world():
            LOG.warning(f"resuming on {dist.world()} processes, saved on {ckpt.get('world', 1)}: "
                        "the rest of this epoch sees the data in another order")


def wrap_for_training(model, cfg, device):
    """(net, attack_model): the module the training forward runs through (DDP under torchrun,
    compiled with ``perf.compile``) and the one attacks and clean forwards use (never DDP: an
    attack needs no gradient all-reduce). ``perf.channels_last`` and ``perf.compile`` apply on
    CUDA only."""
    if device.type == "cuda" and cfg["perf"]["channels_last"]:
        model.to(memory_format=torch.channels_last)
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if dist.launched() else model
    attack_model = model
    if device.type == "cuda" and cfg["perf"]["compile"]:
        net, attack_model = torch.compile(net), torch.compile(model)
    return net, attack_model
