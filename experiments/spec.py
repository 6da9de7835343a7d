"""Reading a sweep spec: strict YAML (duplicate keys are an error), then checked like a config:
every key known (a mistyped one gets a suggestion), the required ones present, each of its type.

A bad spec is a ``UserError``: one line naming the file and the key.
"""
import difflib
import os


from common import read_yaml
from frame import ROOT, UserError

# {key: (types, required)}; a dict value is a section checked the same way.
EVAL = {"attacks": (str, True), "steps": (int, True), "restarts": (int, True), "limit": (int, True),
        "seed": (int, False)}
SPEC = {
    "name": (str, True), "config": (str, True), "dataset": (str, False), "seeds": (list, True),
    "parallel": (int, False), "set": (dict, True), "record": (str, False), "eval": (EVAL, True), "priority": (list, False),
    "autoattack": ({"attacks": (str, False), "limit": (int, False), "seeds": (list, False),
                    "cells": (list, False)}, False),
    # findings 1-4 (paper.KEY "widths" asks for them)
    "widths": (list, False), "large_width": (int, False), "small_width": (int, False),
    "prune_to_widths": (list, False), "schemes": (list, False), "admm_epochs": (int, False),
    "retrain_epochs": (int, False),
    # finding 5
    "arena": ({"width": (int, True), "budget": (int, True), "split": (list, True), "targets": (list, True),
               "allocation": (str, True), "methods": (list, True), "uniform": (list, False),
               "rate_rounds": (dict, True), "variants": (dict, False), "sets": (list, False),
               "starts": (dict, False)}, False),
    # finding 6
    "quantization": ({"width": (int, True), "training": (str, True), "bits": (list, True),
                      "methods": (list, True), "epochs": (int, True)}, False),
}
# keys that come together: a spec with the first has all the others
TOGETHER = {"widths": ("large_width", "small_width", "prune_to_widths", "schemes", "admm_epochs", "retrain_epochs")}


def load_yaml_strict(path):
    """The spec in ``path``, read as every YAML file here is (``common.read_yaml``): a key written
    twice, a file that is not UTF-8 text, not YAML or not a mapping is a one-line ``UserError``."""
    return read_yaml(path, "spec")


def _check(section, schema, where, path):
    for key in section:
        if key not in schema:
            close = difflib.get_close_matches(str(key), schema, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(schema)}"
            raise UserError(f"{path}: unknown key {where}{key!r}{hint}")
    for key, (kind, required) in schema.items():
        if key not in section:
            if required:
                raise UserError(f"{path}: missing key {where}{key!r}")
            continue
        value, sub = section[key], isinstance(kind, dict)
        want = dict if sub else kind
        if not isinstance(value, want) or isinstance(value, bool) and want is int:
            raise UserError(f"{path}: {where}{key} must be a {'mapping' if want is dict else want.__name__}, "
                            f"got {type(value).__name__} {value!r}"[:300])
        if sub:
            _check(value, kind, f"{where}{key}.", path)


def load_spec(path):
    """The sweep spec in ``path``, checked (see the module's docstring)."""
    spec = load_yaml_strict(path)  # a mapping, or a UserError
    _check(spec, SPEC, "", path)
    for key, others in TOGETHER.items():
        missing = [k for k in others if key in spec and k not in spec]
        if missing:
            raise UserError(f"{path}: a spec with {key!r} needs {', '.join(map(repr, missing))} too")
    if not os.path.isfile(os.path.join(ROOT, spec["config"])):
        raise UserError(f"{path}: config {spec['config']!r} is not a file (relative to the repository)")
    if "parallel" in spec and spec["parallel"] < 1:
        raise UserError(f"{path}: parallel must be >= 1, got {spec['parallel']}")
    return spec
