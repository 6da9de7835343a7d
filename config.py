"""One config path: ``configs/<name>.yaml`` over ``DEFAULTS``, then ``--set section.key=value``.

Every key a config may hold is in ``DEFAULTS``; its default also fixes its type. An unknown key
or a wrong type is a ``UserError`` naming the key (and the nearest valid key). Floats accept a
fraction string such as ``8/255``. The resolved config is a plain dict, saved into every
checkpoint and as ``config.yaml`` in the run folder.
"""
import copy
import difflib
import math
import sys
from fractions import Fraction

import yaml

import admm as admm_lib
import data as data_lib
from common import UserError, read_yaml, strict_yaml_loader
from pruning import allocation as allocation_lib
from pruning.plan import STAGES, lr_window, stage_names
from training.losses import LOSSES, LOSSES_OF_METHOD
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


def parse_bits(value, key):
    """Bits of one layer: an integer (its range, 0..16 with 0: left in float, is ``RANGES``')."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{key}: bits must be an integer in {RANGES['quant.bits.*'].text()} (0: not quantized), "
                        f"got {value!r}")
    return value


def parse_float(value, key):
    """A finite float from a number or a fraction string such as ``8/255``. NaN and infinity
    (YAML's ``.nan``, ``.inf``) are refused here, once for every key: ``NaN < 0`` is false, so
    no range check after this could catch them."""
    if isinstance(value, bool):
        raise UserError(f"{key}: expected a number, got {value!r}")
    number = None
    if isinstance(value, (int, float)):
        number = value
    elif isinstance(value, str):
        try:
            number = Fraction(value.replace(" ", ""))
        except (ValueError, ZeroDivisionError):
            pass
    if number is None:
        raise UserError(f"{key}: expected a number or a fraction like 8/255, got {value!r}")
    try:
        number = float(number)
    except OverflowError:  # an int or a fraction beyond float range
        number = math.inf
    if not math.isfinite(number):
        raise UserError(f"{key}: expected a finite number, got {value!r}")
    return number


# Tables keyed by parameter name or pattern (names hold dots, so they are no config sections;
# ``--set prune.prune_ratios.fc1.weight=0.9`` sets one entry): {dotted key: parser of a value}.
TABLES = {"prune.prune_ratios": parse_float, "quant.bits": parse_bits}


def _coerce(key, value, default):
    """``value`` checked against the type of ``default``."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise UserError(f"{key}: expected true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{key}: expected an integer, got {value!r}")
        return value
    if isinstance(default, float):
        return parse_float(value, key)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise UserError(f"{key}: expected a string, got {value!r}")
        return value
    if key in ("prune.rounds", "prune.rate_rounds", "data.mean", "data.std"):
        if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise UserError(f"{key}: expected a list of numbers such as [0.8, 0.9, 1.0], got {value!r}")
        return [float(v) for v in value]
    if isinstance(default, list):
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise UserError(f"{key}: expected a list of integers, got {value!r}")
        return value
    if key in TABLES:
        if isinstance(value, dict) and any(isinstance(v, dict) for v in value.values()):  # one table per arch
            return {str(arch): _name_table(_entry(key, arch), v, TABLES[key]) for arch, v in value.items()}
        return _name_table(key, value, TABLES[key])
    raise AssertionError(key)


def _name_table(key, value, parse):
    """{parameter name or pattern: value}, each value read by ``parse``."""
    if not isinstance(value, dict):
        raise UserError(f"{key}: expected a mapping of parameter name -> value, got {value!r}")
    return {str(k): parse(v, _entry(key, k)) for k, v in value.items()}


def _entry(key, name):
    """How a message names entry ``name`` of table ``key``: ``key.name``, with ``name`` quoted
    when it holds characters that would break the message's one line."""
    return f"{key}.{name}" if str(name).isprintable() else f"{key}.{str(name)!r}"


def _merge(base, new, prefix=""):
    if not isinstance(new, dict):
        raise UserError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {new!r}")
    for k, v in new.items():
        key = f"{prefix}{k}"
        if k not in base:
            near = difflib.get_close_matches(str(k), list(base), n=1)
            hint = f"; did you mean {prefix}{near[0]}?" if near else f"; valid keys: {', '.join(base)}"
            raise UserError(f"unknown config key {key!r}{hint}")
        if isinstance(base[k], dict) and key not in TABLES:
            _merge(base[k], v, key + ".")
        else:
            base[k] = _coerce(key, v, base[k])


def _get(cfg, key):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def validate(cfg):
    """Value checks beyond types: choices, ranges (``check_ranges``) and the rules that tie keys
    together. Model-dependent checks (prune_ratios names) happen once the model is built, still
    before any training."""
    for key, allowed in CHOICES.items():
        if _get(cfg, key) not in allowed:
            raise UserError(f"{key}: {_get(cfg, key)!r} is not one of {', '.join(allowed)}")
    for section in ("prune", "quant"):  # a restart at every Z/U update is not one schedule over the run
        used = cfg["prune"]["method"] == "admm" if section == "prune" else cfg["quant"]["bits"]  # who reads it
        if cfg["lr_span"] == "run" and cfg[section]["restart_lr"] and used:
            raise UserError(f"lr_span=run gives the stages after pretraining one lr schedule, but {section}.restart_lr "
                            f"restarts it at every Z/U update; set {section}.restart_lr=false")
    if cfg["pretrain"]["patience"] and not cfg["data"]["val_size"]:
        raise UserError("pretrain.patience stops on PGD accuracy on the validation split; set data.val_size, e.g. 1000")
    adv = cfg["adv"]
    if adv["loss"] not in LOSSES_OF_METHOD[adv["method"]]:
        raise UserError(f"adv.loss={adv['loss']} does not combine with adv.method={adv['method']} (it takes "
                        f"{' or '.join(LOSSES_OF_METHOD[adv['method']])}); use adv.method=pgd for {adv['loss']}")
    from models import available
    if cfg["model"]["arch"] not in available():
        raise UserError(f"model.arch: {cfg['model']['arch']!r} is not one of {', '.join(available())}")
    _pick_tables(cfg)
    check_ranges(cfg)
    rounds = cfg["prune"]["rounds"]
    if rounds and (rounds[-1] != 1.0 or any(not a < b for a, b in zip([0.0] + rounds, rounds))):
        raise UserError(f"prune.rounds: {rounds} must rise strictly from above 0 and end at 1.0 (the target), "
                        "e.g. [0.8, 0.9, 1.0]")
    _validate_allocation(cfg["prune"])
    return cfg


def _pick_tables(cfg):
    """Per-arch tables ({arch: {name: value}}) replaced by this arch's table."""
    for key in TABLES:
        section, name = key.split(".")
        table = cfg[section][name]
        if any(isinstance(v, dict) for v in table.values()):
            if cfg["model"]["arch"] not in table:
                raise UserError(f"{key} has tables for {', '.join(map(str, table))} but none for "
                                f"model.arch={cfg['model']['arch']}; add one")
            cfg[section][name] = table[cfg["model"]["arch"]]


def _values(cfg, key):
    """[(the key as a message names it, value)] of ``key`` in ``RANGES``: one, or each entry of a
    list or table (``key.*``)."""
    if not key.endswith(".*"):
        return [(key, _get(cfg, key))]
    whole = _get(cfg, key[:-2])
    if isinstance(whole, dict):
        return [(_entry(key[:-2], name), v) for name, v in whole.items()]
    return [(f"{key[:-2]}[{i}]", v) for i, v in enumerate(whole)]


def _upper(cfg, key):
    """(the value beyond which ``key`` never takes effect, what names it): ``Range.warn_above``'s
    value; for a milestone under ``lr_span: run`` (after pretraining), the epochs of every stage
    after pretraining, its schedule's length."""
    bound = RANGES[key].warn_above
    if key.endswith("milestones.*") and cfg["lr_span"] == "run" and not bound.startswith("pretrain."):
        return lr_window(cfg, 1)[1], "the epochs of every stage after pretraining, lr_span: run"
    return _get(cfg, bound), bound


def check_ranges(cfg):
    """Every value of ``RANGES`` in its range (``check_value``). The one place ranges are
    checked: the library takes its values from here."""
    for key in RANGES:
        for name, v in _values(cfg, key):
            check_value(key, v, name)


def check_value(key, value, name=None):
    """``value`` of ``RANGES[key]`` (or of a flag ``name`` that sets it) in its range, else a
    ``UserError`` naming it, the range and the value."""
    if not RANGES[key].holds(value):
        raise UserError(f"{name or key}: must be {RANGES[key].text()}, got {value}")
    return value


def warnings_of(cfg):
    """The settings that are valid but will never take effect in this run (``Range.warn_above``):
    one line each."""
    names = stage_names(cfg)
    sections = {STAGES[k].section for k in STAGES if any(n.split(".")[0] == k for n in names)}
    for section in STAGE_SECTIONS:  # a milestone matters where the section's stage runs a step schedule
        if section not in sections or cfg[section]["schedule"] != "step":
            sections.discard(section)
    runs = {"adv.eps_ramp": "pretrain" in names, "prune.update_every": cfg["prune"]["method"] in ("admm", "gradual"),
            "quant.update_every": "quantize" in names,
            **{f"{s}.milestones.*": s in sections for s in STAGE_SECTIONS}}
    out = []
    for key, rng in RANGES.items():
        if not rng.warn_above or not runs[key]:
            continue
        bound, where = _upper(cfg, key)
        for name, v in _values(cfg, key):
            if v > bound:
                out.append(f"{name}={v} is more than {where} ({bound}): {rng.what}")
    return out


def _validate_allocation(p):
    """The overall target, its allocation, the progressive rates and the score methods."""
    if p["allocation"] != "uniform" and not p["target"]:
        raise UserError(f"prune.allocation={p['allocation']} splits an overall target: set prune.target, e.g. 0.95")
    if p["allocation"] == "from_checkpoint" and not p["rates_from"]:
        raise UserError("prune.allocation=from_checkpoint: give the checkpoint in prune.rates_from")
    if p["target"] and p["sparsity_type"] != "irregular":
        raise UserError(f"prune.target: an overall target is exact for irregular pruning only; give "
                        f"{p['sparsity_type']} pruning per-layer prune.prune_ratios instead")
    if p["method"] in ("hydra", "harp") and p["sparsity_type"] != "irregular":
        raise UserError(f"prune.method={p['method']}: learned masks are implemented for irregular pruning only; "
                        f"set prune.sparsity_type=irregular")
    rates = p["rate_rounds"]
    if rates and p["rounds"]:
        raise UserError("prune.rate_rounds and prune.rounds are two ways to give the rounds; set one of them")
    if (rates or p["rounds"]) and p["method"] in ("hydra", "harp"):
        raise UserError(f"prune.method={p['method']} runs one pruning stage; progressive rounds are for "
                        "admm, gradual and oneshot (clear prune.rounds / prune.rate_rounds)")
    if rates:
        if not p["target"]:
            raise UserError(f"prune.rate_rounds: overall compression rates need an overall target; set prune.target "
                            f"to 1 - 1/{rates[-1]:g}")
        if any(not a < b for a, b in zip([1.0] + rates, rates)):
            raise UserError(f"prune.rate_rounds: {rates} must rise strictly from above 1, e.g. [10, 30, 100]")
        final = 1 / (1 - p["target"])
        if abs(rates[-1] / final - 1) > 1e-3:
            raise UserError(f"prune.rate_rounds: the last rate {rates[-1]:g} must be the target's compression rate "
                            f"1 / (1 - {p['target']}) = {final:.4g}")


def parse_set(item):
    """``section.key=value`` -> (dotted key, YAML-parsed value)."""
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    if not key.strip().isprintable():
        raise UserError(f"--set {item!r}: the key holds characters no config key has")
    try:
        return key.strip(), yaml.load(raw, Loader=strict_yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.constructor.ConstructorError as e:  # a key given twice in a {...} value
        raise UserError(f"--set {item!r}: {' '.join(str(e).split())}") from None
    except (yaml.YAMLError, RecursionError):
        return key.strip(), raw


def load_config(path=None, overrides=()):
    """DEFAULTS <- YAML file <- ``--set`` overrides, validated. Returns a plain nested dict."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        _merge(cfg, read_yaml(path, "config"))
    layers = {key: {} for key in TABLES}
    for item in overrides:
        key, value = parse_set(item)
        table = next((t for t in TABLES if key.startswith(t + ".")), None)
        if table:  # one layer: the rest of the key is a parameter name or pattern
            layers[table][key[len(table) + 1:]] = TABLES[table](value, key)
            continue
        *parents, leaf = key.split(".")
        nested = value
        for p in reversed([*parents, leaf]):
            nested = {p: nested}
        _merge(cfg, nested)
    cfg = validate(cfg)  # picks the per-arch tables, if any
    if any(layers.values()):  # per-layer overrides go on top of the (selected) table, as its last entries
        for key, entries in layers.items():
            table = _get(cfg, key)
            for name, value in entries.items():
                table.pop(name, None)  # re-inserted at the end, so it wins over earlier patterns
                table[name] = value
        validate(cfg)
    return cfg


def check_stored(cfg, path):
    """The config stored in a checkpoint or export at ``path`` (a resolved config), its types,
    choices and ranges checked as a config file's are: a value out of its range (``adv.eps:
    .nan``) is one line naming the file and the key, before anything computes with it. Returns
    the checked copy."""
    merged = copy.deepcopy(DEFAULTS)
    try:
        if not isinstance(cfg, dict):
            raise UserError(f"expected a mapping, got {type(cfg).__name__}")
        _merge(merged, cfg)  # types
        for key, allowed in CHOICES.items():
            if _get(merged, key) not in allowed:
                raise UserError(f"{key}: {_get(merged, key)!r} is not one of {', '.join(allowed)}")
        _pick_tables(merged)
        check_ranges(merged)  # not the rules between keys: a run's resolved config (its allocation applied)
        return merged         # holds the ratios the run pruned to, with prune.target no longer needed
    except UserError as e:
        raise UserError(f"{path}: its stored config is not valid: {e}") from None


def _flat_keys(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict) and f"{prefix}{k}" not in TABLES:
            yield from _flat_keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def _valid(key):
    """The valid values of ``key`` as docs/config.md lists them."""
    if key in CHOICES:
        return " \\| ".join(CHOICES[key])
    if key == "model.arch":
        from models import available
        return " \\| ".join(available())
    rng = RANGES.get(key) or RANGES.get(key + ".*")
    if rng is None:
        return {bool: "true \\| false", str: "a string", list: "a list"}.get(type(_get(DEFAULTS, key)), "")
    text = rng.text() if key in RANGES else f"each {rng.text()}"
    if rng.warn_above:
        text += f"; more than {rng.warn_above} is a warning: {rng.what}"
    return text


def reference():
    """docs/config.md: every key with its default and its valid values, from ``DEFAULTS``,
    ``CHOICES`` and ``RANGES`` (regenerate with ``python config.py > docs/config.md``)."""
    lines = ["# Config keys", "",
             "Generated by `python config.py > docs/config.md` from `config.py` (`DEFAULTS`, `CHOICES`, "
             "`RANGES`), the one place that checks them; `tests/test_config_data.py` checks that this file "
             "is up to date. What each key does: the comments of `DEFAULTS` in `config.py`.", "",
             "A value outside its range is an error naming the key. Floats are finite (`.nan`, `.inf` are "
             "refused) and accept a fraction such as `8/255`. A key given twice in a file is an error. "
             "`prune.rounds` must also rise and end at 1.0; `prune.rate_rounds` must rise and end at the "
             "target's compression rate 1 / (1 - prune.target). A milestone beyond its schedule (its section's "
             "epochs; under `lr_span: run`, after pretraining, the epochs of every stage after pretraining) "
             "is a warning, so that a run shortened with `--set` keeps its config.", "",
             "| key | default | valid values |", "| --- | --- | --- |"]
    for key in _flat_keys(DEFAULTS):
        default = _get(DEFAULTS, key)
        shown = "true" if default is True else "false" if default is False else f"{default!r}".replace("'", "")
        lines.append(f"| `{key}` | `{shown}` | {_valid(key)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(reference())
