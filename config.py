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

from common import UserError, read_yaml, strict_yaml_loader
from pruning.plan import STAGES, lr_window, stage_names
from training.losses import LOSSES_OF_METHOD

from configs.schema import (CHOICES, DEFAULTS, MAX_WIDTH, Range, RANGES, STAGE_SECTIONS)  # noqa: F401 - the schema's names, read as config.X


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


def add_model_flags(p, ckpt_help):
    """The flags of a command that reads a model file (``eval.py``, ``export.py``): ``--ckpt``, and
    ``--config`` / ``--set`` for a file that carries no config of its own (``user_config``)."""
    p.add_argument("--ckpt", required=True, help=ckpt_help)
    p.add_argument("--config", help="YAML config naming the model of a file that carries no config of its own")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a value of --config; repeatable (e.g. --set model.arch=wrn --set model.width=10)")


def user_config(args):
    """The config of ``--config`` and ``--set`` (None when neither is given)."""
    return load_config(args.config, args.overrides) if args.config or args.overrides else None


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
