"""The export file: the export dict of a pruned checkpoint (the compact model's tensors in their
storage encodings, plus what is known about it), its checks, and the model rebuilt from it.

An export dict holds plain data and tensors only: ``format``, ``version``, ``storage``, ``arch``,
``width``, ``dataset``, ``config``, ``source``, ``shapes`` (every tensor of the compact model),
``state`` (dense tensors), ``sparse`` and ``quantized`` (``storage`` encodings), ``channels``,
``sparsity`` and ``figures``. See docs/export.md. ``deploy.formats`` writes it to disk and reads it back.
"""
import os

import torch

import admm as admm_lib
from pruning import allocation as allocation_lib
from deploy import channels
import data as data_lib
from deploy import measure
from pruning import quant
from deploy import storage as storage_lib
from common import UserError
from models import load_weights, model_from_config

FORMAT = "admm-at-export"  # the "format" entry that marks an export file
VERSION = 2  # 2: quantized layers as packed integer codes ("quantized"); a float export is still written as 1
VERSIONS = (1, 2)  # what this code reads
STORAGES = ("compact", "sparse")


def input_shape(cfg):
    info = data_lib.INFO[cfg["data"]["dataset"]]
    return (info.in_channels, info.image_size, info.image_size)


def payload_bits(exp):
    """Bits of the tensors an export dict stores, as stored: dense tensors at their dtype's size,
    sparse float entries as values + bitmask or int32 index, quantized entries as packed codes
    (rounded up to whole bytes per layer) + bitmask or index + one float32 scale. No file overhead."""
    dense = sum(t.numel() * t.element_size() for t in exp["state"].values())
    return 8 * (dense + sum(storage_lib.sparse_nbytes(e) for e in exp["sparse"].values())
                + sum(storage_lib.quantized_nbytes(e) for e in (exp.get("quantized") or {}).values()))


def export_model(model, cfg, storage="compact", source=None, bits=None, scales=None):
    """The export dict of the pruned ``model`` built from ``cfg`` (plain data and tensors only).

    storage: ``compact`` stores each tensor dense; ``sparse`` stores each conv / linear weight as
    ``storage.encode_sparse`` when that is smaller. Both hold the compact model (channels removed).
    source: what to record about the checkpoint it came from (path, stage, epoch, ...).
    bits: {name: b} of the layers quantized to b bits (``quant.quantized_layers``), stored as
    ``storage.encode_quantized`` (a layer not on its levels stays float); ``scales``: their recorded scales.
    Its figures record ``storage_bits``: {export, dense_float32} (``payload_bits``; dense_float32
    is the dense state dict's); a quantized export (version 2) also the size of the float export of
    the same storage (``bytes.float_export``, ``storage_bits.float_export``).
    """
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
    shape = input_shape(cfg)
    state, kept = channels.compact_state(model, shape)
    dense_fig, small_fig = measure.count(model, shape), measure.count(channels.compact_model(model, shape, state), shape)
    dense_sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    sparse = {}
    if storage == "sparse":
        for name in admm_lib.prunable_weights(model):
            entry = storage_lib.encode_sparse(state[name])
            if storage_lib.sparse_nbytes(entry) < state[name].numel() * state[name].element_size():
                sparse[name] = entry
    exp = {
        "format": FORMAT, "version": 1, "storage": storage,
        "arch": cfg["model"]["arch"], "width": cfg["model"]["width"], "dataset": cfg["data"]["dataset"],
        "config": cfg, "source": dict(source or {}),
        "shapes": {k: list(v.shape) for k, v in state.items()},
        "state": {k: v for k, v in state.items() if k not in sparse},
        "sparse": sparse,
        "channels": kept,
        "sparsity": sparsity_report(model, cfg),
        "figures": {"params": {"dense": dense_fig["params"], "nonzero": dense_fig["nonzero"],
                               "compact": small_fig["params"]},
                    "macs": {"dense": dense_fig["macs"], "nonzero": dense_fig["nonzero_macs"],
                             "compact": small_fig["macs"]},
                    "bytes": {"checkpoint": (source or {}).get("bytes"), "dense": measure.nbytes_saved(dense_sd)}},
    }
    storage_bits = {"export": payload_bits(exp),
                    "dense_float32": 8 * sum(t.numel() * t.element_size() for t in dense_sd.values())}
    quantized = {n: e for n, b in (bits or {}).items() if n in state
                 for e in [storage_lib.encode_quantized(state[n], b, (scales or {}).get(n))] if e is not None}
    if quantized:
        exp["figures"]["bytes"]["float_export"] = measure.nbytes_saved(exp)
        exp["version"], exp["quantized"] = VERSION, quantized
        exp["state"] = {k: v for k, v in exp["state"].items() if k not in quantized}
        exp["sparse"] = {k: v for k, v in exp["sparse"].items() if k not in quantized}
        storage_bits = {**storage_bits, "float_export": storage_bits["export"], "export": payload_bits(exp)}
    exp["figures"]["storage_bits"] = storage_bits
    return exp



def sparsity_report(model, cfg):
    """``admm.sparsity_report`` of ``model`` under ``cfg``'s prune ratios and sparsity type."""
    ratios = admm_lib.resolve_ratios(model, cfg["prune"]["prune_ratios"])
    return admm_lib.sparsity_report(model, ratios, cfg["prune"]["sparsity_type"])


def model_from_checkpoint(ckpt, path):
    """The masked (dense) model of a checkpoint dict, on the CPU."""
    cfg = ckpt["config"]
    model = model_from_config(cfg, data_lib.INFO[cfg["data"]["dataset"]], "cpu")
    load_weights(model, ckpt, path, cfg)
    return model


def export_checkpoint(ckpt, path, storage=None, quantized=True, model=None):
    """(export dict, masked model) of the checkpoint dict ``ckpt`` read from ``path``. storage
    defaults to ``sparse`` for irregular pruning (nothing to remove, much to skip) and ``compact``
    for filter and column pruning. quantized: store a quantize-stage checkpoint's quantized layers
    as packed codes (else as the float32 values they take). model: the masked model, if already built."""
    cfg = allocation_lib.resolved_config(ckpt)  # the ratios the run pruned to, in the sparsity report
    storage = storage or ("sparse" if cfg["prune"]["sparsity_type"] == "irregular" else "compact")
    model = model_from_checkpoint(ckpt, path) if model is None else model
    bits = quant.quantized_layers(cfg, ckpt.get("stage"), model) if quantized else {}
    scales = quant.recorded_scales(ckpt)
    source = {"path": str(path), "stage": ckpt.get("stage"), "epoch": ckpt.get("epoch"),
              "adversarial": ckpt.get("adversarial"), "git": ckpt.get("git"),
              "bytes": os.path.getsize(path) if os.path.isfile(path) else None}
    return export_model(model, cfg, storage, source, bits, scales), model


def is_export(obj):
    return isinstance(obj, dict) and "format" in obj


def model_from_export(exp, path="export"):
    """(compact model on the CPU, config) rebuilt from an export dict; anything malformed is a
    one-line UserError naming ``path`` and the entry."""
    def bad(msg):
        return UserError(f"{path} is not a valid export file: {msg}")

    if not is_export(exp) or exp["format"] != FORMAT:
        raise bad(f"no 'format': {FORMAT!r} entry (write exports with export.py)")
    if exp.get("version") not in VERSIONS:
        raise bad(f"version {exp.get('version')!r}, this code reads versions {', '.join(map(str, VERSIONS))}")
    for key, typ in (("storage", str), ("arch", str), ("config", dict), ("shapes", dict), ("state", dict),
                     ("sparse", dict)):
        if not isinstance(exp.get(key), typ):
            raise bad(f"entry {key!r} is missing or not a {typ.__name__}")
    quantized = exp.get("quantized", {})  # version 1 has none
    if not isinstance(quantized, dict):
        raise bad("entry 'quantized' is not a dict")
    cfg = exp["config"]
    try:
        if cfg["model"]["arch"] != exp["arch"] or cfg["data"]["dataset"] not in data_lib.INFO:
            raise bad("config and arch disagree or the dataset is unknown")
    except (KeyError, TypeError):
        raise bad("config lacks model.arch or data.dataset") from None
    state = {}
    for name, shape in exp["shapes"].items():
        if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise bad(f"'shapes' entry {name!r} is not a list of sizes")
        if name in exp["state"]:
            t = exp["state"][name]
            if not isinstance(t, torch.Tensor):
                raise bad(f"state[{name!r}] is not a tensor")
        elif name in exp["sparse"]:
            try:
                t = storage_lib.decode_sparse(exp["sparse"][name], name)
            except ValueError as e:
                raise bad(str(e)) from None
        elif name in quantized:
            try:
                t = storage_lib.decode_quantized(quantized[name], name)
            except ValueError as e:
                raise bad(str(e)) from None
        else:
            raise bad(f"tensor {name!r} is listed in 'shapes' but stored nowhere")
        if list(t.shape) != list(shape):
            raise bad(f"tensor {name!r} has shape {list(t.shape)}, 'shapes' says {list(shape)}")
        state[name] = t
    extra = (set(exp["state"]) | set(exp["sparse"]) | set(quantized)) - set(exp["shapes"])
    if extra:
        raise bad(f"tensors not listed in 'shapes': {', '.join(sorted(extra))}")
    try:
        model = model_from_config(cfg, data_lib.INFO[cfg["data"]["dataset"]], "cpu")
        channels.fit_to_state(model, state)
        model.load_state_dict(state)
        with torch.no_grad():  # layer shapes must fit together, not only each one
            model.eval()(torch.zeros(1, *input_shape(cfg)))
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise bad(f"the tensors do not make a {exp['arch']} model ({(str(e).splitlines() or [''])[0][:200]})") from None
    return model, cfg
