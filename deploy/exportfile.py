"""The export file: the export dict of a pruned checkpoint (the compact model's tensors in their
storage encodings, plus what is known about it), its checks, and the model rebuilt from it; and
``load_model``, which gives ``eval.py`` the model of a checkpoint or an export file.

An export dict holds plain data and tensors only: ``format``, ``version``, ``storage``, ``arch``,
``width``, ``dataset``, ``config``, ``source``, ``shapes`` (every tensor of the compact model),
``state`` (dense tensors), ``sparse`` and ``quantized`` (``storage`` encodings), ``channels``,
``sparsity`` and ``figures``. See docs/export.md.

It goes to disk in one of ``FORMATS``, side by side below, each with ``write(path, exp, model)``
and ``read(path)``: ``torch`` (``torch.save``, the default), ``safetensors`` (raw tensors and a
JSON header; loading runs no code by construction) and ``onnx`` (the compact model as an ONNX
graph for onnxruntime, TensorRT and the like). The last two need optional packages.
"""
import json
import os

import torch

import admm as admm_lib
from pruning import allocation as allocation_lib
from deploy import channels
import data as data_lib
from deploy import measure
from pruning import quant
from deploy import storage as storage_lib
from common import UserError, atomic_write, load_file, reads, require, save_checkpoint
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


@reads("export")
def load_exported(path):
    """(compact model on the CPU in eval mode, config, export dict) of an export file (torch or
    safetensors, recognized by its content)."""
    exp = format_of(path).read(path)
    model, cfg = model_from_export(exp, path)
    return model.eval(), cfg, exp


@reads("checkpoint or export")
def load_model(path, device="cpu"):
    """What ``eval.py --ckpt PATH`` needs from a training checkpoint or an export file:
    (model on ``device`` in eval mode, config, meta). meta: "format" ("checkpoint" or "export"),
    "stage", "adversarial", "sparsity" (the pruned model's ``admm.sparsity_report``, also for an
    export, whose compact layers no longer show the zeros), "compression" (``measure.figures``; for a
    checkpoint the export is built in memory with the default storage and not written; None for a
    model that declares no channel groups) and "convergence" (a checkpoint's ADMM residuals and
    pruned energies by stage, ``TrainState.convergence``; empty for an export), and "quantization"
    (``quant.quantization_meta`` of the quantized layers; None when none is, and for a checkpoint of
    an earlier stage)."""
    fmt = format_of(path)
    obj = fmt.read(path)
    if is_export(obj):
        model, cfg = model_from_export(obj, path)
        src = obj.get("source") or {}
        meta = {"format": "export", "stage": src.get("stage"), "adversarial": src.get("adversarial"),
                "sparsity": obj["sparsity"], "convergence": {},
                "compression": measure.figures(obj, os.path.getsize(path), fmt.name)}
        scales = {n: e["scale"] for n, e in (obj.get("quantized") or {}).items()}
        meta["quantization"] = quant.quantization_meta(model, quant.quantized_layers(cfg, meta["stage"], model), scales)
    else:
        if not isinstance(obj, dict) or "model" not in obj or "config" not in obj:
            raise UserError(f"{path} is neither a checkpoint nor an export written by this project")
        cfg = allocation_lib.resolved_config(obj)  # the ratios the run pruned to, in the sparsity report
        model = model_from_checkpoint(obj, path)
        exp = None
        if channels.has_channel_groups(model):
            exp, _ = export_checkpoint(obj, path, model=model)
            sparsity, compression = exp["sparsity"], measure.figures(exp, measure.nbytes_saved(exp))
        else:  # every architecture evaluates; only the compact figures need to know its channel groups
            sparsity, compression = sparsity_report(model, cfg), None
        meta = {"format": "checkpoint", "stage": obj.get("stage"), "adversarial": obj.get("adversarial"),
                "sparsity": sparsity, "compression": compression,
                "convergence": (obj.get("metrics") or {}).get("convergence") or {}}
        meta["quantization"] = quant.quantization_meta(model, quant.quantized_layers(cfg, meta["stage"], model),
                                                       quant.recorded_scales(obj))
    return model.to(device).eval(), cfg, meta


# --------------------------------------------------------------------------- file formats

class TorchFile:
    """The export dict as written by ``torch.save``; read back with ``torch.load(weights_only=True)``,
    whose unpickler accepts tensors and plain data only. Also reads training checkpoints."""
    name, suffix, runtime = "torch", ".export.pt", "PyTorch"
    storage = None  # compact or sparse, as asked (default: by the pruning scheme)
    quantized = True  # a quantized layer is stored as its packed codes
    runs_outside_torch = False

    def write(self, path, exp, model=None):
        save_checkpoint(exp, path)

    def read(self, path):
        return load_file(path)

    def model(self, path, threads=1):
        """The compact model rebuilt from the file, in eval mode: what a user of the file runs.
        (Its threads are torch's, ``torch.set_num_threads``.)"""
        return model_from_export(self.read(path), path)[0].eval()

    def recognizes(self, head):
        return False  # the fallback: anything no other format claims is tried as a torch file


class SafetensorsFile(TorchFile):
    """The export dict as a safetensors file: every tensor under its path in the dict
    (``state/conv1.weight``, ``sparse/fc1.weight/values``, ``quantized/fc1.weight/codes``) and the
    rest of the dict, plain data, as JSON in the header's string metadata (``export``). Reading
    parses JSON and raw tensor bytes only, so no code can run; a malformed file is a one-line error."""
    name, suffix = "safetensors", ".export.safetensors"

    def write(self, path, exp, model=None):
        st = require("safetensors.torch", "safetensors export", "safetensors")
        plain, tensors = _split_tensors(exp)
        blob = st.save({k: t.contiguous() for k, t in tensors.items()},
                       metadata={"format": FORMAT, "export": json.dumps(plain)})
        atomic_write(path, lambda f: f.write(blob))

    def read(self, path):
        st = require("safetensors.torch", f"reading {path}", "safetensors")
        if not os.path.isfile(path):
            raise UserError(f"checkpoint {path} does not exist")
        try:
            with st.safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise ValueError(f"no 'format': {FORMAT!r} in its header (write exports with export.py)")
                exp = json.loads(meta["export"])
                if not isinstance(exp, dict):
                    raise ValueError("its 'export' metadata is not a JSON object")
                for key in f.keys():
                    _put(exp, key.split("/"), f.get_tensor(key))
        except Exception as e:  # noqa: BLE001 - the safetensors parser, JSON and a bad layout raise many types
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UserError(f"cannot load {path}: not a valid safetensors export ({reason})") from None
        return exp

    def recognizes(self, head):
        """A safetensors file starts with its header's length (8 bytes, little-endian) and then the JSON '{'."""
        return len(head) >= 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 2 ** 32


class OnnxFile:
    """The compact model as an ONNX graph with a dynamic batch axis (input ``image`` [N, C, H, W]
    in [0, 1], output ``logits`` [N, classes]); normalization and ``FoldedConv2d``'s constant
    kernels are in the graph. Dense float32 weights: irregular zeros stay as zeros (the win of
    irregular pruning is the sparse formats, not latency) and quantized layers go out dequantized
    (codes x scale in float32, the values the quantized model computes with). The export dict,
    without tensors, is in the graph's metadata (``admm-at-export``)."""
    name, suffix, runtime = "onnx", ".export.onnx", "onnxruntime"
    storage = "compact"  # the graph holds dense tensors
    quantized = False  # dequantized
    runs_outside_torch = True

    def write(self, path, exp, model):
        proto = onnx_graph(model, input_shape(exp["config"]))
        entry = proto.metadata_props.add()
        entry.key, entry.value = FORMAT, json.dumps(_split_tensors(exp)[0])
        atomic_write(path, lambda f: f.write(proto.SerializeToString()))

    def read(self, path):
        raise UserError(f"{path} is an ONNX graph: run it with onnxruntime; eval.py's attacks need the "
                        f"PyTorch model (export it with --format torch or safetensors)")

    def model(self, path, threads=1):
        return OnnxRuntimeModel(path, threads)

    def recognizes(self, head):
        """An ONNX ModelProto starts with field 1, ir_version, a varint: tag byte 0x08 (a torch
        file starts with "PK", a zip, or 0x80, a pickle)."""
        return head[:1] == b"\x08"


def onnx_graph(model, input_shape):
    """The ONNX ModelProto of ``model`` (put in eval mode) for inputs [N, *input_shape], N dynamic,
    by torch's exporter (``torch.export``, which needs onnxscript)."""
    for module in ("onnx", "onnxscript"):
        require(module, "ONNX export", "onnx onnxscript onnxruntime")
    x = torch.zeros(2, *input_shape)
    program = torch.onnx.export(model.eval(), (x,), dynamo=True, input_names=["image"], output_names=["logits"],
                                dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    return program.model_proto


class OnnxRuntimeModel:
    """An onnxruntime CPU session called like a model: float tensor [N, C, H, W] in, logits out.
    ``path``: an ONNX file, or a serialized ModelProto (bytes)."""

    def __init__(self, path, threads=1):
        ort = require("onnxruntime", "running an ONNX export", "onnxruntime")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x):
        return torch.from_numpy(self.session.run(None, {self.input: x.detach().cpu().float().numpy()})[0])

    def eval(self):
        return self


FORMATS = {f.name: f for f in (TorchFile(), SafetensorsFile(), OnnxFile())}


def format_of(path):
    """The format of the file at ``path``, recognized by its first bytes (torch when none claims it)."""
    head = b""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            head = f.read(9)
    return next((f for f in FORMATS.values() if f.recognizes(head)), FORMATS["torch"])


def _split_tensors(obj, prefix=()):
    """(``obj`` without its tensors, {"a/b/c": tensor}) for a dict whose tensors sit in nested dicts."""
    plain, tensors = {}, {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            tensors["/".join((*prefix, k))] = v
        elif isinstance(v, dict):
            plain[k], inner = _split_tensors(v, (*prefix, k))
            tensors.update(inner)
        else:
            plain[k] = v
    return plain, tensors


def _put(obj, keys, value):
    """Set ``obj[k0][k1]...[kn] = value``; every key but the last must lead to a dict, the last must be new."""
    for k in keys[:-1]:
        obj = obj.get(k) if isinstance(obj, dict) else None
    if not isinstance(obj, dict) or keys[-1] in obj:
        raise ValueError(f"tensor {'/'.join(keys)!r} has no place in the export's layout")
    obj[keys[-1]] = value
