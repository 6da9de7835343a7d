"""The files a model comes in: the export's formats, side by side (``FORMATS``, each with
``write(path, exp, model)`` and ``read(path)``): ``torch`` (``torch.save``, the default),
``safetensors`` (raw tensors and a JSON header; loading runs no code by construction) and
``onnx`` (the compact model as an ONNX graph for onnxruntime, TensorRT and the like; the last two
need optional packages); and ``load_model``, which gives ``eval.py`` the model of a training
checkpoint or of an export file, whatever its format."""
import json
import os

import torch

from pruning import allocation as allocation_lib
from deploy import channels
from deploy import measure
from pruning import quant
from common import UserError, atomic_write, load_file, reads, require, save_checkpoint
from evaluation.report import checkpoint_meta
from deploy.exportfile import (FORMAT, export_checkpoint, input_shape, is_export, model_from_checkpoint,
                               model_from_export, sparsity_report)


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
        scales = {n: e["scale"] for n, e in (obj.get("quantized") or {}).items()}
        meta = {"format": "export", "stage": src.get("stage"), "adversarial": src.get("adversarial"),
                "convergence": {}, "quantization": quant.quantization_meta(model, cfg, src.get("stage"), scales),
                "sparsity": obj["sparsity"], "compression": measure.figures(obj, os.path.getsize(path), fmt.name)}
    else:
        if not isinstance(obj, dict) or "model" not in obj or "config" not in obj:
            raise UserError(f"{path} is neither a checkpoint nor an export written by this project")
        cfg = allocation_lib.resolved_config(obj)  # the ratios the run pruned to, in the sparsity report
        model = model_from_checkpoint(obj, path)
        meta = checkpoint_meta(obj, model, cfg)
        if channels.has_channel_groups(model):
            exp, _ = export_checkpoint(obj, path, model=model)  # built in memory, for its size and figures
            meta["sparsity"], meta["compression"] = exp["sparsity"], measure.figures(exp, measure.nbytes_saved(exp))
        else:  # every architecture evaluates; only the compact figures need to know its channel groups
            meta["sparsity"], meta["compression"] = sparsity_report(model, cfg), None
    return model.to(device).eval(), cfg, meta


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
