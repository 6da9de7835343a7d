"""The files a model comes in: the export's formats, side by side (``FORMATS``, each with
``write(path, exp, model)`` and ``read(path)``): ``torch`` (``torch.save``, the default),
``safetensors`` (raw tensors and a JSON header; loading runs no code by construction),
``pt2`` (a ``torch.export`` program of the compact model) and ``onnx`` (the compact model as an
ONNX graph for onnxruntime, TensorRT and the like; safetensors and onnx need optional packages);
``load_model``, which gives ``eval.py`` the model of a training checkpoint, of outside weights
(``outside.py``) or of an export file, whatever its format; and ``read_checkpoint``, the
checkpoint that ``export.py`` and ``--init`` start from."""
import json
import os
import zipfile

import torch
from torch import nn

from pruning import allocation as allocation_lib
from deploy import channels
from deploy import measure
from pruning import quant
import data as data_lib
from models import outside
from common import UserError, atomic_write, load_file, reading, reads, require, save_checkpoint
from evaluation.report import checkpoint_meta
from deploy.exportfile import (FORMAT, export_checkpoint, input_shape, is_export, model_from_checkpoint,
                               model_from_export, sparsity_report)
from models import model_from_config


@reads("export")
def load_exported(path):
    """(compact model on the CPU in eval mode, config, export dict) of an export file (torch or
    safetensors, recognized by its content)."""
    exp = format_of(path).read(path)
    model, cfg = model_from_export(exp, path)
    return model.eval(), cfg, exp


@reads("checkpoint or export")
def load_model(path, device="cpu", cfg=None):
    """What ``eval.py --ckpt PATH`` needs from a training checkpoint, outside weights (a state
    dict, HYDRA's or HARP's checkpoint: ``cfg``, the user's config, names the architecture) or an
    export file: (model on ``device`` in eval mode, config, meta). meta: "format" ("checkpoint",
    "outside" or "export"), "stage", "adversarial", "sparsity" (the pruned model's
    ``admm.sparsity_report``, also for an export, whose compact layers no longer show the zeros),
    "compression" (``measure.figures``; for a checkpoint the export is built in memory with the
    default storage and not written; None for a model that declares no channel groups) and
    "convergence" (a checkpoint's ADMM residuals and pruned energies by stage,
    ``TrainState.convergence``; empty for an export), and "quantization" (``quant.quantization_meta``
    of the quantized layers; None when none is, and for a checkpoint of an earlier stage)."""
    fmt = format_of(path)
    obj = fmt.read(path) if fmt.name != "safetensors" or SAFETENSORS.is_export(path) else SAFETENSORS.read_plain(path)
    if is_export(obj):
        model, cfg = _exported_model(fmt, obj, path, cfg)
        src = obj.get("source") or {}
        scales = {n: e["scale"] for n, e in (obj.get("quantized") or {}).items()}
        meta = {"format": "export", "stage": src.get("stage"), "adversarial": src.get("adversarial"),
                "convergence": {}, "sparsity": obj["sparsity"],
                "compression": measure.figures(obj, os.path.getsize(path), fmt.name),
                "quantization": None if fmt.name == "pt2" else quant.quantization_meta(model, cfg, src.get("stage"), scales)}
        return model.to(device).eval(), cfg, meta
    obj = checkpoint_of(obj, path, cfg)
    cfg = allocation_lib.resolved_config(obj)  # the ratios the run pruned to, in the sparsity report
    model = model_from_checkpoint(obj, path)
    meta = checkpoint_meta(obj, model, cfg)
    if obj.get("stage") == "outside":  # a state dict, or HYDRA's / HARP's scores read as masks
        meta.update({"format": "outside", "masks": obj.get("masks") or {}})
    if channels.has_channel_groups(model):
        exp, _ = export_checkpoint(obj, path, model=model)  # built in memory, for its size and figures
        meta["sparsity"], meta["compression"] = exp["sparsity"], measure.figures(exp, measure.nbytes_saved(exp))
    else:  # every architecture evaluates; only the compact figures need to know its channel groups
        meta["sparsity"], meta["compression"] = sparsity_report(model, cfg), None
    return model.to(device).eval(), cfg, meta


def _exported_model(fmt, obj, path, cfg):
    """(model, config) of an export file's contents ``obj``; ``cfg`` must be None (an export carries its own)."""
    if cfg is not None:
        raise UserError(f"{path} is an export and carries its own config; drop --config and --set")
    if fmt.name == "pt2":
        model = fmt.model(path)
        outside.refuse_nonfinite(model.state_dict(), path)
        # A program has no Conv2d / Linear modules to resolve the prune ratios on; its sparsity is
        # the one the export recorded (meta["sparsity"]).
        cfg = obj["config"]
        return model, {**cfg, "prune": {**cfg["prune"], "prune_ratios": {}, "target": 0.0}}
    model, cfg = model_from_export(obj, path)
    outside.refuse_nonfinite(model.state_dict(), path)
    return model, cfg


def checkpoint_of(obj, path, cfg=None, model=None, run_config=False):
    """A training checkpoint dict of this project from the loaded file ``obj``: ``obj`` itself when
    it is one (then ``cfg`` must be None, as it carries its own, unless ``run_config``: ``cfg`` is
    the run's, for ``--init``), else the outside weights in it as one (``outside.as_checkpoint``;
    ``cfg`` names the architecture, ``model``: built from it, if already). Weights or buffers with
    NaN or inf are refused."""
    if isinstance(obj, dict) and "model" in obj and "config" in obj and isinstance(obj["config"], dict):
        if cfg is not None and not run_config:
            raise UserError(f"{path} is a checkpoint of this project and carries its own config; "
                            f"drop --config and --set")
        if isinstance(obj["model"], dict):
            outside.refuse_nonfinite(obj["model"], path)
        return obj
    if cfg is None:
        outside.find_state_dict(obj, path)  # weights at all?
        raise UserError(f"{path} holds weights without a config of this project: name the model with "
                        f"--config FILE and --set model.arch=ARCH --set model.width=W (docs/bring_your_own_model.md)")
    if model is None:
        model = model_from_config(cfg, data_lib.INFO[cfg["data"]["dataset"]], "cpu")
    return outside.as_checkpoint(obj, path, cfg, model)


def read_checkpoint(path, cfg=None, purpose="export.py --ckpt", model=None, run_config=False):
    """The training checkpoint dict that ``purpose`` (``export.py --ckpt``, ``--init``) starts
    from: one of this project, or outside weights (``checkpoint_of``). A folder is called a
    folder, and an export an export, with the command that uses it."""
    fmt = format_of(path)
    if fmt.name in ("onnx", "pt2") or (fmt.name == "safetensors" and SAFETENSORS.is_export(path)):
        raise _an_export(path, fmt, purpose)
    obj = SAFETENSORS.read_plain(path) if fmt.name == "safetensors" else load_file(path)
    if is_export(obj):
        raise _an_export(path, fmt, purpose)
    with reading(path):
        return checkpoint_of(obj, path, cfg, model, run_config)


def _an_export(path, fmt, purpose):
    use = {"onnx": "run it with onnxruntime", "pt2": "run it with torch.export.load or evaluate it with "
           f"eval.py --ckpt {path}"}.get(fmt.name, f"evaluate it with eval.py --ckpt {path}")
    return UserError(f"{path} is an export ({fmt.name}, written by export.py), not a training checkpoint: {use}; "
                     f"{purpose} needs a checkpoint or a state dict")


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
    """The export dict as a safetensors file. Layout 2 (header ``"layout": "2"``): the dense
    tensors of the compact model under their own names (``conv1.weight``), so that
    ``safetensors.torch.load_file`` gives the state dict of a compact-storage export; encoded
    tensors under their path in the dict (``sparse/fc1.weight/values``,
    ``quantized/fc1.weight/codes``); the rest of the dict, plain data with ``shapes``, as JSON in
    the header's string metadata (``export``). Layout 1 (no ``layout``) put the dense tensors
    under ``state/``; both are read. Reading parses JSON and raw tensor bytes only, so no code
    can run; a malformed file is a one-line error."""
    name, suffix = "safetensors", ".export.safetensors"
    LAYOUT = "2"

    def write(self, path, exp, model=None):
        st = require("safetensors.torch", "safetensors export", "safetensors")
        plain, tensors = _split_tensors(exp)
        tensors = {k[len("state/"):] if k.startswith("state/") else k: t for k, t in tensors.items()}
        blob = st.save({k: t.contiguous() for k, t in tensors.items()},
                       metadata={"format": FORMAT, "layout": self.LAYOUT, "export": json.dumps(plain)})
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
                for key in f.keys():  # a name without "/" is a dense tensor of the model (layout 2)
                    _put(exp, key.split("/") if "/" in key else ["state", key], f.get_tensor(key))
        except Exception as e:  # noqa: BLE001 - the safetensors parser, JSON and a bad layout raise many types
            raise UserError(f"cannot load {path}: not a valid safetensors export ({_first_line(e)})") from None
        return exp

    def is_export(self, path):
        """Whether the safetensors file at ``path`` says it is an export of this project: its JSON
        header, read alone, names the format (so a damaged export is still called one)."""
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(min(n, 1 << 26)))
            return header.get("__metadata__", {}).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):  # not readable: read_plain() will say why
            return False

    def read_plain(self, path):
        """The tensors of a safetensors file written elsewhere: {name: tensor}."""
        st = require("safetensors.torch", f"reading {path}", "safetensors")
        try:
            return st.load_file(path)
        except Exception as e:  # noqa: BLE001 - the safetensors parser raises many types
            raise UserError(f"cannot load {path}: not a valid safetensors file ({_first_line(e)})") from None

    def recognizes(self, head):
        """A safetensors file starts with its header's length (8 bytes, little-endian) and then the JSON '{'."""
        return len(head) >= 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 2 ** 32


class Pt2File:
    """The compact model as a ``torch.export`` program (``torch.export.save``): aten operators and
    the weights, dense float32 (quantized layers dequantized), with a dynamic batch axis; input
    [N, C, H, W] in [0, 1], output logits. ``torch.export.load(path).module()`` runs it with torch
    alone, differentiably, so ``eval.py`` attacks it. The export dict without tensors is in the
    archive's ``extra/admm-at-export.json``. Its BN layers are in eval mode for good."""
    name, suffix, runtime = "pt2", ".export.pt2", "torch.export"
    storage = "compact"  # the program holds dense tensors
    quantized = False  # dequantized
    runs_outside_torch = False
    EXTRA = f"{FORMAT}.json"

    def write(self, path, exp, model):
        x = torch.zeros(2, *input_shape(exp["config"]))
        program = torch.export.export(model.eval(), (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        extra = {self.EXTRA: json.dumps(_split_tensors(exp)[0])}
        atomic_write(path, lambda f: torch.export.save(program, f, extra_files=extra))

    def read(self, path):
        """The export dict without tensors that the archive carries."""
        return json.loads(self._load(path)[1])

    def model(self, path, threads=1):
        return ProgramModel(self._load(path)[0].module())

    def _load(self, path):
        extra = {self.EXTRA: ""}
        try:
            program = torch.export.load(path, extra_files=extra)
            if not extra[self.EXTRA]:
                raise ValueError(f"no {self.EXTRA} in the archive (write exports with export.py)")
        except Exception as e:  # noqa: BLE001 - the archive reader raises many types
            raise UserError(f"cannot load {path}: not a valid pt2 export ({_first_line(e)})") from None
        return program, extra[self.EXTRA]

    def recognizes(self, head):
        return False  # a zip like a torch file: ``format_of`` looks inside


class ProgramModel(nn.Module):
    """A ``torch.export`` program's module called like a model. ``train()`` / ``eval()`` only set
    the flag: the program was exported in eval mode and its graph does not change with them
    (torch refuses ``eval()`` on it)."""

    def __init__(self, module):
        super().__init__()
        self.program = module

    def forward(self, x):
        return self.program(x)

    def train(self, mode=True):
        self.training = mode
        return self


def _first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


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


FORMATS = {f.name: f for f in (TorchFile(), SafetensorsFile(), Pt2File(), OnnxFile())}
SAFETENSORS = FORMATS["safetensors"]


def format_of(path):
    """The format of the file at ``path``, recognized by its first bytes (torch when none claims
    it); of two zip archives, a pt2 one has an ``archive_format`` entry."""
    head = b""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            head = f.read(9)
    if head.startswith(b"PK") and _is_pt2(path):
        return FORMATS["pt2"]
    return next((f for f in FORMATS.values() if f.recognizes(head)), FORMATS["torch"])


def _is_pt2(path):
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/archive_format") for n in z.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


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
