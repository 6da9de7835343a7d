"""The config's schema: every key a config may hold with its default (``DEFAULTS``; the default
also fixes its type), the choices of the keys that take a name (``CHOICES``, from the registries
that define them) and the valid values of every numeric key (``RANGES``). ``config.py`` reads a
YAML file and ``--set`` against it; ``python config.py`` writes it out as docs/config.md."""
import copy
import math

import admm as admm_lib
import data as data_lib
from pruning import allocation as allocation_lib
from pruning.plan import STAGES
from training.losses import LOSSES
from training.methods import ADVERSARIAL

_STAGE = {
    "epochs": 10,          # passes over the training data in this stage (free: m of them per loop)
    "lr": 0.01,            # peak learning rate
    "optimizer": "sgd",    # sgd | adam
    "momentum": 0.9,       # sgd only
    "weight_decay": 0.0,
    "schedule": "cosine",  # cosine | step | constant (evaluated per pass over the data)
    "milestones": [],      # step schedule: passes over the data (epochs) at which lr *= gamma
    "gamma": 0.1,
}

DEFAULTS = {
    "seed": 0,
    "device": "auto",              # auto | cpu | cuda | cuda:N
    "deterministic": False,        # reproducible GPU runs: torch's deterministic algorithms, cuDNN without
                                   # autotuning, CUBLAS_WORKSPACE_CONFIG=:4096:8 (slower: docs/training.md)
    "lr_span": "stage",            # stage: each stage its own lr schedule | run: one schedule over every stage
                                   # after pretraining, continuing across stage boundaries (each stage's section
                                   # gives lr, schedule, milestones, gamma; set them alike for one curve)
    "data": {
        "dataset": "demo",         # demo | mnist | fashion_mnist | cifar10
        "root": "data",            # where torchvision datasets live / are downloaded to
        "download": True,
        "synthetic": False,        # random tensors of the dataset's shape (smoke tests, benchmarks)
        "train_limit": 0,          # use the first N training examples (0 = all)
        "val_size": 0,             # hold the last N examples of the training set out as a validation split
                                   # (data.load_splits), before train_limit; 0: none (PGD on it: per stage's
                                   # end, and every epoch of a stage with patience)
        "batch_size": 128,
        "test_batch_size": 500,
        "mean": [],                # per-channel normalization inside the model ([]: the dataset's); a model trained
        "std": [],                 # on inputs in [0, 1] with no normalization needs [0, 0, 0] and [1, 1, 1]
    },
    "model": {"arch": "lenet", "width": 4},
    "adv": {                       # the training adversary (L-inf); eps is also the evaluation eps
        "method": "pgd",           # pgd (Madry) | fgsm_rs (Wong et al. 2020) | free (Shafahi et al. 2019)
        "loss": "ce",              # ce (Madry) | trades (Zhang et al. 2019) | mart (Wang et al. 2020); losses.py
        "beta": 6.0,               # trades / mart: weight of the KL term (both papers' default 6)
        "free_replays": 4,         # free: replays m per minibatch (a stage of E epochs runs E / m loops)
        "eps": 0.3,                # pixel units in [0, 1]
        "step_size": 0.01,
        "steps": 40,
        "restarts": 1,
        "random_start": True,
        "attack_mode": "eval",     # model mode while the training attack runs: eval (BN running stats) |
                                   # train (batch stats, updating them: the original code's behaviour)
        "eps_ramp": 0,             # pretraining: eps grows linearly to adv.eps over the first N passes (0: off)
    },
    "eval": {                      # the evaluation PGD (per epoch, final report, eval.py defaults), eps = adv.eps
        "steps": 20,
        "step_size": 0.01,
        "restarts": 1,
        "limit": 1000,             # test examples for the per-epoch evaluation (0 = all)
        "every": 1,                # evaluate every N passes over the data (and always at a stage's end)
    },
    "prune": {
        "sparsity_type": "irregular",  # irregular | filter | column
        "prune_ratios": {},        # {param name or fnmatch pattern: fraction pruned in [0, 1)},
                                   # or {arch: {...}}, one table per arch, picked by model.arch
        "rho": 0.01,               # initial ADMM penalty
        "rho_growth": 1.0,         # rho *= rho_growth at each Z/U update
        "update_every": 1,         # passes over the data between Z/U updates
        "masked_progressive": False,  # keep already-zero weights at zero during ADMM
        "rescale_dual": True,      # U *= rho_old / rho_new when rho grows (Boyd et al. 2011, Sec. 3.4.1);
                                   # false keeps U as the original code does (its multiplier rho*U then grows with rho)
        "restart_lr": True,        # restart the ADMM stage's lr schedule at every Z/U update (the original
                                   # code's choice; docs/pruning.md compares the two)
        "method": "admm",          # admm | gradual (Zhu & Gupta 2017, cubic schedule; the admm section's
                                   # epochs and lr) | oneshot (magnitude pruning at retrain's start)
        "rounds": [],              # progressive ADMM (arXiv:1903.09769): fractions of each layer's target ratio,
                                   # ascending, ending at 1.0, e.g. [0.8, 0.9, 1.0]; each round runs admm + retrain
        "rate_rounds": [],         # progressive ADMM by overall compression rate instead, ascending, ending at the
                                   # target's 1 / (1 - prune.target), e.g. [10, 30, 100] for target 0.99
        "target": 0.0,             # one overall target: fraction of all prunable weights pruned, exactly (0: off,
                                   # prune_ratios alone); prune_ratios entries still fix the layers they name
        "allocation": "uniform",   # how the target is split (allocation.py): uniform | global (one magnitude
                                   # threshold) | lamp (Lee et al. 2021) | erk (Evci et al. 2020) | from_checkpoint
        "rates_from": "",          # allocation from_checkpoint: a checkpoint whose allocation (e.g. a HARP run's
                                   # learned rates) gives the layers' shares, rescaled to prune.target
        "score_lr": 0.0,           # hydra, harp: peak lr of the scores (0: admm.lr); the admm section gives the rest
        "rate_lr": 0.0,            # harp: peak lr of the per-layer keep rates (0: admm.lr)
        "rate_gamma": 1.0,         # harp: gamma_0 of the rate loss; gamma = (e + 1) gamma_0 until the target is met
        "rate_start": 1.0,         # harp: initial keep rates = the allocation's times this (HARP starts denser)
        "rate_init_clip": "floor", # harp: how a start rate becomes a_l = logit(u), u = (k - k_min) / (1 - k_min):
                                   # floor (u clipped to [0.01, 0.99]) | authors (HARP's rate_init_func: u clipped
                                   # to [-0.99, 0.99]; a start at or below k_min, u <= 0, is an error there: NaN)
        "score_optimizer": "",     # hydra, harp: the scores' (and rates') own optimizer, sgd | adam, with the two
                                   # keys below ("": the admm section's optimizer, momentum and weight decay)
        "score_momentum": 0.9,     # score_optimizer=sgd (HYDRA's and HARP's code: 0.9)
        "score_weight_decay": 0.0, # score_optimizer set (HYDRA's code: 1e-4; HARP's CIFAR config: 5e-4)
    },
    "quant": {                     # ADMM quantization after pruning (quant.py; Leng et al. 2018, arXiv:1903.09769)
        "bits": {},                # {param name or fnmatch pattern: bits, 1..16 (0: not quantized)}, or {arch: {...}};
                                   # empty: no quantization. Levels {-(2^(b-1)-1), ..., 0, ..., 2^(b-1)-1} x q per layer
        "rho": 0.1,                # initial ADMM penalty (as prune.rho); with rho_growth, O(1) within the
        "rho_growth": 1.5,         # stage: rho *= rho_growth at each Z/U update (10 updates: 0.1 -> 3.8)
        "update_every": 1,         # passes over the data between Z/U updates
        "rescale_dual": True,      # as prune.rescale_dual
        "restart_lr": True,        # as prune.restart_lr, for the quantize stage's schedule
    },
    "subnet": {                    # HYDRA / HARP checkpoints (SubnetConv/SubnetLinear with popup_scores) read as masks
        "k": 0.0,                  # their --k: fraction of weights kept (HYDRA: in every layer; HARP: the target)
        "alpha": 0.1,              # HARP's --alpha: a layer keeps at least k * alpha (its rates' floor)
    },
    "perf": {                      # GPU fast paths; no-ops on CPU
        "amp": "off",              # off | bf16 | fp16 (autocast; fp16 adds a grad scaler)
        "channels_last": False,
        "compile": False,          # torch.compile the model
    },
    "checkpoint": {
        "every_steps": 0,          # also rewrite <stage>.last.pt every N training steps (0 = once per epoch)
    },
    "pretrain": {**copy.deepcopy(_STAGE),
                 "patience": 0,    # > 0: stop once PGD accuracy on the validation split (data.val_size) has not
                                   # risen by more than min_delta for this many epochs, and keep the best epoch's
                                   # weights (training.state.EarlyStop); epochs is then the most it runs. 0: off
                 "min_delta": 0.0},  # a fraction of the validation split, e.g. 0.005 = half a point
    "admm": copy.deepcopy(_STAGE),
    "retrain": copy.deepcopy(_STAGE),
    "quantize": copy.deepcopy(_STAGE),  # runs after retrain when quant.bits is set
}

STAGE_SECTIONS = ("pretrain", "admm", "retrain", "quantize")

# The choices of each string key, from the registries that implement them (a new entry there is
# a new choice here); the rest are switches inside the code that reads them.
CHOICES = {
    "lr_span": ("stage", "run"),
    "data.dataset": tuple(data_lib.INFO),
    "prune.sparsity_type": admm_lib.SCHEMES,
    "adv.method": tuple(ADVERSARIAL),
    "adv.loss": tuple(LOSSES),
    "adv.attack_mode": ("eval", "train"),
    # a pruning stage's kind (they train with the admm section), or oneshot: retrain prunes at its start
    "prune.method": tuple(k for k, s in STAGES.items() if s.section == "admm") + ("oneshot",),
    "prune.allocation": allocation_lib.RULES,
    "prune.score_optimizer": ("", "sgd", "adam"),
    "prune.rate_init_clip": ("floor", "authors"),
    "perf.amp": ("off", "bf16", "fp16"),
    **{f"{s}.optimizer": ("sgd", "adam") for s in STAGE_SECTIONS},
    **{f"{s}.schedule": ("cosine", "step", "constant") for s in STAGE_SECTIONS},
}

MAX_WIDTH = 1024  # larger widths overflow a tensor's shape (or any memory); w=16 is the standard width


class Range:
    """The valid values of a numeric key: ``lo`` to ``hi``, each end included unless open.
    ``warn_above`` names the key beyond whose value the setting never takes effect (an interval
    longer than its stage, a milestone after its schedule's end): a warning, ``what``, not an
    error, so that a run shortened with ``--set`` keeps the rest of its config. NaN lies in no
    range."""

    def __init__(self, lo=-math.inf, hi=math.inf, lo_open=False, hi_open=False, warn_above=None, what=None):
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open
        self.warn_above, self.what = warn_above, what

    def holds(self, v):
        above = v > self.lo if self.lo_open else v >= self.lo
        below = v < self.hi if self.hi_open else v <= self.hi
        return bool(above and below)  # False for NaN: every comparison with it is False

    def text(self):
        """The range as messages and docs/config.md write it: ``> 0``, ``>= 1``, ``in [0, 1)``."""
        def num(x):
            return "2^32 - 1" if x == 2 ** 32 - 1 else f"{x:g}" if isinstance(x, float) else f"{x}"
        if self.hi == math.inf:
            return f"{'>' if self.lo_open else '>='} {num(self.lo)}"
        return f"in {'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}{')' if self.hi_open else ']'}"


_POSITIVE, _NON_NEGATIVE, _COUNT = Range(0, lo_open=True), Range(0), Range(1)
_STAGE_RANGES = {"epochs": _NON_NEGATIVE, "lr": _POSITIVE, "momentum": Range(0, 1, hi_open=True),
                 "weight_decay": _NON_NEGATIVE, "gamma": _POSITIVE}

# Every numeric key's valid values, checked here and nowhere else (``check_ranges``) and listed in
# docs/config.md (``reference``). ``key.*``: each entry of a list or table.
RANGES = {
    "seed": Range(0, 2 ** 32 - 1),
    "data.train_limit": _NON_NEGATIVE, "data.batch_size": _COUNT, "data.test_batch_size": _COUNT,
    "data.val_size": _NON_NEGATIVE, "data.mean.*": Range(0.0, 1.0), "data.std.*": _POSITIVE,
    "model.width": Range(1, MAX_WIDTH),
    "adv.beta": _NON_NEGATIVE, "adv.free_replays": _COUNT,
    "adv.eps": Range(0.0, 1.0), "adv.step_size": _POSITIVE, "adv.steps": _NON_NEGATIVE, "adv.restarts": _COUNT,
    "adv.eps_ramp": Range(0, warn_above="pretrain.epochs", what="pretraining never reaches the full adv.eps"),
    "eval.steps": _NON_NEGATIVE, "eval.step_size": _POSITIVE, "eval.restarts": _COUNT, "eval.limit": _NON_NEGATIVE,
    "eval.every": _COUNT,  # beyond a stage's epochs: evaluated at the stage's end only, as documented
    "prune.prune_ratios.*": Range(0.0, 1.0, hi_open=True),
    "prune.rho": _POSITIVE, "prune.rho_growth": Range(1.0),
    "prune.update_every": Range(1, warn_above="admm.epochs", what="the ADMM stage makes no Z/U update"),
    "prune.rounds.*": Range(0.0, 1.0, lo_open=True),
    "prune.rate_rounds.*": Range(1.0, lo_open=True),
    "prune.target": Range(0.0, 1.0, hi_open=True),
    "prune.score_lr": _NON_NEGATIVE, "prune.rate_lr": _NON_NEGATIVE, "prune.rate_gamma": _NON_NEGATIVE,
    "prune.rate_start": _POSITIVE,
    "prune.score_momentum": Range(0, 1, hi_open=True), "prune.score_weight_decay": _NON_NEGATIVE,
    "subnet.k": Range(0.0, 1.0), "subnet.alpha": Range(0.0, 1.0),
    "pretrain.patience": _NON_NEGATIVE, "pretrain.min_delta": _NON_NEGATIVE,
    "quant.bits.*": Range(0, 16),
    "quant.rho": _POSITIVE, "quant.rho_growth": Range(1.0),
    "quant.update_every": Range(1, warn_above="quantize.epochs", what="the quantize stage makes no Z/U update"),
    "checkpoint.every_steps": _NON_NEGATIVE,
    **{f"{s}.{k}": r for s in STAGE_SECTIONS for k, r in _STAGE_RANGES.items()},
    **{f"{s}.milestones.*": Range(1, warn_above=f"{s}.epochs", what="the lr never reaches that milestone")
       for s in STAGE_SECTIONS},
}
