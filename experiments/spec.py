"""Reading a sweep spec: strict YAML (duplicate keys are an error), then checked like a config:
every key known (a mistyped one gets a suggestion), the required ones present, each of its type.

A bad spec is a ``UserError``: one line naming the file and the key.
"""
import difflib
import os

import yaml

from frame import ROOT, UserError

# {key: (types, required)}; a dict value is a section checked the same way.
EVAL = {"attacks": (str, True), "steps": (int, True), "restarts": (int, True), "limit": (int, True),
        "seed": (int, False)}
SPEC = {
    "name": (str, True), "config": (str, True), "dataset": (str, False), "seeds": (list, True),
    "parallel": (int, False), "set": (dict, True), "eval": (EVAL, True), "priority": (list, False),
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


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key written twice in one mapping is an error (a key
    that a merge ``<<: *anchor`` brings in may be written again: that is what merging is for)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *anchor``: its keys give way to the ones written here
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise UserError(f"{self.name}: duplicate key {key!r} on lines {seen[key]} and {line}; keep one")
            seen[key] = line
        self.flatten_mapping(node)  # merge keys first, the mapping's own after them (they win)
        return super().construct_mapping(node, deep)


def load_yaml_strict(path):
    """The YAML document in ``path``, read as UTF-8 text; a duplicate key (at any depth), a file
    that is not text or not YAML is a ``UserError`` of one line."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"{path}: {e.strerror}")
    if b"\0" in raw:
        raise UserError(f"{path}: a binary file, not YAML text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8")
    loader = _StrictLoader(text)
    loader.name = path
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        where = f" (line {e.problem_mark.line + 1})" if getattr(e, "problem_mark", None) else ""
        raise UserError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}".replace("\n", " "))
    finally:
        loader.dispose()


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
    spec = load_yaml_strict(path)
    if not isinstance(spec, dict):
        what = "empty" if spec is None else f"a {type(spec).__name__}"
        raise UserError(f"{path}: a sweep spec is a mapping of keys (name, config, seeds, set, eval, ...), "
                        f"but this file is {what}")
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
